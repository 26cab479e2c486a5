"""Plain-PyTorch oracle for the kernels. Vectorised, dense, simple; used by the tests, never by the fast path."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .layout import Layout


def token_layout_ref(input_ids, anchor_ids, attention_mask=None, start=None, sink: int = 0) -> Layout:
    """The layout rule of docs/method.md written token by token, for clarity, not speed: the oracle of
    both production implementations (the CPU kernel and the ATen formulation other devices use).

    For each row: a real token gets the next absolute position (``start`` position + real tokens before
    it) and the segment ``start`` segment + anchors strictly before it; an anchor is a real token whose
    id is an anchor id or whose position is below ``sink``; padding is not an anchor, has the row's start
    position and the running segment.
    """
    ids = input_ids.tolist()
    B = len(ids)
    T = input_ids.shape[1]
    mask = [[1] * T for _ in range(B)] if attention_mask is None else attention_mask.tolist()
    anchors = set(torch.as_tensor(anchor_ids).reshape(-1).tolist())
    starts = [(0, 0)] * B if start is None else list(zip(*(torch.as_tensor(x).expand(B).tolist() for x in start)))
    rows = {"positions": [], "segments": [], "is_anchor": [], "valid": []}
    for b in range(B):
        position, segment = starts[b]
        row_start = position
        out = {k: [] for k in rows}
        for t in range(T):
            real = bool(mask[b][t])
            anchor = real and (ids[b][t] in anchors or position < sink)
            out["positions"].append(position if real else row_start)
            out["segments"].append(segment)
            out["is_anchor"].append(anchor)
            out["valid"].append(real)
            position += real
            segment += anchor
        for k in rows:
            rows[k].append(out[k])
    dev = input_ids.device
    return Layout(torch.tensor(rows["positions"], dtype=torch.int64, device=dev).reshape(B, T),
                  torch.tensor(rows["segments"], dtype=torch.int32, device=dev).reshape(B, T),
                  torch.tensor(rows["is_anchor"], dtype=torch.bool, device=dev).reshape(B, T),
                  torch.tensor(rows["valid"], dtype=torch.bool, device=dev).reshape(B, T))


def ansan_mask(q_layout: Layout, k_layout: Layout, recent: int = 0) -> torch.Tensor:
    """Dense AnSAN mask (see docs/method.md): bool [B, Tq, Tk], True where query i may attend to key j.

    allowed(i, j) = V(i) and V(j) and pos(j) <= pos(i) and (seg(j) == seg(i) or (A(j) and not A(i)))

    ``recent`` = N > 0 also lets a non-anchor query read every key of the N segments before its own
    (``AnchorCache(recent=N)``): ... or (not A(i) and seg(i) - N <= seg(j) < seg(i)).
    """
    qp, qs, qa, qv = (t[:, :, None] for t in q_layout.as_tuple())
    kp, ks, ka, kv = (t[:, None, :] for t in k_layout.as_tuple())
    readable = (ks == qs) | (ka & ~qa)
    if recent:
        readable = readable | (~qa & (ks < qs) & (ks >= qs - recent))
    return qv & kv & (kp <= qp) & readable


def anchor_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_layout: Layout,
    k_layout: Layout,
    scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = torch.float32,
    return_lse: bool = False,
    recent: int = 0,
):
    """Dense masked attention. q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; fully masked rows give zeros; ``recent``: the
    mask's (:func:`ansan_mask`).

    ``compute_dtype=None`` computes in the inputs' dtype (the "plain PyTorch at the kernel's dtype"
    baseline of the error rule); the default computes in fp32 (the accuracy reference).
    """
    out_dtype = q.dtype
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = ansan_mask(q_layout, k_layout, recent)[:, None]  # [B,1,Tq,Tk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with no visible key
    out = torch.matmul(probs, v).to(out_dtype)
    return (out, lse) if return_lse else out


def compact_ref(
    tensors: Sequence[torch.Tensor], keep: torch.Tensor, lengths: torch.Tensor, slot_dim: int = 2
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Out-of-place compaction by index gather, as the authors' code does.

    Returns copies of ``tensors`` whose first new_lengths[b] slots (along ``slot_dim``) of row b are the
    kept slots in order; the remaining slots are left as they were.
    """
    cap = keep.shape[1]
    in_range = torch.arange(cap, device=keep.device)[None, :] < lengths[:, None]
    kept = keep & in_range
    new_lengths = kept.sum(dim=1)
    results = []
    for t in tensors:
        out = t.clone()
        for b in range(t.shape[0]):
            idx = kept[b].nonzero().squeeze(1)
            dst = out[b].narrow(slot_dim - 1, 0, idx.numel())
            dst.copy_(t[b].index_select(slot_dim - 1, idx))
        results.append(out)
    return results, new_lengths


