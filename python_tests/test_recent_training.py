"""The recent-sentence mask without an AnchorCache (the forward keyword ``anllm_recent=N``; ``anllm train --recent
N``): one pass, or forwards over a transformers cache that keeps every key, must give what the dense oracle gives
under the widened mask (anllm_ext.reference.ansan_mask(..., recent=N)), whatever the piece of queries the window part
is computed in; a training step's loss and gradients must equal eager attention with that dense mask (with recalled
spans too); and a pass of the bundled AnLLM must equal its ``AnchorCache(recent=N)``, the inference it trains for."""
import copy

import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache, patch
from anllm_ext.data import AnchorDataCollator
from anllm_ext.reference import anchor_attention_ref, ansan_mask
from anllm_ext.training.recall_spans import RecallSpanCollator

from helpers import (MODEL_ANCHOR, TEXT, assert_step_matches_eager, cached_model_logits, dense_oracle_logits,
                     forward_starts, make_anchor_config, model_stream, needs_smollm2, run_training, step_features,
                     tiny_model)


def dense_recent_logits(model, ids, mask, recent, anchors):
    def attention(module, query, key, value, layout, scaling):
        return anchor_attention_ref(query, key, value, layout, layout, scale=scaling, recent=recent)

    return dense_oracle_logits(model, ids, mask, "anllm_recent_pass_ref", attention, anchors)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("recent", [1, 3])
@pytest.mark.parametrize("piece", [5, 16, 128])
def test_one_pass_with_anllm_recent_matches_the_dense_oracle(family, recent, piece, monkeypatch):
    monkeypatch.setattr(anllm_ext.recent, "WINDOW_CHUNK", piece)
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR)
    ids, mask = model_stream(3, 56, seed=4, left_pad=(0, 3, 8))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False, anllm_recent=recent).logits
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    want = dense_recent_logits(reference, ids, mask, recent, (MODEL_ANCHOR,))
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-5)
    assert (got[keep] - plain[keep]).abs().max() > 1e-3


def test_forwards_over_a_dynamic_cache_with_anllm_recent_match_one_pass():
    """A transformers cache keeps every key, so each forward's window reads the sentences earlier forwards wrote."""
    model = patch(tiny_model("llama", seed=2), MODEL_ANCHOR)
    ids, mask = model_stream(2, 48, seed=6, left_pad=(0, 5))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False, anllm_recent=2).logits
        cache, outs = None, []
        bounds = forward_starts(48, 40, 11) + [48]
        for a, e in zip(bounds, bounds[1:]):
            out = model(input_ids=ids[:, a:e], attention_mask=mask[:, :e], past_key_values=cache, use_cache=True,
                        anllm_recent=2)
            cache = out.past_key_values
            outs.append(out.logits)
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(outs, dim=1)[keep], want[keep], atol=5e-5, rtol=1e-5)


def test_anllm_recent_rejects_bad_values():
    model = patch(tiny_model("llama"), MODEL_ANCHOR)
    ids, _ = model_stream(1, 12, seed=1)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="anllm_recent must be an int >= 0"):
            model(input_ids=ids, use_cache=False, anllm_recent=bad)
    with pytest.raises(ValueError, match=r"AnchorCache\(recent=N\) instead"):
        model(input_ids=ids, cache=AnchorCache(model.config), use_cache=True, anllm_recent=1)
    from anllm_ext.training import AnLLMArguments

    with pytest.raises(ValueError, match="recent must be an int >= 0"):
        AnLLMArguments(data=["x"], recent=-1)
    with pytest.raises(ValueError, match="--recent extends the AnSAN mask"):
        AnLLMArguments(data=["x"], recent=2, attention="causal")
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"recent_share must be in \(0, 1\]"):
            AnLLMArguments(data=["x"], recent=2, recent_share=bad)
    with pytest.raises(ValueError, match="pass --recent too"):
        AnLLMArguments(data=["x"], recent_share=0.5)
    with pytest.raises(ValueError, match=r"recent_share must be in \(0, 1\]"):
        AnchorDataCollator(0, recent=2, recent_share=0.0)


