"""Recent sentences kept hot: an :class:`~anllm_ext.AnchorCache` built with ``recent=N`` keeps every token of the
N sentences closed last (besides the anchors and the open sentence), and a non-anchor query also reads the tokens
of the N sentences before its own.

The mask is the AnSAN mask widened by one term (:func:`anllm_ext.reference.ansan_mask` with ``recent=N``):

    allowed(i, j) = AnSAN(i, j) or (V(i) and V(j) and not A(i) and pos(j) <= pos(i) and seg(i) - N <= seg(j) < seg(i))

Why: most of the loss an anchor cache adds falls on the first tokens of a sentence, which have little of their
own sentence to read; the previous sentence's words are what they miss most (docs/training.md, "Where the anchors
lose"). The widened part is a window per query (a prefill chunk spans several sentences, each query its own
window), so it is not the kernel's AnSAN rule: per layer the kernel attends the AnSAN keys (and writes the new
tokens), then a dense attention over the few window slots adds the rest, and the two are merged by their
log-sum-exp. The window keys are the tail of each row's slots (sentences are kept in order), so the dense part
reads only the columns from the first window key on.

A forward without an AnchorCache takes the same mask with the keyword ``anllm_recent=N`` (a training pass, ``anllm
train --recent N``, or a transformers cache that keeps every key): the kernel's AnSAN part, then the window part a
piece of queries at a time (:func:`plan_windows`), merged the same way.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .layout import Layout


class WindowPlan(NamedTuple):
    """The window part of one forward, the same for every layer: slots ``[start, end)`` of the keys, which query
    reads which of them (``mask`` bool [B, 1, 1, T, end - start], broadcast over KV heads and groups) and which
    slots some query reads (``read`` bool [B, 1, end - start, 1]: the others may hold stale or unwritten values,
    which must not reach the output even times zero)."""

    start: int
    end: int
    mask: torch.Tensor
    read: torch.Tensor


def window_mask(q_layout: Layout, k_layout: Layout, recent: int) -> torch.Tensor:
    """bool [B, Tq, Tk]: the window term of the mask alone (non-anchor keys only, so it never repeats an AnSAN
    key: AnSAN lets a non-anchor query read its own segment and the anchors)."""
    qp, qs, qa, qv = (t[:, :, None] for t in q_layout.as_tuple())
    kp, ks, ka, kv = (t[:, None, :] for t in k_layout.as_tuple())
    return qv & ~qa & kv & ~ka & (kp <= qp) & (ks < qs) & (ks >= qs - recent)


def plan_window(q_layout: Layout, k_layout: Layout, recent: int) -> Optional[WindowPlan]:
    """The window part of a forward of ``q_layout`` over the keys ``k_layout`` (None when no query reads any)."""
    mask = window_mask(q_layout, k_layout, recent)
    columns = mask.any(dim=1).any(dim=0).nonzero()
    if columns.numel() == 0:
        return None
    start, end = int(columns[0]), int(columns[-1]) + 1
    mask = mask[:, :, start:end]
    return WindowPlan(start, end, mask[:, None, None], mask.any(dim=1)[:, None, :, None])


def attend_window(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: WindowPlan, scale: float):
    """Attention of ``query`` [B, Hq, T, D] over the window slots of a layer's buffers ``keys``/``values``
    [B, Hkv, Cap, D] (grouped-query: K/V are not repeated), in fp32: (out [B, Hq, T, D] in the query's dtype,
    lse [B, Hq, T] fp32; -inf and zeros for a query that reads no window key)."""
    B, Hq, T, D = query.shape
    Hkv = keys.shape[1]
    k = keys[:, :, plan.start : plan.end].float()
    v = values[:, :, plan.start : plan.end].float().masked_fill(~plan.read, 0.0)
    q = query.float().reshape(B, Hkv, Hq // Hkv, T, D)
    scores = torch.einsum("bhgtd,bhkd->bhgtk", q, k) * scale
    scores = scores.masked_fill(~plan.mask, float("-inf"))
    # a query that reads no window key: its row of scores is all -inf; the log-sum-exp runs over zeros there
    # instead (probabilities exp(-inf) = 0, and no NaN reaches a gradient), and its lse is -inf after
    reads = plan.mask.any(dim=-1)
    lse = torch.logsumexp(scores.masked_fill(~reads[..., None], 0.0), dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhgtk,bhkd->bhgtd", probs, v)
    lse = lse.masked_fill(~reads, float("-inf"))
    return out.reshape(B, Hq, T, D).to(query.dtype), lse.reshape(B, Hq, T)


#: How many queries each piece of a pass without an AnchorCache holds, so that its fp32 window scores (and what
#: autograd keeps of them) are [B, Hq, WINDOW_CHUNK, window width] at a time, never [B, Hq, T, T].
WINDOW_CHUNK = 128


def plan_windows(q_layout: Layout, k_layout: Layout, recent: int, chunk: Optional[int] = None):
    """The window part of a forward without an AnchorCache (a training pass, or a transformers cache that keeps
    every key), ``chunk`` queries at a time, each piece reading only the key columns its own window spans:
    a list of (first query, :class:`WindowPlan` or None), the same for every layer. ``chunk``: default
    ``WINDOW_CHUNK``."""
    chunk = chunk or WINDOW_CHUNK
    return [(a, plan_window(q_layout[:, a : a + chunk], k_layout, recent))
            for a in range(0, q_layout.shape[1], chunk)]


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plans, scale: float):
    """:func:`attend_window` over every piece of :func:`plan_windows`: ``query`` [B, Hq, T, D] over all of
    ``key``/``value`` [B, Hkv, Tk, D]. Differentiable. (out, lse), or None when no query reads a window key."""
    if all(plan is None for _, plan in plans):
        return None
    bounds = [a for a, _ in plans] + [query.shape[2]]
    outs, lses = [], []
    for (a, plan), e in zip(plans, bounds[1:]):
        q = query[:, :, a:e]
        if plan is None:
            outs.append(torch.zeros_like(q))
            lses.append(torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device))
            continue
        out, lse = attend_window(q, key, value, plan, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
