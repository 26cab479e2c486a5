"""Which KV slots an AnLLM request keeps in vLLM's paged cache: one rule for the scheduler and the workers.

After a request's first ``n`` tokens are computed it keeps every anchor among them and the open segment (the
tokens after the last anchor), in token order, in the first slots of its block table: what
:class:`anllm_ext.AnchorCache` keeps. The rule depends on the token ids only, so the scheduler (which frees
the blocks past the kept slots) and every worker (which moves the kept slots to the front) agree without
exchanging any message.
"""
from __future__ import annotations

import numpy as np


def kept_indices(token_ids, anchor_ids: np.ndarray) -> np.ndarray:
    """Indices (int64, ascending) of the tokens whose keys/values are kept after computing ``token_ids``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one request's 1-D token ids, got shape {ids.shape}")
    anchors = np.flatnonzero(np.isin(ids, anchor_ids))
    open_start = int(anchors[-1]) + 1 if len(anchors) else 0
    return np.concatenate([anchors, np.arange(open_start, len(ids), dtype=np.int64)])


def num_kept(token_ids, anchor_ids: np.ndarray) -> int:
    """``len(kept_indices(token_ids, anchor_ids))``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    anchors = np.flatnonzero(np.isin(ids, anchor_ids))
    open_start = int(anchors[-1]) + 1 if len(anchors) else 0
    return len(anchors) + len(ids) - open_start


def peak_kept(token_ids, anchor_ids: np.ndarray) -> int:
    """The most slots kept after any prefix of ``token_ids`` (a prompt's peak before its chunks are added)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) == 0:
        return 0
    is_anchor = np.isin(ids, anchor_ids)
    t = np.arange(len(ids))
    last_anchor = np.maximum.accumulate(np.where(is_anchor, t, -1))
    # kept after the prefix [0, t]: the anchors so far + the tokens after the last of them
    return int((np.cumsum(is_anchor) + t - last_anchor).max())


def anchor_block_ends(token_ids, anchor_ids: np.ndarray, block_size: int) -> np.ndarray:
    """For each block filled with anchors only (block ``i`` holds anchors ``[i * B, (i + 1) * B)`` once they are
    computed and compacted, and they never move again), the number of tokens it summarises: one past the
    position of its last anchor. Its keys/values are a function of those tokens alone, so a request whose
    token ids start with them can reuse the block (prefix caching, :mod:`anllm_ext.vllm.scheduler`)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    anchors = np.flatnonzero(np.isin(np.asarray(token_ids, dtype=np.int64), anchor_ids))
    return anchors[block_size - 1::block_size] + 1
