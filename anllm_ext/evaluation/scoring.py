"""Token log-probabilities of a model in one evaluation mode: whole sequences (:func:`score_sequences`, what
perplexity sums) and continuations after a context (:func:`score_continuations`, what multiple choice and
lm-eval's ``loglikelihood`` compare). The lm-evaluation-harness backend calls both."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..defaults import BATCH_SIZE, PREFILL_CHUNK, RECENT_SENTENCES
from ..console import progress_bar
from .modes import ALL_MODES, RECALL_MODE, RECENT_MODE


def _pad_right(rows: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
            mask[b, T - len(r):] = 1
    return ids.to(device), mask.to(device)


def _scored(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under ``logits`` [N, V] (fp32) and whether it is the argmax."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), logits.argmax(-1) == targets


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(model) -> int:
    from ..generation import pad_token_id

    pad = pad_token_id(model)
    return 0 if pad is None else pad


def _sequence_logprobs(model, seqs: Sequence[Sequence[int]], use_cache: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One forward over right-padded ``seqs``: per sequence, log p(token t | tokens < t) for t >= 1 and
    whether each token is the argmax (both [len - 1])."""
    ids, mask = _pad_right(seqs, _pad_id(model), _model_device(model))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).logits
    return _rows_logprobs(logits, ids, [len(s) for s in seqs])


def _rows_logprobs(logits: torch.Tensor, ids: torch.Tensor, lengths: Sequence[int]):
    out = []
    for b, n in enumerate(lengths):  # row by row: one [T, V] fp32 log-softmax at a time
        if n < 2:
            out.append((logits.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool)))
            continue
        out.append(_scored(logits[b, : n - 1], ids[b, 1:n]))
    return out


@dataclass
class KVSlots:
    """KV slots counted over the cached modes' prefills (summed over sequences): ``kept`` after the last
    compaction, ``full`` what a full cache holds for the same real tokens, ``peak`` the most held at once
    (per sequence, summed; see :func:`prefill_with_peak`), ``recalled`` (``cached+recall``) the most slots a layer
    recalled from the cold store in the last forward: ``kept + recalled`` is what that forward attended."""

    kept: int = 0
    full: int = 0
    peak: int = 0
    recalled: int = 0


def score_sequences(model, sequences: Sequence[Sequence[int]], mode: str, prefill_chunk: int = PREFILL_CHUNK,
                    kv: Optional[KVSlots] = None, recall=None,
                    recent: int = RECENT_SENTENCES) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (token-id lists, one batch, right-padded): log p(token t | tokens < t) for every t >= 1
    (fp32) and whether each token is the argmax, both of shape [len - 1].

    The model must already be in ``mode`` (see :func:`~anllm_ext.evaluation.model_mode`). ``full`` /
    ``ansan``: one forward over the batch. ``cached``: the batch is prefilled in chunks of ``prefill_chunk``
    into an :class:`~anllm_ext.cache.AnchorCache` that compacts between chunks, each token scored against
    the compacted cache; ``kv`` (when given) adds up its KV slots. ``cached+recall``: the same with ``recall`` (a
    :class:`~anllm_ext.recall.RecallConfig`) in the cache; ``kv.recalled`` adds up the slots recalled.
    ``cached+recent``: the same with the last ``recent`` closed sentences kept hot.
    """
    check_mode(mode)
    if mode in ("full", "ansan"):
        return _sequence_logprobs(model, sequences)
    ids, mask = _pad_right(sequences, _pad_id(model), _model_device(model))
    cache, logits, peak = prefill_with_peak(model, ids, mask, prefill_chunk, return_logits=True,
                                            **cache_options(mode, recall, recent))
    if kv is not None:
        st = cache.stats()
        kv.recalled += sum(st.get("recalled_slots", [0]))
        kv.kept += sum(st["kept_slots"])
        kv.full += sum(st["full_cache_slots"])
        kv.peak += peak
    return _rows_logprobs(logits, ids, [len(s) for s in sequences])


def check_mode(mode: str) -> None:
    if mode not in ALL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {ALL_MODES}")


def cache_options(mode: str, recall=None, recent: int = RECENT_SENTENCES) -> dict:
    """The one decision on what an AnchorCache of a cached ``mode`` is built with (its keywords): ``recall`` (a
    RecallConfig; default settings when None) in ``cached+recall``, ``recent`` sentences kept hot in
    ``cached+recent``, neither in ``cached``."""
    from ..checks import check_int
    from ..recall import RecallConfig

    if mode == RECALL_MODE:
        return {"recall": RecallConfig() if recall is None else recall}
    if mode == RECENT_MODE:
        return {"recent": check_int("recent", recent, 1)}
    return {}


def prefill_with_peak(model, ids: torch.Tensor, mask: torch.Tensor, prefill_chunk: int, return_logits: bool = False,
                      recall=None, recent: int = 0):
    """:func:`anllm_ext.prefill` into a new AnchorCache (with ``recall``, a RecallConfig, when given; keeping ``recent``
    closed sentences hot), plus the peak KV
    slots of real tokens: per row, the most slots held at once (kept slots before a chunk + the chunk's real
    tokens), summed over rows."""
    from ..cache import AnchorCache
    from ..generation import prefill

    kept_after = []  # slots per row after each chunk's forward (compacted; padding never stays)
    cache = AnchorCache(model.config, recall=recall, recent=recent)
    cache.callbacks.append(lambda c, n: kept_after.append(c.lengths()))
    cache, logits = prefill(model, ids, mask, cache=cache, prefill_chunk=prefill_chunk, return_logits=return_logits)
    cache.callbacks.clear()
    peak = 0
    for b in range(ids.shape[0]):
        before, row_peak = 0, 0
        for k, s in enumerate(range(0, ids.shape[1], prefill_chunk)):
            row_peak = max(row_peak, before + int(mask[b, s : s + prefill_chunk].sum()))
            before = kept_after[k][b]
        peak += row_peak
    return cache, logits, peak


@dataclass
class ContinuationScores:
    """Per request: sum of the continuation's log-probabilities and whether every token is the argmax;
    KV figures of the ``cached`` mode (prompt slots kept after compaction / prompt tokens)."""

    logprobs: List[float]
    greedy: List[bool]
    kv_kept_slots: int = 0
    kv_full_slots: int = 0
    kv_peak: float = 0.0


def score_continuations(
    model,
    requests: Sequence[Tuple[Sequence[int], Sequence[int]]],
    mode: str,
    batch_size: int = BATCH_SIZE,
    prefill_chunk: int = PREFILL_CHUNK,
    progress: bool = False,
    recall=None,
    recent: int = RECENT_SENTENCES,
) -> ContinuationScores:
    """log p(continuation | context) of each ``(context_ids, continuation_ids)`` pair, in ``mode``.

    The model must already be in the mode (see :func:`~anllm_ext.evaluation.model_mode`). ``full``/``ansan``:
    each context + continuation is one sequence, ``batch_size`` per forward. ``cached``: requests sharing a
    context are grouped; each context is prefilled once into an AnchorCache (compacted between chunks), its
    rows are repeated for the group's continuations, and all continuations are scored in one forward
    against the compacted cache. ``cached+recall``: the same with ``recall`` (a RecallConfig) in the cache;
    ``cached+recent``: with the last ``recent`` closed sentences kept hot.
    """
    check_mode(mode)
    for n, (ctx, cont) in enumerate(requests):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"request {n}: the context and the continuation need at least one token each")
    if mode not in ("full", "ansan"):
        return _score_cached(model, requests, batch_size, prefill_chunk, progress, mode,
                             cache_options(mode, recall, recent))
    logprobs = [0.0] * len(requests)
    greedy = [False] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    bar = progress_bar(len(requests), f"scoring ({mode})", progress, unit="it")
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [list(requests[i][0]) + list(requests[i][1]) for i in idx]
        for i, (lp, hit) in zip(idx, _sequence_logprobs(model, seqs)):
            n_cont = len(requests[i][1])
            logprobs[i] = float(lp[-n_cont:].double().sum())
            greedy[i] = bool(hit[-n_cont:].all())
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return ContinuationScores(logprobs, greedy)


def _context_groups(requests, batch_size: int) -> List[List[Tuple[Tuple[int, ...], List[int]]]]:
    """Requests grouped by context, and the groups packed so that one forward holds at most
    ``batch_size`` continuations (a group larger than that gets a forward of its own)."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(i)
    packs, current, size = [], [], 0
    for ctx, members in sorted(groups.items(), key=lambda g: -len(g[0])):  # similar lengths pad little
        if current and size + len(members) > batch_size:
            packs.append(current)
            current, size = [], 0
        current.append((ctx, members))
        size += len(members)
    if current:
        packs.append(current)
    return packs


