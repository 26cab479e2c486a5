"""Self-distillation for AnSAN training: the AnSAN-masked student learns to match a full-attention teacher.

The model being converted already behaves as wanted under full attention; AnSAN training only has to
teach it to pass the same information through the anchors. So instead of (or beside) the next-token loss
the student minimises KL(teacher || student) on every predicted token, the teacher being:

- with LoRA: the same weights with the adapter disabled and the patch lifted (full attention), so the
  teacher costs one extra forward pass and no second copy of the model;
- with full fine-tuning: a frozen copy of the model as it was before training, with full attention;
- with ``teacher=DIR``: another model directory (e.g. a larger model of the same tokenizer).

It is a ``Trainer`` feature (:class:`DistillationTrainer` overrides ``compute_loss``), so DDP, FSDP,
DeepSpeed ZeRO-3, gradient accumulation, checkpoints and resume work as for the LM loss.

AC mode: ``<AC>`` is new to the teacher (with LoRA or a frozen copy it holds the row it was initialised
with; an external teacher does not have it). The KL is therefore taken over the original vocabulary only,
both distributions renormalised without the ``<AC>`` column, and an external teacher reads a sentence
end (the ``"."`` token) where the student reads ``<AC>``. Predicting ``<AC>`` is learnt from the LM loss,
which AC mode therefore needs (``distill_alpha < 1``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..hf import as_original

IGNORE_INDEX = -100


@dataclass
class DistillationConfig:
    """How the student is pulled towards the teacher.

    ``temperature``: both distributions are softened by it (the KL is scaled by ``temperature**2``, as in
    Hinton et al., so its gradients keep their size). ``alpha``: the loss is ``alpha * KL + (1 - alpha) *
    LM``. ``hidden_weight``: adds that weight times the mean squared error between the student's and the
    teacher's hidden states (every layer's output, real tokens only; 0: off). ``vocab_size``: the KL covers
    ids ``< vocab_size`` (the teacher's vocabulary; AC mode's ``<AC>`` lies above it). ``teacher_anchor_map``:
    ids the teacher reads instead (AC mode with an external teacher: ``{<AC>: "."}``).
    """

    temperature: float = 1.0
    alpha: float = 1.0
    hidden_weight: float = 0.0
    vocab_size: Optional[int] = None
    teacher_anchor_map: Optional[dict] = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha must be in [0, 1], got {self.alpha}")
        if self.hidden_weight < 0:
            raise ValueError(f"distill hidden-state weight must be >= 0, got {self.hidden_weight}")


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_mask: torch.Tensor,
                  temperature: float = 1.0, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Sum over the masked positions of KL(teacher || student) of the softened next-token distributions,
    times ``temperature**2``. Logits [B, T, V]; ``token_mask`` [B, T] bool; only ids ``< vocab_size`` count
    (both distributions renormalised over them)."""
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ")
    s = student_logits[token_mask].float() / temperature
    t = teacher_logits[token_mask].float() / temperature
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() * temperature ** 2


