"""Which KV slots an AnLLM request keeps in vLLM's paged cache: one rule (:class:`KeepRule`) for the scheduler
and the workers.

After a request's first ``n`` tokens are computed it keeps every anchor among them and the open segment (the
tokens after the last anchor), in token order, in the first slots of its block table: what
:class:`anllm_ext.AnchorCache` keeps. An anchor is a token whose id is an anchor id or whose position is below
the model's ``sink`` (its anchor configuration's attention sink: ``token_layout(..., sink=S)``). With
``recent`` = N (``AnchorCache(recent=N)``, the engine's ``anllm_recent``) it also keeps every token of the N
segments closed last: a token's segment is the number of anchors before it (an anchor closes its own segment),
and the kept tokens are the anchors plus every token from the first token of segment ``anchors - N`` on. The
rule depends on the token ids only, so the scheduler (which frees the blocks past the kept slots) and every
worker (which moves the kept slots to the front) agree without exchanging any message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checks import check_int
from ..config import check_sink


def _token_ids(token_ids) -> np.ndarray:
    """One request's token ids as a 1-D int64 array."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one request's 1-D token ids, got shape {ids.shape}")
    return ids


@dataclass(frozen=True, eq=False)
class KeepRule:
    """The kept-slot rule of one engine: the model's ``anchor_ids`` and ``sink`` (its anchor configuration),
    the engine's ``recent`` (``anllm_recent``). Built once from the engine config
    (:func:`anllm_ext.vllm.detect.keep_rule`), so the scheduler and every worker apply the same one."""

    anchor_ids: np.ndarray
    recent: int = 0
    sink: int = 0

    def __post_init__(self):
        object.__setattr__(self, "anchor_ids", np.asarray(self.anchor_ids, dtype=np.int64).reshape(-1))
        check_int("recent", self.recent, 0)
        check_sink(self.sink)

    def is_anchor(self, token_ids) -> np.ndarray:
        """Per token (bool): an anchor id, or a position below the sink (``token_layout``'s rule)."""
        ids = _token_ids(token_ids)
        flags = np.isin(ids, self.anchor_ids)
        flags[: self.sink] = True
        return flags

    def anchor_positions(self, token_ids) -> np.ndarray:
        """Indices (int64, ascending) of the anchors of ``token_ids``."""
        return np.flatnonzero(self.is_anchor(token_ids))

    def _window_start(self, anchors: np.ndarray) -> int:
        """Index of the first token of segment ``len(anchors) - recent`` (0 when the stream has fewer segments):
        every token from there on is kept."""
        first = len(anchors) - self.recent
        return int(anchors[first - 1]) + 1 if first > 0 else 0

    def kept_indices(self, token_ids) -> np.ndarray:
        """Indices (int64, ascending) of the tokens whose keys/values are kept after computing ``token_ids``."""
        ids = _token_ids(token_ids)
        anchors = self.anchor_positions(ids)
        start = self._window_start(anchors)
        return np.concatenate([anchors[anchors < start], np.arange(start, len(ids), dtype=np.int64)])

    def num_kept(self, token_ids) -> int:
        """``len(kept_indices(token_ids))``."""
        ids = _token_ids(token_ids)
        anchors = self.anchor_positions(ids)
        start = self._window_start(anchors)
        return int(np.searchsorted(anchors, start)) + len(ids) - start

    def peak_kept(self, token_ids) -> int:
        """The most slots kept after any prefix of ``token_ids`` (a prompt's peak before its chunks are added)."""
        is_anchor = self.is_anchor(token_ids)
        if len(is_anchor) == 0:
            return 0
        t = np.arange(len(is_anchor))
        # after the prefix [0, t]: its first `first` anchors, then every token from the window's start on (one
        # past anchor `first - 1`; -1 stands before the stream for first = 0)
        first = np.maximum(np.cumsum(is_anchor) - self.recent, 0)
        start = np.concatenate([[-1], np.flatnonzero(is_anchor)])[first] + 1
        return int((first + t + 1 - start).max())

    def anchor_block_ends(self, token_ids, block_size: int) -> np.ndarray:
        """For each block filled with anchors only (block ``i`` holds anchors ``[i * B, (i + 1) * B)`` once they
        are computed and compacted, and they never move again), the number of tokens it summarises: one past
        the position of its last anchor. Its keys/values are a function of those tokens alone (the sink is the
        model's, the same for every request), so a request whose token ids start with them can reuse the block
        (prefix caching, :mod:`anllm_ext.vllm.scheduler`). Only without recent sentences kept (``recent`` = 0):
        the plugin refuses prefix caching with ``anllm_recent``."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        return self.anchor_positions(token_ids)[block_size - 1::block_size] + 1
