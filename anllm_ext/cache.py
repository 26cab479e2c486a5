"""AnchorCache: a transformers ``Cache`` that keeps only anchors + the open segment (see docs/method.md).

Storage, per layer: preallocated K/V buffers [B, Hkv, Cap, D]; shared by all layers: per-slot layout
buffers [B, Cap] (true absolute position, segment, anchor flag, validity) and per-row lengths. The
capacity grows geometrically (``growth``) when a forward needs more slots. New tokens are written in
place at each row's own offset (a slice copy when all rows have the same length, ``scatter_``
otherwise). After every forward the cache commits the new tokens and, when the chunk contained an
anchor or padding, compacts all layers in place in one call (``compact_kv_`` + ``compact_slots_``)
keeping ``valid & (is_anchor | segment == row's open segment)`` (``recent=N``: ``segment >= open - N``).
Padding therefore never stays in the cache, and rows of a batch have their own lengths.

The protocol with a model (these public methods are all :func:`anllm_ext.patch`'s hooks use, and all a model
of your own needs to use the cache without the patch; python_tests/test_anchor_cache.py drives it that way):

1. before the layers run, the patch's pre-hook asks :meth:`AnchorCache.next_start` where the chunk starts
   in every row, computes the chunk's layout and calls :meth:`AnchorCache.begin_forward`, which reserves
   the slots and returns the layout of every key the chunk attends to;
2. in each layer, transformers calls the layer's ``update`` (it returns the new keys/values and defers
   their write), then the attention function calls :meth:`AnchorCache.attend`, which writes them into the
   layer's slots and attends in one op (``anchor_attention_append_``);
3. after the forward the patch's post-hook calls :meth:`AnchorCache.end_forward`: commit, then compact.

What the transformers ``Cache`` API returns here, for every cache (an empty one included):

- ``get_seq_length()``: the number of input columns the cache has seen (padding included; 0 when empty),
  what a full cache would hold, so that transformers' ``generate`` slices its inputs correctly; it is
  not the number of slots kept (:meth:`AnchorCache.lengths`, ``stats()["kept_slots"]``);
- ``cache.layers[i].keys`` / ``.values``: layer i's preallocated buffer [B, Hkv, capacity, D] (None before
  the first forward); in row b only the first ``lengths()[b]`` slots hold kept keys/values, in the order
  of :meth:`AnchorCache.kept_layout`, the rest is scratch;
- ``stats()``: the memory figures (keys documented there).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from transformers.cache_utils import Cache

from .cache_layer import AnchorLayer, SlotState, WritePlan, query_length
from .errors import UnsupportedError
from .layout import Layout, LayoutStart
from .ops import _scale_for, anchor_attention_append_, anchor_attention_append_with_lse_, compact_kv_, compact_slots_
from .recall import RecallConfig, RecallState, merge_partial_attentions
from .recent import attend_window, plan_window

_ALIGN = 64


def _round_up(n: int, m: int = _ALIGN) -> int:
    return ((n + m - 1) // m) * m


def check_full_attention_layers(config, who: str) -> None:
    """Raise :class:`~anllm_ext.UnsupportedError` when the text config of ``config`` has layers that are
    not full attention (``who``: what refuses them, for the message)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or []
    bad = sorted(set(t for t in layer_types if t != "full_attention"))
    if bad:
        raise UnsupportedError(
            f"{who} supports full-attention layers only; the model has layer types {bad} (sliding-window / "
            "linear-attention layers would not see the keys the AnSAN mask allows)"
        )


