"""Self-distillation (`anllm train --distill`): the loss against a hand-computed KL to the full-attention
teacher, its gradients, the teacher left untouched, runs that lower the KL, and bad inputs."""
import json

import pytest
import torch
import torch.nn.functional as F

import anllm_ext
from anllm_ext.training.distillation import DistillationConfig, kl_to_teacher, predicted_token_mask
from helpers import needs_smollm2, run_training, tiny_causal_lm


def run_distill(tmp_path, model_dir, data, **overrides):
    """A short self-distillation run: run_training with --distill, 10 steps, no held-out scoring."""
    return run_training(tmp_path, model_dir, data, **{"distill": True, "eval_blocks": 0, "max_steps": 10, **overrides})


def test_kl_matches_the_definition_and_masks_positions():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    mask = predicted_token_mask(labels)
    assert mask.tolist() == [[True, True, False, False, False], [True, True, True, True, False]]
    T = 2.0
    p = F.softmax(t / T, -1)
    expected = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1)[mask].sum() * T * T
    torch.testing.assert_close(kl_to_teacher(s, t, mask, temperature=T), expected)
    # vocab_size: both renormalised over the first ids only (AC mode's <AC> column left out)
    p9 = F.softmax(t[..., :9], -1)
    expected9 = (p9 * (p9.log() - F.log_softmax(s[..., :9], -1))).sum(-1)[mask].sum()
    torch.testing.assert_close(kl_to_teacher(s, t, mask, vocab_size=9), expected9)
    assert kl_to_teacher(t, t, mask).abs() < 1e-5


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationConfig(temperature=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        DistillationConfig(alpha=1.5)
    with pytest.raises(ValueError, match="hidden-state weight"):
        DistillationConfig(hidden_weight=-1)


def _trainer(model_dir, tmp_path, lora, alpha, hidden_weight=0.0, teacher=None):
    """A DistillationTrainer over a patched tiny Llama (LoRA or not) and one collated batch."""
    from anllm_ext.data import AnchorDataCollator
    from anllm_ext.training.distillation import DistillationTrainer, frozen_copy
    from anllm_ext.models import load_model
    from anllm_ext.training import AnLLMArguments, AnLLMTrainingArguments, add_lora

    model, tok = load_model(model_dir)
    ids = anllm_ext.ep_anchor_ids(tok)
    if not lora:
        teacher = frozen_copy(model)
    anllm_ext.patch(model, ids)
    model.train()
    if lora:
        from anllm_ext.config import AnchorConfig

        model = add_lora(model, AnLLMArguments(data=["x"], lora=True, lora_r=4), AnchorConfig("ep", list(ids)))
        with torch.no_grad():  # a non-zero adapter, so student and teacher weights differ
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    rows = [tok("The keeper climbed the stairs. He trimmed the wick. Ships saw the beam.")["input_ids"],
            tok("In the winter he did not sleep. The town put up a plaque.")["input_ids"]]
    batch = AnchorDataCollator(tok.pad_token_id)([{"input_ids": r} for r in rows])
    args = AnLLMTrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True, report_to="none")
    trainer = DistillationTrainer(model=model, args=args, teacher=teacher,
                                  distillation=DistillationConfig(alpha=alpha, temperature=1.5,
                                                                  hidden_weight=hidden_weight))
    return trainer, model, batch, ids


@needs_smollm2
@pytest.mark.parametrize("lora", [True, False], ids=["lora-self", "frozen-copy"])
def test_loss_and_gradients_equal_a_hand_computed_kl_to_the_full_attention_teacher(tmp_path, tiny_dir, lora):
    trainer, model, batch, ids = _trainer(tiny_dir, tmp_path, lora, alpha=0.7)
    base = model.get_base_model() if lora else model
    loss = trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    # by hand: the teacher is the model with full attention (LoRA: the adapter off; else the frozen copy)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        if lora:
            anllm_ext.unpatch(base)
            with model.disable_adapter():
                t_logits = model(**inputs).logits
            anllm_ext.patch(base, ids)
        else:
            t_logits = trainer.teacher(**inputs).logits
    out = model(**inputs, labels=batch["labels"])
    mask = predicted_token_mask(batch["labels"])
    p = F.softmax(t_logits / 1.5, -1)
    kl = (p * (p.log() - F.log_softmax(out.logits / 1.5, -1))).sum(-1)[mask].mean() * 1.5 ** 2
    expected = 0.7 * kl + 0.3 * out.loss
    assert kl > 1e-5  # the AnSAN student and the full-attention teacher disagree
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected_grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert anllm_ext.is_patched(base)  # the teacher pass left the patch in place


