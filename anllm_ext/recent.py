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
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)
    out = torch.einsum("bhgtk,bhkd->bhgtd", probs, v)
    return out.reshape(B, Hq, T, D).to(query.dtype), lse.reshape(B, Hq, T)
