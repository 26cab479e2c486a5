"""Training batches under plain causal attention (the forward keyword ``anllm_full_attention=True``; ``anllm train
--full-attention-share F``): a patched model's pass with it must equal the unpatched model (its own full attention,
what the AnLLM serves unpatched), padding and a sink included; a training step's loss and gradients must equal eager
attention with the causal mask; the collator must draw that share of batches, always the same ones, apart from the
recent-sentence window and the recalled spans; bad uses must raise."""
import copy

import pytest
import torch

from anllm_ext import AnchorCache, patch, unpatched
from anllm_ext.data import AnchorDataCollator
from anllm_ext.training.recall_spans import RecallSpanCollator

from helpers import (MODEL_ANCHOR, assert_step_matches_eager, make_anchor_config, model_stream, needs_smollm2,
                     run_training, step_features, tiny_model)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("sink", [0, 2])
def test_pass_with_full_attention_equals_the_unpatched_model(family, sink):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR, sink=sink)
    ids, mask = model_stream(3, 56, seed=4, left_pad=(0, 3, 8))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False, anllm_full_attention=True).logits
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with unpatched(model):
            unpatched_out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(got[keep], unpatched_out[keep], atol=5e-5, rtol=1e-5)
    assert (got[keep] - plain[keep]).abs().max() > 1e-3  # the AnSAN mask is off


def test_anllm_full_attention_rejects_bad_uses():
    model = patch(tiny_model("llama"), MODEL_ANCHOR)
    ids, _ = model_stream(1, 12, seed=1)
    for bad in (1, 0.5, "yes"):
        with pytest.raises(ValueError, match="anllm_full_attention must be True or False"):
            model(input_ids=ids, use_cache=False, anllm_full_attention=bad)
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model(input_ids=ids, cache=AnchorCache(model.config), use_cache=True, anllm_full_attention=True)
    with pytest.raises(ValueError, match="do not combine it with anllm_recalled or anllm_recent"):
        model(input_ids=ids, use_cache=False, anllm_full_attention=True, anllm_recent=1)
    with pytest.raises(ValueError, match="do not combine it with anllm_recalled or anllm_recent"):
        model(input_ids=ids, use_cache=False, anllm_full_attention=True,
              anllm_recalled=torch.zeros_like(ids, dtype=torch.bool))
    with torch.no_grad():  # False is the AnSAN pass itself
        torch.testing.assert_close(model(input_ids=ids, use_cache=False, anllm_full_attention=False).logits,
                                   model(input_ids=ids, use_cache=False).logits)
    from anllm_ext.training import AnLLMArguments

    for bad in (-0.1, 1.0, 1.5, True):
        with pytest.raises(ValueError, match=r"full_attention_share must be in \[0, 1\)"):
            AnLLMArguments(data=["x"], full_attention_share=bad)
        with pytest.raises(ValueError, match=r"full_attention_share must be in \[0, 1\)"):
            AnchorDataCollator(0, full_attention_share=bad)
    with pytest.raises(ValueError, match="with --attention causal every batch is causal"):
        AnLLMArguments(data=["x"], full_attention_share=0.25, attention="causal")


def test_full_attention_share_draws_batches_apart_from_the_window():
    """--full-attention-share 0.25: about a quarter of the batches, each one always the same way; the window of
    --recent-share 0.5 is drawn among the others as it was without the share; no recalled spans in them."""
    gen = torch.Generator().manual_seed(0)
    batches = [[{"input_ids": torch.randint(1, 1000, (n,), generator=gen).tolist()} for n in (20, 13)]
               for _ in range(400)]
    mixed = AnchorDataCollator(0, recent=2, recent_share=0.5, full_attention_share=0.25)
    full = [bool(mixed(b).get("anllm_full_attention")) for b in batches]
    assert 60 < sum(full) < 140
    assert full == [bool(AnchorDataCollator(0, full_attention_share=0.25)(b).get("anllm_full_attention"))
                    for b in batches]
    window_alone = ["anllm_recent" in AnchorDataCollator(0, recent=2, recent_share=0.5)(b) for b in batches]
    window = ["anllm_recent" in mixed(b) for b in batches]
    assert window == [w and not f for w, f in zip(window_alone, full)]
    assert 40 < sum(w for w, f in zip(window_alone, full) if f) < 100  # independent draws
    recalled = RecallSpanCollator(0, [999], spans=1, recent=2, recent_share=0.5, full_attention_share=0.25)
    got = [recalled(b) for b in batches]
    assert full == [bool(g.get("anllm_full_attention")) for g in got]
    assert all(("anllm_recalled" in g) != f for g, f in zip(got, full))
    assert not any("anllm_full_attention" in AnchorDataCollator(0, recent=2)(b) for b in batches)


@needs_smollm2
def test_training_step_with_full_attention_equals_eager_causal_mask(tiny_dir):
    from anllm_ext.models import load_model

    model, tok = load_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    batch = AnchorDataCollator(tok.pad_token_id)(step_features(tok, config))
    batch["anllm_full_attention"] = True

    def causal(lay):
        T = lay.positions.shape[1]
        before = torch.ones(T, T, dtype=torch.bool).tril()
        return (before & lay.valid[:, None, :])[:, None]

    loss = assert_step_matches_eager(model, batch, config.anchor_ids, causal, sink=1)
    plain = {k: v for k, v in batch.items() if k != "anllm_full_attention"}
    with torch.no_grad():
        assert abs(float(model(**plain).loss) - float(loss)) > 1e-4  # the AnSAN mask would change the loss


@needs_smollm2
def test_train_with_a_full_attention_share(tmp_path, tiny_dir, corpus):
    pytest.importorskip("peft")
    res = run_training(tmp_path, tiny_dir, corpus / "train", eval_data=[str(corpus / "eval.txt")],
                       full_attention_share=0.5, recent=2, recent_share=0.5, recall_spans=1, lora=True,
                       distill=True, max_steps=4, eval_before=False)
    assert res["objective"]["full_attention_share"] == 0.5 and res["objective"]["recent"] == 2
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(l == l for l in losses)
