"""Whether a vLLM model is an AnLLM: the one place that decides (:func:`anchor_config_of`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import CONFIG_KEY, AnchorConfig


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
