"""The attention sink (``patch(model, sink=S)``, ``token_layout(..., sink=S)``): the first S real tokens of a row
are anchors whatever their ids. The layout must equal the reference rule's, in one piece and cut into chunks and
decode steps (the CPU kernel serves chunks past the sink, ATen the ones that hold it); a patched model must give
the dense oracle's logits over that layout in one pass and through an AnchorCache (plain, keeping recent
sentences, with left padding); the patch keeps its sink through ``patched``/``unpatched``; and on the bundled AnLLM
the anchor cache with a sink keeps the first token and scores what one masked pass scores."""
import copy

import pytest
import torch

import anllm_ext
from anllm_ext import patch, token_layout
from anllm_ext.hf import patched, patched_sink, unpatched
from anllm_ext.reference import anchor_attention_ref, token_layout_ref

from helpers import (MODEL_ANCHOR, TEXT, cached_model_logits, dense_oracle_logits, forward_starts, model_stream,
                     needs_smollm2, tiny_model, token_stream)


def assert_same_layout(got, want):
    """Equal on every real token (padding's position is its chunk's start: invisible either way)."""
    real = want.valid
    assert torch.equal(got.valid, real) and torch.equal(got.is_anchor, want.is_anchor)
    assert torch.equal(got.positions[real], want.positions[real])
    assert torch.equal(got.segments[real], want.segments[real])


@pytest.mark.parametrize("sink", [1, 3, 7])
@pytest.mark.parametrize("padding", ["none", "left", "mixed"])
def test_token_layout_with_sink_matches_the_reference_in_one_piece_and_in_chunks(sink, padding):
    gen = torch.Generator().manual_seed(sink)
    ids, mask = token_stream(3, 40, padding=padding, generator=gen)
    anchors = [int(ids[0, 5])]
    want = token_layout_ref(ids, anchors, mask, sink=sink)
    assert_same_layout(token_layout(ids, anchors, mask, sink=sink), want)
    for bounds in ([0, 2, 5, 9, 40], [0, 1, 2, 3, 30, 40], [0] + list(range(20, 41))):  # chunks, decode steps
        start, parts = None, []
        for a, e in zip(bounds, bounds[1:]):
            part = token_layout(ids[:, a:e], anchors, mask[:, a:e], start, sink=sink)
            start = part.next_start()
            parts.append(part)
        assert_same_layout(anllm_ext.Layout.cat(parts), want)
    real_first = want.valid & (want.positions < sink)
    assert bool(want.is_anchor[real_first].all()) and int(real_first.sum()) == 3 * sink
    assert not torch.equal(want.is_anchor, token_layout_ref(ids, anchors, mask).is_anchor)


def test_sink_rejects_bad_values():
    ids = torch.ones(1, 4, dtype=torch.long)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="sink must be an int >= 0"):
            token_layout(ids, [7], sink=bad)
        with pytest.raises(ValueError, match="sink must be an int >= 0"):
            patch(tiny_model("llama"), MODEL_ANCHOR, sink=bad)


def dense_sink_logits(model, ids, mask, sink, recent=0):
    def attention(module, query, key, value, layout, scaling):
        return anchor_attention_ref(query, key, value, layout, layout, scale=scaling, recent=recent)

    return dense_oracle_logits(model, ids, mask, "anllm_sink_ref", attention, (MODEL_ANCHOR,), sink=sink)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("sink,recent", [(1, 0), (4, 0), (1, 2)])
def test_patched_model_with_sink_matches_the_dense_oracle_in_one_pass_and_through_the_cache(family, sink, recent):
    base = tiny_model(family, seed=3)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR, sink=sink)
    ids, mask = model_stream(3, 48, seed=8, left_pad=(0, 2, 6))
    want = dense_sink_logits(reference, ids, mask, sink, recent)
    keep = mask.bool()
    with torch.no_grad():
        one_pass = model(input_ids=ids, attention_mask=mask, use_cache=False, anllm_recent=recent).logits
        no_sink = patch(copy.deepcopy(base), MODEL_ANCHOR, sink=0)(input_ids=ids, attention_mask=mask,
                                                                   use_cache=False, anllm_recent=recent).logits
    torch.testing.assert_close(one_pass[keep], want[keep], atol=5e-5, rtol=1e-5)
    assert (one_pass[keep] - no_sink[keep]).abs().max() > 1e-3  # the sink changed what later tokens read
    got, cache = cached_model_logits(model, ids, mask, forward_starts(48, 40, 3), recent=recent)
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-5)
    for b in range(3):  # the cache kept every row's first real tokens
        assert set(range(sink)) <= set(cache.kept_layout(b).positions[0].tolist())


def test_patch_keeps_its_sink_through_patched_and_unpatched():
    model = patch(tiny_model("llama"), MODEL_ANCHOR, sink=2)
    with unpatched(model):
        assert patched_sink(model) == 0
    assert patched_sink(model) == 2
    with patched(model, [MODEL_ANCHOR, MODEL_ANCHOR + 1]):
        assert patched_sink(model) == 2
    assert patched_sink(model) == 2
    patch(model, MODEL_ANCHOR)  # re-patching without sink keeps it
    assert patched_sink(model) == 2
    assert patched_sink(patch(model, MODEL_ANCHOR, sink=0)) == 0


