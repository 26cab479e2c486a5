"""Needle recall: does a model find one fact in a long context under a given KV policy?

A trial hides a needle sentence ("The secret code of the NAME archive is 4821.") at a relative depth in
``length`` tokens of haystack prose, then asks in the model's chat template for the code; greedy decoding;
the trial scores when the code's digits appear in the answer. Every trial reports the hot KV fraction
(KV entries attended in a forward over a full cache's, the largest over the answer's forwards) and its wall
time.

Policies (:data:`POLICIES`): ``"full"`` (the plain model, transformers' full cache), ``"cached"`` (anchor
inference: an :class:`~anllm_ext.AnchorCache`), ``"recall"`` (the same cache with a
:class:`~anllm_ext.RecallConfig`), ``"oracle"`` (the same cache recalling exactly the needle sentence in every
layer at every step: the ceiling of any choice rule at that budget). The haystack is the caller's: held-out prose no training here read
(``scripts/needle_recall.py`` uses the GPL-3, see docs/evaluation.md).
"""
from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import torch

POLICIES = ("full", "cached", "recall", "oracle")
NAMES = ("Harbor", "Granite", "Willow", "Falcon", "Meridian", "Copper", "Juniper", "Orchid", "Saffron", "Tundra",
         "Beacon", "Cobalt", "Lantern", "Maple", "Quartz", "Summit")
QUESTION = "What is the secret code of the {name} archive? Answer with the number only."


@dataclass(frozen=True)
class NeedleTrial:
    """One trial: the needle's archive name and code, its relative depth (0 = start, 1 = end), the haystack
    length in tokens and where in the haystack text the context starts (a paragraph index)."""

    name: str
    code: str
    depth: float
    length: int
    offset: int

    @property
    def needle(self) -> str:
        return f"The secret code of the {self.name} archive is {self.code}."


def make_trials(lengths: Sequence[int], depths: Sequence[float], per_cell: int, paragraphs: int,
                seed: int = 0) -> List[NeedleTrial]:
    """``per_cell`` trials for every (length, depth), seeded: a name, a 4-digit code, a haystack offset."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depths are fractions in [0, 1], got {d}")
    for n in lengths:
        if not isinstance(n, int) or n < 32:
            raise ValueError(f"haystack lengths are token counts >= 32, got {n!r}")
    if per_cell < 1 or paragraphs < 1:
        raise ValueError(f"need per_cell >= 1 and a haystack of >= 1 paragraph, got {per_cell}, {paragraphs}")
    rng = random.Random(seed)
    return [NeedleTrial(rng.choice(NAMES), str(rng.randint(1000, 9999)), d, n, rng.randrange(paragraphs))
            for n in lengths for d in depths for _ in range(per_cell)]


def build_prompt(tokenizer, paragraphs: Sequence[str], trial: NeedleTrial) -> torch.Tensor:
    """Token ids [1, T] of the chat prompt: the user turn holds :func:`haystack_text` then
    :func:`question_text`."""
    return chat_ids(tokenizer, haystack_text(tokenizer, paragraphs, trial) + question_text(trial))


def chat_ids(tokenizer, content: str) -> torch.Tensor:
    """Token ids [1, T] of one user turn holding ``content`` in the model's chat template, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def question_text(trial: NeedleTrial) -> str:
    """What follows the haystack in the user turn."""
    return "\n\n" + QUESTION.format(name=trial.name)


def haystack_text(tokenizer, paragraphs: Sequence[str], trial: NeedleTrial) -> str:
    """~``trial.length`` tokens of ``paragraphs`` from paragraph ``trial.offset`` on (wrapping; the last one cut
    at a sentence end), the needle inserted at ``trial.depth`` (at the nearest sentence start)."""
    chosen, count, i = [], 0, trial.offset
    while count < trial.length:
        para = paragraphs[i % len(paragraphs)]
        ids = tokenizer(para, add_special_tokens=False)["input_ids"]
        if count + len(ids) > trial.length:  # cut the last paragraph at a sentence end when possible
            cut = tokenizer.decode(ids[: trial.length - count])
            para = cut[: cut.rfind(". ") + 1] if ". " in cut else cut
            ids = tokenizer(para, add_special_tokens=False)["input_ids"]
        chosen.append(para)
        count += len(ids)
        i += 1
        if i - trial.offset > 10 * len(paragraphs):
            raise ValueError("the haystack paragraphs are empty")
    text = "\n\n".join(chosen)
    # insert at the sentence start nearest the depth, so the needle is a sentence (a segment) of its own
    starts = [0] + [m.end() for m in re.finditer(r"\.\s+", text)] + [len(text)]
    at = min(starts, key=lambda i: abs(i - trial.depth * len(text)))
    return text[:at] + trial.needle + ("" if at == len(text) else " ") + text[at:]


@dataclass
class NeedleResult:
    policy: str
    recall: Optional[dict]
    trials: List[dict] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(t["found"] for t in self.trials) / len(self.trials) if self.trials else 0.0

    def as_dict(self) -> dict:
        by_length = {}
        for t in self.trials:
            by_length.setdefault(t["length"], []).append(t)
        return {"policy": self.policy, "recall": self.recall, "score": self.score,
                "by_length": {n: {"score": sum(t["found"] for t in ts) / len(ts),
                                  "hot_fraction": sum(t["hot_fraction"] for t in ts) / len(ts),
                                  "seconds": sum(t["seconds"] for t in ts) / len(ts), "trials": len(ts)}
                              for n, ts in sorted(by_length.items())},
                "trials": self.trials}


