"""AnSAN attention built from PyTorch's FlexAttention: the baselines a user would write instead of our kernels.

- :func:`flex_ansan_attention` (``decomposed=False``): one ``flex_attention`` call with the AnSAN rule as
  its ``mask_mod`` (docs/method.md, "The AnSAN mask rule"). What a FlexAttention user writes; but an
  anchor sits in almost every key block, so the block mask skips little beyond the causal half.
- ``decomposed=True``: the strongest baseline from well-kept parts. Visible keys split in two disjoint
  sets (docs/method.md, "How the kernel sees the mask"): (a) the query's own segment up to itself, a
  block-diagonal-causal mask that FlexAttention's block sparsity does skip; (b) for non-anchor queries the
  anchors of earlier segments, gathered per row into a compact K/V (a few percent of the keys) under a
  segment-causal mask. The compact anchor K/V is appended to the keys and one ``flex_attention`` call runs
  over both parts, so its softmax merges them exactly (the same result as two calls merged by their
  log-sum-exp, which compiled FlexAttention on the CPU cannot return) and only the diagonal blocks plus the
  thin anchor strip are computed.

Both accept any pair of layouts (keys in any order, padding anywhere), as ``anchor_attention`` does, and
return zeros for queries that see nothing. ``compile=True`` runs ``flex_attention`` through
``torch.compile`` (how FlexAttention is meant to run; eager mode materialises scores and serves testing).
Differentiable through autograd (FlexAttention's own backward).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .layout import Layout

BLOCK = 128  # FlexAttention's default block size


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    flex_attention, _ = _flex()
    return torch.compile(flex_attention, dynamic=False)


def _block_mask(mask_mod, B, Tq, Tk, device):
    _, create_block_mask = _flex()
    return create_block_mask(mask_mod, B, None, Tq, Tk, device=device, BLOCK_SIZE=BLOCK)


def ansan_mask_mod(q_layout: Layout, k_layout: Layout):
    """The AnSAN rule as a FlexAttention ``mask_mod`` over two layouts."""
    qp, qs, qa, qv = q_layout.as_tuple()
    kp, ks, ka, kv = k_layout.as_tuple()

    def mask_mod(b, h, i, j):
        return qv[b, i] & kv[b, j] & (kp[b, j] <= qp[b, i]) & ((ks[b, j] == qs[b, i]) | (ka[b, j] & ~qa[b, i]))

    return mask_mod


def gather_anchors(k: torch.Tensor, v: torch.Tensor, k_layout: Layout):
    """Each row's anchor keys/values packed to the front of [B, Hkv, Na, D] tensors (Na: the most anchors of
    any row, at least 1) with their layout; the slots past a row's anchors are invalid."""
    anchor = k_layout.is_anchor & k_layout.valid
    counts = anchor.sum(dim=1)
    na = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~anchor).to(torch.int8), dim=1, stable=True)[:, :na]  # anchors first, in key order
    idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
    in_row = torch.arange(na, device=k.device)[None, :] < counts[:, None]
    lay = Layout(k_layout.positions.gather(1, order), k_layout.segments.gather(1, order), in_row, in_row)
    return k.gather(2, idx), v.gather(2, idx), lay


def decomposed_mask_mod(q_layout: Layout, k_layout: Layout, a_layout: Layout):
    """Over keys ``[k ; gathered anchors]``: key j < Tk is visible when in the query's own segment (up to the
    query), key Tk + m when anchor m closes an earlier segment and the query is no anchor. The two sets are
    disjoint and their union is the AnSAN rule."""
    qp, qs, qa, qv = q_layout.as_tuple()
    kp, ks, _, kv = k_layout.as_tuple()
    ap, as_, _, av = a_layout.as_tuple()
    tk = kp.shape[1]

    def mask_mod(b, h, i, j):
        jo, ja = j.clamp(max=tk - 1), (j - tk).clamp(min=0)
        own = kv[b, jo] & (kp[b, jo] <= qp[b, i]) & (ks[b, jo] == qs[b, i])
        earlier = av[b, ja] & ~qa[b, i] & (ap[b, ja] <= qp[b, i]) & (as_[b, ja] != qs[b, i])
        return qv[b, i] & torch.where(j < tk, own, earlier)

    return mask_mod


def flex_ansan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_layout: Layout, k_layout: Layout,
                         scale: Optional[float] = None, decomposed: bool = True, compile: bool = False) -> torch.Tensor:
    """AnSAN attention with FlexAttention. q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hq a multiple of Hkv)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D] with Hkv dividing Hq; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q_layout.shape != q.shape[::2] or k_layout.shape != k.shape[::2]:
        raise ValueError(f"layouts {tuple(q_layout.shape)} / {tuple(k_layout.shape)} do not match q / k tokens")
    B, Tq = q.shape[0], q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not decomposed:
        mask_mod, keys, values = ansan_mask_mod(q_layout, k_layout), k, v
    else:
        ka, va, a_layout = gather_anchors(k, v, k_layout)
        mask_mod = decomposed_mask_mod(q_layout, k_layout, a_layout)
        keys, values = torch.cat([k, ka], dim=2), torch.cat([v, va], dim=2)
    mask = _block_mask(mask_mod, B, Tq, keys.shape[2], q.device)
    flex = _compiled_flex() if compile else _flex()[0]
    out = flex(q, keys, values, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    # a query that sees nothing: FlexAttention returns zeros (its softmax denominator is guarded)
    return out
