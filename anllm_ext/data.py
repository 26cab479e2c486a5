"""Training and evaluation data for AnLLMs: local files -> documents -> token blocks -> padded batches.

Rules (see docs/method.md):

- Files are read with Hugging Face ``datasets``: plain text (each *file* is one document), JSONL/JSON and
  parquet (each *row* is one document, its text in ``text_field``).
- AC mode appends the ``<AC>`` token after every sentence (:func:`anllm_ext.anchors.insert_ac`); EP mode
  keeps the text, its sentence-final periods being the anchors.
- A document longer than ``block_size`` tokens is cut into blocks at anchor boundaries (sentence ends),
  as many whole sentences per block as fit; only a single sentence longer than a block is cut inside.
- One block per row, **no packing**: rows never see each other, and a batch is padded to its longest
  row (dynamic padding), as in the paper's recipe. Packing several documents into one row would let a
  document's tokens see the previous document's anchors under the AnSAN mask (anchors stay visible to
  every later token); per-row blocks avoid that without a document id in the layout.
- Labels: every real token, anchors included; -100 on padding (the model shifts labels itself).
"""
from __future__ import annotations

import glob
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from .anchors import insert_ac
from .config import AnchorConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
IGNORE_INDEX = -100


def _kind(path: str) -> Optional[str]:
    name = path.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def list_data_files(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> Dict[str, List[str]]:
    """Files grouped by loader (``text`` / ``json`` / ``parquet``). Directories are searched recursively and
    files of other types in them skipped; a file named explicitly must have a known suffix, or none (then
    it is plain text, e.g. ``/usr/share/common-licenses/GPL-3``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    groups: Dict[str, List[str]] = {}
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if os.path.isfile(f))
            found = [(_kind(f), f) for f in found if _kind(f)]
            if not found:
                raise ValueError(f"{p} holds no text ({'/'.join(TEXT_SUFFIXES)}), JSONL or parquet files")
        elif os.path.isfile(p):
            kind = _kind(p) or (None if Path(p).suffix else "text")
            if kind is None:
                raise ValueError(f"{p}: unknown file type (text {TEXT_SUFFIXES} or no suffix, JSON {JSON_SUFFIXES}, "
                                 "parquet)")
            found = [(kind, p)]
        else:
            raise FileNotFoundError(f"{p} does not exist (no such file or directory)")
        for kind, f in found:
            groups.setdefault(kind, []).append(f)
    return groups


def load_documents(paths, text_field: str = "text"):
    """A ``datasets.Dataset`` with one document per row in the column ``text``.

    Text files give one document each (``sample_by="document"``); JSONL/parquet rows give one each,
    read from ``text_field``. Files must be UTF-8 (the error names a file that is not, and its line).
    Empty files and empty (or whitespace-only) documents are dropped; no document at all is an error.
    """
    groups = list_data_files(paths)  # missing or unreadable paths fail first, with or without datasets
    import datasets

    parts = []
    for kind, files in groups.items():
        files = [f for f in files if os.path.getsize(f) > 0]  # datasets fails on an empty JSON file
        if files:
            parts.append(_load_files(datasets, kind, files, text_field))
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
    if ds is not None:
        ds = ds.filter(lambda r: isinstance(r["text"], str) and r["text"].strip() != "")
    if ds is None or len(ds) == 0:
        raise ValueError(f"no non-empty document in {_names(paths)} (empty or whitespace-only files)")
    return ds


def _names(paths) -> str:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return ", ".join(os.fspath(p) for p in paths)


def _load_files(datasets, kind: str, files: List[str], text_field: str):
    try:
        if kind == "text":
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            ds = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception:  # datasets wraps a decoding error in its own exception: name the file instead
        if kind != "parquet":
            _check_utf8(files)
        raise
    if kind != "text":
        if text_field not in ds.column_names:
            raise ValueError(f"{files[0]}: rows have no field {text_field!r} (fields: {ds.column_names})")
        if text_field != "text":
            ds = ds.map(lambda r: {"text": r[text_field]})
    return ds.select_columns(["text"])


def _check_utf8(files: List[str]) -> None:
    """Raise ValueError naming the first file (and line) that is not UTF-8."""
    from .checks import not_utf8

    for f in files:
        data = Path(f).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(f, data, e) from None


# --------------------------------------------------------------------------------------------------
# Documents -> blocks
# --------------------------------------------------------------------------------------------------


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def anchor_text(text: str, config: AnchorConfig) -> str:
    """The text as the model sees it: AC mode inserts the anchor token after every sentence."""
    if config.mode == "ac" and config.ac_token not in text:
        return insert_ac(text, config.ac_token)
    return text


def split_blocks(ids: Sequence[int], anchor_ids: Iterable[int], block_size: int) -> List[List[int]]:
    """Cut ``ids`` into blocks of at most ``block_size`` tokens, at anchors where possible.

    Whole segments (up to and including their anchor) are packed greedily into a block; a segment
    longer than ``block_size`` is cut into ``block_size`` pieces.
    """
    if block_size < 2:
        raise ValueError("block_size must be >= 2")
    anchors = set(int(a) for a in anchor_ids)
    segments, start = [], 0
    for i, t in enumerate(ids):
        if t in anchors:
            segments.append(ids[start : i + 1])
            start = i + 1
    if start < len(ids):
        segments.append(ids[start:])
    blocks: List[List[int]] = []
    current: List[int] = []
    for seg in segments:
        if len(current) + len(seg) <= block_size:
            current.extend(seg)
            continue
        if current:
            blocks.append(current)
            current = []
        while len(seg) > block_size:
            blocks.append(list(seg[:block_size]))
            seg = seg[block_size:]
        current = list(seg)
    if current:
        blocks.append(current)
    return blocks


def encode_document(text: str, tokenizer, config: AnchorConfig, block_size: int, min_tokens: int = 2) -> List[List[int]]:
    """One document -> token blocks (BOS first in every block when the tokenizer uses one)."""
    ids = tokenizer(anchor_text(text, config), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    blocks = split_blocks(ids, config.anchor_ids, block_size - len(bos))
    return [bos + b for b in blocks if len(b) + len(bos) >= min_tokens]


def encode_documents(texts: Iterable[str], tokenizer, config: AnchorConfig, block_size: int) -> List[List[int]]:
    """Every document's blocks, in order."""
    out: List[List[int]] = []
    for text in texts:
        out.extend(encode_document(text, tokenizer, config, block_size))
    return out


def tokenize_dataset(ds, tokenizer, config: AnchorConfig, block_size: int, num_proc: Optional[int] = None):
    """``datasets`` map: documents (column ``text``) -> blocks (column ``input_ids``, one block per row)."""
    config.check_tokenizer(tokenizer)

    def encode(batch):
        return {"input_ids": encode_documents(batch["text"], tokenizer, config, block_size)}

    out = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc=f"anchor blocks ({config.mode}, {block_size} tokens)")
    if len(out) == 0:
        raise ValueError("the documents gave no block of at least 2 tokens")
    return out


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def check_recent_share(share) -> None:
    """``recent_share`` (the collator's, ``anllm train --recent-share``) is in (0, 1]."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"recent_share must be in (0, 1], got {share!r}")


def check_full_attention_share(share) -> None:
    """``full_attention_share`` (the collator's, ``anllm train --full-attention-share``) is in [0, 1)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share < 1.0:
        raise ValueError(f"full_attention_share must be in [0, 1), got {share!r}")


@dataclass
class AnchorDataCollator:
    """Pads a list of ``{"input_ids": [...]}`` to the longest row (right padding, attention mask 0) and
    sets labels = input ids on real tokens (anchors included), ``-100`` on padding.

    ``pad_to_multiple_of`` rounds the padded length up (fewer distinct shapes). ``recent`` > 0 adds
    ``anllm_recent`` to the batch: the patched model's mask then lets a token read the ``recent`` sentences before
    its own, as ``AnchorCache(recent=N)`` does (anllm_ext/recent.py). ``recent_share`` < 1 adds it to that share
    of the batches only, the rest keeping the plain AnSAN mask (a model for both caches). ``full_attention_share``
    > 0 marks that share of the batches ``anllm_full_attention``: the patched model reads them with plain causal
    attention, as the AnLLM's own full attention serves (the window is then drawn among the other batches).
    Which batches is drawn from the batch's token ids, so a batch always gets the same mask (resumed runs, every
    process)."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    recent: int = 0
    recent_share: float = 1.0
    full_attention_share: float = 0.0

    def __post_init__(self):
        check_recent_share(self.recent_share)
        check_full_attention_share(self.full_attention_share)

    def __call__(self, features: List[dict]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        rows = [list(f["input_ids"]) for f in features]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a row of the batch has no tokens")
        T = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r)
            ids[b, :n] = torch.tensor(r, dtype=torch.long)
            mask[b, :n] = 1
            labels[b, :n] = ids[b, :n]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self._draws_full_attention(ids):
            batch["anllm_full_attention"] = True
        elif self.recent and self._draws_window(ids):
            batch["anllm_recent"] = self.recent
        return batch

    def _draws_window(self, ids: torch.Tensor) -> bool:
        return self.recent_share >= 1.0 or _batch_draw(ids) < self.recent_share

    def _draws_full_attention(self, ids: torch.Tensor) -> bool:
        # A stream of its own, so the window's draw stays as it was without this share.
        return bool(self.full_attention_share) and _batch_draw(ids, _FULL_ATTENTION_STREAM) < self.full_attention_share


_FULL_ATTENTION_STREAM = 0x46554C4C  # "FULL"


def _batch_draw(ids: torch.Tensor, stream: int = 0) -> float:
    """A number in [0, 1) set by the batch's token ids (and ``stream``): the same in a resumed run and every process."""
    return random.Random(zlib.crc32(ids.numpy().tobytes(), stream)).random()
