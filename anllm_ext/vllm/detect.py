"""Whether a vLLM model is an AnLLM (:func:`anchor_config_of`), its engine's AnLLM setting (:func:`recent_of`)
and the kept-slot rule they make (:func:`keep_rule`): the one place that decides each."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checks import check_int
from ..config import CONFIG_KEY, AnchorConfig
from .compaction import KeepRule

#: The key of vLLM's ``additional_config`` for recent sentences kept hot (``AnchorCache(recent=N)``).
RECENT_KEY = "anllm_recent"


def anchor_config_of(model_config) -> Optional[AnchorConfig]:
    """The anchor configuration of a vLLM ``ModelConfig``: the ``"anllm"`` key of its config.json (vLLM's
    ``hf_config`` keeps unknown keys as attributes), else ``anllm_config.json`` in the model directory;
    None for a model that is no AnLLM (or no model config at all)."""
    if model_config is None:
        return None
    data = getattr(getattr(model_config, "hf_config", None), CONFIG_KEY, None)
    if data is not None:
        return AnchorConfig.from_dict(data)
    path = Path(str(getattr(model_config, "model", "")))
    return AnchorConfig.find_pretrained(path) if path.is_dir() else None


def recent_of(vllm_config) -> int:
    """``additional_config["anllm_recent"]`` of a ``VllmConfig``: how many sentences closed last every request
    keeps hot besides its anchors and open sentence (0 when absent). The engine config carries it to the
    scheduler and to every worker, so all read the same value. An integer >= 0 (else TypeError /
    ValueError); another key starting with ``anllm`` raises ValueError (a misspelt setting never passes
    silently)."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict):
        return 0
    unknown = sorted(k for k in extra if isinstance(k, str) and k.startswith("anllm") and k != RECENT_KEY)
    if unknown:
        raise ValueError(f"additional_config has {unknown}: anllm_ext's vLLM plugin reads only {RECENT_KEY!r}")
    return check_int(f"additional_config[{RECENT_KEY!r}]", extra.get(RECENT_KEY, 0), 0)


def keep_rule(vllm_config) -> Optional[KeepRule]:
    """The kept-slot rule of a ``VllmConfig``'s AnLLM: its anchor ids and sink (the model's anchor
    configuration) and the engine's ``anllm_recent``; None for a model that is no AnLLM. The scheduler, the
    workers' model-runner hooks and the attention backend each take theirs from here."""
    config = anchor_config_of(vllm_config.model_config)
    if config is None:
        return None
    return KeepRule(config.anchor_ids, recent=recent_of(vllm_config), sink=config.sink)