def test_recent_share_draws_the_window_per_batch_and_always_the_same():
    """--recent-share 0.5: about half the batches get the window, each one always the same way (resumed runs,
    every process), with recalled spans too; share 1 gives it to every batch."""
    gen = torch.Generator().manual_seed(0)
    batches = [[{"input_ids": torch.randint(1, 1000, (n,), generator=gen).tolist()} for n in (20, 13)]
               for _ in range(200)]
    half = AnchorDataCollator(0, recent=2, recent_share=0.5)
    drawn = ["anllm_recent" in half(b) for b in batches]
    assert 70 < sum(drawn) < 130
    assert drawn == ["anllm_recent" in AnchorDataCollator(0, recent=2, recent_share=0.5)(b) for b in batches]
    assert all(half(b).get("anllm_recent", 2) == 2 for b in batches)
    recalled = RecallSpanCollator(0, [999], spans=1, recent=2, recent_share=0.5)
    assert drawn == ["anllm_recent" in recalled(b) for b in batches]
    assert all("anllm_recent" in AnchorDataCollator(0, recent=2)(b) for b in batches)
    assert not any("anllm_recent" in AnchorDataCollator(0)(b) for b in batches)


def recent_batch(tok, config, recall_spans=0, recent=2):
    features = step_features(tok, config)
    if recall_spans:
        return RecallSpanCollator(tok.pad_token_id, config.anchor_ids, spans=recall_spans, recent=recent)(features)
    return AnchorDataCollator(tok.pad_token_id, recent=recent)(features)


@needs_smollm2
@pytest.mark.parametrize("recall_spans", [0, 1], ids=["recent", "recent+recalled"])
def test_training_step_with_recent_sentences_equals_eager_dense_mask(tiny_dir, recall_spans):
    from anllm_ext.models import load_model

    model, tok = load_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    batch = recent_batch(tok, config, recall_spans)
    assert batch["anllm_recent"] == 2

    def dense(lay):
        keys = lay
        if recall_spans:  # recalled tokens read as anchors do (anllm_ext.hf.hooks)
            keys = anllm_ext.Layout(lay.positions, lay.segments, lay.is_anchor | (batch["anllm_recalled"] & lay.valid),
                                    lay.valid)
        return ansan_mask(lay, keys, recent=2)[:, None]

    loss = assert_step_matches_eager(model, batch, config.anchor_ids, dense)
    plain = {k: v for k, v in batch.items() if k != "anllm_recent"}
    with torch.no_grad():
        assert abs(float(model(**plain).loss) - float(loss)) > 1e-4  # the window changed the loss


@needs_smollm2
def test_train_with_recent_sentences(tmp_path, tiny_dir, corpus):
    pytest.importorskip("peft")
    res = run_training(tmp_path, tiny_dir, corpus / "train", eval_data=[str(corpus / "eval.txt")], recent=2,
                       recent_share=0.5, recall_spans=1, lora=True, distill=True, max_steps=4, eval_before=False)
    assert res["objective"]["recent"] == 2 and res["objective"]["recall_spans"] == 1
    assert res["objective"]["recent_share"] == 0.5
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(l == l for l in losses)
    after = res["eval_after"]["modes"]
    assert after["cached+recent"]["kv_kept"] > after["cached"]["kv_kept"]


@needs_smollm2
def test_bundled_anllm_pass_with_recent_equals_its_recent_cache(monkeypatch):
    """What training with --recent sees is what AnchorCache(recent=N) serves: the bundled AnLLM, one pass with
    anllm_recent=2 (window pieces of 32 queries), against chunked prefill and decode steps through the cache."""
    from anllm_ext.models import load_model

    monkeypatch.setattr(anllm_ext.recent, "WINDOW_CHUNK", 32)
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-anllm")
    patch(model)
    text = TEXT + " " + TEXT + "\n\nWho kept the light burning? It was"
    ids = tok(text, return_tensors="pt")["input_ids"][:, :150]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        one_pass = model(input_ids=ids, use_cache=False, anllm_recent=2).logits
    cached, _ = cached_model_logits(model, ids, mask, forward_starts(ids.shape[1], ids.shape[1] - 3, 64), recent=2)
    torch.testing.assert_close(one_pass, cached, atol=1e-3, rtol=1e-4)  # logits are O(10)