def recall_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: Layout,
    chunk_starts: Sequence[int],
    budget: int,
    every: str = "token",
    score: str = "mass",
    scale: Optional[float] = None,
    pool: str = "layer",
    carry: Optional[dict] = None,
    index: str = "anchor",
    layer: Optional[int] = None,
    layers: Sequence[int] = (),
    question: bool = False,
    recent: int = 0,
) -> torch.Tensor:
    """Dense oracle of one layer of anchor-indexed recall (anllm_ext/recall.py), written independently of it.

    q [B,Hq,T,D], k/v [B,Hkv,T,D] cover a whole text of ``layout`` that a cache processed in forwards starting
    at the columns ``chunk_starts`` (the first is 0). A forward s *chooses* when ``every == "token"``, when it
    is the first forward, with ``every == "sentence"`` when the forward before it held an anchor or padding in
    some row (the cache compacted), with ``every == "prompt"`` when it spans more than one column; else it
    reuses the last choice. A choice of row b scores every closed segment (segment below
    the segment of the forward's first column) that has a real non-anchor token by the AnSAN attention
    probability its anchor gets from the forward's real non-anchor queries (``index="anchor"``; with
    ``index="tokens"``: ``exp(q . k * scale - lse)`` of its real non-anchor tokens, ``lse`` over the AnSAN keys,
    summed over those tokens, or the largest for ``"peak"``), summed over those queries, then
    summed (``"mass"``) or maximised (``"max"``) over heads, or the largest over queries and heads
    (``"peak"``), and takes the ``budget`` best with a positive
    score. With ``pool="running"`` each layer's scores of a choice are first divided by their sum over the
    candidates and added to those of the earlier layers of the stack for the same forward and row: ``carry``, a
    dict the caller passes to every layer of one pass, layer 0 first, holds these sums. With ``pool="layers"``
    only the layers in ``layers`` add theirs (this call is layer ``layer``); a layer before the first of them
    ranks by its own scores. A real non-anchor query
    then also sees every real non-anchor token of the segments its forward's choice took. With ``question``
    (``every == "prompt"``), a forward that reuses a choice made by a forward of several columns also sees the
    segments with real non-anchor tokens whose anchor lies in that forward's columns. With ``recent`` = N (a cache
    keeping the last N closed segments hot) the hot mask is ``ansan_mask(..., recent=N)`` (its lse is the one the
    scores divide by) and a forward's candidates are the closed segments below the segment of its first column
    minus N (those a cache has evicted by then)."""
    if pool in ("running", "layers") and carry is None:
        raise ValueError(f"pool={pool!r} needs carry={{}} shared by the layers of one pass")
    if pool == "layers" and layer is None:
        raise ValueError("pool='layers' needs the layer index")
    adds = pool == "running" or (pool == "layers" and layer in layers)
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    hot = ansan_mask(layout, layout, recent)  # [B,T,T]
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    hot_scores = scores.masked_fill(~hot[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(hot_scores, dim=-1), nan=0.0)
    if index == "tokens":  # what each key would get beside the hot ones: exp(logit - lse over the AnSAN keys)
        probs = torch.nan_to_num(torch.exp(scores - torch.logsumexp(hot_scores, dim=-1, keepdim=True)), nan=0.0)

    bounds = list(chunk_starts) + [T]
    real_word = layout.valid & ~layout.is_anchor  # [B,T]: real non-anchor tokens (the ones a cache evicts)
    extra = torch.zeros_like(hot)
    chosen, closed = None, None
    for s in range(len(bounds) - 1):
        a, e = bounds[s], bounds[s + 1]
        boundary_before = s > 0 and bool((layout.is_anchor | ~layout.valid)[:, bounds[s - 1] : a].any())
        several = e - a > 1
        now = chosen
        if every == "token" or chosen is None or (boundary_before if every == "sentence" else several):
            chosen = now = [_ref_choice(probs[b], layout, b, a, e, budget, score, real_word[b],
                                        carry if pool != "layer" else None, (s, b), index, adds, recent)
                            for b in range(B)]
            closed = [layout.segments[b, a:e][(layout.is_anchor & layout.valid)[b, a:e]].long()
                      for b in range(B)] if question and several else None
        elif closed is not None:  # a forward reusing the choice of the prompt's last several-column forward
            now = [torch.cat([c, d]) for c, d in zip(chosen, closed)]
        for b in range(B):
            recalled = real_word[b] & torch.isin(layout.segments[b].long(), now[b])  # [T] keys
            queries = real_word[b, a:e]
            extra[b, a:e] |= queries[:, None] & recalled[None, :]
    mask = (hot | extra)[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0) @ v
    return out.to(q.dtype)


def _ref_choice(probs_b, layout: Layout, b: int, a: int, e: int, budget: int, score: str, real_word_b,
                carry=None, key=None, index="anchor", adds=True, recent=0):
    """Segments row b's forward over columns [a, e) recalls (see :func:`recall_attention_ref`)."""
    seg = layout.segments[b].long()
    evicted_below = int(seg[a]) - recent  # segments below it are cold when the forward starts
    has_words = torch.zeros(int(seg.max()) + 2, dtype=torch.bool)
    has_words[seg[real_word_b].cpu()] = True
    voters = real_word_b[a:e]
    seen = probs_b[:, a:e][:, voters]  # [Hq, voters, T]
    pooled = torch.stack([_ref_pool(seen[:, :, j : j + 1], score) for j in range(seen.shape[2])])
    if index == "tokens":  # an anchor stands for its segment's words: pool over those keys instead
        for j in range(seen.shape[2]):
            words = (seg == seg[j]) & real_word_b
            pooled[j] = _ref_pool(seen[:, :, words], score) if words.any() else 0.0
    is_candidate = [bool(layout.is_anchor[b, j]) and bool(layout.valid[b, j]) and int(seg[j]) < evicted_below
                    and bool(has_words[int(seg[j])]) for j in range(layout.positions.shape[1])]
    if carry is not None and not adds and key in carry:  # pool="layers", an unlisted layer: the listed ones' sum
        pooled = torch.tensor(carry[key])
    elif carry is not None and adds:  # this layer's share over the candidates, added to earlier layers'
        total = sum(float(pooled[j]) for j, c in enumerate(is_candidate) if c)
        share = [float(pooled[j]) / total if c and total > 0 else 0.0 for j, c in enumerate(is_candidate)]
        before = carry.get(key, [0.0] * len(share))
        carry[key] = [x + y for x, y in zip(before, share)]
        pooled = torch.tensor(carry[key])
    candidates = [(float(pooled[j]), int(seg[j])) for j, c in enumerate(is_candidate) if c and float(pooled[j]) > 0]
    candidates.sort(reverse=True)
    return torch.tensor([s for _, s in candidates[:budget]], dtype=torch.int64, device=seg.device)


def _ref_pool(seen, score: str) -> torch.Tensor:
    """One score from the probabilities ``seen`` [Hq, voters, keys] (see :func:`recall_attention_ref`)."""
    if seen.numel() == 0:
        return torch.zeros(())
    if score == "peak":
        return seen.max()
    per_head = seen.sum(dim=(1, 2))
    return per_head.sum() if score == "mass" else per_head.max()
