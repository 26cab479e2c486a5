"""Python face of the torch.ops.anllm operators: public wrappers, fake (meta) kernels and autograd."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import warnings

import torch

try:
    from . import _C  # registers torch.ops.anllm
except ImportError as exc:  # typically: built against another torch (undefined symbols)
    raise ImportError(
        f"anllm_ext's compiled extension could not be loaded with torch {torch.__version__}: {exc}. "
        "Rebuild it against the torch you run: pip install --no-build-isolation --force-reinstall ."
    ) from exc
from .layout import Layout

if _C.torch_version != torch.__version__:
    warnings.warn(
        f"anllm_ext was built against torch {_C.torch_version} but runs with torch {torch.__version__}; "
        "if anything fails, rebuild: pip install --no-build-isolation --force-reinstall .",
        RuntimeWarning,
        stacklevel=2,
    )

_ops = torch.ops.anllm
# The overloads themselves: calling them skips overload resolution, which shows in a decode step that
# calls the attention op once per layer.
_attention_fwd = _ops.anchor_attention_fwd.default
_attention_bwd = _ops.anchor_attention_bwd.default
_compact = _ops.compact_.default
_append_attention = _ops.anchor_attention_append_.default


def _require_tensors(named) -> None:
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")


def _scale_for(q: torch.Tensor, scale: Optional[float]) -> float:
    """The softmax scale: 1/sqrt(head dim) unless given."""
    if scale is None and (q.dim() == 0 or q.shape[-1] == 0):  # no default scale to derive
        raise ValueError(f"anllm: q must be [B, H, T, D] with a head dim >= 1, got shape {tuple(q.shape)}")
    return float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _layout_args(layout: Layout, side: str):
    if not isinstance(layout, Layout):
        raise TypeError(f"{side}_layout must be an anllm_ext.Layout (see token_layout), got {type(layout).__name__}")
    return layout.as_tuple()


def anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_layout: Layout,
    k_layout: Layout,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of q [B,Hq,Tq,D] over k/v [B,Hkv,Tk,D] under the AnSAN mask of the two layouts.

    Grouped-query attention when Hq is a multiple of Hkv (K/V are never repeated). Queries that see no
    key (padding) return zeros. Differentiable in q, k and v.
    """
    return anchor_attention_with_lse(q, k, v, q_layout, k_layout, scale)[0]


def anchor_attention_with_lse(q, k, v, q_layout: Layout, k_layout: Layout, scale: Optional[float] = None):
    """Like :func:`anchor_attention`, also returning the fp32 log-sum-exp of the scores [B,Hq,Tq]."""
    # Runs once per layer in every decode step: plain statements, no generators.
    _require_tensors((("q", q), ("k", k), ("v", v)))
    scale = _scale_for(q, scale)
    if q.dim() and q.stride(-1) != 1:
        q = q.contiguous()
    if k.dim() and k.stride(-1) != 1:
        k = k.contiguous()
    if v.dim() and v.stride(-1) != 1:
        v = v.contiguous()
    args = (q, k, v, *_layout_args(q_layout, "q"), *_layout_args(k_layout, "k"), scale)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) and not (
        torch.compiler.is_compiling()
    ):
        # Inference: skip the Python autograd wrapper of the op (a decode step calls this once per
        # layer, where the wrapper costs a noticeable share of the kernel's time).
        with torch._C._AutoDispatchBelowAutograd():
            return _attention_fwd(*args)
    return _attention_fwd(*args)


