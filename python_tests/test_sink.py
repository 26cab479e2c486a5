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
from anllm_ext import AnchorCache, patch, token_layout
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
