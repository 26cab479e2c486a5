"""Generation with an AnchorCache: chunked prefill (compaction between chunks), then decoding.

:func:`generate` drives transformers' own ``model.generate`` (greedy, sampling, beam search, logits
processors, stopping criteria all work as usual) with an :class:`AnchorCache` and transformers'
chunked prefill (``prefill_chunk_size``), so the peak KV memory during the prompt is anchors + open
segment + one chunk. Decoded anchors trigger real-time compaction through the patch's forward hook.
A patched model's own ``model.generate()`` also uses an AnchorCache by default, but runs the prompt in
one forward unless given ``prefill_chunk_size``: use :func:`generate` for long prompts, one-off
``anchor_ids``, a progress bar or the cache's memory figures.

:func:`prefill` runs a prompt through a patched model chunk by chunk (optionally returning all
logits), for tests, benchmarks and custom decoding loops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .checks import check_int
from .console import progress_bar
from .defaults import PREFILL_CHUNK as DEFAULT_PREFILL_CHUNK
from .errors import UnsupportedError
from .cache import AnchorCache
from .hf import cache_kwarg, patched


def _check_inputs(input_ids, attention_mask, cache) -> None:
    """input_ids a non-empty [batch, tokens] integer tensor; attention_mask (if given) covering them (and the
    columns ``cache`` holds); cache an AnchorCache or None."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a [batch, tokens] integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)})")
    if cache is not None and not isinstance(cache, AnchorCache):
        raise TypeError(f"cache must be an AnchorCache (or None), got {type(cache).__name__}; for a full cache call "
                        "model.generate(..., cache_implementation='dynamic')")
    if attention_mask is None:
        return
    past = cache.get_seq_length() if cache is not None else 0
    B, T = input_ids.shape
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != B or (
        attention_mask.shape[1] not in (T, past + T)
    ):
        want = f"[{B}, {T}]" + (f" or [{B}, {past + T}] (the cache's columns too)" if past else "")
        raise ValueError(f"attention_mask must be a {want} tensor like input_ids, got "
                         f"{list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}")


_MODEL = object()  # pad_token_id's default: the model's own eos ids


def _first_id(value) -> Optional[int]:
    """A token id, or the first of a list of ids (None for None or an empty list)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def pad_token_id(model, eos_token_id=_MODEL) -> Optional[int]:
    """The id to pad a batch with when the caller gives none: the model's ``pad_token_id``, else its first
    eos id (``eos_token_id`` given: that one instead of the model's, e.g. ``generate``'s argument), looked up
    in ``model.generation_config`` and then ``model.config``; None when neither names one."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = _first_id(getattr(cfg, "pad_token_id", None))
        if pad is None:
            pad = _first_id(getattr(cfg, "eos_token_id", None) if eos_token_id is _MODEL else eos_token_id)
        if pad is not None:
            return pad
    return None


def chunk_bounds(T: int, chunk: int, last_chunk_full: bool = False):
    """(start, end) of each chunk of ``T`` columns: ``chunk`` each, the short one last, or first when
    ``last_chunk_full``."""
    cuts = list(range(T % chunk if last_chunk_full and T % chunk else chunk, T, chunk))
    return list(zip([0] + cuts, cuts + [T]))


