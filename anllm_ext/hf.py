"""transformers integration: run a Hugging Face causal LM under the AnSAN mask with the fused kernel.

``patch(model, anchor_ids)`` does three things, all through public APIs:

1. registers an attention function ``"anllm"`` in transformers' ``AttentionInterface`` and a mask
   function of the same name in ``AttentionMaskInterface`` (the mask function returns ``None``: the
   kernel evaluates the mask rule itself, so no dense mask is ever built), and switches the model to
   it with ``model.set_attn_implementation("anllm")``;
2. adds a forward pre-hook (``register_forward_pre_hook(with_kwargs=True)``) to the decoder (the
   model's ``base_model``). Once per forward it computes the token layout of the new tokens from
   ``input_ids`` + the 2-D ``attention_mask`` (+ the per-row start kept by an :class:`AnchorCache`),
   replaces ``position_ids`` by the true absolute positions (RoPE), computes the key layout once for
   all layers and passes both in a per-forward context object as the keyword ``anllm_ctx``, which
   transformers forwards untouched to every attention call (so gradient checkpointing works too);
3. adds a forward hook that lets an :class:`AnchorCache` commit the new tokens and compact itself
   (all layers in one call) after every forward;
4. overrides ``_prepare_cache_for_generation`` (and ``set_attn_implementation``) on the model instance, so that ``model.generate()``
   without a cache creates an :class:`AnchorCache` where transformers would create a ``DynamicCache``
   (``patch(..., default_cache="full")``, ``cache_implementation="dynamic"`` or an explicit cache keep
   the full cache).

The hooks are plain functions that read the patch state from the module they run on (never from a
closure), so ``copy.deepcopy`` of a patched model yields an independently patched copy.

``unpatch(model)`` removes the hooks and restores the previous attention implementation.

Swaps behind the patch never give a silently wrong result (docs/transformers.md, "What is supported"):
``model.set_attn_implementation(other)`` is overridden on the instance and lifts the patch before setting
``other``; any other switch of the implementation (``config._attn_implementation``, a submodule's
``set_attn_implementation``) is caught by :func:`_check_attention_intact` in the pre-hook and in
``generate``, and ``patch(model)`` repairs it. :func:`check_cache` is the one decision on which caches
a patched model runs with. While patched, ``model.config`` carries the anchors (``save_pretrained``
saves them).

Caches: an :class:`~anllm_ext.cache.AnchorCache` keeps only anchors + the open segment. Any other
transformers cache (e.g. the ``DynamicCache`` a direct forward creates with ``use_cache=True`` and no cache)
keeps everything; the layout of its tokens is remembered next to it so that later forwards with the
same cache object still see the exact mask.
"""
from __future__ import annotations

import inspect
import logging
import types
import weakref
from typing import Optional

import torch

from .errors import UnsupportedError
from .cache import AnchorCache
from .layout import Layout, token_layout
from .ops import anchor_attention, anchor_attention_append_

ATTN_NAME = "anllm"

_STATE_ATTR = "_anllm_patch_state"
# Layout of every token held by a non-anchor transformers cache (DynamicCache etc.), keyed by the cache
# (a _Tracked: the layout and a fingerprint that detects beam-search reordering).
_HISTORY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class ForwardContext:
    """What the attention function of every layer needs for one forward: built once per forward."""

    __slots__ = ("q_layout", "k_layout", "cache", "tracked", "_max_pos")

    def __init__(self, q_layout: Layout, k_layout: Layout, cache=None, tracked=None):
        self.q_layout = q_layout
        self.k_layout = k_layout
        self.cache = cache  # an AnchorCache, committed/compacted after the forward
        self.tracked = tracked  # another transformers cache whose token layout we remember
        self._max_pos = None

    def max_position(self) -> int:
        if self._max_pos is None:
            pos = self.q_layout.positions
            self._max_pos = int(pos.max().item()) if pos.numel() else -1
        return self._max_pos