@needs_smollm2
def test_bundled_anllm_anchor_cache_with_a_sink_equals_one_masked_pass():
    from anllm_ext.config import resolve_anchor_config
    from anllm_ext.evaluation import perplexity, text_blocks
    from anllm_ext.models import load_model

    model, tok = load_model("smollm2-anllm")
    anchors = resolve_anchor_config(None, tok, model)
    patch(model, anchors, sink=1)
    blocks = text_blocks(tok, [TEXT * 4], anchors, 160, 2)
    res = perplexity(model, blocks, ("ansan", "cached", "cached+recent"), 32, progress=False, anchor_ids=anchors,
                     recent=2)
    assert res.max_abs_diff_cached_vs_ansan < 1e-4
    patch(model, anchors, sink=0)
    plain = perplexity(model, blocks, ("ansan", "cached"), 32, progress=False, anchor_ids=anchors)
    assert abs(res.modes["cached"].perplexity - plain.modes["cached"].perplexity) > 1e-3
    assert res.modes["cached"].kv_kept > plain.modes["cached"].kv_kept


def test_anchor_config_carries_its_sink_on_disk():
    from anllm_ext.config import AnchorConfig

    plain = AnchorConfig("ids", [5, 3])
    assert "sink" not in plain.to_dict()  # files without a sink stay as they were
    sunk = AnchorConfig("ids", [5, 3], sink=2)
    assert sunk.to_dict()["sink"] == 2 and AnchorConfig.from_dict(sunk.to_dict()) == sunk
    assert AnchorConfig.from_dict(plain.to_dict()).sink == 0
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="sink must be an int >= 0"):
            AnchorConfig("ids", [5], sink=bad)
        with pytest.raises(ValueError, match="sink must be an int >= 0"):
            AnchorConfig.from_dict({"mode": "ids", "anchor_ids": [5], "sink": bad})


def test_a_saved_patched_model_is_patched_again_with_its_sink(tmp_path):
    """patch(model, sink=S) puts S into the anchor configuration the model carries; save_pretrained writes it, and a
    new patch of the loaded model (no ids) takes it; an explicit sink wins; unpatch restores what it carried."""
    from transformers import AutoModelForCausalLM

    from anllm_ext.config import AnchorConfig

    base = tiny_model("llama", seed=2)
    model = patch(base, MODEL_ANCHOR, sink=3)
    assert AnchorConfig.from_model(model).sink == 3
    model.save_pretrained(tmp_path)
    assert AnchorConfig.find_pretrained(tmp_path).sink == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert patched_sink(patch(loaded)) == 3
    ids, mask = model_stream(2, 30, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    assert patched_sink(patch(AutoModelForCausalLM.from_pretrained(tmp_path), sink=0)) == 0
    config = AnchorConfig("ids", [MODEL_ANCHOR], sink=2)
    assert patched_sink(patch(tiny_model("llama"), config)) == 2  # a new patch: the given configuration's
    anllm_ext.unpatch(model)
    assert getattr(model.config, "anllm", None) is None


@needs_smollm2
def test_training_step_with_a_sink_equals_eager_dense_mask(tiny_dir):
    from anllm_ext.data import AnchorDataCollator
    from anllm_ext.models import load_model
    from anllm_ext.reference import ansan_mask

    from helpers import assert_step_matches_eager, make_anchor_config, step_features

    model, tok = load_model(tiny_dir)
    config = make_anchor_config("ep", tok)
    batch = AnchorDataCollator(tok.pad_token_id)(step_features(tok, config))
    loss = assert_step_matches_eager(model, batch, config.anchor_ids, lambda lay: ansan_mask(lay, lay)[:, None],
                                     sink=2)
    plain = patch(load_model(tiny_dir)[0], config.anchor_ids, sink=0)
    with torch.no_grad():
        assert abs(float(plain(**batch).loss) - float(loss)) > 1e-4  # the sink changed the loss


@needs_smollm2
def test_train_with_a_sink_saves_it_with_the_adapter(tmp_path, tiny_dir, corpus):
    """`anllm train --sink S`: the run trains and scores with the sink, and the adapter it saves carries it, so
    load_model + the anchors it resolves serve it; a run on that adapter without --sink keeps it."""
    pytest.importorskip("peft")
    from anllm_ext.config import AnchorConfig, resolve_anchor_config
    from anllm_ext.models import load_model

    from helpers import run_training

    res = run_training(tmp_path / "a", tiny_dir, corpus / "train", sink=2, lora=True, max_steps=2,
                       adapter_dtype="float32")
    assert res["anchor_config"]["sink"] == 2
    adapter = tmp_path / "a" / "out" / "adapter"
    assert AnchorConfig.from_pretrained(adapter).sink == 2
    model, tok = load_model(adapter)
    anchors = resolve_anchor_config(None, tok, model)
    assert anchors.sink == 2 and patched_sink(patch(model)) == 2
    again = run_training(tmp_path / "b", adapter, corpus / "train", lora=True, max_steps=1, adapter_dtype="float32",
                         eval_before=False)
    assert again["anchor_config"]["sink"] == 2


def test_training_arguments_check_the_sink():
    from anllm_ext.training import AnLLMArguments

    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        AnLLMArguments(data=["x"], sink=-1)
    with pytest.raises(ValueError, match="--sink makes tokens anchors"):
        AnLLMArguments(data=["x"], sink=1, attention="causal")