@torch.no_grad()
def prefill(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    cache: Optional[AnchorCache] = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    return_logits: bool = False,
    anchor_ids=None,
    progress: bool = False,
    last_chunk_full: bool = False,
) -> Tuple[AnchorCache, torch.Tensor]:
    """Feed ``input_ids`` [B, T] through a patched model in chunks of ``prefill_chunk`` tokens.

    ``attention_mask`` covers the columns already in ``cache`` plus ``input_ids`` (as in transformers),
    or ``input_ids`` only. Returns (cache, logits): logits of every token [B, T, V] when
    ``return_logits``, else of the last token [B, 1, V]. ``last_chunk_full``: cut the chunks from the end, so
    the first one is short and the last one holds the prompt's last ``prefill_chunk`` tokens (recall with
    ``every="prompt"`` chooses by the last chunk: the question, not a few tokens of it).
    """
    check_int("prefill_chunk", prefill_chunk, 1)
    _check_inputs(input_ids, attention_mask, cache)
    B, T = input_ids.shape
    with patched(model, anchor_ids):
        if cache is None:
            cache = AnchorCache(model.config)
        past = cache.get_seq_length()
        if attention_mask is not None and attention_mask.shape[1] == T and past:
            attention_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], dim=1)
        bar = progress_bar(T, "prefill", progress)
        logits = []
        try:
            for s, e in chunk_bounds(T, prefill_chunk, last_chunk_full):
                out = model(
                    input_ids=input_ids[:, s:e],
                    attention_mask=None if attention_mask is None else attention_mask[:, : past + e],
                    use_cache=True,
                    **{cache_kwarg(model): cache},
                    logits_to_keep=0 if return_logits else 1,
                )
                if return_logits or e == T:
                    logits.append(out.logits)
                if bar is not None:
                    bar.update(e - s)
        finally:
            if bar is not None:
                bar.close()
    return cache, torch.cat(logits, dim=1) if return_logits else logits[-1]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    anchor_ids=None,
    cache: Optional[AnchorCache] = None,
    progress: bool = False,
    return_cache: bool = False,
    **generate_kwargs,
):
    """Generate with anchor-based inference; returns the output ids [B, T + new] like ``model.generate``.

    The model must be patched (:func:`anllm_ext.patch`) or ``anchor_ids`` given (then it is patched
    for this call only). Any other ``model.generate`` argument passes through (``temperature``,
    ``top_p``, ``num_beams``, ``eos_token_id``, ``streamer``, ...). Beam search works (the cache
    reorders its rows); assisted/speculative decoding is not supported (the cache cannot be cropped).
    With ``return_cache=True`` returns (ids, cache); ``cache.stats()`` has the memory figures.
    ``prefill_chunk``: prompt tokens per forward (an integer >= 1; None: the whole prompt in one forward).
    Batches are left-padded (right padding raises: generation continues after the last column).
    """
    check_int("prefill_chunk", prefill_chunk, 1, none_ok=True)
    check_int("max_new_tokens", max_new_tokens, 1, none_ok=True)
    _check_inputs(input_ids, attention_mask, cache)
    for bad in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if generate_kwargs.get(bad) is not None:
            raise UnsupportedError(f"{bad}: assisted decoding needs a croppable cache; AnchorCache is not")
    if generate_kwargs.pop("past_key_values", None) is not None:
        raise ValueError("pass an AnchorCache as cache=, not past_key_values=")
    with patched(model, anchor_ids):
        if cache is None:
            cache = AnchorCache(model.config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        past = cache.get_seq_length()
        if (past or cache.recall is not None) and prefill_chunk is not None:
            # Going on from a cache that holds the first `past` columns: transformers' chunked prefill starts at
            # column 0 whatever the cache holds (5.17), so the new prompt tokens but the last are prefilled here
            # and generate() goes on from the last one, unchunked. With recall the chunks are cut from the end,
            # so the forward that chooses for the answer holds the whole end of the prompt (the question).
            if input_ids.shape[1] - past > 1:
                prefill(model, input_ids[:, past:-1], attention_mask[:, :-1], cache=cache, prefill_chunk=prefill_chunk,
                        last_chunk_full=cache.recall is not None)
            prefill_chunk = None
        if generate_kwargs.get("pad_token_id") is None and getattr(model.generation_config, "pad_token_id", None) is None:
            pad = pad_token_id(model, generate_kwargs.get("eos_token_id", _MODEL))
            if pad is not None:
                generate_kwargs["pad_token_id"] = pad
        bar = progress_bar(input_ids.shape[1] + (max_new_tokens or 0), "anllm generate", progress)
        if bar is not None:
            def _tick(c, n):  # n = input columns of one forward (a prefill chunk, or 1 when decoding)
                bar.update(n)

            cache.callbacks.append(_tick)
        try:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                prefill_chunk_size=prefill_chunk,
                **{cache_kwarg(model): cache},
                **generate_kwargs,
            )
        finally:
            if bar is not None:
                cache.callbacks.remove(_tick)
                bar.close()
    return (out, cache) if return_cache else out
