"""One layer of :class:`~anllm_ext.AnchorCache` (:class:`AnchorLayer`: its K/V buffers) and the slot state that
the cache and all its layers share (:class:`SlotState`: capacity, per-row lengths, columns seen, the current
forward's :class:`WritePlan` and the deferred write of the last updated layer). The cache and its layers talk
only through the SlotState's public members, never through each other's privates."""
from __future__ import annotations

from typing import List, Optional

import torch
from transformers.cache_utils import CacheLayerMixin

from .errors import UnsupportedError


def query_length(query) -> int:
    """``get_mask_sizes`` receives the query length (transformers >= 5.4) or ``cache_position`` (5.0-5.3)."""
    return int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)


class AnchorLayer(CacheLayerMixin):
    """K/V buffers of one layer; the slot bookkeeping is the shared :class:`SlotState`.

    ``keys`` / ``values``: [B, Hkv, capacity, D] (None before the first forward); row b's first
    ``state.lengths_host[b]`` slots are the kept ones. ``get_seq_length()``: the state's columns seen.
    ``index``: the layer's place in the cache (0 = first layer)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, state: "SlotState", index: int):
        super().__init__()
        self.state = state
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        cap = self.state.capacity
        self.device = key_states.device
        self.keys = key_states.new_empty(B, H, cap, D)
        self.values = value_states.new_empty(B, value_states.shape[1], cap, value_states.shape[3])
        self.is_initialized = True

    def _grow(self, cap: int, used: int) -> None:
        for name in ("keys", "values"):
            old = getattr(self, name)
            B, H, _, D = old.shape
            new = old.new_empty(B, H, cap, D)
            if used:
                new[:, :, :used].copy_(old[:, :, :used])
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Reserve this layer's slots for the new tokens and return the new tokens' keys/values.

        The write itself is deferred to the attention call, which writes and attends in one op
        (``anchor_attention_append_``); the attention function recognises the returned tensors.
        """
        state = self.state
        plan = state.require_plan()
        if key_states.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("AnchorCache is for inference: run under torch.no_grad() / torch.inference_mode()")
        if torch.is_autocast_enabled(key_states.device.type):
            # RoPE can leave the keys in fp32 while the values are in the autocast dtype: store (and attend
            # in) the autocast dtype, as the attention function does.
            dtype = torch.get_autocast_dtype(key_states.device.type)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[0] != key_states.shape[0]:
            raise ValueError(f"batch size {key_states.shape[0]} != cache batch size {self.keys.shape[0]}")
        if self.keys.shape[2] != state.capacity:
            self._grow(state.capacity, plan.used_before)
        state.defer_write(self, key_states, value_states)
        return key_states, value_states

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, plan: "WritePlan") -> None:
        """Write the new tokens' keys/values at each row's offset (the unfused path)."""
        T = key_states.shape[2]
        if plan.index is None:  # all rows equally long: the chunk starts at used_before in every row
            self.keys.narrow(2, plan.used_before, T).copy_(key_states)
            self.values.narrow(2, plan.used_before, T).copy_(value_states)
        else:
            B, H, _, D = key_states.shape
            idx = plan.index[:, None, :, None]
            self.keys.scatter_(2, idx.expand(B, H, T, D), key_states.to(self.keys.dtype))
            self.values.scatter_(
                2, idx.expand(B, value_states.shape[1], T, value_states.shape[3]), value_states.to(self.values.dtype)
            )

    def get_seq_length(self) -> int:
        return self.state.seen_tokens

    def get_mask_sizes(self, query_length_or_positions):
        return self.state.seen_tokens + query_length(query_length_or_positions), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of get_max_length in transformers < 5.13
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedError("AnchorCache drops tokens as it goes and cannot be cropped (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


class WritePlan:
    """Where the chunk of the current forward goes: ``offsets[b]`` is row b's first new slot. ``index``
    [B, T] holds every new slot when rows differ in length (None when all start at ``used_before``)."""

    __slots__ = ("offsets", "index", "end", "used_before")

    def __init__(self, offsets, index, end, used_before):
        self.offsets, self.index, self.end, self.used_before = offsets, index, end, used_before


class SlotState:
    """What an :class:`~anllm_ext.AnchorCache` and its layers share: the slot capacity per row, the batch,
    the input columns seen, the slots in use per row (``lengths`` on the device, ``lengths_host`` as ints),
    the per-slot layout buffers ``slots`` (positions, segments, is_anchor, valid: [B, capacity]), where the
    next chunk starts, the current forward's :class:`WritePlan` (None outside a forward) and the deferred
    write of the last layer whose ``update`` ran but whose attention call has not yet written its tokens."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.capacity = 0
        self.batch: Optional[int] = None
        self.seen_tokens = 0
        self.plan: Optional[WritePlan] = None
        self.pending = None  # (layer, new keys, new values)
        self.lengths: Optional[torch.Tensor] = None  # int64 [B]
        self.lengths_host: List[int] = []
        self.slots: Optional[List[torch.Tensor]] = None
        self.start = None  # LayoutStart of the next chunk

    def require_plan(self) -> WritePlan:
        """The current forward's plan; raises when no forward is under way."""
        if self.plan is None:
            raise RuntimeError(
                "AnchorCache.update called outside a forward: a model patched by anllm_ext.patch(model, anchor_ids) "
                "drives the cache; a model of your own calls begin_forward(chunk layout) first, then per layer "
                "update + attend, then end_forward (see AnchorCache's docstring)"
            )
        return self.plan

    def defer_write(self, layer: AnchorLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Hold ``layer``'s new keys/values until its attention call writes them (a layer whose attention
        never ran gets its tokens written now)."""
        self.flush_pending()
        self.pending = (layer, key_states, value_states)

    def take_pending(self, key: torch.Tensor, value: torch.Tensor) -> Optional[AnchorLayer]:
        """The layer whose update returned exactly ``key``/``value`` (its write still deferred), or None.
        The caller then owes the write."""
        pending = self.pending
        if pending is None or pending[1] is not key or pending[2] is not value:
            return None
        self.pending = None
        return pending[0]

    def flush_pending(self) -> None:
        """Write the deferred keys/values of the last updated layer (when no fused attention call did)."""
        if self.pending is not None:
            layer, k, v = self.pending
            self.pending = None
            layer.write(k, v, self.plan)