def _score_cached(model, requests, batch_size, prefill_chunk, progress, mode, options) -> ContinuationScores:
    from ..hf import cache_kwarg

    device = _model_device(model)
    pad = _pad_id(model)
    cache_name = cache_kwarg(model)
    logprobs = [0.0] * len(requests)
    greedy = [False] * len(requests)
    kept = full = peak = 0
    bar = progress_bar(len(requests), f"scoring ({mode})", progress, unit="it")
    for pack in _context_groups(requests, batch_size):
        # 1) prefill the contexts once (left-padded: every row's last column is its last context token)
        ids, mask = _pad_left([list(ctx) for ctx, _ in pack], pad, device)
        cache, last, pack_peak = prefill_with_peak(model, ids, mask, prefill_chunk, **options)
        st = cache.stats()
        kept += sum(st["kept_slots"]) + sum(st.get("recalled_slots", ()))  # hot: kept + recalled
        full += sum(st["full_cache_slots"])
        peak += pack_peak
        # 2) one row per continuation, against its context's compacted rows
        rows = [g for g, (_, members) in enumerate(pack) for _ in members]
        members = [i for _, ms in pack for i in ms]
        cache.batch_select_indices(torch.tensor(rows, device=device))
        conts = [list(requests[i][1]) for i in members]
        first_lp, first_hit = _scored(last[rows, -1], torch.tensor([c[0] for c in conts], device=device))
        width = max(len(c) for c in conts) - 1
        rest = None
        if width > 0:  # the continuations' tokens but the last (whose logits score nothing)
            cont_ids, cont_mask = _pad_right([c[:-1] if len(c) > 1 else [pad] for c in conts], pad, device)
            for r, c in enumerate(conts):
                if len(c) == 1:
                    cont_mask[r] = 0
            full_mask = torch.cat([mask[rows], cont_mask], dim=1)
            with torch.no_grad():
                rest = model(input_ids=cont_ids, attention_mask=full_mask, use_cache=True, **{cache_name: cache}).logits
        for r, (i, c) in enumerate(zip(members, conts)):
            lp, hit = first_lp[r : r + 1], first_hit[r : r + 1]
            if len(c) > 1:
                lp2, hit2 = _scored(rest[r, : len(c) - 1], torch.tensor(c[1:], device=device))
                lp, hit = torch.cat([lp, lp2]), torch.cat([hit, hit2])
            logprobs[i] = float(lp.double().sum())
            greedy[i] = bool(hit.all())
        if bar is not None:
            bar.update(len(members))
    if bar is not None:
        bar.close()
    return ContinuationScores(logprobs, greedy, kept, full, peak / max(full, 1))
