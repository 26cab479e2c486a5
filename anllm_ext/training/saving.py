"""Saving a trained AnLLM (full model or LoRA adapter + merged model) and the run's results."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from .arguments import AnLLMArguments
from .zero3 import full_parameters

RESULTS_FILE = "anllm_results.json"


def save_anllm(trainer, model, tok, config, args: AnLLMArguments, output_dir: str) -> str:
    """Save the trained AnLLM so that ``load_model(path)`` + ``patch(model)`` restore it; returns the path.

    Call on every rank (FSDP / DeepSpeed gather the weights in ``trainer.save_model``).
    Full fine-tuning: the model (its ``config.json`` carries the anchors), tokenizer, ``anllm_config.json``.
    LoRA: the adapter in ``output_dir/adapter`` (small; the anchors and the base model named beside it) and,
    with ``merge_lora``, the merged model in ``output_dir``, which plain transformers loads without peft.
    """
    out = Path(output_dir)
    main = trainer.is_world_process_zero()
    if not args.lora:
        trainer.save_model(str(out))
    else:
        with full_parameters(model):
            if main:
                _save_lora(model, tok, config, args, out)
    whole_model = not args.lora or args.merge_lora  # else output_dir holds only the adapter folder
    if main and whole_model:
        tok.save_pretrained(out)
        if args.attention == "ansan":  # a causal baseline is no AnLLM: it carries no anchors
            config.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
    return str(out) if whole_model else str(out / "adapter")


def _save_lora(model, tok, config, args: AnLLMArguments, out: Path) -> None:
    """The adapter in ``out/adapter`` and, with ``merge_lora``, the merged model in ``out``."""
    adapter_dir = out / "adapter"
    # the <AC> row travels as PEFT's trainable-token delta: never the whole (resized) embedding matrix
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    _cast_safetensors(adapter_dir, getattr(torch, args.adapter_dtype))
    tok.save_pretrained(adapter_dir)
    config.save_pretrained(adapter_dir)
    _record_base(adapter_dir, _base_model(args))
    if not args.merge_lora:
        return
    merged = model.merge_and_unload()
    config.attach(merged)
    merged.save_pretrained(out)


def _cast_safetensors(directory: Path, dtype: torch.dtype) -> None:
    """Store the floating-point tensors of every safetensors file in ``directory`` as ``dtype`` (a bf16
    adapter is half the size; peft casts it back to the model's dtype when loading)."""
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def _base_model(args: AnLLMArguments) -> Optional[str]:
    """The base model of the adapter a LoRA run saves: ``--model`` (None: the bundled model), or the base of
    the adapter ``--model`` names when that adapter went on training."""
    from ..config import AnchorConfig
    from .steps import continued_adapter

    adapter = continued_adapter(args)
    if adapter is None:
        return args.model
    base = AnchorConfig.from_pretrained(adapter).base_model
    return None if base in (None, "bundled") else base


def _record_base(adapter_dir: Path, base: Optional[str]) -> None:
    """Name the base model in ``anllm_config.json`` (``base_model``): ``"bundled"`` for the bundled model, else
    its path. For the bundled model, PEFT's ``adapter_config.json`` names none (``base_model_name_or_path``
    null instead of the path of this machine's model cache), so the adapter directory is portable."""
    from ..config import AnchorConfig

    config = AnchorConfig.from_pretrained(adapter_dir)
    config.base_model = "bundled" if base is None else str(Path(base).resolve())
    config.save_pretrained(adapter_dir)
    if base is None:
        peft_file = adapter_dir / "adapter_config.json"
        data = json.loads(peft_file.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = None
        peft_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_results(results: dict, output_dir: str) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n", encoding="utf-8")
    print(f"anllm train: results in {path}", flush=True)
    return path


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return str(x)