def run_needle(model, tokenizer, paragraphs: Sequence[str], trials: Sequence[NeedleTrial], policy: str,
               recall=None, max_new_tokens: int = 16, prefill_chunk: int = 512, log=None) -> NeedleResult:
    """Run every trial under ``policy`` (:data:`POLICIES`). ``"cached"``/``"recall"`` need a patched model;
    ``"full"`` an unpatched one. ``recall``: the :class:`~anllm_ext.RecallConfig` of ``"recall"``."""
    from ..cache import AnchorCache
    from ..generation import generate
    from ..hf import is_patched
    from ..recall import RecallConfig

    if policy not in POLICIES:
        raise ValueError(f"unknown needle policy {policy!r}; choose from {POLICIES}")
    if (policy == "recall") != isinstance(recall, RecallConfig):
        raise ValueError("policy 'recall' takes a RecallConfig as recall=, the other policies none")
    if policy == "oracle":
        recall = RecallConfig(budget=1)
    if (policy == "full") == is_patched(model):
        raise ValueError(f"policy {policy!r} needs {'an unpatched' if policy == 'full' else 'a patched'} model")
    result = NeedleResult(policy, asdict(recall) if policy == "recall" else None)
    for trial in trials:
        hits = []
        ids = build_prompt(tokenizer, paragraphs, trial)
        start = time.perf_counter()
        with torch.no_grad():
            if policy == "full":
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
                hot = 1.0
            else:
                cache = AnchorCache(model.config, recall=recall)
                segment = needle_segment(tokenizer, model, ids, trial)
                if policy == "oracle":
                    cache.recall = _needle_oracle(recall, segment)
                hits = _track_needle_hits(cache, segment, ids.shape[1])
                hot_steps = _track_hot_fraction(cache, ids.shape[1])
                out = generate(model, ids, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk, cache=cache)
                hot = max(hot_steps)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        found = trial.code in answer.replace(",", "").replace(" ", "")
        result.trials.append({**asdict(trial), "prompt_tokens": int(ids.shape[1]), "answer": answer,
                              "found": found, "hot_fraction": hot, "seconds": seconds,
                              # share of layers whose recall held the needle: at the forward that gave the
                              # first answer token, and over all forwards from then on
                              "needle_hit_first": hits[0] if hits else None,
                              "needle_hit_mean": sum(hits) / len(hits) if hits else None})
        if log is not None:
            hit = "" if not hits else f" needle-hit first={hits[0]:.2f} mean={sum(hits) / len(hits):.2f}"
            log(f"{policy} len={trial.length} depth={trial.depth} found={found} hot={hot:.3f}{hit} "
                f"{seconds:.1f}s {answer!r}")
    return result


def needle_segment(tokenizer, model, ids: torch.Tensor, trial: NeedleTrial) -> int:
    """The segment id of the needle sentence in the prompt ``ids`` [1, T] under the patched model's anchors."""
    return marker_segment(tokenizer, model, ids, f" {trial.name} archive is")


def marker_segment(tokenizer, model, ids: torch.Tensor, marker_text: str) -> int:
    """The segment id, under the patched model's anchors, of the first place ``ids`` [1, T] holds the tokens of
    ``marker_text`` (a phrase inside a sentence: its first token's context does not change its tokens)."""
    from ..hf import patched_anchor_ids, patched_sink
    from ..layout import token_layout

    marker = tokenizer(marker_text, add_special_tokens=False)["input_ids"]
    row = ids[0].tolist()
    for i in range(len(row) - len(marker) + 1):
        if row[i : i + len(marker)] == marker:
            return int(token_layout(ids, patched_anchor_ids(model), sink=patched_sink(model)).segments[0, i])
    raise ValueError(f"{marker_text.strip()!r} is not in the prompt")


def _track_hot_fraction(cache, prompt_len: int) -> List[float]:
    """After every forward from the prompt's last one on, append the hot KV fraction of that forward: (kept
    slots after it + the most slots a layer recalled in it) / the real tokens seen (row 0); the trial reports
    the largest."""
    fractions: List[float] = []

    def record(c, n_new):
        if c.seen_tokens >= prompt_len:
            st = c.stats()
            recalled = st["recalled_slots"][0] if st.get("recalled_slots") else 0
            fractions.append((st["kept_slots"][0] + recalled) / st["full_cache_slots"][0])

    cache.callbacks.append(record)
    return fractions


def _track_needle_hits(cache, segment: int, prompt_len: int) -> List[float]:
    """After every forward from the prompt's last one on, append the share of layers whose last recall choice
    (row 0) held ``segment``; returns the (growing) list."""
    hits: List[float] = []

    def record(c, n_new):
        chosen = c.recall.chosen if c.recall is not None else {}
        if chosen and c.seen_tokens >= prompt_len:
            hits.append(sum(bool((segs[0] == segment).any()) for segs in chosen.values()) / len(chosen))

    cache.callbacks.append(record)
    return hits


def _needle_oracle(config, segment: int):
    """Recall that always chooses the needle's segment (once it is evicted), in every layer."""
    from ..recall import RecallState

    class NeedleOracle(RecallState):
        def _choose(self, layer, query, lse_hot, q_layout, k_layout, scale):
            if not any(self.cold.lengths):
                return None
            chosen = [torch.tensor([segment], device=query.device)] * query.shape[0]
            self.chosen[layer.index] = chosen
            return self.cold.gather(layer.index, chosen, query.device)

    return NeedleOracle(config)
