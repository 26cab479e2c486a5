"""The evaluation modes (``full``, ``ansan``, ``cached``, ``cached+recall``, ``cached+recent``: see
:mod:`anllm_ext.evaluation`) and how a model is put in one."""
from __future__ import annotations

from typing import Iterable, Tuple

#: The evaluation modes, in the order they run by default (not to be confused with the anchor modes of
#: ``anllm_ext.config.ANCHOR_MODES``).
MODES = ("full", "ansan", "cached")
#: The anchor cache with anchor-indexed recall (:class:`~anllm_ext.recall.RecallConfig`): run when asked for.
RECALL_MODE = "cached+recall"
#: The anchor cache keeping the last closed sentences hot (``AnchorCache(recent=N)``): run when asked for.
RECENT_MODE = "cached+recent"
#: Every mode a run may name.
ALL_MODES = MODES + (RECALL_MODE, RECENT_MODE)
#: The modes that score against an AnchorCache (prefilled in chunks, compacted between them).
CACHED_MODES = ("cached", RECALL_MODE, RECENT_MODE)


def check_modes(modes: Iterable[str]) -> Tuple[str, ...]:
    """``modes`` as a tuple of distinct names from ``ALL_MODES`` (else ValueError naming the problem)."""
    modes = tuple(modes)
    if not modes:
        raise ValueError(f"no evaluation mode given; choose from {ALL_MODES}")
    for m in modes:
        if m not in ALL_MODES:
            raise ValueError(f"unknown evaluation mode {m!r}; choose from {ALL_MODES}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"evaluation modes repeat: {modes}")
    return modes


def model_mode(model, mode: str, anchors=None):
    """The one decision on patching per evaluation mode, as a context manager: ``"full"`` runs the model
    unpatched (:func:`anllm_ext.hf.unpatched`: the patch is lifted for the block), the anchor modes patched
    (:func:`anllm_ext.hf.patched`: with ``anchors``, an :class:`~anllm_ext.config.AnchorConfig` or ids; None:
    the patch it has, else the anchors its config carries)."""
    from ..hf import patched, unpatched

    if mode not in ALL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose from {ALL_MODES}")
    return unpatched(model) if mode == "full" else patched(model, anchors)
