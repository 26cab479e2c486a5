"""``patch`` / ``unpatch`` / ``patched``: put a transformers causal LM under the AnSAN mask and take it off
again; the instance overrides a patch installs (``set_attn_implementation``, and ``generate``'s cache
choice); the checks that refuse what a patched model cannot run exactly."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import types
from typing import Optional

import torch

from ..cache import AnchorCache, check_full_attention_layers
from ..errors import UnsupportedError
from ..config import check_sink
from .attention import ATTN_NAME, attn_implementation, check_attention_intact
from .cache_policy import cache_kwarg, check_cache, check_cache_implementation, full_attention_cache
from .hooks import STATE_ATTR, PatchState, install_hooks, remove_hooks, state_of

_log = logging.getLogger("anllm_ext.hf")


def _decoder_of(model):
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def transformers_model(model):
    """The transformers model a patch goes on: ``model`` itself, or the model under a wrapper that forwards to
    it (PEFT's ``PeftModel``: its ``get_base_model()``, LoRA layers in place). PEFT's ``generate`` calls the
    base model's, which never passes through the wrapper's forward: a patch on the wrapper would miss it."""
    target = model
    while getattr(type(target), "set_attn_implementation", None) is None and hasattr(target, "get_base_model"):
        target = target.get_base_model()
    return target


def is_patched(model) -> bool:
    return state_of(transformers_model(model)) is not None


def patched_anchor_ids(model) -> Optional[torch.Tensor]:
    """Anchor ids a patched model uses (None when not patched)."""
    state = state_of(transformers_model(model))
    return None if state is None else state.anchors


def patched_sink(model) -> int:
    """The ``sink`` of a patched model (0 when not patched)."""
    state = state_of(transformers_model(model))
    return 0 if state is None else state.sink


def patch(model, anchor_ids=None, *, default_cache: str = "anchor", sink: Optional[int] = None) -> "torch.nn.Module":
    """Make a transformers causal LM attend under the AnSAN mask of ``anchor_ids``; returns the model.

    ``anchor_ids``: an :class:`~anllm_ext.config.AnchorConfig` (what ``anllm_ext.config.resolve_anchor_config``
    decides; the model then carries exactly this configuration), or an int, a list of ints or a 1-D tensor of
    ids of the model's vocabulary (e.g. :func:`anllm_ext.anchors.ep_anchor_ids`). ``None`` (the default) takes the anchors the model carries in
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
    (the caches a patched model supports: :func:`~anllm_ext.hf.check_cache`).

    ``sink``: the first ``sink`` tokens of every row count as anchors whatever their ids, so every later token
    reads them and an :class:`~anllm_ext.cache.AnchorCache` keeps them (an attention sink; docs/method.md,
    "Attention sink"). None: the current value when re-patching; for a new patch the sink of the anchor
    configuration the anchors come from (one given, or the one the model carries when ``anchor_ids`` is None),
    else 0. The model then carries it in its anchor configuration (``save_pretrained`` saves it).
    """
    if default_cache not in ("anchor", "full"):
        raise ValueError(f"default_cache must be 'anchor' or 'full', got {default_cache!r}")
    if sink is not None:
        check_sink(sink)
    _check_model(model)
    from ..config import AnchorConfig

    target = transformers_model(model)  # a PEFT model: the patch goes on its base model (generate goes there)
    config = anchor_ids if isinstance(anchor_ids, AnchorConfig) else None
    ids = _anchor_ids_for(target, config.anchor_ids if config is not None else anchor_ids, wrapper=model)
    state = state_of(target)
    if sink is None:
        sink = _sink_for(target, config, anchor_ids, state)
    if state is None:
        check_full_attention_layers(target.config, "anllm_ext.patch")
        _check_one_device(target)
        decoder = _decoder_of(target)
        state = PatchState(decoder, ids, target.config._attn_implementation, _positional_params(decoder),
                           default_cache, _saved_anchor_dict(target))
    else:
        state.set_anchors(ids)
        state.default_cache = default_cache
    state.sink = sink
    _install(target, state, config)
    return model


def unpatch(model) -> "torch.nn.Module":
    """Undo :func:`patch`: hooks removed, previous attention implementation and anchor configuration restored."""
    target = transformers_model(model)
    state = state_of(target)
    if state is None:
        return model
    _lift(target, state)
    _own_set_attn_implementation(target)(state.previous_impl or "sdpa")
    return model


@contextlib.contextmanager
def patched(model, anchor_ids=None):
    """``with patched(model, anchors): ...``: the model runs under the AnSAN mask of ``anchors`` inside the block,
    and as it was before the block after it (patched with its previous anchors, or unpatched).

    ``anchors`` as :func:`patch` takes them (ids or an :class:`~anllm_ext.config.AnchorConfig`); None: a patched
    model keeps its patch, an unpatched one is patched with the anchors its config carries (``ValueError`` when it
    carries none). The model's ``default_cache`` is kept.
    """
    target = transformers_model(model)
    before = _snapshot(target)
    if anchor_ids is None and before is not None:
        yield model
        return
    patch(model, anchor_ids, default_cache=before[1] if before is not None else "anchor")
    try:
        yield model
    finally:
        _restore(model, before)


@contextlib.contextmanager
def unpatched(model):
    """``with unpatched(model): ...``: full attention inside the block (the patch lifted, as :func:`unpatch`), and
    the same patch again after it (its anchors, their saved configuration and its ``default_cache``). An
    unpatched model is used as it is."""
    before = _snapshot(transformers_model(model))
    if before is None:
        yield model
        return
    unpatch(model)
    try:
        yield model
    finally:
        _restore(model, before)


@contextlib.contextmanager
def as_original(model):
    """``with as_original(model): ...``: the model as it was before its conversion, inside the block: a PEFT
    adapter disabled and the patch lifted (full attention); as before after it. The full-attention teacher of
    self-distillation and the "original" run of ``anllm generate --original``."""
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with adapter_off, unpatched(base):
        yield model


def _snapshot(target):
    """(anchor configuration, default_cache, sink) of a patched model, or None: what :func:`_restore` puts back."""
    from ..config import AnchorConfig

    state = state_of(target)
    return None if state is None else (AnchorConfig.from_model(target), state.default_cache, state.sink)


def _restore(model, snapshot) -> None:
    if snapshot is None:
        unpatch(model)
    else:
        patch(model, snapshot[0], default_cache=snapshot[1], sink=snapshot[2])


# --------------------------------------------------------------------------------------------------
# What patch() accepts
# --------------------------------------------------------------------------------------------------


def _check_model(model) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"patch() expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError("anllm_ext.patch supports decoder-only models only")


def _anchor_ids_for(model, anchor_ids, wrapper=None) -> torch.Tensor:
    """``anchor_ids`` (or the saved ones) as a 1-D int64 tensor of ids of the model's vocabulary."""
    if anchor_ids is None:
        anchor_ids = _saved_anchor_ids(model, wrapper)
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


# --------------------------------------------------------------------------------------------------
# Installing and lifting a patch
# --------------------------------------------------------------------------------------------------


def _install(model, state: PatchState, config=None) -> None:
    """Put ``state``'s patch on ``model``: the anchor attention, the decoder's hooks (once), the instance
    overrides, and the anchors in ``model.config`` (idempotent: also repairs a patch whose attention
    implementation was switched behind its back)."""
    decoder = _decoder_of(model)
    if attn_implementation(model) != ATTN_NAME:
        _own_set_attn_implementation(model)(ATTN_NAME)
        if attn_implementation(model) != ATTN_NAME:
            raise RuntimeError(f"{type(model).__name__} refused attn_implementation '{ATTN_NAME}'")
    setattr(model, STATE_ATTR, state)
    setattr(decoder, STATE_ATTR, state)
    install_hooks(decoder, state)
    model.set_attn_implementation = types.MethodType(_set_attn_implementation, model)
    if hasattr(type(model), "_prepare_cache_for_generation"):  # generate() without a cache gets an AnchorCache
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    _attach_anchor_config(model, state, config)


def _lift(model, state: PatchState) -> None:
    """Remove the patch (hooks, state, overrides, the anchors it put in the config); the attention
    implementation is left to the caller."""
    from ..config import CONFIG_KEY

    decoder = _decoder_of(model)
    remove_hooks(state)
    for module in (model, decoder):
        module.__dict__.pop(STATE_ATTR, None)
    for name in ("_prepare_cache_for_generation", "set_attn_implementation"):
        model.__dict__.pop(name, None)
    if state.saved_anchor_config is None:
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
    else:
        setattr(model.config, CONFIG_KEY, state.saved_anchor_config)


def _saved_anchor_ids(model, wrapper=None):
    from ..config import AnchorConfig

    config = AnchorConfig.from_model(model)
    if config is None:
        peft = wrapper is not None and wrapper is not model
        raise ValueError(
            f"{type(wrapper if peft else model).__name__} carries no anchor configuration (none was saved with it: "
            "a model trained by `anllm train`, or saved by save_pretrained while patched, carries one); pass "
            "anchor_ids, e.g. anllm_ext.patch(model, anllm_ext.ep_anchor_ids(tokenizer))"
            + ("; an adapter trained by `anllm train` keeps its anchors in its anllm_config.json: "
               "anllm_ext.models.load_model(ADAPTER_DIR) loads it with them" if peft else "")
        )
    return config.anchor_ids


def _sink_for(model, config, anchor_ids, state) -> int:
    """``patch``'s sink when none is given: the current patch's, else the anchor configuration's, else 0."""
    from ..config import AnchorConfig

    if state is not None:
        return state.sink
    if config is None and anchor_ids is None:
        config = AnchorConfig.from_model(model)
    return config.sink if config is not None else 0


def _saved_anchor_dict(model):
    from ..config import CONFIG_KEY

    return getattr(model.config, CONFIG_KEY, None)


def _attach_anchor_config(model, state: PatchState, config=None) -> None:
    """Make ``model.config`` carry the anchors the model is patched with, so ``save_pretrained`` saves them:
    ``config`` when the patch was given one; else the configuration it carries (or carried before the patch,
    e.g. a trained AnLLM's AC/EP one) when that has exactly these ids, else an ``"ids"`` configuration of them;
    with the patch's sink."""
    from ..config import CONFIG_KEY, AnchorConfig

    if config is None:
        ids = sorted(set(int(i) for i in state.anchors.tolist()))
        carried = (AnchorConfig.from_dict(d) for d in (getattr(model.config, CONFIG_KEY, None),
                                                        state.saved_anchor_config) if d is not None)
        config = next((c for c in carried if c.anchor_ids == ids), None) or AnchorConfig("ids", ids)
    dataclasses.replace(config, sink=state.sink).attach(model)


# --------------------------------------------------------------------------------------------------
# Instance overrides of a patched model
# --------------------------------------------------------------------------------------------------


def _own_set_attn_implementation(model):
    """The model's own ``set_attn_implementation``, past the patch's instance override (for a wrapper that
    forwards attributes to its base model, e.g. PEFT: the base model's)."""
    target = transformers_model(model)
    return types.MethodType(type(target).set_attn_implementation, target)


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    """``set_attn_implementation`` of a patched model: ``"anllm"`` keeps the patch; any other implementation
    lifts it (as :func:`unpatch`) and is then set, so the model runs exactly as the unpatched model would.
    Paged attention (continuous batching) is refused: the anchor cache cannot run it."""
    own = _own_set_attn_implementation(self)
    state = state_of(self)
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


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
    """Instance override of ``GenerationMixin._prepare_cache_for_generation`` on a patched model: where
    transformers would create its default ``DynamicCache`` (no cache passed, no ``cache_implementation``),
    create an :class:`AnchorCache` instead, unless the patch says ``default_cache="full"``. Refuses, before
    generating, what the patched model cannot generate exactly: a switched attention implementation,
    right padding, and caches :func:`~anllm_ext.hf.check_cache` refuses."""
    state = state_of(self)
    if state is not None:
        check_attention_intact(self)
        _check_left_padding(model_kwargs.get("attention_mask"))
        check_cache_implementation(generation_config.cache_implementation)
    user_cache = any(model_kwargs.get(name) is not None for name in ("cache", "past_key_values"))
    result = type(self)._prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, *args, **kwargs
    )
    if state is None:
        return result
    made = [name for name in ("cache", "past_key_values") if model_kwargs.get(name) is not None]
    if user_cache:  # the user's cache is used as given, or refused
        for name in made:
            check_cache(model_kwargs[name])
        return result
    if generation_config.use_cache is False:
        return result
    # No cache given: the patched model picks the one it runs with (transformers' default may not fit: a
    # configured sliding window, e.g. Mistral's, makes it a sliding-window cache, which the AnSAN mask replaces).
    anchor = state.default_cache == "anchor" and generation_config.cache_implementation is None
    if anchor and (generation_mode == "assisted_generation" or getattr(generation_config, "is_assistant", False)):
        _log.warning(
            "anllm_ext: assisted decoding needs a croppable cache; this generate() keeps the full DynamicCache"
        )
        anchor = False
    if not made:  # older 5.x releases (5.0) leave the default cache to the model's forward
        if anchor and self._supports_default_dynamic_cache():
            model_kwargs[cache_kwarg(self)] = AnchorCache(self.config)
        return result  # else the pre-hook creates a full-attention DynamicCache
    from transformers import DynamicCache

    for name in made:
        default = model_kwargs[name]
        model_kwargs[name] = AnchorCache(self.config) if anchor and type(default) is DynamicCache \
            else full_attention_cache(default)
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