@needs_smollm2
def test_hidden_state_term_adds_to_the_loss(tmp_path, tiny_dir):
    trainer, model, batch, _ = _trainer(tiny_dir, tmp_path, lora=True, alpha=1.0, hidden_weight=0.0)
    plain = trainer.compute_loss(model, dict(batch))
    trainer.distillation.hidden_weight = 2.0
    with_hidden = trainer.compute_loss(model, dict(batch))
    assert with_hidden > plain + 1e-6


@needs_smollm2
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_distill_run_lowers_the_kl_and_saves_an_anllm(tmp_path, tiny_dir, corpus, lora):
    res = run_distill(tmp_path, tiny_dir, corpus / "train", lora=lora, max_steps=12,
                      learning_rate=1e-2 if lora else 3e-3)
    kls = [h["distill_kl"] for h in res["log_history"] if "distill_kl" in h]
    assert len(kls) == 12 and sum(kls[-3:]) / 3 < 0.8 * sum(kls[:3]) / 3
    assert res["objective"]["loss"] == "distill"
    saved = json.loads((tmp_path / "out" / "anllm_results.json").read_text())
    assert saved["objective"]["teacher"] == "self (full attention)"


@needs_smollm2
def test_external_teacher_directory(tmp_path, tiny_dir, corpus):
    """A teacher directory with the same tokenizer (here: another tiny Llama) teaches the student."""
    from helpers import tiny_llama_dir

    teacher = tiny_llama_dir(tiny_dir, tmp_path / "teacher", seed=1)
    res = run_distill(tmp_path, tiny_dir, corpus / "train", teacher=teacher, max_steps=3)
    assert res["objective"]["teacher"] == teacher and res["train_steps"] == 3


@needs_smollm2
def test_bad_distillation_inputs_fail_before_any_step(tmp_path, tiny_dir, corpus):
    import transformers as tf

    from anllm_ext.training import AnLLMArguments

    with pytest.raises(ValueError, match="with --attention causal"):
        AnLLMArguments(data=["x"], distill=True, attention="causal")
    with pytest.raises(ValueError, match="no such model directory"):
        AnLLMArguments(data=["x"], distill=True, teacher=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pass --distill too"):
        AnLLMArguments(data=["x"], teacher=str(tmp_path))
    with pytest.raises(ValueError, match="alpha must be in"):
        AnLLMArguments(data=["x"], distill=True, distill_alpha=2.0)
    # AC mode: the teacher does not predict <AC>, the LM loss must stay in the mix
    with pytest.raises(ValueError, match="AC mode.*--distill-alpha below 1"):
        run_distill(tmp_path, tiny_dir, corpus / "train", anchor_mode="ac", lora=True)
    # a teacher with another vocabulary
    other = tmp_path / "other"
    tok = tf.AutoTokenizer.from_pretrained(tiny_dir)
    tiny_causal_lm(vocab_size=len(tok) + 64, num_hidden_layers=1).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="predicts over .* tokens but the student's vocabulary"):
        run_distill(tmp_path, tiny_dir, corpus / "train", teacher=str(other))


@needs_smollm2
def test_ac_mode_distillation_runs_with_the_lm_loss_mixed_in(tmp_path, tiny_dir, corpus):
    res = run_distill(tmp_path, tiny_dir, corpus / "train", anchor_mode="ac", lora=True, distill_alpha=0.5,
                      max_steps=3)
    assert res["anchor_config"]["mode"] == "ac" and res["train_steps"] == 3
    assert all(h["distill_kl"] >= 0 for h in res["log_history"] if "distill_kl" in h)


@needs_smollm2
def test_logged_terms_are_per_token_over_an_accumulated_step(tmp_path, tiny_dir):
    """With gradient accumulation the Trainer normalises each micro-batch by the whole step's tokens; the logged
    distill_kl / lm_loss are still per-token means over the step (two equal micro-batches: one's own mean)."""
    trainer, model, batch, _ = _trainer(tiny_dir, tmp_path, lora=True, alpha=0.5)
    trainer.compute_loss(model, dict(batch))  # no num_items_in_batch: normalised by its own tokens
    trainer.log(alone := {"loss": 0.0})
    trainer.args.gradient_accumulation_steps = 2
    n_tokens = int(predicted_token_mask(batch["labels"]).sum())
    for _ in range(2):
        trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * n_tokens))
    trainer.log(logs := {"loss": 0.0})
    for key in ("distill_kl", "lm_loss"):
        assert logs[key] == pytest.approx(alone[key], rel=1e-4), key