# --------------------------------------------------------------------------------------------------
# Attention and mask functions (registered in transformers' interfaces)
# --------------------------------------------------------------------------------------------------


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
    """transformers attention function: q [B,Hq,S,D], k/v [B,Hkv,T,D] -> ([B,S,Hq,D], None)."""
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
    window = kwargs.get("sliding_window")
    if window is not None and ctx.max_position() >= window:
        raise UnsupportedError(
            f"this layer uses sliding-window attention (window {window}) and the input reaches position "
            f"{ctx.max_position()}: anllm attention implements full attention + the AnSAN mask only"
        )
    if torch.is_autocast_enabled(query.device.type):  # as SDPA does: attend in the autocast dtype
        query, key, value = _autocast_dtype(query, key, value)
    k_layout = ctx.k_layout
    cache = ctx.cache
    if cache is not None:
        layer = cache.take_pending(key, value)
        if layer is None:
            raise UnsupportedError(
                f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}) did not pass the keys/values "
                "its AnchorCache.update returned straight to the attention function; anllm_ext cannot place them "
                "in the cache"
            )
        # One op writes the new tokens into the cache and attends over the kept slots + them.
        out = anchor_attention_append_(
            query, key, value, layer.keys, layer.values, cache._plan.offsets, ctx.q_layout, k_layout, scaling
        )
        return out.transpose(1, 2).contiguous(), None
    if key.shape[2] != k_layout.positions.shape[1] or query.shape[2] != ctx.q_layout.positions.shape[1]:
        raise RuntimeError(
            f"layer {getattr(module, 'layer_idx', '?')}: got {query.shape[2]} queries / {key.shape[2]} keys but the "
            f"anchor layout describes {ctx.q_layout.positions.shape[1]} / {k_layout.positions.shape[1]}; the cache "
            "(sliding-window or other non-full-attention cache?) does not keep every key the mask needs"
        )
    out = anchor_attention(query, key, value, ctx.q_layout, k_layout, scaling)
    return out.transpose(1, 2).contiguous(), None


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


register()


# --------------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------------


def cache_kwarg(module) -> str:
    """Name of the keyword that takes the KV cache in ``module.forward`` (and ``generate``): ``"cache"``
    (transformers >= 5.24) or ``"past_key_values"`` (earlier 5.x releases)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


class _PatchState:
    """What the hooks of one patched model need. Stored on the model and on its decoder, and never
    captured by a hook: the hooks read it from the module they run on, so ``copy.deepcopy`` of a
    patched model gives the copy its own state (re-patching one leaves the other alone)."""

    def __init__(self, decoder, anchors: torch.Tensor, previous_impl, param_names, default_cache: str,
                 saved_anchor_config=None):
        self.anchors = anchors
        self.saved_anchor_config = saved_anchor_config  # what model.config carried before the patch
        self.previous_impl = previous_impl
        self.param_names = param_names
        self.cache_name = cache_kwarg(decoder)
        self.default_cache = default_cache
        self._anchors_by_device = {anchors.device: anchors}

    def anchors_on(self, device) -> torch.Tensor:
        t = self._anchors_by_device.get(device)
        if t is None:
            t = self._anchors_by_device[device] = self.anchors.to(device)
        return t


def _decoder_of(model):
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def is_patched(model) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patched_anchor_ids(model) -> Optional[torch.Tensor]:
    """Anchor ids a patched model uses (None when not patched)."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.anchors


def patch(model, anchor_ids=None, *, default_cache: str = "anchor") -> "torch.nn.Module":
    """Make a transformers causal LM attend under the AnSAN mask of ``anchor_ids``; returns the model.

    ``anchor_ids``: an int, a list of ints or a 1-D tensor of ids of the model's vocabulary (e.g.
    :func:`anllm_ext.anchors.ep_anchor_ids`). ``None`` (the default) takes the anchors the model carries in
    its config (:class:`anllm_ext.config.AnchorConfig`: saved by ``anllm train``, and by ``save_pretrained``
    of a patched model) and raises ``ValueError`` on a model that carries none. Calling ``patch`` again on a
    patched model replaces the anchor ids (and ``default_cache``) and restores the anchor attention if it was
    switched off behind the patch (e.g. ``config._attn_implementation = "sdpa"``).

    While patched, the model carries its anchors in ``model.config`` (``save_pretrained`` saves them, so
    ``patch(AutoModelForCausalLM.from_pretrained(dir))`` needs no ids); :func:`unpatch` restores what it
    carried before. ``model.set_attn_implementation(other)`` lifts the patch (as :func:`unpatch`) and then
    sets ``other``.

    ``default_cache``: the cache ``model.generate()`` creates when given none: ``"anchor"`` (an
    :class:`~anllm_ext.cache.AnchorCache`, the default) or ``"full"`` (transformers' ``DynamicCache``,
    which keeps every token). A cache passed to ``generate`` or a ``cache_implementation`` always wins
    (the caches a patched model supports: :func:`check_cache`).
    """
    if default_cache not in ("anchor", "full"):
        raise ValueError(f"default_cache must be 'anchor' or 'full', got {default_cache!r}")
    _check_model(model)
    ids = _anchor_ids_for(model, anchor_ids)
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        _check_layer_types(model.config)
        _check_one_device(model)
        decoder = _decoder_of(model)
        state = _PatchState(decoder, ids, model.config._attn_implementation, _positional_params(decoder),
                            default_cache, _saved_anchor_dict(model))
    else:
        state.anchors, state._anchors_by_device = ids, {ids.device: ids}
        state.default_cache = default_cache
    _install(model, state)
    return model


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"patch() expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError("anllm_ext.patch supports decoder-only models only")


