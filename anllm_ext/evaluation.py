"""Quality of a model under anchor inference (see docs/method.md): perplexity and multiple-choice accuracy.

Every evaluation runs the same work in up to three modes and reports, per mode, the quality, the KV
kept against a full cache (the paper's C-down = 1 - kept / full) and the wall time (T-up = full time /
mode time):

``"full"``
    the plain model (full attention, no anchors): the patch is lifted for the run.
``"ansan"``
    one masked pass of the patched model over each whole sequence (``use_cache=False``).
``"cached"``
    anchor-based inference: the prompt is prefilled in chunks into an :class:`~anllm_ext.cache.AnchorCache`
    that compacts between chunks (:func:`anllm_ext.prefill`); what is scored is computed against the
    compacted cache. Its scores equal the ``"ansan"`` scores up to float rounding.

Perplexity (:func:`perplexity`)
    ``blocks`` is a list of token-id lists; each is scored on its own (every real token after the
    first), several per forward with right padding.

Multiple choice (:func:`multiple_choice`, data from :func:`load_multiple_choice`)
    Log-likelihood of each option after the prompt, as lm-evaluation-harness does: ``acc`` takes the
    option with the highest sum of log-probabilities, ``acc_norm`` divides it by the option's length
    in characters. k-shot prompts take k demonstrations from the same questions (seeded, never the
    question itself); each demonstration ends with ``<AC>`` (AC anchors) or a period (EP anchors). In
    the ``"cached"`` mode the prompt (demonstrations + question) is prefilled and compacted once and
    all options are scored against that compacted cache, in one batch (the paper's real-time
    compression).

JSONL schema of a multiple-choice file, one object per line::

    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": 0}

``question``: a non-empty string; ``choices``: a list of at least two distinct non-empty strings;
``answer``: the 0-based index of the correct choice. Other keys (e.g. ``"id"``) are kept and ignored.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

MODES = ("full", "ansan", "cached")


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------


def _check_modes(modes: Iterable[str]) -> Tuple[str, ...]:
    modes = tuple(modes)
    if not modes:
        raise ValueError(f"no evaluation mode given; choose from {MODES}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown evaluation mode {m!r}; choose from {MODES}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"evaluation modes repeat: {modes}")
    return modes


@contextlib.contextmanager
def model_mode(model, mode: str, anchor_ids=None):
    """Run ``model`` in ``mode``: ``"full"`` lifts the patch (and restores it), the anchor modes patch it.

    ``anchor_ids`` patches the model for the block; without them an anchor mode needs a patched model
    (or a trained AnLLM whose config carries its anchors: ``anllm_ext.patch(model)``).
    """
    from .hf import is_patched, patch, patched, patched_anchor_ids, unpatch

    if mode == "full":
        ids = patched_anchor_ids(model)
        if ids is None:
            yield model
            return
        unpatch(model)
        try:
            yield model
        finally:
            patch(model, ids)
    elif anchor_ids is not None:
        with patched(model, anchor_ids):
            yield model
    else:
        if not is_patched(model):
            raise ValueError(
                f"mode {mode!r} needs a patched model: call anllm_ext.patch(model, anchor_ids) or pass anchor_ids="
            )
        yield model


# --------------------------------------------------------------------------------------------------
# Token log-probabilities
# --------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from .generation import _progress_bar

    return _progress_bar(total, desc, enabled, unit="it")


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
    for cfg in (getattr(model, "generation_config", None), model.config):
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(cfg, name, None)
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            if v is not None:
                return int(v)
    return 0


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


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


@dataclass
class ModeResult:
    """Quality, KV and time of one mode.

    ``kv_kept``: KV slots kept after the work / slots a full cache holds for the same tokens (1.0 for
    ``full`` and ``ansan``); ``kv_peak``: per sequence, the most slots held at once during the prefill
    (kept slots + the chunk in flight, padding excluded), summed / the same full slots; ``c_down = 1 - kv_kept``; ``t_up``: the ``full`` mode's seconds /
    this mode's seconds (None without a ``full`` run).
    """

    mode: str
    seconds: float
    kv_kept: float = 1.0
    kv_peak: float = 1.0
    kv_kept_slots: int = 0
    kv_full_slots: int = 0
    t_up: Optional[float] = None
    # perplexity
    tokens: Optional[int] = None
    nll: Optional[float] = None
    perplexity: Optional[float] = None
    # multiple choice
    questions: Optional[int] = None
    accuracy: Optional[float] = None
    accuracy_norm: Optional[float] = None

    @property
    def c_down(self) -> float:
        return 1.0 - self.kv_kept

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["c_down"] = self.c_down
        return d


def _set_t_up(modes: Dict[str, ModeResult]) -> None:
    full = modes.get("full")
    for r in modes.values():
        r.t_up = (full.seconds / r.seconds) if full is not None and r.seconds > 0 else None


@dataclass
class PerplexityResult:
    """Per-mode perplexity; ``max_abs_diff_cached_vs_ansan``: largest gap between the per-token
    log-probabilities of the two anchor modes (None unless both ran)."""

    modes: Dict[str, ModeResult]
    blocks: int
    max_abs_diff_cached_vs_ansan: Optional[float] = None

    def __getitem__(self, mode: str) -> ModeResult:
        return self.modes[mode]

    def to_dict(self) -> dict:
        return {
            "task": "perplexity",
            "blocks": self.blocks,
            "max_abs_diff_cached_vs_ansan": self.max_abs_diff_cached_vs_ansan,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
        }

    def to_json(self, path=None) -> str:
        return _to_json(self.to_dict(), path)

    def table(self) -> str:
        return format_table(self.modes, ("perplexity", "nll", "tokens"))


def _check_blocks(blocks) -> List[List[int]]:
    if isinstance(blocks, torch.Tensor):
        blocks = blocks.tolist()
    out = []
    for i, b in enumerate(blocks):
        b = b.tolist() if isinstance(b, torch.Tensor) else list(b)
        if len(b) < 2:
            raise ValueError(f"block {i} has {len(b)} tokens; perplexity needs at least 2 per block")
        if not all(isinstance(t, int) for t in b):
            raise ValueError(f"block {i} holds non-integer token ids")
        out.append(b)
    if not out:
        raise ValueError("no blocks to score")
    return out


def _perplexity_batch(model, mode: str, batch: List[List[int]], prefill_chunk: int, kv: dict):
    if mode in ("full", "ansan"):
        return _sequence_logprobs(model, batch)
    ids, mask = _pad_right(batch, _pad_id(model), _model_device(model))
    cache, logits, peak = prefill_with_peak(model, ids, mask, prefill_chunk, return_logits=True)
    st = cache.stats()
    kv["kept"] += sum(st["kept_slots"])
    kv["full"] += sum(st["full_cache_slots"])
    kv["peak"] += peak
    return _rows_logprobs(logits, ids, [len(b) for b in batch])


def prefill_with_peak(model, ids: torch.Tensor, mask: torch.Tensor, chunk_size: int, return_logits: bool = False):
    """:func:`anllm_ext.prefill` into a new AnchorCache, plus the peak KV slots of real tokens: per row, the
    most slots held at once (kept slots before a chunk + the chunk's real tokens), summed over rows."""
    from .cache import AnchorCache
    from .generation import prefill

    kept_after = []  # slots per row after each chunk's forward (compacted; padding never stays)
    cache = AnchorCache(model.config)
    cache.callbacks.append(lambda c, n: kept_after.append(c.lengths()))
    cache, logits = prefill(model, ids, mask, cache=cache, chunk_size=chunk_size, return_logits=return_logits)
    cache.callbacks.clear()
    peak = 0
    for b in range(ids.shape[0]):
        before, row_peak = 0, 0
        for k, s in enumerate(range(0, ids.shape[1], chunk_size)):
            row_peak = max(row_peak, before + int(mask[b, s : s + chunk_size].sum()))
            before = kept_after[k][b]
        peak += row_peak
    return cache, logits, peak


def perplexity(
    model,
    blocks: Sequence[Sequence[int]],
    modes: Sequence[str] = MODES,
    prefill_chunk: int = 256,
    batch_size: int = 4,
    progress: bool = True,
    anchor_ids=None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``blocks`` (token-id lists, each scored on its own) in each mode.

    ``model`` is patched (:func:`anllm_ext.patch`) or ``anchor_ids`` given; ``"full"`` runs it unpatched.
    Every real token after the first of a block is scored. ``prefill_chunk``: chunk of the ``"cached"``
    mode's prefill (compaction between chunks); ``batch_size``: blocks per forward (right-padded).
    Returns a :class:`PerplexityResult` (``result["cached"].perplexity``, ``.kv_kept``, ``.seconds``, ...).
    """
    from .checks import check_int

    modes = _check_modes(modes)
    blocks = _check_blocks(blocks)
    check_int("batch_size", batch_size, 1)
    check_int("prefill_chunk", prefill_chunk, 1)
    # longest first: batches of similar lengths pad little
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))
    results: Dict[str, ModeResult] = {}
    per_token: Dict[str, List[torch.Tensor]] = {}
    for mode in modes:
        kv = {"kept": 0, "full": 0, "peak": 0}
        scores: List[Optional[torch.Tensor]] = [None] * len(blocks)
        bar = _progress(len(blocks), f"perplexity ({mode})", progress)
        t0 = time.perf_counter()
        with model_mode(model, mode, anchor_ids), torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                rows = _perplexity_batch(model, mode, [blocks[i] for i in idx], prefill_chunk, kv)
                for i, (lp, _) in zip(idx, rows):
                    scores[i] = lp.cpu()
                if bar is not None:
                    bar.update(len(idx))
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        per_token[mode] = scores
        all_lp = torch.cat(scores)
        n = int(all_lp.numel())
        nll = float(-all_lp.double().sum() / n)
        r = ModeResult(mode, seconds, tokens=n, nll=nll, perplexity=math.exp(nll))
        if mode == "cached":
            r.kv_kept_slots, r.kv_full_slots = kv["kept"], kv["full"]
            r.kv_kept = kv["kept"] / max(kv["full"], 1)
            r.kv_peak = kv["peak"] / max(kv["full"], 1)
        else:
            r.kv_kept_slots = r.kv_full_slots = sum(len(b) for b in blocks)
        results[mode] = r
    _set_t_up(results)
    diff = None
    if "ansan" in per_token and "cached" in per_token:
        diff = max(float((a - b).abs().max()) for a, b in zip(per_token["ansan"], per_token["cached"]))
    return PerplexityResult(results, len(blocks), diff)


def text_blocks(tokenizer, texts: Sequence[str], block_size: int = 512, max_blocks: Optional[int] = None,
                ac_token: Optional[str] = None, anchor_ids: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Token blocks of at most ``block_size`` tokens, cut as ``anllm train`` cuts its held-out text
    (:mod:`anllm_ext.data`): BOS first when the tokenizer uses one, each text on its own, cut at anchors
    (sentence ends) where possible, so a block ends on a whole segment. ``ac_token``: AC mode, the token
    is inserted after every sentence and is the anchor. ``anchor_ids``: the anchors to cut at (default:
    the ``ac_token``'s id in AC mode, else the tokenizer's sentence-final punctuation, as EP mode)."""
    from .anchors import ep_anchor_ids
    from .config import AnchorConfig
    from .data import encode_documents

    from .checks import check_int

    check_int("block_size", block_size, 2)
    check_int("max_blocks", max_blocks, 0, none_ok=True)
    if ac_token is not None:
        ac_id = tokenizer.convert_tokens_to_ids(ac_token)
        if ac_id is None or ac_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {ac_token!r}; add it first (anllm_ext.add_ac_token)")
        config = AnchorConfig("ac", list(anchor_ids) if anchor_ids is not None else [ac_id], ac_token=ac_token)
    else:
        config = AnchorConfig("ids", list(anchor_ids) if anchor_ids is not None else ep_anchor_ids(tokenizer))
    blocks = encode_documents(texts, tokenizer, config, block_size)
    if not blocks:
        raise ValueError("the texts hold fewer than 2 tokens")
    return blocks[:max_blocks] if max_blocks else blocks


# --------------------------------------------------------------------------------------------------
# Multiple choice: data
# --------------------------------------------------------------------------------------------------


@dataclass
class Question:
    question: str
    choices: List[str]
    answer: int
    row: str = ""  # "file:line", for messages


def _validate_question(obj, where: str) -> Question:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} (schema: question, choices, answer)")
    q, choices, answer = obj["question"], obj["choices"], obj["answer"]
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: every choice must be a non-empty string")
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: choices repeat: {choices}")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise ValueError(f"{where}: 'answer' must be an integer index, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
    return Question(q, list(choices), int(answer), where)


def load_multiple_choice(path) -> List[Question]:
    """Questions from a UTF-8 JSONL file (schema in the module docstring; a UTF-8 byte-order mark is
    accepted); errors name the file and line."""
    from .checks import read_utf8

    path = Path(path)
    questions = []
    for n, line in enumerate(read_utf8(path, "multiple-choice file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
        questions.append(_validate_question(obj, where))
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


# --------------------------------------------------------------------------------------------------
# Multiple choice: prompts
# --------------------------------------------------------------------------------------------------

DEMO_ENDS = ("ac", "period", "none")


@dataclass
class MultipleChoiceConfig:
    """How questions become prompts and how they are scored.

    ``shots``: demonstrations per prompt, drawn (``seed``) from the other questions of the file.
    ``demo_end``: what closes a demonstration: ``"ac"`` (the ``<AC>`` token, AC anchors), ``"period"``
    (EP anchors: a period unless the demonstration already ends with one) or ``"none"``.
    ``limit``: score the first ``limit`` questions only. ``batch_size``: sequences (options) per forward.
    """

    shots: int = 0
    seed: int = 1234
    limit: Optional[int] = None
    modes: Tuple[str, ...] = MODES
    batch_size: int = 8
    prefill_chunk: int = 256
    demo_end: str = "none"
    ac_token: str = "<AC>"
    template: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    progress: bool = True

    def __post_init__(self):
        from .checks import check_int

        self.modes = _check_modes(self.modes)
        check_int("shots", self.shots, 0)
        check_int("limit", self.limit, 1, none_ok=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("prefill_chunk", self.prefill_chunk, 1)
        if self.demo_end not in DEMO_ENDS:
            raise ValueError(f"demo_end must be one of {DEMO_ENDS}, got {self.demo_end!r}")
        if "{question}" not in self.template:
            raise ValueError("template must contain {question}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modes"] = list(self.modes)
        return d


def _demonstration(q: Question, cfg: MultipleChoiceConfig) -> str:
    text = cfg.template.format(question=q.question) + cfg.target_delimiter + q.choices[q.answer]
    if cfg.demo_end == "ac":
        text += cfg.ac_token
    elif cfg.demo_end == "period" and not text.rstrip().endswith("."):
        text = text.rstrip() + "."
    return text


def build_context(questions: Sequence[Question], index: int, cfg: MultipleChoiceConfig) -> str:
    """The prompt of question ``index``: ``cfg.shots`` demonstrations (seeded, never the question itself),
    then the question."""
    if cfg.shots > len(questions) - 1:
        raise ValueError(
            f"{cfg.shots} shots need at least {cfg.shots + 1} questions (the question itself is never a "
            f"demonstration); the file has {len(questions)}"
        )
    others = [i for i in range(len(questions)) if i != index]
    picks = random.Random(cfg.seed * 1_000_003 + index).sample(others, cfg.shots) if cfg.shots else []
    parts = [_demonstration(questions[i], cfg) for i in picks]
    parts.append(cfg.template.format(question=questions[index].question))
    return cfg.fewshot_delimiter.join(parts)


@dataclass
class _Item:
    context: List[int]
    options: List[List[int]]
    lengths: List[int]  # characters of each choice (acc_norm)
    answer: int


def _encode_items(tokenizer, questions, indices, cfg) -> List[_Item]:
    items = []
    for i in indices:
        q = questions[i]
        ctx = tokenizer(build_context(questions, i, cfg))["input_ids"]
        if not ctx:
            raise ValueError(f"{q.row}: the prompt tokenizes to nothing")
        opts = [tokenizer(cfg.target_delimiter + c, add_special_tokens=False)["input_ids"] for c in q.choices]
        for c, o in zip(q.choices, opts):
            if not o:
                raise ValueError(f"{q.row}: choice {c!r} tokenizes to nothing")
        items.append(_Item(list(ctx), [list(o) for o in opts], [len(c) for c in q.choices], q.answer))
    return items


# --------------------------------------------------------------------------------------------------
# Scoring (context, continuation) pairs: shared with the lm-eval backend
# --------------------------------------------------------------------------------------------------


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
    batch_size: int = 8,
    prefill_chunk: int = 256,
    progress: bool = False,
) -> ContinuationScores:
    """log p(continuation | context) of each ``(context_ids, continuation_ids)`` pair, in ``mode``.

    The model must already be in the mode (see :func:`model_mode`). ``full``/``ansan``: each context +
    continuation is one sequence, ``batch_size`` per forward. ``cached``: requests sharing a context
    are grouped; each context is prefilled once into an AnchorCache (compacted between chunks), its
    rows are repeated for the group's continuations, and all continuations are scored in one forward
    against the compacted cache.
    """
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {MODES}")
    for n, (ctx, cont) in enumerate(requests):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"request {n}: the context and the continuation need at least one token each")
    if mode == "cached":
        return _score_cached(model, requests, batch_size, prefill_chunk, progress)
    logprobs = [0.0] * len(requests)
    greedy = [False] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    bar = _progress(len(requests), f"scoring ({mode})", progress)
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


def _score_cached(model, requests, batch_size, prefill_chunk, progress) -> ContinuationScores:
    from .hf import cache_kwarg

    device = _model_device(model)
    pad = _pad_id(model)
    cache_name = cache_kwarg(model)
    logprobs = [0.0] * len(requests)
    greedy = [False] * len(requests)
    kept = full = peak = 0
    bar = _progress(len(requests), "scoring (cached)", progress)
    for pack in _context_groups(requests, batch_size):
        # 1) prefill the contexts once (left-padded: every row's last column is its last context token)
        ids, mask = _pad_left([list(ctx) for ctx, _ in pack], pad, device)
        cache, last, pack_peak = prefill_with_peak(model, ids, mask, prefill_chunk)
        st = cache.stats()
        kept += sum(st["kept_slots"])
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


# --------------------------------------------------------------------------------------------------
# Multiple choice: evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class MultipleChoiceResult:
    """Per-mode accuracy; ``scores[mode][q][c]``: log-likelihood of choice c of question q;
    ``max_abs_diff_cached_vs_ansan``: largest gap between those two modes' scores (None unless both ran)."""

    config: MultipleChoiceConfig
    modes: Dict[str, ModeResult]
    answers: List[int]
    scores: Dict[str, List[List[float]]] = field(default_factory=dict)
    max_abs_diff_cached_vs_ansan: Optional[float] = None
    source: Optional[str] = None

    def __getitem__(self, mode: str) -> ModeResult:
        return self.modes[mode]

    def to_dict(self, with_scores: bool = False) -> dict:
        d = {
            "task": "multiple_choice",
            "source": self.source,
            "config": self.config.to_dict(),
            "questions": len(self.answers),
            "max_abs_diff_cached_vs_ansan": self.max_abs_diff_cached_vs_ansan,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
        }
        if with_scores:
            d["answers"] = self.answers
            d["scores"] = self.scores
        return d

    def to_json(self, path=None, with_scores: bool = False) -> str:
        return _to_json(self.to_dict(with_scores), path)

    def table(self) -> str:
        return format_table(self.modes, ("accuracy", "accuracy_norm", "questions"))


def _accuracy(scores: List[List[float]], items: List[_Item]) -> Tuple[float, float]:
    acc = norm = 0
    for s, it in zip(scores, items):
        acc += max(range(len(s)), key=lambda c: s[c]) == it.answer
        norm += max(range(len(s)), key=lambda c: s[c] / it.lengths[c]) == it.answer
    return acc / len(items), norm / len(items)


def multiple_choice(model, tokenizer, questions: Sequence[Question], config: Optional[MultipleChoiceConfig] = None,
                    anchor_ids=None, source: Optional[str] = None) -> MultipleChoiceResult:
    """Accuracy of ``model`` on ``questions`` (see :func:`load_multiple_choice`) in each mode of ``config``.

    ``model`` is patched (:func:`anllm_ext.patch`) or ``anchor_ids`` given; ``"full"`` runs it unpatched.
    """
    cfg = config or MultipleChoiceConfig()
    questions = list(questions)
    if not questions:
        raise ValueError("no questions to score")
    indices = list(range(len(questions)))[: cfg.limit]
    items = _encode_items(tokenizer, questions, indices, cfg)
    requests = [(it.context, o) for it in items for o in it.options]
    results: Dict[str, ModeResult] = {}
    all_scores: Dict[str, List[List[float]]] = {}
    for mode in cfg.modes:
        t0 = time.perf_counter()
        with model_mode(model, mode, anchor_ids), torch.no_grad():
            sc = score_continuations(model, requests, mode, cfg.batch_size, cfg.prefill_chunk, cfg.progress)
        seconds = time.perf_counter() - t0
        flat = iter(sc.logprobs)
        scores = [[next(flat) for _ in it.options] for it in items]
        acc, norm = _accuracy(scores, items)
        r = ModeResult(mode, seconds, questions=len(items), accuracy=acc, accuracy_norm=norm)
        prompt_slots = sum(len(it.context) for it in items)
        if mode == "cached":
            r.kv_kept_slots, r.kv_full_slots = sc.kv_kept_slots, sc.kv_full_slots
            r.kv_kept = sc.kv_kept_slots / max(sc.kv_full_slots, 1)
            r.kv_peak = sc.kv_peak
        else:
            r.kv_kept_slots = r.kv_full_slots = prompt_slots
        results[mode] = r
        all_scores[mode] = scores
    _set_t_up(results)
    diff = None
    if "ansan" in all_scores and "cached" in all_scores:
        diff = max(abs(a - b) for qa, qb in zip(all_scores["ansan"], all_scores["cached"]) for a, b in zip(qa, qb))
    return MultipleChoiceResult(cfg, results, [it.answer for it in items], all_scores, diff, source)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _to_json(d: dict, path=None) -> str:
    text = json.dumps(d, indent=2)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def format_table(modes: Dict[str, ModeResult], quality: Sequence[str]) -> str:
    """A plain-text table: one row per mode, quality columns then KV kept, C-down, seconds, T-up."""
    head = ["mode", *quality, "KV kept", "KV peak", "C-down", "seconds", "T-up"]
    rows = [head]
    for r in modes.values():
        cells = [r.mode]
        for q in quality:
            v = getattr(r, q)
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        cells += [f"{100 * r.kv_kept:.1f}%", f"{100 * r.kv_peak:.1f}%", f"{100 * r.c_down:.1f}%", f"{r.seconds:.2f}",
                  "-" if r.t_up is None else f"{r.t_up:.2f}x"]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot_results(records: Sequence[dict], path, title: Optional[str] = None) -> None:
    """PNG of quality vs KV kept, one point per mode (and per shot count): accuracy for multiple
    choice, perplexity for text. ``records``: ``to_dict()`` outputs. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)") from e
    kinds = [k for k in ("multiple_choice", "perplexity") if any(r["task"] == k for r in records)]
    if not kinds:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    markers = {"full": "s", "ansan": "^", "cached": "o"}  # the mode by marker, the run by colour, in a legend
    for ax, kind in zip(axes[0], kinds):
        for i, r in enumerate(r for r in records if r["task"] == kind):
            label = f"{r['config']['shots']}-shot" if kind == "multiple_choice" else "text"
            for mode, m in r["modes"].items():
                y = m["accuracy"] if kind == "multiple_choice" else m["perplexity"]
                ax.scatter(100 * m["kv_kept"], y, marker=markers.get(mode, "x"), s=60, color=f"C{i % 10}",
                           alpha=0.8, label=f"{mode}, {label}")
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("KV kept vs full cache (%)")
        ax.set_ylabel("accuracy" if kind == "multiple_choice" else "perplexity")
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title("multiple choice" if kind == "multiple_choice" else "perplexity")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CLI: ``anllm eval``
# --------------------------------------------------------------------------------------------------


def resolve_model_anchors(model, tokenizer, spec: Optional[str]) -> Tuple[List[int], str, Optional[str]]:
    """(anchor ids, style, AC token) from a CLI spec, or from the anchor configuration a trained AnLLM
    carries (``spec=None``; plain models then default to ``"ep"``). Style: ``"ac"``, ``"ep"`` or ``"ids"``."""
    from .anchors import AC_TOKEN, PRESETS, resolve_anchors

    if spec is None:
        from .config import AnchorConfig

        saved = AnchorConfig.from_model(model)
        if saved is not None:
            return list(saved.anchor_ids), saved.mode, saved.ac_token
        spec = "ep"
    spec = spec.strip()
    ids = resolve_anchors(spec, tokenizer, model)
    if spec in PRESETS:
        style = PRESETS[spec].mode
    elif spec == "ac":
        style = "ac"
    elif spec == "ep" or spec.startswith("ep:"):
        style = "ep"
    else:
        style = "ids"
    return ids, style, AC_TOKEN if style == "ac" else None


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to ``anllm``'s subcommands (the parser and its function live here)."""
    from .checks import arg_int

    e = subparsers.add_parser("eval", help="perplexity and multiple-choice accuracy: full attention vs anchor inference",
                              description=__doc__.split("\n\n")[0])
    e.add_argument("--model", default=None, help="local model directory (default: bundled SmolLM2-135M-Instruct)")
    e.add_argument("--text", nargs="+", default=None, metavar="PATH",
                   help="text for perplexity: files or folders (searched recursively), with the file rules of "
                        "`anllm train --data`: .txt/.md/.rst/.text (one document each), .jsonl/.json and .parquet "
                        "(one document per row, field 'text'); UTF-8")
    e.add_argument("--mc", default=None, metavar="JSONL", help="multiple-choice questions (question, choices, answer)")
    e.add_argument("--anchors", default=None,
                   help="ep, ep:<chars>, ac, anllm-ac/anllm-ep or ids '13,30' (default: the anchors a trained "
                        "AnLLM carries, else ep)")
    e.add_argument("--mode", default=",".join(MODES), help=f"comma-separated modes from {MODES}")
    e.add_argument("--shots", type=arg_int(0), nargs="+", default=[0], help="demonstrations per question (several: one run each)")
    e.add_argument("--limit", type=arg_int(1), default=None, help="score the first N questions")
    e.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draw")
    e.add_argument("--demo-end", choices=("auto",) + DEMO_ENDS, default="auto",
                   help="what ends a demonstration (auto: <AC> for ac anchors, a period for ep, nothing for ids)")
    e.add_argument("--batch-size", type=arg_int(1), default=8, help="sequences per forward")
    e.add_argument("--prefill-chunk", type=arg_int(1), default=256, help="prefill chunk of the cached mode")
    e.add_argument("--block-size", type=arg_int(2), default=512, help="tokens per perplexity block")
    e.add_argument("--max-blocks", type=arg_int(0), default=16, help="perplexity blocks at most (0: all)")
    e.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    e.add_argument("--plot", default=None, metavar="PNG", help="write quality vs KV kept as a PNG (matplotlib)")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=arg_int(0), default=0, help="torch threads (0: torch's default)")
    e.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args) -> int:
    from .checks import check_device, check_output_path
    from .data import list_data_files, load_documents
    from .hf import patch
    from .models import load_model

    if args.text is None and args.mc is None:
        raise ValueError("nothing to evaluate: give --text PATH... and/or --mc FILE.jsonl")
    modes = _check_modes(m.strip() for m in args.mode.split(",") if m.strip())
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # bad files fail before the model loads
    questions = load_multiple_choice(args.mc) if args.mc else None
    texts = list(load_documents(args.text)["text"]) if args.text else []
    n_files = sum(len(f) for f in list_data_files(args.text).values()) if args.text else 0
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    ids, style, ac_token = resolve_model_anchors(model, tok, args.anchors)
    patch(model, ids)
    name = args.model or "bundled SmolLM2-135M-Instruct"
    print(f"model: {name} ({type(model).__name__}, {args.dtype}, {torch.get_num_threads()} threads); "
          f"anchors: {args.anchors or style} ({len(ids)} ids); modes: {', '.join(modes)}")
    records = []
    if texts:
        blocks = text_blocks(tok, texts, args.block_size, args.max_blocks, ac_token=ac_token, anchor_ids=ids)
        res = perplexity(model, blocks, modes, args.prefill_chunk, args.batch_size, args.progress)
        print(f"\nperplexity: {len(blocks)} blocks of <= {args.block_size} tokens from {len(texts)} document(s) in "
              f"{n_files} file(s)")
        print(res.table())
        if res.max_abs_diff_cached_vs_ansan is not None:
            print(f"cached vs ansan: max |token log-prob difference| {res.max_abs_diff_cached_vs_ansan:.2e}")
        records.append({**res.to_dict(), "source": [str(f) for f in args.text]})
    demo_end = args.demo_end if args.demo_end != "auto" else {"ac": "ac", "ep": "period"}.get(style, "none")
    for shots in args.shots if questions else []:
        cfg = MultipleChoiceConfig(shots=shots, seed=args.seed, limit=args.limit, modes=modes,
                                   batch_size=args.batch_size, prefill_chunk=args.prefill_chunk, demo_end=demo_end,
                                   ac_token=ac_token or "<AC>", progress=args.progress)
        res = multiple_choice(model, tok, questions, cfg, source=str(args.mc))
        print(f"\nmultiple choice: {len(res.answers)} questions from {args.mc}, {shots}-shot, demonstrations end: "
              f"{demo_end}")
        print(res.table())
        if res.max_abs_diff_cached_vs_ansan is not None:
            print(f"cached vs ansan: max |option log-likelihood difference| {res.max_abs_diff_cached_vs_ansan:.2e}")
        records.append(res.to_dict())
    meta = {"model": name, "dtype": args.dtype, "anchors": args.anchors or style, "threads": torch.get_num_threads()}
    if args.json:
        _to_json({"meta": meta, "results": records}, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_results(records, args.plot, title=f"{name}, anchors {meta['anchors']}")
        print(f"wrote {args.plot}")
    return 0
