"""Which tokens are a model's anchors: the configuration an AnLLM is trained with (saved inside its model
directory), and the one decision that turns an anchor spec (CLI ``--anchors``, training arguments) and a
model's saved configuration into anchors (:func:`resolve_anchor_config`).

A model trained with the AnSAN mask only works under anchor inference with the anchors it was trained
on, so the configuration travels with the weights: :meth:`AnchorConfig.attach` writes it into the
model's ``config`` under the key ``"anllm"`` (so ``config.json`` carries it, and plain transformers loads
the directory unchanged: unknown config keys are kept as attributes), and ``anllm_config.json`` beside
the weights holds the same (also for a LoRA adapter directory, which has no ``config.json`` of its own;
there it also names the adapter's base model).

``anllm_ext.patch(model)`` with no anchor ids reads it back (:meth:`AnchorConfig.from_model`).

Anchor specs (the ``--anchors`` option of ``anllm generate`` / ``anllm eval``, lm-eval's ``anchors=``):
``ep`` (tokens ending a sentence with a period), ``ep:<chars>`` (with any of ``<chars>``), ``ac`` (the added
``<AC>`` token), a preset of a released checkpoint (``anllm-ac``, ``anllm-ep``: :data:`anllm_ext.PRESETS`)
or explicit ids (``13,30``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Union

CONFIG_KEY = "anllm"
CONFIG_FILE = "anllm_config.json"
#: The anchor modes (not to be confused with the evaluation modes, ``anllm_ext.evaluation.MODES``).
ANCHOR_MODES = ("ac", "ep", "ids")
_FIELDS = ("mode", "anchor_ids", "ac_token", "punctuation", "version", "base_model", "sink")


def check_sink(sink) -> None:
    """``sink`` (an anchor configuration's, the patch's, token_layout's) is an int >= 0."""
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an int >= 0 (tokens), got {sink!r}")


@dataclass
class AnchorConfig:
    """How a model's anchors are defined (and the on-disk schema of ``anllm_config.json``).

    Args:
        mode: ``"ac"`` (an added ``<AC>`` token after every sentence), ``"ep"`` (sentence-final
            punctuation) or ``"ids"`` (explicit ids).
        anchor_ids: the vocabulary ids that are anchors (kept sorted).
        ac_token: the AC token's text (AC mode), e.g. ``"<AC>"``; data pipelines insert it.
        punctuation: the EP punctuation (EP mode), e.g. ``"."``.
        version: the schema version (1).
        base_model: LoRA adapter directories only: the model the adapter applies to, ``"bundled"`` (the
            bundled SmolLM2-135M-Instruct) or a model directory; None (and not written) for a whole model.
        sink: the first ``sink`` tokens of every row are anchors whatever their ids (an attention sink:
            ``anllm_ext.patch(model, sink=...)``, docs/method.md); a model trained with one is served with it,
            so it travels with the anchors. 0 (and not written): none.
    """

    mode: str
    anchor_ids: List[int]
    ac_token: Optional[str] = None
    punctuation: Optional[str] = None
    version: int = field(default=1)
    base_model: Optional[str] = None
    sink: int = 0

    def __post_init__(self):
        if self.mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {self.mode!r}")
        self.anchor_ids = sorted(int(i) for i in self.anchor_ids)
        if not self.anchor_ids:
            raise ValueError("an anchor configuration needs at least one anchor id")
        if self.mode == "ac" and not self.ac_token:
            raise ValueError("AC mode needs ac_token (the text of the added anchor token)")
        check_sink(self.sink)

    # ------------------------------------------------------------------ dict / model config
    def to_dict(self) -> dict:
        """The JSON object of ``anllm_config.json`` (``base_model`` and ``sink`` only when set)."""
        d = asdict(self)
        if d["base_model"] is None:
            del d["base_model"]
        if not d["sink"]:
            del d["sink"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "AnchorConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an anchor configuration is a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in _FIELDS if k in data}
        missing = {"mode", "anchor_ids"} - set(known)
        if missing:
            raise ValueError(f"anchor configuration lacks {sorted(missing)}: {data}")
        return cls(**known)

    def attach(self, model) -> None:
        """Store the configuration in ``model.config`` (saved into ``config.json`` by ``save_pretrained``)."""
        setattr(model.config, CONFIG_KEY, self.to_dict())

    @classmethod
    def from_model(cls, model) -> Optional["AnchorConfig"]:
        """The configuration stored in ``model.config`` (a PEFT wrapper forwards ``config`` to its base);
        None when the model carries none."""
        data = getattr(getattr(model, "config", None), CONFIG_KEY, None)
        return None if data is None else cls.from_dict(data)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``anllm_config.json`` into ``directory`` (created if missing); returns its path."""
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def find_pretrained(cls, directory: Union[str, os.PathLike]) -> Optional["AnchorConfig"]:
        """From ``anllm_config.json``, else from the ``"anllm"`` key of ``config.json``; None if neither (a
        model directory of a model that is no AnLLM)."""
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

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "AnchorConfig":
        """As :meth:`find_pretrained`, but a directory without an anchor configuration raises
        ``FileNotFoundError`` (use :meth:`find_pretrained` where its absence is normal)."""
        config = cls.find_pretrained(directory)
        if config is None:
            raise FileNotFoundError(
                f"{directory} holds no anchor configuration (neither {CONFIG_FILE} nor the {CONFIG_KEY!r} key of "
                "config.json): it was not saved by `anllm train` or by save_pretrained of a patched model"
            )
        return config

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if the tokenizer cannot produce these anchors (ids out of range, ``<AC>`` missing)."""
        n = len(tokenizer)
        bad = [i for i in self.anchor_ids if i < 0 or i >= n]
        if bad:
            raise ValueError(f"anchor ids {bad} are outside the tokenizer's vocabulary of {n} tokens")
        if self.mode == "ac":
            ac = tokenizer.convert_tokens_to_ids(self.ac_token)
            if ac is None or ac == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no token {self.ac_token!r}; add it first (anllm_ext.add_ac_token)")
            if ac not in self.anchor_ids:
                raise ValueError(f"the tokenizer maps {self.ac_token!r} to {ac}, not to an anchor id {self.anchor_ids}")


# ---------------------------------------------------------------------------------------- the decision


def spec_mode(spec: str) -> str:
    """The anchor mode an anchor spec names: ``"ac"``, ``"ep"`` or ``"ids"`` (presets: their mode; a spec
    that is none of these raises ``ValueError``)."""
    from .anchors import PRESETS

    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec].mode
    if spec in ("ac", "ids"):
        return spec
    if spec == "ep" or spec.startswith("ep:"):
        return "ep"
    _parse_ids(spec)
    return "ids"


def _parse_ids(spec: str) -> List[int]:
    from .anchors import PRESETS

    try:
        ids = [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"anchors must be 'ep', 'ep:<chars>', 'ac', a preset {sorted(PRESETS)} or ids like '13,30'")
    if not ids:
        raise ValueError("no anchor ids given")
    return ids


def resolve_anchor_config(spec: Optional[str] = None, tokenizer=None, model=None, *, default: str = "ep",
                          ac_init: str = "period", keep_saved_mode: bool = False) -> AnchorConfig:
    """The anchors of ``model`` with ``tokenizer``: the one place that decides them.

    ``spec`` None: the configuration the model carries (:meth:`AnchorConfig.from_model`: a trained AnLLM),
    else the spec ``default``. A spec (see the module docstring) is turned into a configuration:
    ``ep[:<chars>]`` takes every token of the vocabulary ending a sentence with that punctuation
    (:func:`~anllm_ext.anchors.ep_anchor_ids`); ``ac`` adds ``<AC>`` to the tokenizer and the model's
    embeddings (:func:`~anllm_ext.anchors.add_ac_token`, ``ac_init``: ``"period"`` copies the row of ``"."``
    as the authors' code does, ``"mean"`` the mean row as the paper says); a preset is checked against the
    tokenizer and sets its padding token (:meth:`~anllm_ext.anchors.AnchorPreset.apply`); ids are taken as
    given. ``keep_saved_mode``: a spec that names only the mode the model's saved configuration has
    (``ac``, ``ep``, ``ids``), or its own punctuation (``ep:<chars>``), keeps the saved configuration (what
    training a trained AnLLM further needs); other punctuation makes new anchors (training it to write into
    them). Without a tokenizer only presets and ids can be resolved (nothing is checked).
    """
    from .anchors import AC_TOKEN, PRESETS, add_ac_token, ep_anchor_ids

    saved = AnchorConfig.from_model(model) if model is not None else None
    if spec is None:
        if saved is not None:
            config = saved
            if tokenizer is not None:
                config.check_tokenizer(tokenizer)
            return config
        spec = default
    spec = spec.strip()
    mode = spec_mode(spec)
    if keep_saved_mode and saved is not None and saved.mode == mode and (
            spec in ("ac", "ep", "ids") or spec == f"ep:{saved.punctuation}"):
        if tokenizer is not None:
            saved.check_tokenizer(tokenizer)
        return saved
    if spec in PRESETS:
        preset = PRESETS[spec]
        ids = preset.apply(tokenizer, model) if tokenizer is not None else list(preset.anchor_ids)
        extra = {"ac_token": AC_TOKEN} if preset.mode == "ac" else {"punctuation": "."}
        return AnchorConfig(preset.mode, ids, **extra)
    if mode == "ep":
        if tokenizer is None:
            raise ValueError("EP anchors need the tokenizer")
        punctuation = spec[3:] if spec.startswith("ep:") else "."
        return AnchorConfig("ep", ep_anchor_ids(tokenizer, punctuation), punctuation=punctuation)
    if mode == "ac":
        if tokenizer is None:
            raise ValueError("AC anchors need the tokenizer")
        return AnchorConfig("ac", [add_ac_token(tokenizer, model, init=ac_init)], ac_token=AC_TOKEN)
    if spec == "ids":
        raise ValueError("anchor mode 'ids' needs anchor ids (e.g. '13,30')")
    config = AnchorConfig("ids", _parse_ids(spec))
    if tokenizer is not None:
        config.check_tokenizer(tokenizer)
    return config


def resolve_anchors(spec: str, tokenizer=None, model=None) -> List[int]:
    """Anchor ids from an anchor spec (see the module docstring): :func:`resolve_anchor_config`'s ids
    (a preset given a tokenizer is checked against it and sets its padding token)."""
    return resolve_anchor_config(spec, tokenizer, model).anchor_ids


def anchor_spec(mode: Optional[str], punctuation: str = ".", anchor_ids=None) -> Optional[str]:
    """The anchor spec of a mode and its parameters (training's ``--anchor-mode``, ``--punctuation``,
    ``--anchor-ids``): ids when given, ``ep:<punctuation>`` for other punctuation than a period; None
    for no mode and no ids."""
    if anchor_ids:
        return ",".join(str(int(i)) for i in anchor_ids)
    if mode == "ep" and punctuation != ".":
        return f"ep:{punctuation}"
    return mode
