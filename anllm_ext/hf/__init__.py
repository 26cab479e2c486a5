"""transformers integration: run a Hugging Face causal LM under the AnSAN mask with the fused kernel.

``patch(model, anchor_ids)`` does four things, all through public APIs:

1. registers an attention function ``"anllm"`` in transformers' ``AttentionInterface`` and a mask
   function of the same name in ``AttentionMaskInterface`` (the mask function returns ``None``: the
   kernel evaluates the mask rule itself, so no dense mask is ever built), and switches the model to
   it with ``model.set_attn_implementation("anllm")`` (``anllm_ext.hf.attention``);
2. adds a forward pre-hook (``register_forward_pre_hook(with_kwargs=True)``) to the decoder (the
   model's ``base_model``) that computes the token layouts of each forward and hands them to every
   attention call in a per-forward context (``anllm_ext.hf.hooks``);
3. adds a forward hook that lets an :class:`~anllm_ext.cache.AnchorCache` commit the new tokens and compact
   itself (all layers in one call) after every forward;
4. overrides ``_prepare_cache_for_generation`` (and ``set_attn_implementation``) on the model instance, so
   that ``model.generate()`` without a cache creates an :class:`~anllm_ext.cache.AnchorCache` where
   transformers would create a ``DynamicCache`` (``patch(..., default_cache="full")``,
   ``cache_implementation="dynamic"`` or an explicit cache keep the full cache) (``anllm_ext.hf.patching``).

``unpatch(model)`` removes the hooks and restores the previous attention implementation. ``copy.deepcopy``
of a patched model yields an independently patched copy.

Swaps behind the patch never give a silently wrong result (docs/transformers.md, "What is supported"):
``model.set_attn_implementation(other)`` is overridden on the instance and lifts the patch before setting
``other``; any other switch of the implementation (``config._attn_implementation``, a submodule's
``set_attn_implementation``) is caught in the pre-hook and in ``generate``, and ``patch(model)`` repairs
it. :func:`check_cache` is the one decision on which caches a patched model runs with
(``anllm_ext.hf.cache_policy``). While patched, ``model.config`` carries the anchors (``save_pretrained``
saves them).

Caches: an :class:`~anllm_ext.cache.AnchorCache` keeps only anchors + the open segment. Any other
transformers cache (e.g. the ``DynamicCache`` a direct forward creates with ``use_cache=True`` and no cache)
keeps everything; the layout of its tokens is remembered next to it so that later forwards with the
same cache object still see the exact mask (``anllm_ext.hf.history``).
"""
from .attention import ATTN_NAME, anllm_attention_forward, anllm_mask_function, register
from .cache_policy import SUPPORTED_CACHE_IMPLEMENTATIONS, cache_kwarg, check_cache
from .hooks import ForwardContext
from .patching import as_original, is_patched, patch, patched, patched_anchor_ids, patched_sink, unpatch, unpatched

register()

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "unpatched",
    "is_patched",
    "patched_anchor_ids",
    "patched_sink",
    "cache_kwarg",
    "check_cache",
    "SUPPORTED_CACHE_IMPLEMENTATIONS",
    "ATTN_NAME",
    "anllm_attention_forward",
    "anllm_mask_function",
    "register",
    "ForwardContext",
]
