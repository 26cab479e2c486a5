"""Which KV slots an AnLLM request keeps in vLLM's paged cache: one rule for the scheduler and the workers.

After a request's first ``n`` tokens are computed it keeps every anchor among them and the open segment (the
tokens after the last anchor), in token order, in the first slots of its block table: what
:class:`anllm_ext.AnchorCache` keeps. With ``recent`` = N (``AnchorCache(recent=N)``, the engine's
``anllm_recent``) it also keeps every token of the N segments closed last: a token's segment is the number of
anchors before it (an anchor closes its own segment), and the kept tokens are the anchors plus every token
from the first token of segment ``anchors - N`` on. The rule depends on the token ids only, so the scheduler
(which frees the blocks past the kept slots) and every worker (which moves the kept slots to the front) agree
without exchanging any message.
"""
from __future__ import annotations

import numpy as np

from ..checks import check_int


def _window_start(anchors: np.ndarray, recent: int) -> int:
    """Index of the first token of segment ``len(anchors) - recent`` (0 when the stream has fewer segments):
    every token from there on is kept."""
    first = len(anchors) - check_int("recent", recent, 0)
    return int(anchors[first - 1]) + 1 if first > 0 else 0


def kept_indices(token_ids, anchor_ids: np.ndarray, recent: int = 0) -> np.ndarray:
    """Indices (int64, ascending) of the tokens whose keys/values are kept after computing ``token_ids``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one request's 1-D token ids, got shape {ids.shape}")
    anchors = np.flatnonzero(np.isin(ids, anchor_ids))
    start = _window_start(anchors, recent)
    return np.concatenate([anchors[anchors < start], np.arange(start, len(ids), dtype=np.int64)])


def num_kept(token_ids, anchor_ids: np.ndarray, recent: int = 0) -> int:
    """``len(kept_indices(token_ids, anchor_ids, recent))``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    anchors = np.flatnonzero(np.isin(ids, anchor_ids))
    start = _window_start(anchors, recent)
    return int(np.searchsorted(anchors, start)) + len(ids) - start


def peak_kept(token_ids, anchor_ids: np.ndarray, recent: int = 0) -> int:
    """The most slots kept after any prefix of ``token_ids`` (a prompt's peak before its chunks are added)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    check_int("recent", recent, 0)
    if len(ids) == 0:
        return 0
    is_anchor = np.isin(ids, anchor_ids)
    t = np.arange(len(ids))
    # after the prefix [0, t]: its first `first` anchors, then every token from the window's start on (one past
    # anchor `first - 1`; -1 stands before the stream for first = 0)
    first = np.maximum(np.cumsum(is_anchor) - recent, 0)
    start = np.concatenate([[-1], np.flatnonzero(is_anchor)])[first] + 1
    return int((first + t + 1 - start).max())


def anchor_block_ends(token_ids, anchor_ids: np.ndarray, block_size: int) -> np.ndarray:
    """For each block filled with anchors only (block ``i`` holds anchors ``[i * B, (i + 1) * B)`` once they are
    computed and compacted, and they never move again), the number of tokens it summarises: one past the
    position of its last anchor. Its keys/values are a function of those tokens alone, so a request whose
    token ids start with them can reuse the block (prefix caching, :mod:`anllm_ext.vllm.scheduler`). Only
    without recent sentences kept (``recent`` = 0): the plugin refuses prefix caching with ``anllm_recent``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    anchors = np.flatnonzero(np.isin(np.asarray(token_ids, dtype=np.int64), anchor_ids))
    return anchors[block_size - 1::block_size] + 1