class AnchorCache(Cache):
    """KV cache for anchor-based inference. Pass it as ``cache=`` to a patched model or to ``generate``.

    Args:
        config: the model's config, or the model itself (gives the number of layers; checks that all
            layers are full attention). Without it, layers are created on first use.
        initial_capacity: slots allocated on the first forward (at least the first chunk's length).
        growth: factor by which the capacity grows when a forward needs more slots.
        compact: compact after every forward (default True). False keeps everything (a full cache
            with the anchor layout; for tests and comparisons).
        recall: a :class:`~anllm_ext.recall.RecallConfig`: evicted segments go to a cold store and every
            forward's non-anchor queries also attend over the few segments chosen through their anchors
            (anllm_ext/recall.py). None (default): evicted segments are dropped.
        recent: keep the tokens of the ``recent`` sentences closed last hot too, and let every non-anchor query
            read the ``recent`` sentences before its own (anllm_ext/recent.py): more KV for a smaller loss. The
            exact one-pass equivalent is the mask ``anllm_ext.reference.ansan_mask(..., recent=recent)``. 0
            (default): anchors and the open sentence only. With ``recall`` too, the sentences that leave the
            window go to the cold store and recall chooses among them.
    """

    def __init__(self, config=None, initial_capacity: int = 256, growth: float = 1.25, compact: bool = True,
                 recall: Optional[RecallConfig] = None, recent: int = 0):
        from .checks import check_int

        if recall is not None and not isinstance(recall, RecallConfig):
            raise TypeError(f"recall must be an anllm_ext.RecallConfig or None, got {type(recall).__name__}")
        if recall is not None and not compact:
            raise ValueError("recall needs compact=True: a cache that never compacts evicts nothing to recall")
        self.recent = check_int("recent", recent, 0)
        if self.recent and not compact:
            raise ValueError("recent needs compact=True: a cache that never compacts keeps every sentence already")
        self.recall = None if recall is None else RecallState(recall)

        if not isinstance(growth, (int, float)) or isinstance(growth, bool) or not growth > 1.0:
            raise ValueError(f"growth must be a number > 1, got {growth!r}")
        self.initial_capacity = check_int("initial_capacity", initial_capacity, 1)
        self.growth = float(growth)
        self.compact = bool(compact)
        if isinstance(config, torch.nn.Module):  # AnchorCache(model) as well as AnchorCache(model.config)
            config = getattr(config, "config", None)
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            if not isinstance(getattr(text, "num_hidden_layers", None), int):
                raise TypeError(
                    f"AnchorCache(config) takes a transformers model config with num_hidden_layers (pass "
                    f"model.config, or the model), got {type(config).__name__}"
                )
            check_full_attention_layers(text, "AnchorCache")
            if recall is not None and recall.layers and max(recall.layers) >= text.num_hidden_layers:
                raise ValueError(f"RecallConfig.layers {list(recall.layers)} name a layer the model does not have "
                                 f"(it has {text.num_hidden_layers}: 0..{text.num_hidden_layers - 1})")
        self.state = SlotState()  # shared with every layer: capacity, lengths, plan, deferred write
        if config is not None:
            super().__init__(layers=[AnchorLayer(self.state, i) for i in range(text.num_hidden_layers)])
        else:
            super().__init__(layer_class_to_replicate=lambda: AnchorLayer(self.state, len(self.layers)))
        self._clear_state()

    # The slot state's figures, under the names the cache has always had.
    capacity = property(lambda self: self.state.capacity)
    batch = property(lambda self: self.state.batch)
    seen_tokens = property(lambda self: self.state.seen_tokens)

    def _clear_state(self):
        self.state.clear()
        if self.recall is not None:
            self.recall.clear()
        self.peak_slots = 0  # max over forwards of the slots in use (all rows) right after appending
        self.peak_capacity = 0
        self.compactions = 0
        self.window = None  # the recent-sentence part of the current forward (a WindowPlan), if any
        self.callbacks = []  # called as fn(cache, n_new_columns) after every committed forward

    # ---------------------------------------------------------------- the protocol with a patched model
    def next_start(self) -> Optional[LayoutStart]:
        """Where the next chunk starts in every row (None before the first forward)."""
        return self.state.start

    def begin_forward(self, q: Layout) -> Layout:
        """Reserve slots for the chunk ``q`` and write its layout; returns the layout of all keys."""
        B, T = q.positions.shape
        device = q.positions.device
        st = self.state
        if st.slots is None:
            st.batch = B
            st.capacity = _round_up(max(self.initial_capacity, T))
            st.slots = [
                torch.zeros(B, st.capacity, dtype=torch.int64, device=device),
                torch.zeros(B, st.capacity, dtype=torch.int32, device=device),
                torch.zeros(B, st.capacity, dtype=torch.bool, device=device),
                torch.zeros(B, st.capacity, dtype=torch.bool, device=device),
            ]
            st.lengths = torch.zeros(B, dtype=torch.int64, device=device)
            st.lengths_host = [0] * B
        elif B != st.batch:
            raise ValueError(f"AnchorCache holds a batch of {st.batch} rows, got a chunk of {B} rows")
        used = max(st.lengths_host)
        end = used + T
        if end > st.capacity:
            self._grow_slots(_round_up(max(end, int(math.ceil(st.capacity * self.growth)))), used)
        if min(st.lengths_host) == used:  # all rows equally long: plain slice copies
            for buf, t in zip(st.slots, q.as_tuple()):
                buf.narrow(1, used, T).copy_(t)
            plan = WritePlan(list(st.lengths_host), None, end, used)
        else:
            index = st.lengths[:, None] + torch.arange(T, device=device)[None, :]
            for buf, t in zip(st.slots, q.as_tuple()):
                buf.scatter_(1, index, t.to(buf.dtype))
            plan = WritePlan(list(st.lengths_host), index, end, used)
        st.plan = plan
        st.pending = None
        if self.recall is not None:
            self.recall.begin_forward()
        k_layout = Layout(*(buf.narrow(1, 0, end).contiguous() for buf in st.slots))
        self.window = plan_window(q, k_layout, self.recent) if self.recent else None
        self.peak_slots = max(self.peak_slots, sum(st.lengths_host) + B * T)
        self.peak_capacity = max(self.peak_capacity, st.capacity)
        return k_layout

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_layout: Layout,
               k_layout: Layout, scaling: Optional[float] = None) -> Optional[torch.Tensor]:
        """One layer's attention of this forward, against the cache: writes ``key``/``value`` (the new
        tokens' keys/values that the layer's ``update`` returned) into that layer's slots and attends the
        queries [B, Hq, T, D] over the kept slots + the new tokens under the AnSAN mask, in one op.

        ``q_layout``: the chunk's layout; ``k_layout``: what :meth:`begin_forward` returned. Returns the
        attention output [B, Hq, T, D], or None when ``key``/``value`` are not the tensors an ``update`` of
        this forward returned (the caller then cannot place them in the cache)."""
        layer = self.take_pending(key, value)
        if layer is None:
            return None
        if self.recall is None and self.window is None:
            return anchor_attention_append_(query, key, value, layer.keys, layer.values, self.state.plan.offsets,
                                            q_layout, k_layout, scaling)
        scale = _scale_for(query, scaling)
        out, lse = anchor_attention_append_with_lse_(query, key, value, layer.keys, layer.values,
                                                     self.state.plan.offsets, q_layout, k_layout, scale)
        if self.window is not None:  # the op has written the new keys: the window may include them
            out_w, lse_w = attend_window(query, layer.keys, layer.values, self.window, scale)
            out, lse = merge_partial_attentions(out, lse, out_w, lse_w, with_lse=True)
        if self.recall is None:
            return out
        return self.recall.attend(layer, query, out, lse, q_layout, k_layout, scale)

    def take_pending(self, key: torch.Tensor, value: torch.Tensor):
        """The layer whose update returned exactly ``key``/``value`` (its write still deferred), or None.
        The caller then owes the write: it must pass them to ``anchor_attention_append_``."""
        return self.state.take_pending(key, value)

    def flush_pending(self) -> None:
        """Write the deferred keys/values of the last updated layer (when no fused attention call did)."""
        self.state.flush_pending()

    def end_forward(self, q: Layout) -> None:
        """Commit the chunk ``q`` (after all layers ran) and compact if it closed a segment or had padding."""
        st = self.state
        if st.plan is None:
            return
        st.flush_pending()
        st.plan = None
        self.window = None
        T = q.positions.shape[1]
        st.lengths += T
        st.lengths_host = [n + T for n in st.lengths_host]
        st.seen_tokens += T
        st.start = q.next_start() if T > 0 else st.start
        if self.compact and T > 0 and q.has_boundary():
            self._compact()
        for fn in self.callbacks:
            fn(self, T)

    def _grow_slots(self, cap: int, used: int) -> None:
        st = self.state
        new = []
        for buf in st.slots:
            b = buf.new_zeros(buf.shape[0], cap)
            b[:, :used].copy_(buf[:, :used])
            new.append(b)
        st.slots = new
        st.capacity = cap  # K/V buffers follow lazily in AnchorLayer.update

    def _compact(self) -> None:
        st = self.state
        pos, seg, anc, val = st.slots
        open_seg = st.start.segment.to(seg.dtype)
        keep = val & (anc | (seg >= open_seg[:, None] - self.recent))
        layers = [l for l in self.layers if isinstance(l, AnchorLayer) and l.is_initialized]
        if self.recall is not None:
            in_use = torch.arange(st.capacity, device=val.device)[None, :] < st.lengths[:, None]
            self.recall.evict(in_use & ~keep, st.slots, layers)
        new_lengths = compact_kv_([l.keys for l in layers], [l.values for l in layers], keep, st.lengths)
        compact_slots_(st.slots, keep, st.lengths)
        st.lengths = new_lengths
        st.lengths_host = new_lengths.tolist()
        val &= torch.arange(st.capacity, device=val.device)[None, :] < new_lengths[:, None]
        self.compactions += 1

    # ---------------------------------------------------------------- transformers Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns seen so far, padding included (0 for an empty cache): not the slots kept."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length_or_positions, layer_idx: int = 0):
        return self.seen_tokens + query_length(query_length_or_positions), 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # the name of get_max_length in transformers < 5.13
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedError(
            "AnchorCache drops tokens as it goes and cannot be cropped (assisted/speculative decoding is unsupported)"
        )

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self._clear_state()

    def _select_rows(self, index: torch.Tensor) -> None:
        st = self.state
        if st.slots is None:
            return
        index = index.to(st.slots[0].device)
        for layer in self.layers:
            if isinstance(layer, AnchorLayer):
                layer.reorder_cache(index)
        st.slots = [s.index_select(0, index) for s in st.slots]
        st.lengths = st.lengths.index_select(0, index)
        st.lengths_host = st.lengths.tolist()
        if st.start is not None:
            st.start = LayoutStart(*(t.index_select(0, index) for t in st.start))
        st.batch = int(index.numel())
        if self.recall is not None:
            self.recall.select_rows(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow ``beam_idx`` (K/V, layouts, lengths)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(torch.as_tensor(indices).reshape(-1).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state.slots is None:
            return
        idx = torch.arange(self.batch, device=self.state.slots[0].device).repeat_interleave(repeats)
        self._select_rows(idx)

    # ---------------------------------------------------------------- inspection
    def lengths(self) -> List[int]:
        """Slots in use per row (anchors + open segment after a compaction; + the recent sentences)."""
        return list(self.state.lengths_host)

    def kept_layout(self, row: int = 0) -> Layout:
        """Layout of the slots row ``row`` keeps (for inspection and tests)."""
        n = self.state.lengths_host[row]
        return Layout(*(s[row : row + 1, :n] for s in self.state.slots))

    def _slot_bytes(self) -> int:
        """K + V bytes of one slot of one row, all layers."""
        total = 0
        for l in self.layers:
            if isinstance(l, AnchorLayer) and l.is_initialized:
                total += (l.keys.shape[1] * l.keys.shape[3]) * l.keys.element_size()
                total += (l.values.shape[1] * l.values.shape[3]) * l.values.element_size()
        return total

    def stats(self) -> Dict[str, object]:
        """Kept slots, KV bytes (kept / peak in use / allocated) and the reduction vs. a full cache.

        Keys (the same for an empty cache, then all zero / empty): ``batch`` (rows), ``tokens_seen``
        (= ``get_seq_length()``), ``kept_slots`` (per row, = :meth:`lengths`), ``capacity`` (slots allocated per
        row), ``kv_bytes`` (K+V of the kept slots, all layers), ``peak_kv_bytes`` (the most in use at once,
        right after a chunk was appended), ``allocated_kv_bytes`` / ``peak_allocated_kv_bytes`` (the buffers,
        now / at most), ``full_cache_slots`` (per row, the real tokens seen: what a full cache would keep,
        padding excluded), ``full_kv_bytes`` (their K+V bytes), ``reduction`` (1 - kept / full slots) and
        ``compactions`` (how many times the cache compacted).

        With recall, also the hot / cold split: ``cold_slots`` (per row, evicted tokens kept cold),
        ``cold_kv_bytes``, ``recalled_slots`` (per row, the most tokens a layer recalled in the last forward),
        ``recalled_kv_bytes`` (all layers, last forward), ``hot_kv_bytes`` (= ``kv_bytes`` + ``recalled_kv_bytes``)
        and ``hot_fraction`` ((kept + recalled slots) / full-cache slots)."""
        figures = self._cache_stats()
        if self.recall is not None:
            figures.update(self.recall.stats())
            figures["hot_kv_bytes"] = figures["kv_bytes"] + figures["recalled_kv_bytes"]
            hot = sum(figures["kept_slots"]) + sum(figures["recalled_slots"])
            full = sum(figures["full_cache_slots"])
            figures["hot_fraction"] = hot / full if full else 0.0
        return figures

    def _cache_stats(self) -> Dict[str, object]:
        if self.state.slots is None:
            return {"batch": 0, "tokens_seen": 0, "kept_slots": [], "capacity": 0, "kv_bytes": 0, "peak_kv_bytes": 0,
                    "allocated_kv_bytes": 0, "peak_allocated_kv_bytes": 0, "full_cache_slots": [],
                    "full_kv_bytes": 0, "reduction": 0.0, "compactions": 0}
        slot_bytes = self._slot_bytes()
        kept = list(self.state.lengths_host)
        full = self.state.start.position.tolist() if self.state.start is not None else [0] * self.batch
        return {
            "batch": self.batch,
            "tokens_seen": self.seen_tokens,
            "kept_slots": kept,
            "capacity": self.capacity,
            "kv_bytes": sum(kept) * slot_bytes,
            "peak_kv_bytes": self.peak_slots * slot_bytes,
            "allocated_kv_bytes": self.batch * self.capacity * slot_bytes,
            "peak_allocated_kv_bytes": self.batch * self.peak_capacity * slot_bytes,
            "full_cache_slots": full,  # real tokens seen per row: what a full cache keeps (padding excluded)
            "full_kv_bytes": sum(full) * slot_bytes,
            "reduction": (1.0 - sum(kept) / sum(full)) if sum(full) else 0.0,
            "compactions": self.compactions,
        }

    def __repr__(self):
        return f"AnchorCache(layers={len(self.layers)}, batch={self.batch}, kept={self.state.lengths_host}, capacity={self.capacity})"


def cache_kv_bytes(cache) -> int:
    """Bytes of K/V a transformers cache holds right now (AnchorCache: the slots in use)."""
    if isinstance(cache, AnchorCache):
        return int(cache.stats()["kv_bytes"])
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
