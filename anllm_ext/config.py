"""The anchor configuration an AnLLM is trained with, saved inside its model directory.

A model trained with the AnSAN mask only works under anchor inference with the anchors it was trained
on, so the configuration travels with the weights: :meth:`AnchorConfig.attach` writes it into the
model's ``config`` under the key ``"anllm"`` (so ``config.json`` carries it, and plain transformers loads
the directory unchanged: unknown config keys are kept as attributes), and ``anllm_config.json`` beside
the weights holds the same (also for a LoRA adapter directory, which has no ``config.json`` of its own).

``anllm_ext.patch(model)`` with no anchor ids reads it back (:meth:`AnchorConfig.from_model`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Union

CONFIG_KEY = "anllm"
CONFIG_FILE = "anllm_config.json"
MODES = ("ac", "ep", "ids")


@dataclass
class AnchorConfig:
    """How a model's anchors are defined.

    Args:
        mode: ``"ac"`` (an added ``<AC>`` token after every sentence), ``"ep"`` (sentence-final
            punctuation) or ``"ids"`` (explicit ids).
        anchor_ids: the vocabulary ids that are anchors.
        ac_token: the AC token's text (AC mode), e.g. ``"<AC>"``; data pipelines insert it.
        punctuation: the EP punctuation (EP mode), e.g. ``"."``.
    """

    mode: str
    anchor_ids: List[int]
    ac_token: Optional[str] = None
    punctuation: Optional[str] = None
    version: int = field(default=1)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"anchor mode must be one of {MODES}, got {self.mode!r}")
        self.anchor_ids = sorted(int(i) for i in self.anchor_ids)
        if not self.anchor_ids:
            raise ValueError("an anchor configuration needs at least one anchor id")
        if self.mode == "ac" and not self.ac_token:
            raise ValueError("AC mode needs ac_token (the text of the added anchor token)")

    # ------------------------------------------------------------------ dict / model config
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AnchorConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an anchor configuration is a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in ("mode", "anchor_ids", "ac_token", "punctuation", "version") if k in data}
        missing = {"mode", "anchor_ids"} - set(known)
        if missing:
            raise ValueError(f"anchor configuration lacks {sorted(missing)}: {data}")
        return cls(**known)

    def attach(self, model) -> None:
        """Store the configuration in ``model.config`` (saved into ``config.json`` by ``save_pretrained``)."""
        setattr(model.config, CONFIG_KEY, self.to_dict())

    @classmethod
    def from_model(cls, model) -> Optional["AnchorConfig"]:
        """The configuration stored in ``model.config`` (a PEFT wrapper forwards ``config`` to its base)."""
        data = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        return None if data is None else cls.from_dict(data)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> Optional["AnchorConfig"]:
        """From ``anllm_config.json``, else from the ``"anllm"`` key of ``config.json``; None if neither."""
        directory = Path(directory)
        own = directory / CONFIG_FILE
        if own.is_file():
            return cls.from_dict(json.loads(own.read_text(encoding="utf-8")))
        config = directory / "config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8")).get(CONFIG_KEY)
            if data is not None:
                return cls.from_dict(data)
        return None

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if the tokenizer cannot produce these anchors (ids out of range, ``<AC>`` missing)."""
        n = len(tokenizer)
        bad = [i for i in self.anchor_ids if i < 0 or i >= n]
        if bad:
            raise ValueError(f"anchor ids {bad} are outside the tokenizer's vocabulary of {n} tokens")
        if self.mode == "ac":
            ac = tokenizer.convert_tokens_to_ids(self.ac_token)
            if ac not in self.anchor_ids:
                raise ValueError(f"the tokenizer maps {self.ac_token!r} to {ac}, not to an anchor id {self.anchor_ids}")



def make_anchor_config(mode: str, tokenizer, model=None, punctuation: str = ".", anchor_ids=None,
                       ac_init: str = "period") -> AnchorConfig:
    """The anchor configuration for ``mode`` on this tokenizer (and model).

    ``"ac"`` adds ``<AC>`` to the tokenizer and the model's embeddings (``ac_init``: ``"period"`` copies the
    row of ``"."`` as the authors' code does, ``"mean"`` the mean row as the paper says); ``"ep"`` takes every
    token ending a sentence with ``punctuation``; ``"ids"`` takes ``anchor_ids`` as given.
    """
    from .anchors import AC_TOKEN, add_ac_token, ep_anchor_ids

    if mode == "ac":
        return AnchorConfig("ac", [add_ac_token(tokenizer, model, init=ac_init)], ac_token=AC_TOKEN)
    if mode == "ep":
        return AnchorConfig("ep", ep_anchor_ids(tokenizer, punctuation), punctuation=punctuation)
    if mode == "ids":
        if not anchor_ids:
            raise ValueError("anchor mode 'ids' needs anchor_ids")
        config = AnchorConfig("ids", list(anchor_ids))
        config.check_tokenizer(tokenizer)
        return config
    raise ValueError(f"anchor mode must be one of {MODES}, got {mode!r}")
