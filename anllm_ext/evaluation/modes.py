"""The three evaluation modes (``full``, ``ansan``, ``cached``: see :mod:`anllm_ext.evaluation`) and how a
model is put in one."""
from __future__ import annotations

import contextlib
from typing import Iterable, Tuple

#: The evaluation modes, in the order they run by default (not to be confused with the anchor modes of
#: ``anllm_ext.config.ANCHOR_MODES``).
MODES = ("full", "ansan", "cached")


def check_modes(modes: Iterable[str]) -> Tuple[str, ...]:
    """``modes`` as a tuple of distinct names from ``MODES`` (else ValueError naming the problem)."""
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
    from ..hf import is_patched, patch, patched, patched_anchor_ids, unpatch

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
