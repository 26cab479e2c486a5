"""Training with recalled spans: the AnSAN mask plus a few earlier sentences fully visible, as anchor-indexed
recall (:class:`~anllm_ext.RecallConfig`) gives evicted sentences back at inference.

An AnSAN-trained model never sees the words of an earlier sentence, so when recall hands them back it has never
learnt to read them. Here every training row gets up to ``spans`` of its closed sentences marked *recalled*: their
non-anchor tokens become visible to every later real non-anchor token of the row (the forward's
``anllm_recalled``, see ``anllm_ext.hf.hooks``), exactly what a cache recalling those sentences at every later
forward attends. Which sentences:

- first, by how much of them the rest of the row repeats: the sentences with the most distinct word n-grams
  (``ngram`` token ids, the anchor excluded) that occur again after the sentence's end, best first (a fact that an
  answer or a question quotes); a sentence none of whose n-grams recurs is never taken this way;
- the rest of the ``spans`` at random among the other closed sentences (recalled text that does not help, as a
  choice through the anchors also recalls), drawn from a generator seeded by the row's token ids, so a row always
  gets the same marks (resumed runs, every process).
"""
from __future__ import annotations

import random
import zlib
from array import array
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from ..data import AnchorDataCollator


def sentence_spans(ids: Sequence[int], anchor_ids) -> List[range]:
    """The closed sentences of a row: token index ranges, each ending with (and including) an anchor."""
    anchors = set(int(a) for a in anchor_ids)
    spans, start = [], 0
    for i, t in enumerate(ids):
        if int(t) in anchors:
            spans.append(range(start, i + 1))
            start = i + 1
    return spans


def repeated_ngrams(ids: Sequence[int], span: range, n: int) -> int:
    """How many distinct n-grams of ``span``'s tokens (its final anchor excluded) occur again after ``span``."""
    words = list(ids[span.start : span.stop - 1])
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    if not grams:
        return 0
    later = list(ids[span.stop :])
    seen = {tuple(later[i : i + n]) for i in range(len(later) - n + 1)}
    return len(grams & seen)


def choose_recalled(ids: Sequence[int], anchor_ids, spans: int, ngram: int = 3) -> List[range]:
    """Up to ``spans`` closed sentences of the row to mark recalled (module docstring); only sentences with
    tokens after them (a recalled sentence matters to later tokens only)."""
    closed = [s for s in sentence_spans(ids, anchor_ids) if s.stop < len(ids) and len(s) > 1]
    ranked = sorted(((repeated_ngrams(ids, s, ngram), -i, s) for i, s in enumerate(closed)), reverse=True)
    chosen = [s for score, _, s in ranked if score > 0][:spans]
    rest = [s for s in closed if s not in chosen]
    rng = random.Random(zlib.crc32(array("q", ids).tobytes()))
    chosen += rng.sample(rest, min(spans - len(chosen), len(rest)))
    return sorted(chosen, key=lambda s: s.start)


@dataclass
class RecallSpanCollator:
    """:class:`~anllm_ext.data.AnchorDataCollator`'s batch plus ``anllm_recalled`` (bool [B, T]): the
    non-anchor tokens of the sentences :func:`choose_recalled` marks in each row (none in a batch drawn for full
    attention)."""

    pad_token_id: int
    anchor_ids: Sequence[int]
    spans: int
    ngram: int = 3
    recent: int = 0  # AnchorDataCollator's
    recent_share: float = 1.0  # AnchorDataCollator's
    full_attention_share: float = 0.0  # AnchorDataCollator's

    def __post_init__(self):
        if self.spans < 1:
            raise ValueError(f"recall spans must be >= 1 sentences per row, got {self.spans}")
        if self.ngram < 1:
            raise ValueError(f"the n-gram length must be >= 1, got {self.ngram}")
        self._pad = AnchorDataCollator(self.pad_token_id, recent=self.recent, recent_share=self.recent_share,
                                       full_attention_share=self.full_attention_share)

    def __call__(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        batch = self._pad(features)
        if batch.get("anllm_full_attention"):  # every sentence is readable already
            return batch
        recalled = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for b, f in enumerate(features):
            ids = [int(t) for t in f["input_ids"]]
            for span in choose_recalled(ids, self.anchor_ids, self.spans, self.ngram):
                recalled[b, span.start : span.stop - 1] = True  # the anchor stays an anchor
        batch["anllm_recalled"] = recalled
        return batch
