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

Two more cached modes run when named: ``"cached+recall"`` (anchor-indexed recall of evicted sentences,
:class:`~anllm_ext.recall.RecallConfig`) and ``"cached+recent"`` (the last ``recent`` closed sentences kept hot and
readable to the next sentence's words, ``AnchorCache(recent=N)``); their KV kept counts what they hold hot.

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
    compression). The JSONL schema of a questions file: ``anllm_ext.evaluation.multiple_choice``.

Where each part lives: ``modes`` (the modes, :func:`model_mode`), ``scoring`` (token log-probabilities of
sequences and of continuations: :func:`score_sequences`, :func:`score_continuations`, shared with the
lm-evaluation-harness backend), ``perplexity``, ``multiple_choice``, ``report`` (results, tables, JSON,
plots), ``run`` (:class:`EvalPlan` and :func:`run_eval`: what ``anllm eval`` runs, one way: the caller decides the
model and its anchors, the tasks take them as given). Every public name is importable from
``anllm_ext.evaluation``. The ``anllm eval`` command (:mod:`anllm_ext.cli`) only parses and calls :func:`run_eval`.
"""
from .modes import ALL_MODES, MODES, RECALL_MODE, RECENT_MODE, check_modes, model_mode
from .multiple_choice import (
    DEMO_ENDS,
    MultipleChoiceConfig,
    MultipleChoiceResult,
    Question,
    build_context,
    load_multiple_choice,
    demo_end_for,
    multiple_choice,
)
from .perplexity import PerplexityResult, perplexity, text_blocks
from .run import EvalPlan, run_eval
from .report import ModeResult, dump_json, format_table, plot_results, set_t_up
from .scoring import ContinuationScores, KVSlots, prefill_with_peak, score_continuations, score_sequences

__all__ = [
    "MODES",
    "ALL_MODES",
    "RECALL_MODE",
    "RECENT_MODE",
    "check_modes",
    "model_mode",
    "score_sequences",
    "score_continuations",
    "ContinuationScores",
    "KVSlots",
    "prefill_with_peak",
    "perplexity",
    "PerplexityResult",
    "text_blocks",
    "Question",
    "load_multiple_choice",
    "DEMO_ENDS",
    "MultipleChoiceConfig",
    "build_context",
    "multiple_choice",
    "MultipleChoiceResult",
    "ModeResult",
    "set_t_up",
    "format_table",
    "dump_json",
    "plot_results",
    "demo_end_for",
    "EvalPlan",
    "run_eval",
]

