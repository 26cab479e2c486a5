"""Find a model's recall layers: the layers whose own recall choice finds the sentence a later question asks for.

``RecallConfig(pool="layers", layers=...)`` lets every layer from the first listed one on choose by the summed
scores of the listed layers, so a few layers that find the asked-for sentence choose for the later ones. Which
layers those are is a property of the model, measured here on the user's own text (not on what will be
evaluated): synthetic facts ("The room number of the Willow office is 4821.") are hidden at several depths of
haystacks cut from ``paragraphs``, a chat question asks for the fact, and the prompt is prefilled in two
forwards (the haystack, then the question) under an :class:`~anllm_ext.AnchorCache` that recalls with
``pool="layer"`` (each layer chooses by its own scores). A layer *hits* a trial when its choice holds the fact's
sentence; the recall layers are those that hit at least ``min_hit`` of the trials (the best one if none does).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch

from .needle import NeedleTrial, chat_ids, haystack_text, marker_segment

ATTRIBUTES = ("room number", "access number", "badge number", "postal code")
PLACES = ("Willow", "Granite", "Harbor", "Copper", "Juniper", "Summit", "Lantern", "Orchid")


@dataclass(frozen=True)
class FactTrial(NeedleTrial):
    """A needle trial whose needle is "The ATTRIBUTE of the NAME office is CODE."."""

    attribute: str = ATTRIBUTES[0]

    @property
    def needle(self) -> str:
        return f"The {self.attribute} of the {self.name} office is {self.code}."

    @property
    def question(self) -> str:
        return f"\n\nWhat is the {self.attribute} of the {self.name} office? Answer with the number only."


def fact_trials(lengths: Sequence[int], depths: Sequence[float], per_cell: int, paragraphs: int,
                seed: int = 0) -> List[FactTrial]:
    """``per_cell`` seeded trials for every (length, depth)."""
    if per_cell < 1 or paragraphs < 1 or not lengths or not depths:
        raise ValueError("need lengths, depths, per_cell >= 1 and a haystack of >= 1 paragraph")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"fact depths are fractions in [0, 1], got {d}")
    rng = random.Random(seed)
    return [FactTrial(rng.choice(PLACES), str(rng.randint(1000, 9999)), d, int(n), rng.randrange(paragraphs),
                      rng.choice(ATTRIBUTES))
            for n in lengths for d in depths for _ in range(per_cell)]


def fact_segment(tokenizer, model, ids: torch.Tensor, trial: FactTrial) -> int:
    """The segment id of the fact sentence in ``ids`` [1, T] under the patched model's anchors."""
    return marker_segment(tokenizer, model, ids, f" of the {trial.name} office is")


def text_paragraphs(texts: Sequence[str]) -> List[str]:
    """The paragraphs (blank-line separated, whitespace collapsed) of over 200 characters of ``texts``: what
    haystacks are cut from."""
    paragraphs = [" ".join(p.split()) for text in texts for p in text.split("\n\n")]
    return [p for p in paragraphs if len(p) > 200]


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


@dataclass
class RecallLayers:
    """The measured hit rate of every layer and the layers chosen from it, with the settings measured."""

    layers: List[int]
    hit_rate: List[float]
    trials: int
    budget: int
    index: str
    score: str
    min_hit: float

    def as_dict(self) -> dict:
        return asdict(self)


def find_recall_layers(model, tokenizer, paragraphs: Sequence[str], lengths: Sequence[int] = (512, 1024, 2048),
                       depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), per_cell: int = 1, budget: int = 4,
                       index: str = "tokens", score: str = "peak", min_hit: float = 0.8, seed: int = 0,
                       log: Optional[Callable[[str], None]] = None) -> RecallLayers:
    """Measure each layer's hit rate on fact trials (module docstring) of a patched ``model``; return the layers
    hitting >= ``min_hit`` of them. ``budget``/``index``/``score``: the RecallConfig the layers choose with."""
    from ..cache import AnchorCache
    from ..generation import prefill
    from ..hf import is_patched
    from ..recall import RecallConfig

    if not is_patched(model):
        raise ValueError("find_recall_layers needs a patched model (anllm_ext.patch(model))")
    if not 0.0 < min_hit <= 1.0:
        raise ValueError(f"min_hit is a share of trials in (0, 1], got {min_hit}")
    config = RecallConfig(budget=budget, every="prompt", score=score, index=index)
    trials = fact_trials(lengths, depths, per_cell, len(paragraphs), seed)
    hits = None
    for trial in trials:
        haystack = haystack_text(tokenizer, paragraphs, trial)
        context = chat_ids(tokenizer, haystack + trial.question)
        question = context.shape[1] - _common_prefix(context[0], chat_ids(tokenizer, haystack)[0])
        segment = fact_segment(tokenizer, model, context, trial)
        cache = AnchorCache(model.config, recall=config)
        with torch.no_grad():
            prefill(model, context[:, :-question], cache=cache, prefill_chunk=context.shape[1])
            prefill(model, context[:, -question:], cache=cache, prefill_chunk=question)
        layer_hits = [bool((cache.recall.chosen.get(l, [torch.zeros(0)])[0] == segment).any())
                      for l in range(len(cache.layers))]
        hits = layer_hits if hits is None else [h + x for h, x in zip(hits, layer_hits)]
        if log is not None:
            log(f"length={trial.length} depth={trial.depth}: {sum(layer_hits)} of {len(layer_hits)} layers hit")
    rate = [h / len(trials) for h in hits]
    layers = [l for l, r in enumerate(rate) if r >= min_hit] or [max(range(len(rate)), key=rate.__getitem__)]
    return RecallLayers(layers, rate, len(trials), budget, index, score, min_hit)
