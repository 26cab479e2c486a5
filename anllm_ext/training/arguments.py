"""The arguments of ``anllm train``: what to train on which data (:class:`AnLLMArguments`) and transformers'
``TrainingArguments`` with the paper's defaults (:class:`AnLLMTrainingArguments`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from transformers import TrainingArguments

from ..config import ANCHOR_MODES, check_sink
from ..data import check_full_attention_share, check_recent_share
from ..defaults import PREFILL_CHUNK


@dataclass
class AnLLMArguments:
    """What to train and on which data (the anchor side of a run)."""

    data: List[str] = field(default_factory=list, metadata={"help": "training files or directories (text, JSONL, parquet)"})
    model: Optional[str] = field(default=None, metadata={
        "help": "local model directory (default: bundled SmolLM2-135M), or a LoRA adapter directory / "
                "smollm2-anllm: with --lora that adapter goes on training, without it is merged first"})
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
    prefill_chunk: int = field(default=PREFILL_CHUNK, metadata={"help": "chunk size of the anchor-cached evaluation"})
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
    recall_spans: int = field(default=0, metadata={
        "help": "train for anchor-indexed recall: up to N closed sentences per row stay visible to every later "
                "token, as recall gives them back (those the rest of the row repeats first, then random ones; "
                "anllm_ext/training/recall_spans.py); 0: the plain AnSAN mask"})
    recent: int = field(default=0, metadata={
        "help": "train for AnchorCache(recent=N): a non-anchor token also reads every token of the N sentences "
                "before its own, as that cache keeps them hot at inference (anllm_ext/recent.py); 0: the plain "
                "AnSAN mask"})
    recent_share: float = field(default=1.0, metadata={
        "help": "with --recent: the share of batches trained under that window, drawn per batch; the others keep "
                "the plain AnSAN mask, for a model served both with and without recent sentences"})
    full_attention_share: float = field(default=0.0, metadata={
        "help": "the share of batches trained with plain causal attention (what the AnLLM's own full attention "
                "serves), drawn per batch; the others keep the AnSAN mask (with --recent, its window is drawn "
                "among them). 0: every batch under the AnSAN mask"})
    sink: Optional[int] = field(default=None, metadata={
        "help": "the first S tokens of every row are anchors (an attention sink every later token reads, "
                "patch(model, sink=S)); saved in the model's anchor configuration, so it is served with it. "
                "Default: the sink the model carries (0 for a new AnLLM)"})

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
        if self.recall_spans < 0:
            raise ValueError(f"recall_spans must be >= 0 sentences per row, got {self.recall_spans}")
        if self.recall_spans and self.attention != "ansan":
            raise ValueError("--recall-spans extends the AnSAN mask; with --attention causal every sentence is visible")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int) or self.recent < 0:
            raise ValueError(f"recent must be an int >= 0 sentences, got {self.recent!r}")
        if self.recent and self.attention != "ansan":
            raise ValueError("--recent extends the AnSAN mask; with --attention causal every sentence is visible")
        check_recent_share(self.recent_share)
        check_full_attention_share(self.full_attention_share)
        if self.full_attention_share and self.attention != "ansan":
            raise ValueError("--full-attention-share mixes causal batches into AnSAN training; with --attention causal "
                             "every batch is causal")
        if self.sink is not None:
            check_sink(self.sink)
            if self.attention != "ansan":
                raise ValueError("--sink makes tokens anchors of the AnSAN mask; with --attention causal every token "
                                 "is visible")
        if self.recent_share < 1.0 and not self.recent:
            raise ValueError("--recent-share is the share of batches trained with --recent N: pass --recent too")
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