def anchor_attention_append_(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    offsets: Sequence[int],
    q_layout: Layout,
    k_layout: Layout,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Inference with a preallocated cache, one call per layer: writes ``k_new``/``v_new`` [B,Hkv,Tq,D]
    into ``k_cache``/``v_cache`` [B,Hkv,Cap,D] (in place) at slots ``offsets[b] .. offsets[b]+Tq-1`` of
    each row b, then returns the attention of ``q`` [B,Hq,Tq,D] over the first ``Tk`` slots under the
    AnSAN mask, where ``Tk`` is the length of ``k_layout`` (the layout of those slots, new ones included).

    Equal to writing the slots and calling :func:`anchor_attention` on ``k_cache[:, :, :Tk]``, in one
    dispatcher call (what :class:`~anllm_ext.AnchorCache` does in every layer). Not differentiable.
    """
    return anchor_attention_append_with_lse_(q, k_new, v_new, k_cache, v_cache, offsets, q_layout, k_layout, scale)[0]


def anchor_attention_append_with_lse_(q, k_new, v_new, k_cache, v_cache, offsets, q_layout: Layout, k_layout: Layout,
                                      scale: Optional[float] = None):
    """Like :func:`anchor_attention_append_`, also returning the fp32 log-sum-exp of the scores [B,Hq,Tq]
    (to merge with another partial attention, as anchor-indexed recall does)."""
    _require_tensors((("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)))
    if not torch.compiler.is_compiling() and k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr():
        # one buffer for both: the values would overwrite the keys
        raise ValueError("anllm: k_cache and v_cache share memory; pass two separate buffers")
    scale = _scale_for(q, scale)
    if q.dim() and q.stride(-1) != 1:
        q = q.contiguous()
    args = (*_layout_args(q_layout, "q"), *_layout_args(k_layout, "k"), scale)
    with torch._C._AutoDispatchBelowAutograd():
        return _append_attention(q, k_new, v_new, k_cache, v_cache, offsets, *args)


def _check_one_device(named_tensors):
    """Fake kernels run for meta/fake tensors; mixing devices must fail there as in the real kernels."""
    (first_name, first), *rest = named_tensors
    for name, t in rest:
        torch._check(
            t.device == first.device,
            lambda: f"anllm: {name} is on {t.device} but {first_name} is on {first.device}; all inputs must be on one device",
        )


@torch.library.register_fake("anllm::anchor_attention_fwd")
def _anchor_attention_fwd_fake(q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor, k_valid, scale):
    names = "q k v q_pos q_seg q_is_anchor q_valid k_pos k_seg k_is_anchor k_valid".split()
    _check_one_device(zip(names, (q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor, k_valid)))
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "anllm: q, k, v must be 4-D")
    B, Hq, Tq, D = q.shape
    return q.new_empty(B, Hq, Tq, D), q.new_empty(B, Hq, Tq, dtype=torch.float32)


@torch.library.register_fake("anllm::anchor_attention_append_")
def _anchor_attention_append_fake(q, k_new, v_new, k_cache, v_cache, offsets, *layouts_and_scale):
    tensors = (q, k_new, v_new, k_cache, v_cache) + tuple(layouts_and_scale[:-1])
    _check_one_device((f"input {i}", t) for i, t in enumerate(tensors))
    torch._check(q.dim() == 4, lambda: "anllm: q must be 4-D")
    B, Hq, Tq, D = q.shape
    return q.new_empty(B, Hq, Tq, D), q.new_empty(B, Hq, Tq, dtype=torch.float32)


@torch.library.register_fake("anllm::token_layout")
def _token_layout_fake(input_ids, anchor_ids, attention_mask, start_pos, start_seg):
    named = [("input_ids", input_ids), ("anchor_ids", anchor_ids), ("start_pos", start_pos), ("start_seg", start_seg)]
    _check_one_device(named + ([("attention_mask", attention_mask)] if attention_mask is not None else []))
    torch._check(input_ids.dim() == 2, lambda: "anllm: input_ids must be a 2-D tensor")
    B, T = input_ids.shape
    new = input_ids.new_empty
    return (new(B, T, dtype=torch.int64), new(B, T, dtype=torch.int32), new(B, T, dtype=torch.bool),
            new(B, T, dtype=torch.bool), new(B, dtype=torch.int64), new(B, dtype=torch.int64),
            new((), dtype=torch.bool))


@torch.library.register_fake("anllm::anchor_attention_bwd")
def _anchor_attention_bwd_fake(dout, q, k, v, lse, delta, *layouts_and_scale):
    tensors = (dout, q, k, v, lse, delta) + tuple(layouts_and_scale[:-1])
    _check_one_device((f"input {i}", t) for i, t in enumerate(tensors))
    return torch.empty_like(q, memory_format=torch.contiguous_format), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, *layouts, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *layouts)
    ctx.scale = scale


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, *layouts = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    dq, dk, dv = _attention_bwd(dout.contiguous(), q, k, v, lse, delta, *layouts, ctx.scale)
    return (dq, dk, dv) + (None,) * len(layouts) + (None,)


torch.library.register_autograd(
    "anllm::anchor_attention_fwd", _attention_backward, setup_context=_attention_setup_context
)


def compact_kv_(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], keep: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Compact per-layer K/V caches [B,H,Cap,D] in place, all layers in one call.

    For each row b the slots j < lengths[b] with keep[b, j] move to the front, order preserved; rows
    are independent. Returns the new lengths (int64 [B]). Slots past a row's new length are stale.
    """
    return _compact(list(keys) + list(values), keep, lengths)


def compact_slots_(tensors: Sequence[torch.Tensor], keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The same compaction for per-slot tensors [B,Cap] (e.g. a cache's positions, segments, flags)."""
    return _compact(list(tensors), keep, lengths)


@torch.library.register_fake("anllm::compact_")
def _compact_fake(tensors, keep, lengths):
    _check_one_device([("keep", keep), ("lengths", lengths)] + [(f"tensors[{i}]", t) for i, t in enumerate(tensors)])
    return lengths.new_empty(lengths.shape)
