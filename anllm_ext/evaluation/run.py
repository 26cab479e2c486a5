"""What ``anllm eval`` runs, as one plan (:class:`EvalPlan`) handed to one entry point (:func:`run_eval`): the caller
decides the model and its anchors (an :class:`~anllm_ext.config.AnchorConfig`), the plan says which tasks in which
modes, and every task below takes the anchors as given (:func:`~anllm_ext.evaluation.model_mode` patches per mode)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from ..checks import check_int
from ..defaults import BATCH_SIZE, PREFILL_CHUNK, RECENT_SENTENCES
from ..recall import RecallConfig
from .modes import MODES, check_modes
from .multiple_choice import (DEMO_ENDS, MultipleChoiceConfig, MultipleChoiceResult, Question, demo_end_for,
                              multiple_choice)
from .perplexity import PerplexityResult, perplexity, text_blocks


@dataclass
class EvalPlan:
    """The tasks of one evaluation and their settings.

    ``texts``: documents for perplexity (cut into blocks of ``block_size`` tokens, at most ``max_blocks``; 0: all);
    ``questions``: multiple-choice questions, scored once per entry of ``shots``; ``demo_end``: what closes a
    demonstration (``"auto"``: what fits the anchors, :func:`~anllm_ext.evaluation.multiple_choice.demo_end_for`);
    ``text_source`` / ``mc_source``: where the data came from (recorded in the results); ``recall``: the
    :class:`~anllm_ext.recall.RecallConfig` of the ``cached+recall`` mode (default settings when None); ``recent``: the
    closed sentences the ``cached+recent`` mode keeps hot.
    """

    texts: Sequence[str] = ()
    questions: Sequence[Question] = ()
    modes: Tuple[str, ...] = MODES
    shots: Sequence[int] = (0,)
    limit: Optional[int] = None
    seed: int = 1234
    demo_end: str = "auto"
    batch_size: int = BATCH_SIZE
    prefill_chunk: int = PREFILL_CHUNK
    block_size: int = 512
    max_blocks: int = 16
    progress: bool = True
    text_source: List[str] = field(default_factory=list)
    mc_source: Optional[str] = None
    recall: Optional[RecallConfig] = None
    recent: int = RECENT_SENTENCES

    def __post_init__(self):
        self.modes = check_modes(self.modes)
        if not self.texts and not self.questions:
            raise ValueError("nothing to evaluate: give texts for perplexity and/or multiple-choice questions")
        if self.demo_end not in ("auto",) + DEMO_ENDS:
            raise ValueError(f"demo_end must be 'auto' or one of {DEMO_ENDS}, got {self.demo_end!r}")
        for n in self.shots:
            check_int("shots", n, 0)
        check_int("block_size", self.block_size, 2)
        check_int("max_blocks", self.max_blocks, 0)
        check_int("recent", self.recent, 1)


def run_eval(model, tokenizer, anchors, plan: EvalPlan) -> Iterator[Union[PerplexityResult, MultipleChoiceResult]]:
    """Run ``plan`` on ``model`` with ``anchors`` (an :class:`~anllm_ext.config.AnchorConfig`), yielding each task's
    result as it finishes: perplexity first (when ``plan.texts``), then multiple choice once per shot count."""
    if plan.texts:
        blocks = text_blocks(tokenizer, plan.texts, anchors, plan.block_size, plan.max_blocks)
        result = perplexity(model, blocks, plan.modes, plan.prefill_chunk, plan.batch_size, plan.progress,
                            anchor_ids=anchors, recall=plan.recall, recent=plan.recent)
        result.source = list(plan.text_source)
        yield result
    demo_end = demo_end_for(anchors) if plan.demo_end == "auto" else plan.demo_end
    for shots in plan.shots if plan.questions else ():
        config = MultipleChoiceConfig(shots=shots, seed=plan.seed, limit=plan.limit, modes=plan.modes,
                                      batch_size=plan.batch_size, prefill_chunk=plan.prefill_chunk, demo_end=demo_end,
                                      ac_token=anchors.ac_token or MultipleChoiceConfig.ac_token,
                                      progress=plan.progress, recall=plan.recall, recent=plan.recent)
        yield multiple_choice(model, tokenizer, plan.questions, config, anchor_ids=anchors, source=plan.mc_source)
