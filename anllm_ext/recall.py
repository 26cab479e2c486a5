"""Anchor-indexed recall: the sentences an :class:`~anllm_ext.AnchorCache` evicts are kept in a cold
store, and the queries of a forward get a few of them back, chosen through their anchors.

Per layer and per forward (see :meth:`RecallState.attend`):

1. the queries attend over the hot cache (anchors + open segment + the new tokens) as without recall, which
   also gives each query's log-sum-exp ``lse``;
2. every closed segment with evicted tokens is scored by the attention the forward's non-anchor queries would
   give it: with ``index="anchor"``, the probability its anchor (hot) receives, ``exp(q . k_anchor * scale - lse)``;
   with ``index="tokens"``, the probabilities its evicted tokens' own keys (cold) would receive, summed over the
   segment (or the largest, for ``score="peak"``). Either is summed over queries, then over heads
   (``score="mass"``) or the largest head's (``score="max"``), or the largest of any query and head
   (``score="peak"``); the ``budget`` best segments with a positive score are recalled;
3. the queries attend over the recalled segments' evicted tokens at their true positions (the op takes any key
   layout: the recalled keys are flagged as anchors, so exactly the non-anchor queries see them, as they see
   anchors), and the two partial attentions are merged by their log-sum-exp.

So a non-anchor query sees: the AnSAN mask's keys + every evicted token of the segments its forward recalled;
an anchor query sees what it sees without recall (it summarises its own segment only). The dense oracle is
:func:`anllm_ext.reference.recall_attention_ref`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .layout import Layout
from .ops import anchor_attention_with_lse

EVERY = ("token", "sentence", "prompt")
_UNCHOSEN = object()  # no choice made since the last compaction
SCORES = ("mass", "max", "peak")
POOLS = ("layer", "running", "layers")
INDEXES = ("anchor", "tokens")
_QUERY_BLOCK = 256  # queries scored against the cold keys at a time (bounds the probabilities' memory)


@dataclass(frozen=True)
class RecallConfig:
    """Settings of anchor-indexed recall.

    Args:
        budget: sentences (closed segments) recalled per row, per layer, per forward (>= 1).
        every: ``"token"``: every forward (each decode step, each prefill chunk) chooses anew;
            ``"sentence"``: a forward chooses only when the cache compacted since the last choice (a sentence
            closed), later forwards reuse the recalled keys; ``"prompt"``: a forward of several tokens (the
            prompt, or each chunk of it: ``anllm_ext.generate`` cuts the chunks from the end, so the last one
            holds the prompt's last ``prefill_chunk`` tokens, the question) chooses, one-token forwards
            (decoding) keep the last choice, so the answer reads what the question's tokens recalled.
        score: how a segment's anchor is scored from the attention probabilities the forward's non-anchor
            queries give it: ``"mass"`` (summed over queries and heads), ``"max"`` (summed over queries, the
            largest head's) or ``"peak"`` (the largest of any query and head: one query that looks at it is
            enough, e.g. a name in the question).
        index: what a segment is found by: ``"anchor"``, the attention its anchor gets (one hot key per
            segment, the anchor the model trained to summarise it); ``"tokens"``, the attention its evicted tokens'
            own keys would get (every cold key is read at each choice: a scan of the cold store, as costly as
            attending it, so pair it with ``every="prompt"`` or ``"sentence"``).
        pool: ``"layer"``: each layer chooses by its own scores; ``"running"``: layer l chooses by the sum over
            layers 0..l of this forward of each layer's scores normalised to sum 1 over the candidates (later
            layers use the evidence of earlier ones; still one pass, causal over layers); ``"layers"``: the same
            sum over the listed ``layers`` only (those whose choice finds what later text asks for, e.g. the
            model's retrieval layers, found by ``anllm recall-layers``); a layer before the first listed one
            chooses by its own scores.
        layers: the layer indices ``pool="layers"`` sums (and only it takes them).
        question: with ``every="prompt"``: decoding also recalls every sentence the prompt's last forward closed
            (the question and what precedes it in that chunk: without it the answer would read them through
            their anchors only, their tokens being evicted when the prompt ends). That forward itself sees what
            it chose, as without it.
        cold_device: where the evicted K/V live (e.g. ``"cpu"`` for host memory beside a GPU); None: beside the
            hot cache.
    """

    budget: int = 4
    every: str = "token"
    score: str = "mass"
    index: str = "anchor"
    pool: str = "layer"
    layers: Optional[Tuple[int, ...]] = None
    question: bool = False
    cold_device: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"RecallConfig.budget must be an integer >= 1 (sentences per step), got {self.budget!r}")
        if self.every not in EVERY:
            raise ValueError(f"RecallConfig.every must be one of {EVERY}, got {self.every!r}")
        if self.score not in SCORES:
            raise ValueError(f"RecallConfig.score must be one of {SCORES}, got {self.score!r}")
        if self.index not in INDEXES:
            raise ValueError(f"RecallConfig.index must be one of {INDEXES}, got {self.index!r}")
        if self.pool not in POOLS:
            raise ValueError(f"RecallConfig.pool must be one of {POOLS}, got {self.pool!r}")
        if (self.pool == "layers") != (self.layers is not None):
            raise ValueError("RecallConfig.layers goes with pool='layers' (and it needs them): got "
                             f"pool={self.pool!r}, layers={self.layers!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(l, int) or isinstance(l, bool) or l < 0 for l in layers):
                raise ValueError(f"RecallConfig.layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if not isinstance(self.question, bool):
            raise ValueError(f"RecallConfig.question must be True or False, got {self.question!r}")
        if self.question and self.every != "prompt":
            raise ValueError(f"RecallConfig.question=True goes with every='prompt' (what decoding keeps), got "
                             f"every={self.every!r}")
        if self.cold_device is not None:
            torch.device(self.cold_device)  # raises on a bad name


class ColdStore:
    """Evicted tokens of every row: their K/V per layer ([B, Hkv, capacity, D]) and their true positions and
    segments ([B, capacity]); row b holds ``lengths[b]`` tokens in eviction (= position) order."""

    def __init__(self, device=None):
        self.device = None if device is None else torch.device(device)
        self.clear()

    def clear(self) -> None:
        self.keys: Dict[int, torch.Tensor] = {}
        self.values: Dict[int, torch.Tensor] = {}
        self.positions: Optional[torch.Tensor] = None
        self.segments: Optional[torch.Tensor] = None
        self.lengths: List[int] = []

    @property
    def capacity(self) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def add(self, drop: torch.Tensor, slots: List[torch.Tensor], layers) -> None:
        """Move the hot slots ``drop`` [B, Cap] marks (before the compaction that removes them) into the store:
        their layout from ``slots`` (positions, segments, ...) and every initialised layer's K/V."""
        rows = [d.nonzero().squeeze(1) for d in drop]
        counts = [int(r.numel()) for r in rows]
        if not any(counts):
            return
        B = drop.shape[0]
        if self.positions is None:
            self.lengths = [0] * B
        self._reserve(max(n + c for n, c in zip(self.lengths, counts)), slots[0].device, layers)
        for b, (idx, n, c) in enumerate(zip(rows, self.lengths, counts)):
            if c == 0:
                continue
            self.positions[b, n : n + c] = slots[0][b, idx].to(self.positions.device)
            self.segments[b, n : n + c] = slots[1][b, idx].to(self.segments.device)
            for layer in layers:
                self.keys[layer.index][b, :, n : n + c] = layer.keys[b, :, idx].to(self.keys[layer.index].device)
                self.values[layer.index][b, :, n : n + c] = layer.values[b, :, idx].to(self.values[layer.index].device)
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]

    def _reserve(self, need: int, hot_device, layers) -> None:
        """Grow every buffer to at least ``need`` slots (geometrically, so appends stay amortised O(1))."""
        if need <= self.capacity and all(l.index in self.keys for l in layers):
            return
        cap = max(need, 2 * self.capacity, 64)
        device = self.device or hot_device
        B = len(self.lengths)
        self.positions = _grown(self.positions, (B, cap), torch.int64, device)
        self.segments = _grown(self.segments, (B, cap), torch.int64, device)
        for layer in layers:
            H, D = layer.keys.shape[1], layer.keys.shape[3]
            for store, hot in ((self.keys, layer.keys), (self.values, layer.values)):
                store[layer.index] = _grown(store.get(layer.index), (B, hot.shape[1], cap, hot.shape[3]),
                                            hot.dtype, device)

    def gather(self, layer_index: int, chosen: List[torch.Tensor], device):
        """K/V [B, Hkv, R, D] and the layout of every stored token of the segments ``chosen[b]`` (row b), padded
        to the longest row; the layout flags them as anchors (see the module docstring). None if none."""
        picks = [
            (self.segments[b, :n][:, None] == sel.to(self.segments.device)[None, :]).any(1).nonzero().squeeze(1)
            if n and sel.numel() else torch.zeros(0, dtype=torch.int64, device=self.segments.device)
            for b, (n, sel) in enumerate(zip(self.lengths, chosen))
        ]
        R = max(int(p.numel()) for p in picks)
        if R == 0:
            return None
        B = len(picks)
        index = torch.zeros(B, R, dtype=torch.int64, device=self.segments.device)
        valid = torch.zeros(B, R, dtype=torch.bool, device=self.segments.device)
        for b, p in enumerate(picks):
            index[b, : p.numel()] = p
            valid[b, : p.numel()] = True
        keys, values = self.keys[layer_index], self.values[layer_index]
        kv_index = index[:, None, :, None].expand(B, keys.shape[1], R, keys.shape[3])
        k = keys.gather(2, kv_index).to(device)
        v = values.gather(2, kv_index).to(device)
        layout = Layout(self.positions.gather(1, index).to(device), self.segments.gather(1, index).to(device, torch.int32),
                        valid.to(device), valid.to(device))
        return k, v, layout, [int(p.numel()) for p in picks]

    def has_segment(self, segments: torch.Tensor) -> torch.Tensor:
        """bool like ``segments`` [B, T]: whether row b's store holds tokens of that segment."""
        out = torch.zeros(segments.shape, dtype=torch.bool, device=segments.device)
        for b, n in enumerate(self.lengths):
            if n:
                stored = self.segments[b, :n].to(segments.device)
                out[b] = (segments[b].to(torch.int64)[:, None] == stored.unique()[None, :]).any(1)
        return out

    def select_rows(self, index: torch.Tensor) -> None:
        if self.positions is None:
            return
        idx = index.to(self.positions.device)
        self.positions = self.positions.index_select(0, idx)
        self.segments = self.segments.index_select(0, idx)
        for store in (self.keys, self.values):
            for i in list(store):
                store[i] = store[i].index_select(0, idx)
        self.lengths = [self.lengths[i] for i in index.tolist()]

    def nbytes(self) -> int:
        """K + V bytes of the stored tokens, all rows and layers."""
        per_slot = sum(t.shape[1] * t.shape[3] * t.element_size() for s in (self.keys, self.values) for t in s.values())
        return sum(self.lengths) * per_slot


