"""Few-shot multiple choice in each evaluation mode: the questions file (:func:`load_multiple_choice`), the
prompts (:class:`MultipleChoiceConfig`, :func:`build_context`) and the accuracy (:func:`multiple_choice`).

JSONL schema of a multiple-choice file, one object per line::

    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": 0}

``question``: a non-empty string; ``choices``: a list of at least two distinct non-empty strings;
``answer``: the 0-based index of the correct choice. Other keys (e.g. ``"id"``) are kept and ignored.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..defaults import BATCH_SIZE, PREFILL_CHUNK, RECENT_SENTENCES
from ..anchors import AC_TOKEN
from ..recall import RecallConfig
from .modes import CACHED_MODES, MODES, check_modes, model_mode
from .report import ModeResult, dump_json, format_table, set_t_up
from .scoring import score_continuations

# --------------------------------------------------------------------------------------------------
# Data
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
    from ..checks import read_utf8

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
# Prompts
# --------------------------------------------------------------------------------------------------

#: What may close a few-shot demonstration (:attr:`MultipleChoiceConfig.demo_end`).
DEMO_ENDS = ("ac", "period", "none")


@dataclass
class MultipleChoiceConfig:
    """How questions become prompts and how they are scored.

    ``shots``: demonstrations per prompt, drawn (``seed``) from the other questions of the file.
    ``demo_end``: what closes a demonstration: ``"ac"`` (the ``<AC>`` token, AC anchors), ``"period"``
    (EP anchors: a period unless the demonstration already ends with one) or ``"none"``.
    ``limit``: score the first ``limit`` questions only. ``batch_size``: sequences (options) per forward.
    ``recall``: the :class:`~anllm_ext.recall.RecallConfig` of the ``cached+recall`` mode (default settings when None).
    ``recent``: the closed sentences the ``cached+recent`` mode keeps hot.
    """

    shots: int = 0
    seed: int = 1234
    limit: Optional[int] = None
    modes: Tuple[str, ...] = MODES
    batch_size: int = BATCH_SIZE
    prefill_chunk: int = PREFILL_CHUNK
    demo_end: str = "none"
    ac_token: str = AC_TOKEN
    template: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    progress: bool = True
    recall: Optional[RecallConfig] = None
    recent: int = RECENT_SENTENCES

    def __post_init__(self):
        from ..checks import check_int

        self.modes = check_modes(self.modes)
        check_int("shots", self.shots, 0)
        check_int("limit", self.limit, 1, none_ok=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("prefill_chunk", self.prefill_chunk, 1)
        check_int("recent", self.recent, 1)
        if self.demo_end not in DEMO_ENDS:
            raise ValueError(f"demo_end must be one of {DEMO_ENDS}, got {self.demo_end!r}")
        if "{question}" not in self.template:
            raise ValueError("template must contain {question}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modes"] = list(self.modes)
        return d


def demo_end_for(anchors) -> str:
    """What closes a demonstration under ``anchors`` (an :class:`~anllm_ext.config.AnchorConfig`): ``"ac"`` for AC
    anchors, ``"period"`` for EP anchors, ``"none"`` for explicit ids (what ``--demo-end auto`` means)."""
    return {"ac": "ac", "ep": "period"}.get(anchors.mode, "none")


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
# Evaluation
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
        return dump_json(self.to_dict(with_scores), path)

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

    ``anchor_ids``: the anchors (an :class:`~anllm_ext.config.AnchorConfig` or ids) of the anchor modes; None: the
    model's patch, else the anchors its config carries (:func:`~anllm_ext.evaluation.model_mode` decides).
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
            sc = score_continuations(model, requests, mode, cfg.batch_size, cfg.prefill_chunk, cfg.progress, cfg.recall,
                                      cfg.recent)
        seconds = time.perf_counter() - t0
        flat = iter(sc.logprobs)
        scores = [[next(flat) for _ in it.options] for it in items]
        acc, norm = _accuracy(scores, items)
        r = ModeResult(mode, seconds, questions=len(items), accuracy=acc, accuracy_norm=norm)
        prompt_slots = sum(len(it.context) for it in items)
        if mode in CACHED_MODES:
            r.kv_kept_slots, r.kv_full_slots = sc.kv_kept_slots, sc.kv_full_slots
            r.kv_kept = sc.kv_kept_slots / max(sc.kv_full_slots, 1)
            r.kv_peak = sc.kv_peak
        else:
            r.kv_kept_slots = r.kv_full_slots = prompt_slots
        results[mode] = r
        all_scores[mode] = scores
    set_t_up(results)
    diff = None
    if "ansan" in all_scores and "cached" in all_scores:
        diff = max(abs(a - b) for qa, qb in zip(all_scores["ansan"], all_scores["cached"]) for a, b in zip(qa, qb))
    return MultipleChoiceResult(cfg, results, [it.answer for it in items], all_scores, diff, source)
