"""The forward hooks a patch puts on the decoder, the per-forward context they hand to every attention
call, and the patch state they read.

Once per forward the pre-hook computes the token layout of the new tokens from ``input_ids`` + the 2-D
``attention_mask`` (+ the per-row start kept by an :class:`~anllm_ext.cache.AnchorCache`), replaces
``position_ids`` by the true absolute positions (RoPE), computes the key layout once for all layers and
passes both in a :class:`ForwardContext` as the keyword ``anllm_ctx``, which transformers forwards
untouched to every attention call (so gradient checkpointing works too). The post-hook lets an
AnchorCache commit the new tokens and compact itself (all layers in one call), or records the layout of
another transformers cache's tokens (``anllm_ext.hf.history``).

The hooks are plain functions that read the patch state from the module they run on (never from a
closure), and the state keeps the hooks' removable handles, so ``copy.deepcopy`` of a patched model yields
an independently patched copy (the copied handles point at the copy's hook dicts).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..cache import AnchorCache
from ..layout import Layout, token_layout
from .attention import check_attention_intact
from .cache_policy import cache_kwarg, check_cache
from .history import history_of, remember

#: The attribute under which the model and its decoder carry their :class:`PatchState`.
STATE_ATTR = "_anllm_patch_state"


class PatchState:
    """What the hooks of one patched model need, and their handles. Stored on the model and on its
    decoder, and never captured by a hook: the hooks read it from the module they run on, so
    ``copy.deepcopy`` of a patched model gives the copy its own state (re-patching one leaves the other alone)."""

    def __init__(self, decoder, anchors: torch.Tensor, previous_impl, param_names, default_cache: str,
                 saved_anchor_config=None):
        self.anchors = anchors
        self.saved_anchor_config = saved_anchor_config  # what model.config carried before the patch
        self.previous_impl = previous_impl
        self.param_names = param_names
        self.cache_name = cache_kwarg(decoder)
        self.default_cache = default_cache
        self.sink = 0  # the first tokens of a row that are anchors whatever their ids (token_layout's sink)
        self.handles = ()  # the decoder's hooks (torch RemovableHandles)
        self._anchors_by_device = {anchors.device: anchors}

    def set_anchors(self, anchors: torch.Tensor) -> None:
        self.anchors, self._anchors_by_device = anchors, {anchors.device: anchors}

    def anchors_on(self, device) -> torch.Tensor:
        t = self._anchors_by_device.get(device)
        if t is None:
            t = self._anchors_by_device[device] = self.anchors.to(device)
        return t


def state_of(module) -> Optional[PatchState]:
    """The patch state ``module`` (a patched model or its decoder) carries, or None."""
    return module.__dict__.get(STATE_ATTR)


def install_hooks(decoder, state: PatchState) -> None:
    """Put the pre- and post-hook on ``decoder`` (once: the previous ones of ``state`` are removed)."""
    remove_hooks(state)
    state.handles = (
        decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        decoder.register_forward_hook(_post_hook, with_kwargs=True),
    )


def remove_hooks(state: PatchState) -> None:
    for handle in state.handles:
        handle.remove()
    state.handles = ()


class ForwardContext:
    """What the attention function of every layer needs for one forward: built once per forward."""

    __slots__ = ("q_layout", "k_layout", "cache", "tracked", "held", "window")

    def __init__(self, q_layout: Layout, k_layout: Layout, cache=None, tracked=None):
        self.q_layout = q_layout
        self.k_layout = k_layout
        self.cache = cache  # an AnchorCache, committed/compacted after the forward
        self.tracked = tracked  # another transformers cache whose token layout we remember
        self.held = k_layout  # the layout `tracked` holds after the forward
        self.window = None  # anllm_recent: the recent-sentence pieces of this forward (anllm_ext.recent.plan_windows)


def _pre_hook(module, args, kwargs):
    state = state_of(module)
    if state is None:  # the hook outlived its state (a module copied without its model): do nothing
        return None
    check_attention_intact(module)
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
    recalled = kwargs.pop("anllm_recalled", None)
    recent = kwargs.pop("anllm_recent", None)
    full = kwargs.pop("anllm_full_attention", None)
    ctx = _build_context(module, state, kwargs)
    if full is not None:
        _full_attention(ctx, full, recalled, recent)
    if recalled is not None:
        _recall_spans(ctx, recalled)
    if recent is not None:
        _recent_window(ctx, recent)
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


def _build_context(module, state: PatchState, kwargs) -> ForwardContext:
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
        return token_layout(input_ids, state.anchors_on(input_ids.device), chunk_mask, start, state.sink)

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

    if cache is None:  # what the decoder would create itself, created here so its layout is tracked; of
        # full-attention layers even where the config sets a sliding window (the AnSAN mask replaces it)
        from transformers import DynamicCache

        cache = DynamicCache()
        kwargs[cache_key] = cache
    check_cache(cache)
    history = history_of(cache)
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


def _require_whole_text_pass(ctx: ForwardContext, what: str, instead: str) -> None:
    """A keyword that describes this forward's tokens only (not a cache's) needs a forward that holds every key."""
    if ctx.cache is not None or ctx.k_layout.shape != ctx.q_layout.shape:
        raise ValueError(f"{what}; it cannot be combined with a cache that already holds tokens or with an "
                         f"AnchorCache ({instead})")


def _recall_spans(ctx: ForwardContext, recalled) -> None:
    """``anllm_recalled`` (bool [batch, tokens]): tokens whose keys every later real non-anchor query of the row
    sees, as anchor-indexed recall gives an evicted sentence back (anllm_ext/recall.py: recalled keys are
    flagged as anchors; training with recalled spans, anllm_ext/training/recall_spans.py). Only for a pass over
    a whole text: the flags describe this forward's tokens, not a cache's."""
    q = ctx.q_layout
    _require_whole_text_pass(ctx, "anllm_recalled marks tokens of one pass over a whole text", "use RecallConfig there")
    if not isinstance(recalled, torch.Tensor) or recalled.dtype != torch.bool or tuple(recalled.shape) != tuple(q.shape):
        raise ValueError(f"anllm_recalled must be a bool tensor of shape [batch, tokens] = {list(q.shape)}, got "
                         f"{getattr(recalled, 'dtype', type(recalled).__name__)} {list(getattr(recalled, 'shape', []))}")
    flagged = q.is_anchor | (recalled.to(q.is_anchor.device) & q.valid)
    ctx.k_layout = Layout(q.positions, q.segments, flagged, q.valid)
    ctx.held = q  # a tracked cache holds the tokens as they are: the recall was this forward's


def _full_attention(ctx: ForwardContext, full, recalled, recent) -> None:
    """``anllm_full_attention=True``: this pass over a whole text reads every earlier token (plain causal
    attention, what the AnLLM's own full attention serves), through the same kernel: one sentence, no anchor.
    A batch of ``anllm train --full-attention-share``; the positions stay the true ones."""
    if not isinstance(full, bool):
        raise ValueError(f"anllm_full_attention must be True or False, got {full!r}")
    if not full:
        return
    q = ctx.q_layout
    _require_whole_text_pass(ctx, "anllm_full_attention reads one pass over a whole text",
                             "serve full attention unpatched: anllm_ext.unpatched(model)")
    if recalled is not None or recent is not None:
        raise ValueError("anllm_full_attention already reads every token: do not combine it with anllm_recalled or "
                         "anllm_recent")
    zeros = torch.zeros_like(q.is_anchor)
    ctx.q_layout = ctx.k_layout = Layout(q.positions, torch.zeros_like(q.segments), zeros, q.valid)
    ctx.held = q  # a tracked cache holds the tokens as they are: full attention was this forward's


def _recent_window(ctx: ForwardContext, recent) -> None:
    """``anllm_recent=N``: a non-anchor query also reads every token of the N sentences before its own (the mask
    of ``AnchorCache(recent=N)``, anllm_ext/recent.py) in a forward whose keys are all there: a pass over a whole
    text (training) or a transformers cache that keeps every key. An AnchorCache keeps its own ``recent``."""
    from ..recent import plan_windows

    if isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
        raise ValueError(f"anllm_recent must be an int >= 0 (sentences), got {recent!r}")
    if ctx.cache is not None:
        raise ValueError("anllm_recent widens the mask of a forward that has every key; an AnchorCache evicts "
                         "them: build it with AnchorCache(recent=N) instead")
    if recent:
        ctx.window = plan_windows(ctx.q_layout, ctx.k_layout, recent)


def _post_hook(module, args, kwargs, output):
    ctx = kwargs.get("anllm_ctx")
    if ctx is None:
        return None
    if ctx.cache is not None:
        ctx.cache.end_forward(ctx.q_layout)
    elif ctx.tracked is not None:
        remember(ctx.tracked, ctx.held)
    return None