def _grown(old: Optional[torch.Tensor], shape, dtype, device) -> torch.Tensor:
    """A zero buffer of ``shape`` holding ``old``'s slots first (the slot dim: 1 of [B, Cap], 2 of [B, H, Cap, D])."""
    new = torch.zeros(shape, dtype=dtype, device=device)
    if old is not None:
        slot_dim = 1 if old.dim() == 2 else 2
        new.narrow(slot_dim, 0, old.shape[slot_dim]).copy_(old)
    return new


def anchor_scores(query, keys, lse, q_layout: Layout, candidates: torch.Tensor, scale: float, score: str):
    """Score [B, Tk] of every candidate key slot (``candidates`` [B, Tk], the anchors of segments with evicted
    tokens): the attention probability ``exp(q . k * scale - lse)`` of the non-anchor queries, summed over
    the queries, then summed over heads (``"mass"``) or the largest head's (``"max"``), or the largest of any
    query and head (``"peak"``); -inf elsewhere."""
    B, Hq, T, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv, T, D)
    logits = torch.einsum("bhgtd,bhkd->bhgtk", q, keys.float()) * scale
    probs = torch.exp(logits - lse.reshape(B, Hkv, Hq // Hkv, T)[..., None])
    voters = (q_layout.valid & ~q_layout.is_anchor)[:, None, None, :, None]
    probs = torch.where(voters, probs, torch.zeros((), device=probs.device))
    if score == "peak":
        pooled = probs.amax(3).reshape(B, Hq, -1).amax(1)
    else:
        per_head = probs.sum(3).reshape(B, Hq, -1)
        pooled = per_head.sum(1) if score == "mass" else per_head.amax(1)
    return pooled.masked_fill(~candidates, float("-inf"))


def token_scores(query, keys, key_segments, key_valid, lse, q_layout: Layout, scale: float, score: str,
                 n_segments: int) -> torch.Tensor:
    """Score [B, n_segments] of every segment from its keys (``keys`` [B, Hkv, N, D] with their segments and
    validity [B, N]): the probabilities ``exp(q . k * scale - lse)`` the non-anchor queries would give them,
    summed over each segment's keys and the queries, then over heads (``"mass"``) or the largest head's
    (``"max"``); or the largest of any key, query and head (``"peak"``). Zero for a segment with no valid key."""
    B, Hq, T, D = query.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    k = keys.float()
    voters = (q_layout.valid & ~q_layout.is_anchor)
    per_key = torch.zeros((B, N) if score == "peak" else (B, Hq, N), device=query.device)
    for a in range(0, T, _QUERY_BLOCK):
        e = min(T, a + _QUERY_BLOCK)
        q = query[:, :, a:e].float().reshape(B, Hkv, group, e - a, D)
        logits = torch.einsum("bhgtd,bhkd->bhgtk", q, k) * scale
        probs = torch.exp(logits - lse[:, :, a:e].reshape(B, Hkv, group, e - a)[..., None]).reshape(B, Hq, e - a, N)
        probs = torch.where(voters[:, None, a:e, None], probs, torch.zeros((), device=probs.device))
        if score == "peak":
            per_key = torch.maximum(per_key, probs.amax(2).amax(1))
        else:
            per_key += probs.sum(2)
    bins = key_segments.to(query.device, torch.int64).masked_fill(~key_valid.to(query.device), n_segments)
    if score == "peak":
        out = per_key.new_zeros(B, n_segments + 1).scatter_reduce(1, bins, per_key, "amax")
    else:
        out = per_key.new_zeros(B, Hq, n_segments + 1).scatter_add(2, bins[:, None].expand(B, Hq, N), per_key)
        out = out.sum(1) if score == "mass" else out.amax(1)
    return out[:, :n_segments]


def choose_segments(scores: torch.Tensor, segments: torch.Tensor, budget: int) -> List[torch.Tensor]:
    """Per row: the segments of the ``budget`` best-scored slots whose score is positive (int64 [<= budget])."""
    k = min(budget, scores.shape[1])
    if k == 0:
        return [segments.new_zeros(0, dtype=torch.int64) for _ in range(scores.shape[0])]
    best, where = scores.topk(k, dim=1)
    chosen = segments.gather(1, where).to(torch.int64)
    return [chosen[b][best[b] > 0] for b in range(scores.shape[0])]


def closing_segments(q_layout: Layout, k_layout: Layout) -> List[torch.Tensor]:
    """Per row, the segments (int64) whose anchor is among the forward's new tokens ``q_layout`` and that have real
    non-anchor tokens hot (``k_layout``): those the forward closed, whose tokens a compaction evicts."""
    words = k_layout.valid & ~k_layout.is_anchor
    anchors = q_layout.valid & q_layout.is_anchor
    out = []
    for b in range(k_layout.segments.shape[0]):
        with_words = k_layout.segments[b][words[b]].to(torch.int64).unique()
        closed = q_layout.segments[b][anchors[b]].to(torch.int64)
        out.append(with_words[torch.isin(with_words, closed)])
    return out


#: Stands for the -inf lse of a part a query reads nothing of inside :func:`merge_partial_attentions`: its weight
#: exp(-1e30 - lse) is 0 as exp(-inf) is, and no -inf - -inf = NaN reaches a gradient (training merges too).
NO_KEY_LSE = -1e30


def merge_partial_attentions(out_a, lse_a, out_b, lse_b, with_lse: bool = False):
    """Softmax attention over the union of two disjoint key sets from the partial results (out [B,H,T,D],
    lse [B,H,T]); a query that sees no key in either set gets zeros (lse -inf). ``with_lse``: also the union's
    lse. Differentiable, with finite gradients for queries that read nothing of one part or of both."""
    a, b = lse_a.float().clamp(min=NO_KEY_LSE), lse_b.float().clamp(min=NO_KEY_LSE)
    lse = torch.logaddexp(a, b)
    empty = (a <= NO_KEY_LSE) & (b <= NO_KEY_LSE)
    w_a = torch.exp(a - lse).masked_fill(empty, 0.0)[..., None]
    w_b = torch.exp(b - lse).masked_fill(empty, 0.0)[..., None]
    out = (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)
    return (out, lse.masked_fill(empty, float("-inf"))) if with_lse else out


class RecallState:
    """The recall side of one :class:`~anllm_ext.AnchorCache`: its config, the cold store, the reused
    selection (``every="sentence"``) and the figures of the last forward."""

    def __init__(self, config: RecallConfig):
        self.config = config
        self.cold = ColdStore(config.cold_device)
        self.clear()

    def clear(self) -> None:
        self.cold.clear()
        self.reusable: Dict[int, object] = {}  # layer index -> the last choice's gathered recall (None: nothing)
        self.recalled: Dict[int, List[int]] = {}  # layer index -> recalled tokens per row, last forward
        self.recalled_bytes: Dict[int, int] = {}
        self.chosen: Dict[int, List[torch.Tensor]] = {}  # layer index -> segments per row, last choice (inspection)
        self.decode_choice: Dict[int, List[torch.Tensor]] = {}  # question=True: what decoding recalls, per row
        self.running: Optional[torch.Tensor] = None  # pool="running": this forward's summed scores [B, Tk]
        self.closing: Optional[List[torch.Tensor]] = None  # question=True: this forward's closed segments

    def begin_forward(self) -> None:
        self.running = None
        self.closing = None  # the same for every layer of a forward: found once

    def evict(self, drop: torch.Tensor, slots, layers) -> None:
        """Called before a compaction: keep the dropped slots; a later forward chooses anew (``"prompt"``: only
        a forward of several tokens does; the gathered recall of the last stays valid, segments are evicted whole,
        except with ``question``: a sentence the prompt closed may be evicted only now, when the cache keeps recent
        sentences, so decoding gathers its choice again)."""
        self.cold.add(drop & slots[3], slots, layers)
        if self.config.every != "prompt":
            self.reusable = {}
        elif self.config.question:
            self.reusable = {l: r for l, r in self.reusable.items() if l not in self.decode_choice}

    def select_rows(self, index: torch.Tensor) -> None:
        self.cold.select_rows(index)
        self.reusable = {}
        rows = index.tolist()
        self.decode_choice = {l: [c[i] for i in rows] for l, c in self.decode_choice.items()}

    def attend(self, layer, query, out_hot, lse_hot, q_layout: Layout, k_layout: Layout, scale: float):
        """The output of ``layer``'s queries over the hot keys (``out_hot``/``lse_hot``, what the op gave)
        plus the recalled segments (module docstring). The layer's new keys are already in its buffers."""
        recall = self.reusable.get(layer.index, _UNCHOSEN)
        every, several = self.config.every, query.shape[2] > 1
        if recall is _UNCHOSEN and not several and layer.index in self.decode_choice:
            # question=True: the first one-token forward after the prompt gathers what the prompt's last forward
            # chose plus the segments it closed (cold since that forward's compaction)
            self.chosen[layer.index] = self.decode_choice[layer.index]
            recall = self.cold.gather(layer.index, self.decode_choice[layer.index], query.device)
            self.reusable[layer.index] = recall
        elif recall is _UNCHOSEN or every == "token" or (every == "prompt" and several):
            recall = self._choose(layer, query, lse_hot, q_layout, k_layout, scale)
            self.reusable[layer.index] = recall  # None: chosen, nothing to recall
            if self.config.question and several:
                if self.closing is None:
                    self.closing = closing_segments(q_layout, k_layout)
                self.decode_choice[layer.index] = [torch.cat([c.to(s.device), s]).unique()
                                                   for c, s in zip(self.chosen[layer.index], self.closing)]
                del self.reusable[layer.index]
        if recall is None:
            self.recalled[layer.index] = [0] * query.shape[0]
            self.recalled_bytes[layer.index] = 0
            return out_hot
        k, v, layout, counts = recall
        self.recalled[layer.index] = counts
        self.recalled_bytes[layer.index] = sum(counts) * (k[0, :, 0].numel() + v[0, :, 0].numel()) * k.element_size()
        out_r, lse_r = anchor_attention_with_lse(query, k, v, q_layout, layout, scale)
        return merge_partial_attentions(out_hot, lse_hot, out_r, lse_r)

    def _choose(self, layer, query, lse_hot, q_layout, k_layout, scale):
        if not any(self.cold.lengths):
            self.chosen[layer.index] = [torch.zeros(0, dtype=torch.int64, device=query.device)] * query.shape[0]
            return None
        Tk = k_layout.positions.shape[1]
        keys = layer.keys[:, :, :Tk]
        candidates = k_layout.is_anchor & k_layout.valid & self.cold.has_segment(k_layout.segments)
        if self.config.index == "tokens":
            scores = self._token_scores(layer.index, query, lse_hot, q_layout, k_layout, candidates, scale)
        else:
            scores = anchor_scores(query, keys, lse_hot, q_layout, candidates, scale, self.config.score)
        if self.config.pool != "layer":
            scores = self._pooled(layer.index, scores, candidates)
        chosen = choose_segments(scores, k_layout.segments, self.config.budget)
        self.chosen[layer.index] = chosen
        return self.cold.gather(layer.index, chosen, query.device)

    def _token_scores(self, layer_index, query, lse_hot, q_layout, k_layout, candidates, scale):
        """index="tokens": each cold segment's score from its evicted keys, put on its anchor's hot slot (the
        slots ``choose_segments`` and the pool rank), -inf off the candidates."""
        n = max(self.cold.lengths)
        segments = self.cold.segments[:, :n]
        valid = torch.arange(n, device=segments.device)[None, :] < torch.tensor(self.cold.lengths, device=segments.device)[:, None]
        n_segments = int(segments[valid].max()) + 1
        per_segment = token_scores(query, self.cold.keys[layer_index][:, :, :n].to(query.device), segments, valid,
                                   lse_hot, q_layout, scale, self.config.score, n_segments)
        where = k_layout.segments.to(torch.int64).clamp(0, n_segments - 1)
        return per_segment.gather(1, where).masked_fill(~candidates, float("-inf"))

    def _pooled(self, layer_index: int, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Add this layer's scores, normalised over the candidates, to the forward's running sum (pool="layers":
        a listed layer's only); return the sum (this layer's scores while it is empty)."""
        if self.config.pool == "layers" and layer_index not in self.config.layers:
            return scores if self.running is None else self.running.masked_fill(~candidates, float("-inf"))
        finite = torch.where(candidates, scores, torch.zeros((), device=scores.device))
        total = finite.sum(1, keepdim=True)
        share = torch.where(total > 0, finite / total.clamp_min(1e-30), torch.zeros((), device=scores.device))
        self.running = share if self.running is None else self.running + share
        return self.running.masked_fill(~candidates, float("-inf"))

    def stats(self) -> Dict[str, object]:
        """Cold figures and the last forward's recalled figures (see AnchorCache.stats)."""
        recalled = list(self.recalled.values())
        return {
            "cold_slots": list(self.cold.lengths),
            "cold_kv_bytes": self.cold.nbytes(),
            "recalled_slots": [max(r) for r in zip(*recalled)] if recalled else [],
            "recalled_kv_bytes": sum(self.recalled_bytes.values()),
        }
