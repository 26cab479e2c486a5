"""AnSAN training: turn a causal LM into an anchor-based LLM with the Hugging Face ``Trainer``.

The model is patched (:func:`anllm_ext.patch`), so every training forward runs under the AnSAN mask
through the fused kernel and its backward; the rest is transformers' own ``Trainer`` (checkpoints,
resume, logging, gradient accumulation and checkpointing, bf16, DDP under ``torchrun``, FSDP and
DeepSpeed through ``--fsdp`` / ``--deepspeed``) and optionally PEFT LoRA.

Python API::

    from anllm_ext.training import AnLLMArguments, AnLLMTrainingArguments, train
    result = train(AnLLMArguments(data=["docs/"], anchor_mode="ac"),
                   AnLLMTrainingArguments(output_dir="out", max_steps=100))

CLI: ``anllm train --data DIR --anchor-mode ac --output-dir out --max-steps 100`` (every
``TrainingArguments`` option is accepted too). Defaults follow the paper (see docs/method.md): lr 2e-5
constant after 20 warm-up steps, weight decay 0, loss on all tokens including anchors, no packing.

A run ends with held-out perplexity in three modes (full attention, one AnSAN pass, the anchor-cached
path with chunked prefill and compaction) and the KV kept, written to ``anllm_results.json``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from .config import ANCHOR_MODES

RESULTS_FILE = "anllm_results.json"


@dataclass
class AnLLMArguments:
    """What to train and on which data (the anchor side of a run)."""

    data: List[str] = field(default_factory=list, metadata={"help": "training files or directories (text, JSONL, parquet)"})
    model: Optional[str] = field(default=None, metadata={"help": "local model directory (default: bundled SmolLM2-135M)"})
    anchor_mode: Optional[str] = field(default=None, metadata={
        "help": "ac (add <AC> after every sentence), ep (sentence-final punctuation) or ids; default: the "
                "model's saved anchor configuration, else ep"})
    anchor_ids: Optional[List[int]] = field(default=None, metadata={"help": "explicit anchor ids (mode ids)"})
    punctuation: str = field(default=".", metadata={"help": "EP anchors: sentence-final punctuation"})
    ac_init: str = field(default="period", metadata={"help": "AC embedding init: period (authors' code) or mean (paper)"})
    text_field: str = field(default="text", metadata={"help": "the text field of JSONL / parquet rows"})
    block_size: int = field(default=512, metadata={"help": "tokens per training row (documents split at sentences)"})
    eval_data: List[str] = field(default_factory=list, metadata={"help": "held-out files (default: a split of --data)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of documents held out when --eval-data is absent"})
    eval_blocks: int = field(default=32, metadata={"help": "held-out blocks scored at the start and end (0: none)"})
    eval_before: bool = field(default=True, metadata={"help": "also score the model before training"})
    prefill_chunk: int = field(default=128, metadata={"help": "chunk size of the anchor-cached evaluation"})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "stop after this many training tokens (all ranks)"})
    max_minutes: Optional[float] = field(default=None, metadata={"help": "stop after this many minutes of training"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (PEFT) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules (comma list or all-linear)"})
    adapter_dtype: str = field(default="bfloat16", metadata={"help": "dtype the LoRA adapter is saved in (float32, bfloat16, float16)"})
    merge_lora: bool = field(default=True, metadata={"help": "also save the merged model (loads without peft)"})
    threads: int = field(default=0, metadata={"help": "torch threads per process (0: torch's default)"})
    attention: str = field(default="ansan", metadata={
        "help": "ansan (train an AnLLM) or causal (the same run with plain causal attention: the baseline)"})
    distill: bool = field(default=False, metadata={
        "help": "self-distillation: match the full-attention teacher's next-token distribution (KL) instead of "
                "(or beside) the LM loss; the teacher is the model itself with full attention (LoRA: adapter "
                "off; full fine-tuning: a frozen copy) unless --teacher is given"})
    teacher: Optional[str] = field(default=None, metadata={
        "help": "with --distill: a teacher model directory (same tokenizer), e.g. a larger model"})
    distill_temperature: float = field(default=1.0, metadata={"help": "with --distill: softmax temperature"})
    distill_alpha: float = field(default=1.0, metadata={
        "help": "with --distill: loss = alpha * KL + (1 - alpha) * LM loss (AC mode needs alpha < 1: the "
                "teacher does not predict <AC>)"})
    distill_hidden_weight: float = field(default=0.0, metadata={
        "help": "with --distill: weight of the hidden-state MSE to the teacher (0: off)"})

    def __post_init__(self):
        if self.attention not in ("ansan", "causal"):
            raise ValueError(f"attention must be 'ansan' or 'causal', got {self.attention!r}")
        if self.anchor_mode is not None and self.anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"unknown anchor mode {self.anchor_mode!r}: use ac, ep or ids")
        if self.anchor_ids and self.anchor_mode not in (None, "ids"):
            raise ValueError("anchor_ids go with anchor_mode='ids'")
        if self.block_size < 8:
            raise ValueError("block_size must be >= 8")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        self._check_distill()

    def _check_distill(self):
        if not self.distill:
            if self.teacher is not None:
                raise ValueError("--teacher is the teacher of --distill: pass --distill too")
            return
        if self.attention == "causal":
            raise ValueError("--distill trains an AnSAN student against its full-attention teacher; with "
                             "--attention causal student and teacher would be the same model")
        if self.teacher is not None and not os.path.isdir(self.teacher):
            raise ValueError(f"--teacher {self.teacher}: no such model directory")
        from .distillation import DistillationConfig

        DistillationConfig(self.distill_temperature, self.distill_alpha, self.distill_hidden_weight)


@dataclass
class AnLLMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's defaults (see docs/method.md)."""

    output_dir: Optional[str] = field(default="anllm-out", metadata={"help": "where checkpoints and the model go"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (paper: 2e-5)"})
    lr_scheduler_type: str = field(default="constant_with_warmup", metadata={"help": "paper: constant after warm-up"})
    warmup_steps: float = field(default=20, metadata={"help": "warm-up steps (paper: 20)"})
    weight_decay: float = field(default=0.0, metadata={"help": "paper: 0"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "rows per device and step"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    save_steps: float = field(default=200, metadata={"help": "checkpoint every N steps"})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "checkpoints kept"})
    report_to: Optional[str] = field(default="none", metadata={"help": "loggers (tensorboard, wandb, ...)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the collator's columns"})
    include_num_input_tokens_seen: Optional[str] = field(default="non_padding", metadata={"help": "count real tokens"})
    group_by_length: bool = field(default=True, metadata={"help": "batch rows of similar length (less padding)"})
    ddp_find_unused_parameters: Optional[bool] = field(default=False, metadata={
        "help": "every parameter gets a gradient in AnSAN training; True only for models with unused branches"})

    def __post_init__(self):
        if self.deepspeed and not self.use_cpu and _launched_distributed() and not torch.accelerator.is_available():
            self._configure_cpu_deepspeed()
        super().__post_init__()

    def _configure_cpu_deepspeed(self):
        """DeepSpeed on CPU processes (DeepSpeed's CPU accelerator, gloo). transformers starts DeepSpeed with
        no communication backend, which accelerate reads as one process when there is no accelerator (each
        rank would then fill the config's "auto" batch size for a world of 1 and fail DeepSpeed's batch
        check). So the distributed state is configured here, with gloo, and the Trainer told to use it."""
        from accelerate import PartialState

        if self.accelerator_config is not None and not isinstance(self.accelerator_config, dict):
            raise ValueError("DeepSpeed on CPU configures accelerate's state itself: pass accelerator_config "
                             "as a dict (or not at all)")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend="gloo")
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        self.accelerator_config = dict(self.accelerator_config or {}, use_configured_state=True)


def _launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def _full_parameters(model):
    """Under DeepSpeed ZeRO-3 each rank holds a slice of every parameter: gather them whole for the
    duration (a collective, every rank enters it). A no-op otherwise."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


@contextlib.contextmanager
def _zero3_init_off(training_args):
    """Load a model whole on one rank: transformers would otherwise create it partitioned (ZeRO-3's
    ``zero.Init``), a collective the other ranks never join."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training_args.hf_deepspeed_config)


class BudgetCallback(TrainerCallback):
    """Stops training after a token budget (real tokens, all ranks) or a wall-clock budget."""

    def __init__(self, max_tokens: Optional[int] = None, max_minutes: Optional[float] = None):
        self.max_tokens, self.max_minutes = max_tokens, max_minutes
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_tokens is not None and state.num_input_tokens_seen >= self.max_tokens:
            control.should_training_stop = True
        if self.max_minutes is not None and time.monotonic() - self._start >= 60.0 * self.max_minutes:
            control.should_training_stop = True
        if control.should_training_stop:
            control.should_save = True  # a checkpoint of the last step, so --resume-from-checkpoint can go on
        return control


# --------------------------------------------------------------------------------------------------
# The steps of a run
# --------------------------------------------------------------------------------------------------


def load_for_training(args: AnLLMArguments):
    """(model, tokenizer, anchor config): the model loaded in fp32, patched with its anchors.

    The anchors: :func:`anllm_ext.config.resolve_anchor_config` of ``--anchor-mode`` / ``--anchor-ids`` /
    ``--punctuation``; a model that carries a configuration of the mode asked for (or no mode given) keeps it.
    """
    from .config import anchor_spec, resolve_anchor_config
    from .hf import patch
    from .models import load_model

    model, tok = load_model(args.model)
    config = resolve_anchor_config(anchor_spec(args.anchor_mode, args.punctuation, args.anchor_ids), tok, model,
                                   default=anchor_spec("ep", args.punctuation), ac_init=args.ac_init,
                                   keep_saved_mode=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if args.attention == "ansan":
        config.attach(model)
        patch(model, config.anchor_ids)
    model.train()
    return model, tok, config


def build_datasets(args: AnLLMArguments, tok, config, seed: int):
    """(train blocks, held-out blocks) as ``datasets.Dataset`` with ``input_ids``; documents, not blocks, are
    split, so no held-out text is trained on."""
    from .data import load_documents, tokenize_dataset

    docs = load_documents(args.data, args.text_field)
    if args.eval_data:
        train_docs, eval_docs = docs, load_documents(args.eval_data, args.text_field)
    elif args.eval_blocks and args.eval_fraction > 0:
        if len(docs) < 2:
            raise ValueError("one document cannot be split into training and held-out parts; pass --eval_data")
        split = docs.train_test_split(test_size=args.eval_fraction, seed=seed)
        train_docs, eval_docs = split["train"], split["test"]
    else:
        train_docs, eval_docs = docs, None
    train_ds = tokenize_dataset(train_docs, tok, config, args.block_size)
    eval_ds = None
    if eval_docs is not None and args.eval_blocks:
        eval_ds = tokenize_dataset(eval_docs, tok, config, args.block_size).shuffle(seed=seed)
        eval_ds = eval_ds.select(range(min(args.eval_blocks, len(eval_ds))))
    return train_ds, eval_ds


def add_lora(model, args: AnLLMArguments, config):
    """Wrap the patched model in a PEFT LoRA model; in AC mode the ``<AC>`` embedding row trains too."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    extra = {}
    if config.mode == "ac":
        extra["trainable_token_indices"] = {"embed_tokens": list(config.anchor_ids)}
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, lora)


def make_teacher(model, tok, config, args: AnLLMArguments):
    """The full-attention teacher of ``--distill``: ``None`` with LoRA (the model itself, adapter off), a
    frozen copy of the (still untrained) model for full fine-tuning, or the ``--teacher`` directory."""
    from .distillation import frozen_copy, load_teacher
    from .hf import unpatch

    if args.teacher is not None:
        return load_teacher(args.teacher, tok, _original_vocab(model, config))
    if args.lora:
        return None
    return unpatch(frozen_copy(model))


def _original_vocab(model, config) -> int:
    """The vocabulary before AC mode's ``<AC>`` (added last, above every original id)."""
    if config.mode == "ac":
        return min(config.anchor_ids)
    return model.get_output_embeddings().weight.shape[0]


def distillation_config(tok, config, args: AnLLMArguments):
    from .distillation import DistillationConfig

    anchor_map = None
    if config.mode == "ac":
        if args.distill_alpha >= 1.0:
            raise ValueError("AC mode: the teacher does not predict <AC>, so --distill needs the LM loss too "
                             "(--distill-alpha below 1, e.g. 0.9)")
        if args.teacher is not None:  # the external teacher reads a sentence end where the student reads <AC>
            period = tok.encode(".", add_special_tokens=False)
            anchor_map = {i: period[-1] for i in config.anchor_ids}
    vocab = min(config.anchor_ids) if config.mode == "ac" else None
    return DistillationConfig(args.distill_temperature, args.distill_alpha, args.distill_hidden_weight,
                              vocab_size=vocab, teacher_anchor_map=anchor_map)


def _objective(args: AnLLMArguments) -> dict:
    if not args.distill:
        return {"loss": "lm"}
    return {"loss": "distill", "teacher": args.teacher or "self (full attention)", "alpha": args.distill_alpha,
            "temperature": args.distill_temperature, "hidden_weight": args.distill_hidden_weight}


def evaluate_blocks(model, eval_ds, args: AnLLMArguments, label: str, anchor_ids) -> Optional[dict]:
    """Held-out perplexity in the three modes (see :func:`anllm_ext.evaluation.perplexity`)."""
    if eval_ds is None or len(eval_ds) == 0:
        return None
    from .evaluation import perplexity

    if hasattr(model, "get_base_model"):  # PEFT: the patched transformers model, LoRA layers in place
        model = model.get_base_model()
    was_training = model.training
    model.eval()
    try:
        result = perplexity(model, [list(r) for r in eval_ds["input_ids"]], prefill_chunk=args.prefill_chunk,
                            anchor_ids=anchor_ids)
    finally:
        model.train(was_training)
    result = result.to_dict() if hasattr(result, "to_dict") else result
    print(f"anllm train: held-out perplexity {label}: {json.dumps(result)}", flush=True)
    return result


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
        with _full_parameters(model):
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
    _record_base(adapter_dir, args.model)
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


def _record_base(adapter_dir: Path, base: Optional[str]) -> None:
    """Name the base model in ``anllm_config.json`` (``base_model``): ``"bundled"`` for the bundled model, else
    its path. For the bundled model, PEFT's ``adapter_config.json`` names none (``base_model_name_or_path``
    null instead of the path of this machine's model cache), so the adapter directory is portable."""
    from .config import AnchorConfig

    config = AnchorConfig.from_pretrained(adapter_dir)
    config.base_model = "bundled" if base is None else str(Path(base).resolve())
    config.save_pretrained(adapter_dir)
    if base is None:
        peft_file = adapter_dir / "adapter_config.json"
        data = json.loads(peft_file.read_text(encoding="utf-8"))
        data["base_model_name_or_path"] = None
        peft_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train(args: AnLLMArguments, training_args: AnLLMTrainingArguments) -> dict:
    """Run AnSAN training end to end; returns (and writes to ``anllm_results.json``) the run's results."""
    from transformers import Trainer, set_seed

    from .data import AnchorDataCollator

    if not args.data:
        raise ValueError("no training data: pass data=[files or directories]")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(training_args.seed)
    model, tok, config = load_for_training(args)
    with training_args.main_process_first(desc="tokenize"):
        train_ds, eval_ds = build_datasets(args, tok, config, training_args.seed)
    is_main = training_args.process_index == 0
    results = {"anchor_config": config.to_dict(), "train_blocks": len(train_ds),
               "train_tokens_available": int(sum(len(r) for r in train_ds["input_ids"])),
               "eval_blocks": 0 if eval_ds is None else len(eval_ds)}
    if args.eval_before and eval_ds is not None:
        with _full_parameters(model):
            if is_main:
                results["eval_before"] = evaluate_blocks(model, eval_ds, args, "before training", config.anchor_ids)
    teacher = make_teacher(model, tok, config, args) if args.distill else None
    if args.lora:
        model = add_lora(model, args, config)
    trainer_kwargs = dict(
        model=model, args=training_args, train_dataset=train_ds, processing_class=tok,
        data_collator=AnchorDataCollator(tok.pad_token_id),
        callbacks=[BudgetCallback(args.max_tokens, args.max_minutes)],
    )
    if args.distill:
        from .distillation import DistillationTrainer

        trainer = DistillationTrainer(**trainer_kwargs, teacher=teacher,
                                      distillation=distillation_config(tok, config, args))
    else:
        trainer = Trainer(**trainer_kwargs)
    results["objective"] = _objective(args)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results.update(train_seconds=time.time() - started, train_steps=trainer.state.global_step,
                   train_tokens=int(trainer.state.num_input_tokens_seen), train_loss=output.training_loss,
                   log_history=trainer.state.log_history)
    saved = save_anllm(trainer, model, tok, config, args, training_args.output_dir)
    if not is_main:
        return results
    results["saved_to"] = saved
    # score what was saved, reloaded as a user loads it (also checks the round trip)
    with _zero3_init_off(training_args):
        reloaded = _reload(saved)
    results["eval_after"] = evaluate_blocks(reloaded, eval_ds, args, "after training", config.anchor_ids)
    write_results(results, training_args.output_dir)
    return results


def _reload(path: str):
    from .models import load_model

    return load_model(path)[0]


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


def __getattr__(name):
    # the `anllm train` command (its parser and function) is part of the CLI, anllm_ext.cli
    if name in ("add_train_parser", "cmd_train"):
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
