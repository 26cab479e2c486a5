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

import time

import torch

from .arguments import AnLLMArguments, AnLLMTrainingArguments
from .saving import RESULTS_FILE, save_anllm, write_results
from .steps import (BudgetCallback, add_lora, build_datasets, distillation_config, evaluate_blocks, load_for_training,
                    make_teacher, objective)
from .zero3 import full_parameters, zero3_init_off

__all__ = ["AnLLMArguments", "AnLLMTrainingArguments", "BudgetCallback", "RESULTS_FILE", "add_lora", "build_datasets",
           "distillation_config", "evaluate_blocks", "load_for_training", "make_teacher", "save_anllm", "train",
           "write_results"]


def train(args: AnLLMArguments, training_args: AnLLMTrainingArguments) -> dict:
    """Run AnSAN training end to end; returns (and writes to ``anllm_results.json``) the run's results."""
    from transformers import Trainer, set_seed

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
    teacher = make_teacher(model, tok, config, args) if args.distill else None
    if args.lora:  # before scoring: an adapter that goes on training is part of the model before training
        model = add_lora(model, args, config)
    if args.eval_before and eval_ds is not None:
        with full_parameters(model):
            if is_main:
                results["eval_before"] = evaluate_blocks(model, eval_ds, args, "before training", config.anchor_ids)
    trainer_kwargs = dict(
        model=model, args=training_args, train_dataset=train_ds, processing_class=tok,
        data_collator=_collator(args, tok, config),
        callbacks=[BudgetCallback(args.max_tokens, args.max_minutes)],
    )
    if args.distill:
        from .distillation import DistillationTrainer

        trainer = DistillationTrainer(**trainer_kwargs, teacher=teacher,
                                      distillation=distillation_config(tok, config, args))
    else:
        trainer = Trainer(**trainer_kwargs)
    results["objective"] = objective(args)
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
    with zero3_init_off(training_args):
        reloaded = _reload(saved)
    results["eval_after"] = evaluate_blocks(reloaded, eval_ds, args, "after training", config.anchor_ids)
    write_results(results, training_args.output_dir)
    return results


def _collator(args: AnLLMArguments, tok, config):
    """Pads the rows; with ``--recall-spans`` also marks each row's recalled sentences; with ``--recent`` asks
    for the recent-sentence mask; with ``--full-attention-share`` marks that share of batches for causal attention."""
    from ..data import AnchorDataCollator
    from .recall_spans import RecallSpanCollator

    masks = dict(recent=args.recent, recent_share=args.recent_share, full_attention_share=args.full_attention_share)
    if args.recall_spans:
        return RecallSpanCollator(tok.pad_token_id, list(config.anchor_ids), args.recall_spans, **masks)
    return AnchorDataCollator(tok.pad_token_id, **masks)


def _reload(path: str):
    from ..models import load_model

    return load_model(path)[0]