def predicted_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a label (the positions the shifted LM loss scores)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def hidden_state_error(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                       token_mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the per-token mean squared error, averaged over the layers (the
    embedding output, equal for both, is skipped)."""
    pairs = list(zip(student_hidden, teacher_hidden))[1:]
    total = sum(((s[token_mask].float() - t[token_mask].float()) ** 2).mean(-1).sum() for s, t in pairs)
    return total / max(len(pairs), 1)


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``alpha * KL(teacher || student) + (1 - alpha) * LM`` (plus an optional
    hidden-state term). ``teacher=None``: the model itself with full attention (LoRA only)."""

    def __init__(self, *args, distillation: DistillationConfig, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation = distillation
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._parts = {"kl": 0.0, "lm": 0.0, "hidden": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distillation
        want_hidden = cfg.hidden_weight > 0
        student_inputs = dict(inputs, output_hidden_states=True) if want_hidden else inputs
        lm_loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True,
                                                num_items_in_batch=num_items_in_batch)
        token_mask = predicted_token_mask(inputs["labels"])
        with torch.no_grad():
            teacher_out = self._teacher_forward(model, inputs, want_hidden)
        count = token_mask.sum().clamp(min=1)
        kl = self._normalise(kl_to_teacher(outputs.logits, teacher_out.logits, token_mask, cfg.temperature,
                                           cfg.vocab_size), count, num_items_in_batch)
        loss = cfg.alpha * kl + (1.0 - cfg.alpha) * lm_loss
        hidden = None
        if want_hidden:
            hidden = self._normalise(hidden_state_error(outputs.hidden_states, teacher_out.hidden_states,
                                                        token_mask), count, num_items_in_batch)
            loss = loss + cfg.hidden_weight * hidden
        self._record(kl, lm_loss, hidden, per_step=num_items_in_batch is not None and self.model_accepts_loss_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _teacher_forward(self, model, inputs, want_hidden: bool):
        ids = inputs["input_ids"]
        for source, target in (self.distillation.teacher_anchor_map or {}).items():
            ids = torch.where(ids == source, torch.full_like(ids, target), ids)
        kwargs = dict(input_ids=ids, attention_mask=inputs.get("attention_mask"), output_hidden_states=want_hidden)
        if self.teacher is not None:
            return self.teacher(**kwargs)
        unwrapped = self.accelerator.unwrap_model(model)
        with as_original(unwrapped):
            return unwrapped(**kwargs)

    def _normalise(self, total, count, num_items_in_batch):
        """Scale a summed per-token loss the way the Trainer scales the LM loss, so that gradient
        accumulation and several processes give the gradients of one large batch."""
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return total / count
        loss = total / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss

    def _record(self, kl, lm, hidden, per_step: bool):
        """Adds one micro-batch's terms. ``per_step``: they are normalised by the tokens of the whole accumulated
        batch (the Trainer's ``num_items_in_batch``), so an optimizer step's value is their sum: each counts
        ``gradient_accumulation_steps`` times, and the log's mean is per optimizer step, per token."""
        weight = self.args.gradient_accumulation_steps if per_step else 1
        self._parts["kl"] += float(kl.detach()) * weight
        self._parts["lm"] += float(lm.detach()) * weight
        self._parts["hidden"] += float(hidden.detach()) * weight if hidden is not None else 0.0
        self._parts["n"] += 1

    def log(self, logs, *args, **kwargs):
        """Adds the mean KL / LM (/ hidden) terms since the last log to the Trainer's logs (training only)."""
        n = self._parts["n"]
        if n and "loss" in logs:
            logs["distill_kl"] = round(self._parts["kl"] / n, 6)
            logs["lm_loss"] = round(self._parts["lm"] / n, 6)
            if self.distillation.hidden_weight > 0:
                logs["hidden_mse"] = round(self._parts["hidden"] / n, 6)
            self._parts = {"kl": 0.0, "lm": 0.0, "hidden": 0.0, "n": 0}
        super().log(logs, *args, **kwargs)


def frozen_copy(model):
    """A frozen full-attention copy of an (unpatched) model: the teacher of full fine-tuning."""
    teacher = copy.deepcopy(model)
    return teacher.eval().requires_grad_(False)


def load_teacher(path: str, student_tokenizer, original_vocab: int):
    """The teacher model of ``path`` (unpatched, frozen), checked against the student's tokenizer."""
    import os

    from ..models import load_model

    if not os.path.isdir(path):
        raise FileNotFoundError(f"teacher: no such model directory: {path}")
    teacher, teacher_tok = load_model(path)
    out = teacher.get_output_embeddings().weight.shape[0]
    if out != original_vocab:
        raise ValueError(f"teacher {path} predicts over {out} tokens but the student's vocabulary (before any "
                         f"<AC> token) has {original_vocab}: distillation needs the same tokenizer")
    ours, theirs = student_tokenizer.get_vocab(), teacher_tok.get_vocab()
    differ = [tok for tok, i in theirs.items() if ours.get(tok) != i]
    if differ:
        raise ValueError(f"teacher {path}: its tokenizer maps {len(differ)} tokens differently from the "
                         f"student's (e.g. {differ[:3]}); distillation needs the same tokenizer")
    return teacher.eval().requires_grad_(False)