def _anchor_ids_for(model, anchor_ids) -> torch.Tensor:
    """``anchor_ids`` (or the saved ones) as a 1-D int64 tensor of ids of the model's vocabulary."""
    if anchor_ids is None:
        anchor_ids = _saved_anchor_ids(model)
    if isinstance(anchor_ids, torch.Tensor):
        if anchor_ids.is_floating_point() or anchor_ids.is_complex() or anchor_ids.dtype == torch.bool:
            raise TypeError(f"anchor_ids must hold integer token ids, got a {anchor_ids.dtype} tensor")
        ids = anchor_ids.detach().reshape(-1).to(torch.int64)
    else:
        items = [anchor_ids] if isinstance(anchor_ids, int) or not hasattr(anchor_ids, "__iter__") else list(anchor_ids)
        bad = [i for i in items if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise TypeError(f"anchor_ids must be an int, a list of ints or an integer tensor; got {bad[0]!r}")
        ids = torch.tensor(items, dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("anchor_ids is empty: give at least one token id (e.g. anllm_ext.ep_anchor_ids(tokenizer))")
    vocab = _vocab_size(model)
    out = ids[(ids < 0) | (ids >= vocab)] if vocab else ids[ids < 0]
    if out.numel():
        raise ValueError(
            f"anchor_ids {out.tolist()[:5]} are not token ids of this model (allowed: 0 to {vocab - 1 if vocab else 'inf'})"
        )
    return ids


def _vocab_size(model) -> Optional[int]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def _positional_params(decoder):
    return [
        n
        for n, p in inspect.signature(decoder.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _install(model, state: "_PatchState") -> None:
    """Put ``state``'s patch on ``model``: the anchor attention, the decoder's hooks (once), the instance
    overrides, and the anchors in ``model.config`` (idempotent: also repairs a patch whose attention
    implementation was switched behind its back)."""
    decoder = _decoder_of(model)
    if _attn_implementation(model) != ATTN_NAME:
        _own_set_attn_implementation(model)(ATTN_NAME)
        if _attn_implementation(model) != ATTN_NAME:
            raise RuntimeError(f"{type(model).__name__} refused attn_implementation '{ATTN_NAME}'")
    setattr(model, _STATE_ATTR, state)
    setattr(decoder, _STATE_ATTR, state)
    _remove_hooks(decoder)
    decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    decoder.register_forward_hook(_post_hook, with_kwargs=True)
    model.set_attn_implementation = types.MethodType(_set_attn_implementation, model)
    if hasattr(type(model), "_prepare_cache_for_generation"):  # generate() without a cache gets an AnchorCache
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    _attach_anchor_config(model, state)


def _saved_anchor_ids(model):
    from .config import AnchorConfig

    config = AnchorConfig.from_model(model)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} carries no anchor configuration (none was saved with it: a model trained by "
            "`anllm train`, or saved by save_pretrained while patched, carries one); pass anchor_ids, e.g. "
            "anllm_ext.patch(model, anllm_ext.ep_anchor_ids(tokenizer))"
        )
    return config.anchor_ids


def _saved_anchor_dict(model):
    from .config import CONFIG_KEY

    return getattr(model.config, CONFIG_KEY, None)


def _attach_anchor_config(model, state: "_PatchState") -> None:
    """Make ``model.config`` carry the anchors the model is patched with, so ``save_pretrained`` saves them:
    the configuration it carries (or carried before the patch, e.g. a trained AnLLM's AC/EP one) when that
    has exactly these ids, else an ``"ids"`` configuration of them."""
    from .config import CONFIG_KEY, AnchorConfig

    ids = sorted(set(int(i) for i in state.anchors.tolist()))
    for data in (getattr(model.config, CONFIG_KEY, None), state.saved_anchor_config):
        if data is not None and AnchorConfig.from_dict(data).anchor_ids == ids:
            setattr(model.config, CONFIG_KEY, data)
            return
    AnchorConfig("ids", ids).attach(model)


def unpatch(model) -> "torch.nn.Module":
    """Undo :func:`patch`: hooks removed, previous attention implementation and anchor configuration restored."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    _lift(model, state)
    _own_set_attn_implementation(model)(state.previous_impl or "sdpa")
    return model


def _own_set_attn_implementation(model):
    """The model's own ``set_attn_implementation``, past the patch's instance override (for a wrapper that
    forwards attributes to its base model, e.g. PEFT: the base model's)."""
    target = model
    while getattr(type(target), "set_attn_implementation", None) is None and hasattr(target, "get_base_model"):
        target = target.get_base_model()
    return types.MethodType(type(target).set_attn_implementation, target)


def _lift(model, state: "_PatchState") -> None:
    """Remove the patch (hooks, state, overrides, the anchors it put in the config); the attention
    implementation is left to the caller."""
    from .config import CONFIG_KEY

    decoder = _decoder_of(model)
    _remove_hooks(decoder)
    for module in (model, decoder):
        module.__dict__.pop(_STATE_ATTR, None)
    for name in ("_prepare_cache_for_generation", "set_attn_implementation"):
        model.__dict__.pop(name, None)
    if state.saved_anchor_config is None:
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
    else:
        setattr(model.config, CONFIG_KEY, state.saved_anchor_config)


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    """``set_attn_implementation`` of a patched model: ``"anllm"`` keeps the patch; any other implementation
    lifts it (as :func:`unpatch`) and is then set, so the model runs exactly as the unpatched model would.
    Paged attention (continuous batching) is refused: the anchor cache cannot run it."""
    own = _own_set_attn_implementation(self)
    state = self.__dict__.get(_STATE_ATTR)
    requested = attn_implementation.get("", ATTN_NAME) if isinstance(attn_implementation, dict) else attn_implementation
    if state is None or requested == ATTN_NAME:
        return own(attn_implementation, *args, **kwargs)
    if isinstance(requested, str) and requested.startswith("paged"):
        raise UnsupportedError(
            f"attn_implementation {requested!r} (continuous batching) is not supported on a patched model; "
            "use model.generate() or anllm_ext.generate, or anllm_ext.unpatch(model) first"
        )
    _log.info("anllm_ext: set_attn_implementation(%r) lifts the anchor patch of %s", requested, type(self).__name__)
    _lift(self, state)
    return own(attn_implementation, *args, **kwargs)


def _attn_implementation(module) -> Optional[str]:
    """The attention implementation the layers of ``module`` will call (its text config's)."""
    config = module.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return text._attn_implementation


def _check_attention_intact(module) -> None:
    """Raise when the attention implementation of a patched model was switched behind the patch (the
    hooks would keep building anchor layouts and caches that the new implementation ignores)."""
    impl = _attn_implementation(module)
    if impl != ATTN_NAME:
        raise UnsupportedError(
            f"this model is patched by anllm_ext but its attention implementation was switched to {impl!r} "
            "behind the patch (config._attn_implementation, or set_attn_implementation on a submodule), so its "
            "layers would ignore the AnSAN mask. Call anllm_ext.patch(model) to restore the anchor attention, or "
            f"model.set_attn_implementation({impl!r}) on the patched model (or anllm_ext.unpatch(model)) to run it "
            "unpatched"
        )


def _remove_hooks(decoder) -> None:
    """Remove the patch's hooks, found by identity (no handle is kept: see :class:`_PatchState`)."""
    for hooks, with_kwargs in (
        (decoder._forward_pre_hooks, decoder._forward_pre_hooks_with_kwargs),
        (decoder._forward_hooks, decoder._forward_hooks_with_kwargs),
    ):
        for key in [k for k, fn in hooks.items() if fn is _pre_hook or fn is _post_hook]:
            del hooks[key]
            with_kwargs.pop(key, None)


class patched:
    """Context manager: ``with patched(model, anchor_ids): ...`` (unpatches on exit if it patched)."""

    def __init__(self, model, anchor_ids):
        self.model, self.anchor_ids = model, anchor_ids

    def __enter__(self):
        self._was = is_patched(self.model)
        previous = patched_anchor_ids(self.model)
        self._previous_ids = previous
        state = self.model.__dict__.get(_STATE_ATTR)
        self._previous_default = state.default_cache if state is not None else "anchor"
        patch(self.model, self.anchor_ids, default_cache=self._previous_default)
        return self.model

    def __exit__(self, *exc):
        if self._was:
            patch(self.model, self._previous_ids, default_cache=self._previous_default)
        else:
            unpatch(self.model)
        return False


def _check_layer_types(config) -> None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        bad = sorted(set(t for t in layer_types if t != "full_attention"))
        if bad:
            raise UnsupportedError(
                f"model has layer types {bad}; anllm_ext supports full-attention layers only "
                "(sliding-window / linear-attention layers would not see the keys the AnSAN mask allows)"
            )


def _check_one_device(model) -> None:
    """The layouts and the AnchorCache's slot buffers live on the input's device and the kernels need
    them on q's device: a model split over devices (``device_map="auto"``, offloading) is refused."""
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    devices |= {str(p.device) for p in model.parameters()}
    devices = {f"cuda:{d}" if d.isdigit() else d for d in devices}
    if len(devices) > 1:
        raise UnsupportedError(
            f"{type(model).__name__} is split over devices {sorted(devices)}: anllm_ext keeps one anchor layout "
            "per forward on the input's device and its kernels need it on every layer's device. Load the model "
            "on one device (device_map=None or a single device, no offloading), then patch it"
        )


_log = logging.getLogger(__name__)


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
    """Instance override of ``GenerationMixin._prepare_cache_for_generation`` on a patched model: where
    transformers would create its default ``DynamicCache`` (no cache passed, no ``cache_implementation``),
    create an :class:`AnchorCache` instead, unless the patch says ``default_cache="full"``. Refuses, before
    generating, what the patched model cannot generate exactly: a switched attention implementation,
    right padding, and caches :func:`check_cache` refuses."""
    state = self.__dict__.get(_STATE_ATTR)
    if state is not None:
        _check_attention_intact(self)
        _check_left_padding(model_kwargs.get("attention_mask"))
        _check_cache_implementation(generation_config.cache_implementation)
    user_cache = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
    result = type(self)._prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, *args, **kwargs
    )
    if state is None:
        return result
    made = [name for name in ("cache", "past_key_values") if model_kwargs.get(name) is not None]
    for name in made:
        check_cache(model_kwargs[name])
    if state.default_cache != "anchor" or user_cache:
        return result
    if generation_config.cache_implementation is not None or generation_config.use_cache is False:
        return result
    if generation_mode == "assisted_generation" or getattr(generation_config, "is_assistant", False):
        _log.warning(
            "anllm_ext: assisted decoding needs a croppable cache; this generate() keeps the full DynamicCache"
        )
        return result
    from transformers import DynamicCache

    if not made and self._supports_default_dynamic_cache():
        # older 5.x releases (5.0) leave the default cache to the model's forward: give generate() one
        model_kwargs[cache_kwarg(self)] = AnchorCache(self.config)
    for name in made:
        if type(model_kwargs[name]) is DynamicCache:
            model_kwargs[name] = AnchorCache(self.config)
    return result


def _check_left_padding(mask) -> None:
    """``generate`` appends new tokens after the last column: a row whose last column is padding (right
    padding) would get new tokens at positions transformers numbers wrongly. Refused, with transformers' advice."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 0 and bool((mask[:, -1] == 0).any()):
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"right padding detected (attention_mask[{rows[0]}, -1] == 0; rows {rows[:8]}): a decoder-only model "
            "generates after the last column, so for correct generation results pad on the left (tokenizer "
            "padding_side='left'), as transformers advises"
        )


# The caches a patched model runs exactly with (one place for the decision: check_cache and
# _check_cache_implementation). transformers' "offloaded" is a DynamicCache too (it needs a GPU).
SUPPORTED_CACHE_IMPLEMENTATIONS = (None, "dynamic", "offloaded")


def check_cache(cache) -> None:
    """The caches a patched model runs exactly with: an :class:`AnchorCache`, or transformers' ``DynamicCache``
    of full-attention layers (what ``cache_implementation="dynamic"`` and a direct forward with
    ``use_cache=True`` create; the patch remembers its tokens' layout). Any other cache raises
    :class:`UnsupportedError`: a ``StaticCache`` (``cache_implementation="static"``) hands the attention all
    its preallocated slots, which carry no anchor layout; quantized and sliding-window caches change or
    drop keys the AnSAN mask needs."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if isinstance(cache, AnchorCache):
        return
    layer_types = {type(layer) for layer in getattr(cache, "layers", [])}
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is not None:
        layer_types.add(replicate)
    if type(cache) is DynamicCache and layer_types <= {DynamicLayer}:
        return
    layers = f" of {', '.join(sorted(t.__name__ for t in layer_types))}" if layer_types else ""
    raise _unsupported_cache(f"got a {type(cache).__name__}{layers}")


def _check_cache_implementation(name) -> None:
    if name not in SUPPORTED_CACHE_IMPLEMENTATIONS:
        raise _unsupported_cache(f"got cache_implementation={name!r}")


def _unsupported_cache(what: str) -> UnsupportedError:
    return UnsupportedError(
        f"a patched model supports only an AnchorCache or a DynamicCache of full-attention layers ({what}): static, "
        "quantized and sliding-window caches do not keep every key with its anchor layout (and torch.compile of the "
        "decode step, what a static cache is for, is not supported). Use model.generate() without a cache (an "
        "AnchorCache), cache=AnchorCache(model.config), or cache_implementation='dynamic' (the full cache)"
    )


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def _pre_hook(module, args, kwargs):
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:  # the hook outlived its state (a module copied without its model): do nothing
        return None
    _check_attention_intact(module)
    names = state.param_names
    if args:  # bind positional arguments to their names once, then work on kwargs only
        if len(args) > len(names):
            raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
        for name, value in zip(names, args):
            kwargs[name] = value
        args = ()
    # Accept the cache under either name (`cache` in transformers >= 5.24, `past_key_values` before) and
    # hand it to the decoder under the name its forward takes.
    other = "past_key_values" if state.cache_name == "cache" else "cache"
    if other in kwargs:
        value = kwargs.pop(other)
        if value is not None:
            if kwargs.get(state.cache_name) is not None:
                raise ValueError("pass the cache as `cache=` or `past_key_values=`, not both")
            kwargs[state.cache_name] = value
    ctx = _build_context(module, state, kwargs)
    _check_position_ids(kwargs.get("position_ids"), ctx.q_layout)
    kwargs["anllm_ctx"] = ctx
    kwargs["position_ids"] = ctx.q_layout.positions
    return args, kwargs


def _check_position_ids(given, layout: Layout) -> None:
    """A patched model places every token at its true absolute position: the number of real (unmasked)
    tokens before it in its row, the cache included. ``position_ids`` that say otherwise on a real token
    would silently be replaced, so they raise; padding entries are not compared (generate() fills them
    with placeholders)."""
    if given is None:
        return
    expected = layout.positions
    if not isinstance(given, torch.Tensor) or given.dim() != 2 or given.shape[1] != expected.shape[1] or (
        given.shape[0] not in (1, expected.shape[0])
    ):
        raise ValueError(
            f"a patched model takes position_ids of shape [batch, tokens] = {list(expected.shape)} (or none), "
            f"got {getattr(given, 'shape', type(given).__name__)}"
        )
    wrong = (given.to(expected.device) != expected) & layout.valid
    if bool(wrong.any()):
        b, t = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(
            f"position_ids[{b}, {t}] = {int(given[min(b, given.shape[0] - 1), t])} but the token's true absolute "
            f"position is {int(expected[b, t])}: a patched model places each token after the real tokens before "
            "it (attention_mask 1) in its row, the cache included. Pass no position_ids, or these positions"
        )


def _build_context(module, state: _PatchState, kwargs) -> ForwardContext:
    explicit = kwargs.pop("anllm_layout", None)
    cache_key = state.cache_name
    cache = kwargs.get(cache_key)
    input_ids = kwargs.get("input_ids")
    mask = kwargs.get("attention_mask")
    if input_ids is None and explicit is None:
        raise ValueError(
            "a patched model needs input_ids to find the anchors (or pass anllm_layout=token_layout(...) "
            "together with inputs_embeds)"
        )
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"a patched model takes a 2-D [batch, tokens] attention_mask, got {type(mask).__name__}")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"a patched model takes a 2-D [batch, tokens] attention_mask (1 = token, 0 = padding), got a "
            f"{mask.dim()}-D mask: the AnSAN mask is computed from the anchors, do not pass a prepared mask"
        )
    T = input_ids.shape[1] if input_ids is not None else explicit.positions.shape[1]
    chunk_mask = None
    if mask is not None:
        if mask.shape[1] < T:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns for {T} new tokens")
        chunk_mask = mask[:, mask.shape[1] - T :]

    def layout_for(start):
        if explicit is not None:
            if start is not None:
                raise ValueError("anllm_layout cannot be combined with a non-empty cache")
            return explicit
        return token_layout(input_ids, state.anchors_on(input_ids.device), chunk_mask, start)

    if isinstance(cache, AnchorCache):
        q = layout_for(cache.next_start())
        k = cache.begin_forward(q)
        return ForwardContext(q, k, cache)

    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True)
    if cache is None and not use_cache:
        q = layout_for(None)
        return ForwardContext(q, q)

    if cache is None:  # what the decoder would create itself; created here so its layout is tracked
        from transformers import DynamicCache

        cache = DynamicCache(config=module.config)
        kwargs[cache_key] = cache
    check_cache(cache)
    history = _history_of(cache)
    if history is None:
        if cache.get_seq_length() > 0:
            raise ValueError(
                f"{type(cache).__name__} already holds tokens that were not processed by the patched model; "
                "its anchor layout is unknown. Use an AnchorCache or a cache filled by the patched model"
            )
        q = layout_for(None)
        k = q
    else:
        q = layout_for(history.next_start())
        if history.positions.shape[0] != q.positions.shape[0]:
            raise ValueError("the batch size changed between forwards on the same cache")
        k = Layout.cat([history, q])
    return ForwardContext(q, k, None, tracked=cache)


class _Tracked:
    """Layout of the tokens a non-anchor cache holds, plus a fingerprint of its layer-0 keys that tells
    whether transformers reordered / selected / cropped its rows since (beam search does)."""

    __slots__ = ("layout", "fingerprint")

    def __init__(self, layout, fingerprint):
        self.layout, self.fingerprint = layout, fingerprint


def _fingerprint(cache):
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[0], "keys", None) if layers else None
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
        return None
    return keys[:, 0, :, :2].detach().clone()  # [B, T, 2]: first KV head, two channels, every token


