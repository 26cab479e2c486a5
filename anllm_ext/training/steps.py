"""The steps of a run: load and patch the model, build the datasets, LoRA, the distillation teacher, held-out
scoring, and the budget callback."""
from __future__ import annotations

import json
import time
from typing import Optional

from transformers import TrainerCallback

from .arguments import AnLLMArguments


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


def load_for_training(args: AnLLMArguments):
    """(model, tokenizer, anchor config): the model loaded in fp32, patched with its anchors.

    The anchors: :func:`anllm_ext.config.resolve_anchor_config` of ``--anchor-mode`` / ``--anchor-ids`` /
    ``--punctuation``; a model that carries a configuration of the mode asked for (or no mode given) keeps it.
    A LoRA adapter as ``--model`` (e.g. ``smollm2-anllm``): with ``--lora`` its base model, unmerged (the
    adapter itself goes on training, :func:`add_lora`); without, the adapter merged in (full fine-tuning).
    """
    from ..config import anchor_spec, resolve_anchor_config
    from ..hf import patch
    from ..models import load_adapter_base, load_model, resolve_model_dir

    if continued_adapter(args) is not None:
        model, tok, _ = load_adapter_base(resolve_model_dir(args.model))
    else:
        model, tok = load_model(args.model)
    config = resolve_anchor_config(anchor_spec(args.anchor_mode, args.punctuation, args.anchor_ids), tok, model,
                                   default=anchor_spec("ep", args.punctuation), ac_init=args.ac_init,
                                   keep_saved_mode=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if args.sink is not None:
        config.sink = args.sink
    if args.attention == "ansan":
        patch(model, config)  # the model carries the configuration, its sink too (saved with it)
    model.train()
    return model, tok, config


def build_datasets(args: AnLLMArguments, tok, config, seed: int):
    """(train blocks, held-out blocks) as ``datasets.Dataset`` with ``input_ids``; documents, not blocks, are
    split, so no held-out text is trained on."""
    from ..data import load_documents, tokenize_dataset

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


def continued_adapter(args: AnLLMArguments):
    """The LoRA adapter directory ``--lora`` goes on training (``--model`` names an adapter), else None."""
    from ..models import is_adapter_dir, resolve_model_dir

    return resolve_model_dir(args.model) if args.lora and is_adapter_dir(args.model) else None


def add_lora(model, args: AnLLMArguments, config):
    """Wrap the patched model in a PEFT LoRA model; in AC mode the ``<AC>`` embedding row trains too. With an
    adapter as ``--model``, that adapter, trainable (its own rank, alpha and target modules)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    adapter = continued_adapter(args)
    if adapter is not None:
        _check_lora_settings(adapter, args)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    targets = args.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    extra = {}
    if config.mode == "ac":
        extra["trainable_token_indices"] = {"embed_tokens": list(config.anchor_ids)}
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM", **extra)
    return get_peft_model(model, lora)


def _check_lora_settings(adapter, args: AnLLMArguments) -> None:
    """An adapter that goes on training keeps its shape: a --lora-r / --lora-alpha other than the defaults
    must be the adapter's own (else the user asked for an adapter this run cannot give)."""
    from peft import LoraConfig

    saved = LoraConfig.from_pretrained(str(adapter))
    defaults = AnLLMArguments()
    for name, value, own in (("lora-r", args.lora_r, saved.r), ("lora-alpha", args.lora_alpha, saved.lora_alpha)):
        asked = value != getattr(defaults, name.replace("-", "_"))
        if asked and value != own:
            raise ValueError(f"--model {args.model} is a LoRA adapter with {name.replace('-', '_')}={own}; "
                             f"--{name} {value} cannot apply to it (it goes on training as it is)")


def make_teacher(model, tok, config, args: AnLLMArguments):
    """The full-attention teacher of ``--distill``: ``None`` with LoRA (the model itself, adapter off), a
    frozen copy of the (still untrained) model for full fine-tuning, or the ``--teacher`` directory."""
    from .distillation import frozen_copy, load_teacher
    from ..hf import unpatch

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


def objective(args: AnLLMArguments) -> dict:
    spans = {"recall_spans": args.recall_spans} if args.recall_spans else {}
    if args.recent:
        spans["recent"] = args.recent
        spans["recent_share"] = args.recent_share
    if args.full_attention_share:
        spans["full_attention_share"] = args.full_attention_share
    if not args.distill:
        return {"loss": "lm", **spans}
    return {"loss": "distill", "teacher": args.teacher or "self (full attention)", "alpha": args.distill_alpha,
            "temperature": args.distill_temperature, "hidden_weight": args.distill_hidden_weight, **spans}


def evaluate_blocks(model, eval_ds, args: AnLLMArguments, label: str, anchor_ids) -> Optional[dict]:
    """Held-out perplexity in the three modes (see :func:`anllm_ext.evaluation.perplexity`), and with ``--recent``
    the anchor cache keeping that many sentences hot."""
    if eval_ds is None or len(eval_ds) == 0:
        return None
    from ..evaluation import MODES, RECENT_MODE, perplexity

    if hasattr(model, "get_base_model"):  # PEFT: the patched transformers model, LoRA layers in place
        model = model.get_base_model()
    was_training = model.training
    model.eval()
    try:
        recent = dict(modes=MODES + (RECENT_MODE,), recent=args.recent) if args.recent else {}
        result = perplexity(model, [list(r) for r in eval_ds["input_ids"]], prefill_chunk=args.prefill_chunk,
                            anchor_ids=anchor_ids, **recent)
    finally:
        model.train(was_training)
    result = result.to_dict() if hasattr(result, "to_dict") else result
    print(f"anllm train: held-out perplexity {label}: {json.dumps(result)}", flush=True)
    return result
