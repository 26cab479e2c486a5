"""Perplexity in each evaluation mode (:func:`perplexity`) of token blocks cut from text (:func:`text_blocks`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..defaults import BATCH_SIZE, PREFILL_CHUNK, RECENT_SENTENCES
from ..console import progress_bar
from .modes import CACHED_MODES, MODES, check_modes, model_mode
from .report import ModeResult, dump_json, format_table, set_t_up
from .scoring import KVSlots, score_sequences


@dataclass
class PerplexityResult:
    """Per-mode perplexity; ``max_abs_diff_cached_vs_ansan``: largest gap between the per-token
    log-probabilities of the two anchor modes (None unless both ran)."""

    modes: Dict[str, ModeResult]
    blocks: int
    max_abs_diff_cached_vs_ansan: Optional[float] = None
    source: Optional[List[str]] = None  # the files the blocks were cut from

    def __getitem__(self, mode: str) -> ModeResult:
        return self.modes[mode]

    def to_dict(self) -> dict:
        return {
            "task": "perplexity",
            "source": self.source,
            "blocks": self.blocks,
            "max_abs_diff_cached_vs_ansan": self.max_abs_diff_cached_vs_ansan,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
        }

    def to_json(self, path=None) -> str:
        return dump_json(self.to_dict(), path)

    def table(self) -> str:
        return format_table(self.modes, ("perplexity", "nll", "tokens"))


def _check_blocks(blocks) -> List[List[int]]:
    if isinstance(blocks, torch.Tensor):
        blocks = blocks.tolist()
    out = []
    for i, b in enumerate(blocks):
        b = b.tolist() if isinstance(b, torch.Tensor) else list(b)
        if len(b) < 2:
            raise ValueError(f"block {i} has {len(b)} tokens; perplexity needs at least 2 per block")
        if not all(isinstance(t, int) for t in b):
            raise ValueError(f"block {i} holds non-integer token ids")
        out.append(b)
    if not out:
        raise ValueError("no blocks to score")
    return out


def perplexity(
    model,
    blocks: Sequence[Sequence[int]],
    modes: Sequence[str] = MODES,
    prefill_chunk: int = PREFILL_CHUNK,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    anchor_ids=None,
    recall=None,
    recent: int = RECENT_SENTENCES,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``blocks`` (token-id lists, each scored on its own) in each mode.

    ``anchor_ids``: the anchors (an :class:`~anllm_ext.config.AnchorConfig` or ids) of the anchor modes; None: the
    model's patch, else the anchors its config carries (:func:`~anllm_ext.evaluation.model_mode` decides).
    Every real token after the first of a block is scored. ``recall``: the
    :class:`~anllm_ext.recall.RecallConfig` of the ``cached+recall`` mode (default settings when None); its KV kept
    is the hot part, kept + recalled slots. ``recent``: the closed sentences the ``cached+recent`` mode keeps hot.
    ``prefill_chunk``: chunk of the ``"cached"``
    mode's prefill (compaction between chunks); ``batch_size``: blocks per forward (right-padded).
    Returns a :class:`PerplexityResult` (``result["cached"].perplexity``, ``.kv_kept``, ``.seconds``, ...).
    """
    from ..checks import check_int

    modes = check_modes(modes)
    blocks = _check_blocks(blocks)
    check_int("batch_size", batch_size, 1)
    check_int("prefill_chunk", prefill_chunk, 1)
    # longest first: batches of similar lengths pad little
    order = sorted(range(len(blocks)), key=lambda i: -len(blocks[i]))
    results: Dict[str, ModeResult] = {}
    per_token: Dict[str, List[torch.Tensor]] = {}
    for mode in modes:
        kv = KVSlots()
        scores: List[Optional[torch.Tensor]] = [None] * len(blocks)
        bar = progress_bar(len(blocks), f"perplexity ({mode})", progress, unit="it")
        t0 = time.perf_counter()
        with model_mode(model, mode, anchor_ids), torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                rows = score_sequences(model, [blocks[i] for i in idx], mode, prefill_chunk, kv, recall, recent)
                for i, (lp, _) in zip(idx, rows):
                    scores[i] = lp.cpu()
                if bar is not None:
                    bar.update(len(idx))
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        per_token[mode] = scores
        all_lp = torch.cat(scores)
        n = int(all_lp.numel())
        nll = float(-all_lp.double().sum() / n)
        r = ModeResult(mode, seconds, tokens=n, nll=nll, perplexity=math.exp(nll))
        if mode in CACHED_MODES:
            r.kv_kept_slots, r.kv_full_slots = kv.kept + kv.recalled, kv.full
            r.kv_kept = r.kv_kept_slots / max(kv.full, 1)
            r.kv_peak = kv.peak / max(kv.full, 1)
        else:
            r.kv_kept_slots = r.kv_full_slots = sum(len(b) for b in blocks)
        results[mode] = r
    set_t_up(results)
    diff = None
    if "ansan" in per_token and "cached" in per_token:
        diff = max(float((a - b).abs().max()) for a, b in zip(per_token["ansan"], per_token["cached"]))
    return PerplexityResult(results, len(blocks), diff)


def text_blocks(tokenizer, texts: Sequence[str], anchors, block_size: int = 512,
                max_blocks: Optional[int] = None) -> List[List[int]]:
    """Token blocks of at most ``block_size`` tokens, cut as ``anllm train`` cuts its held-out text
    (:mod:`anllm_ext.data`): BOS first when the tokenizer uses one, each text on its own, cut at the anchors of
    ``anchors`` (an :class:`~anllm_ext.config.AnchorConfig`, e.g. from ``resolve_anchor_config``) where possible,
    so a block ends on a whole segment; in AC mode ``anchors.ac_token`` is inserted after every sentence."""
    from ..checks import check_int
    from ..config import AnchorConfig
    from ..data import encode_documents

    if not isinstance(anchors, AnchorConfig):
        raise TypeError(f"anchors must be an AnchorConfig (anllm_ext.config.resolve_anchor_config makes one), got "
                        f"{type(anchors).__name__}")
    check_int("block_size", block_size, 2)
    check_int("max_blocks", max_blocks, 0, none_ok=True)
    anchors.check_tokenizer(tokenizer)
    blocks = encode_documents(texts, tokenizer, anchors, block_size)
    if not blocks:
        raise ValueError("the texts hold fewer than 2 tokens")
    return blocks[:max_blocks] if max_blocks else blocks