def _history_of(cache) -> Optional[Layout]:
    tracked = _HISTORY.get(cache)
    if tracked is None:
        return None
    now = _fingerprint(cache)
    old = tracked.fingerprint
    if now is None or old is None:
        return tracked.layout
    if now.shape == old.shape and torch.equal(now, old):
        return tracked.layout
    # rows were reordered / selected (beam search) and/or the cache was cropped: find each new row's source
    Bn, Tn = now.shape[:2]
    if Tn > old.shape[1]:
        raise RuntimeError(f"{type(cache).__name__} changed outside the patched model; its anchor layout is unknown")
    same = (now.reshape(Bn, 1, -1) == old[:, :Tn].reshape(1, old.shape[0], -1)).all(-1)  # [Bn, Bold]
    if not bool(same.any(-1).all()):
        raise RuntimeError(f"{type(cache).__name__} changed outside the patched model; its anchor layout is unknown")
    src = same.to(torch.int8).argmax(-1).to(tracked.layout.positions.device)
    layout = tracked.layout[src][:, :Tn]
    tracked.layout, tracked.fingerprint = layout, now
    return layout


def _post_hook(module, args, kwargs, output):
    ctx = kwargs.get("anllm_ctx")
    if ctx is None:
        return None
    if ctx.cache is not None:
        ctx.cache.end_forward(ctx.q_layout)
    elif ctx.tracked is not None:
        _HISTORY[ctx.tracked] = _Tracked(ctx.k_layout, _fingerprint(ctx.tracked))
    return None
