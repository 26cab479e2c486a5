"""The attention and mask functions registered with transformers under the name ``"anllm"``, and the check
that a patched model's layers still call them."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UnsupportedError
from ..ops import _scale_for, anchor_attention, anchor_attention_with_lse

#: The name of the attention implementation (and mask function) in transformers' interfaces.
ATTN_NAME = "anllm"


def anllm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """transformers attention function: q [B,Hq,S,D], k/v [B,Hkv,T,D] -> ([B,S,Hq,D], None).

    The per-forward context (keyword ``anllm_ctx``, a :class:`~anllm_ext.hf.ForwardContext`) holds the
    layouts of the queries and keys; with an :class:`~anllm_ext.cache.AnchorCache` the cache writes the new
    keys/values and attends (:meth:`~anllm_ext.cache.AnchorCache.attend`)."""
    ctx = kwargs.get("anllm_ctx")
    if ctx is None:
        raise RuntimeError(
            "attn_implementation 'anllm' needs the per-forward anchor layout: patch the model with "
            "anllm_ext.patch(model, anchor_ids) and call the patched model (not a submodule of its decoder)"
        )
    if dropout and dropout > 0.0:
        raise UnsupportedError(
            f"anllm attention does not implement attention dropout (got dropout={dropout}); set "
            "config.attention_dropout = 0 or call model.eval()"
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise UnsupportedError(f"anllm attention does not support `{name}` (model {type(module).__name__})")
    # A configured sliding window (kwargs["sliding_window"], e.g. Mistral's) is not applied: the AnSAN mask
    # replaces it (docs/transformers.md, "Sliding windows").
    if torch.is_autocast_enabled(query.device.type):  # as SDPA does: attend in the autocast dtype
        query, key, value = _autocast_dtype(query, key, value)
    k_layout = ctx.k_layout
    cache = ctx.cache
    if cache is not None:
        # One op writes the new tokens into the cache and attends over the kept slots + them.
        out = cache.attend(query, key, value, ctx.q_layout, k_layout, scaling)
        if out is None:
            raise UnsupportedError(
                f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}) did not pass the keys/values "
                "its AnchorCache.update returned straight to the attention function; anllm_ext cannot place them "
                "in the cache"
            )
        return out.transpose(1, 2).contiguous(), None
    if key.shape[2] != k_layout.positions.shape[1] or query.shape[2] != ctx.q_layout.positions.shape[1]:
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: got {query.shape[2]} queries / {key.shape[2]} keys but the "
            f"anchor layout describes {ctx.q_layout.positions.shape[1]} / {k_layout.positions.shape[1]}; the cache "
            "(sliding-window or other non-full-attention cache?) does not keep every key the mask needs"
        )
    if ctx.window is None:
        out = anchor_attention(query, key, value, ctx.q_layout, k_layout, scaling)
    else:
        out = _with_recent_window(query, key, value, ctx, scaling)
    return out.transpose(1, 2).contiguous(), None


def _with_recent_window(query, key, value, ctx, scaling):
    """``anllm_recent``: the AnSAN keys through the kernel, the recent sentences' through a dense attention a
    piece of queries at a time; disjoint key sets, merged by their log-sum-exp (anllm_ext/recent.py)."""
    from ..recall import merge_partial_attentions
    from ..recent import window_attention

    scale = _scale_for(query, scaling)
    out, lse = anchor_attention_with_lse(query, key, value, ctx.q_layout, ctx.k_layout, scale)
    window = window_attention(query, key, value, ctx.window, scale)
    return out if window is None else merge_partial_attentions(out, lse, *window)


def _autocast_dtype(*tensors):
    """``tensors`` cast to the enabled autocast dtype of their device (RoPE can leave q/k in fp32 while v
    is in the autocast dtype); an AnchorCache's update already returned its keys/values in that dtype."""
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


def anllm_mask_function(*args, **kwargs):
    """Mask function for ``AttentionMaskInterface``: the kernel needs no mask tensor, so build none."""
    return None


def register() -> None:
    """Register the ``"anllm"`` attention and mask functions in transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, anllm_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, anllm_mask_function)


def attn_implementation(module) -> Optional[str]:
    """The attention implementation the layers of ``module`` will call (its text config's)."""
    config = module.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return text._attn_implementation


def check_attention_intact(module) -> None:
    """Raise when the attention implementation of a patched model was switched behind the patch (the
    hooks would keep building anchor layouts and caches that the new implementation ignores)."""
    impl = attn_implementation(module)
    if impl != ATTN_NAME:
        raise UnsupportedError(
            f"this model is patched by anllm_ext but its attention implementation was switched to {impl!r} "
            "behind the patch (config._attn_implementation, or set_attn_implementation on a submodule), so its "
            "layers would ignore the AnSAN mask. Call anllm_ext.patch(model) to restore the anchor attention, or "
            f"model.set_attn_implementation({impl!r}) on the patched model (or anllm_ext.unpatch(model)) to run it "
            "unpatched"
        )
