"""Recent sentences kept hot (AnchorCache(recent=N), anllm_ext/recent.py): chunk by chunk and step by step the
cache must give what one pass under the widened mask gives (anllm_ext.reference.ansan_mask(..., recent=N): a
non-anchor query also reads the N sentences before its own), keep exactly the slots that rule needs, and differ
from the plain anchor cache (else the comparison would prove nothing). Toy stack, tiny transformers models
through the patch (batches, left padding), and the bundled AnLLM."""
import copy

import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache, patch
from anllm_ext.hf import patched_anchor_ids, patched_sink
from anllm_ext.reference import anchor_attention_ref

from helpers import (ANCHOR, MODEL_ANCHOR, TEXT, ToyStack, cached_model_logits, dense_oracle_logits, forward_starts,
                     model_stream, needs_smollm2, run_stack_cached, tiny_model, token_stream)

WIDTH = 32


class RecentStack(ToyStack):
    def dense_pass(self, x, layout, recent):
        """One pass over the whole text under the widened mask (the plain-PyTorch oracle)."""
        for i in range(len(self.q)):
            q, k, v = self.heads(i, x)
            x = self.merge(i, x, anchor_attention_ref(q, k, v, layout, layout, recent=recent))
        return x


def run_cached(stack, x, ids, mask, starts, recent):
    return run_stack_cached(stack, x, ids, mask, starts, recent=recent)


def kept_with_recent(layout, recent):
    """Slots per row a cache keeps after `layout`: valid and (anchor or in the last recent + 1 segments)."""
    open_seg = layout.next_start().segment[:, None]
    keep = layout.valid & (layout.is_anchor | (layout.segments.to(torch.int64) >= open_seg - recent))
    return keep.sum(1).tolist()


@pytest.mark.parametrize("recent", [1, 2, 5])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_recent_cache_matches_one_pass_under_the_widened_mask(recent, chunk, padding):
    B, T, prefill = 3, 80, 64
    ids, mask = token_stream(B, T, "random", padding, anchor_every=6, seed=chunk + recent)
    x = torch.randn(B, T, WIDTH, generator=torch.Generator().manual_seed(1))
    stack = RecentStack(WIDTH)
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    with torch.no_grad():
        expected = stack.dense_pass(x, layout, recent)
        plain = stack.dense_pass(x, layout, 0)
    got, cache = run_cached(stack, x, ids, mask, forward_starts(T, prefill, chunk), recent)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=5e-5, rtol=1e-5)
    assert (got[valid] - plain[valid]).abs().max() > 1e-2  # the window changed the output
    assert cache.lengths() == kept_with_recent(layout, recent)
    assert cache.lengths() > run_cached(stack, x, ids, mask, forward_starts(T, prefill, chunk), 0)[1].lengths()


@pytest.mark.parametrize("pattern", ["at_zero", "consecutive", "all", "none", "cache_like"])
def test_recent_cache_on_awkward_anchor_patterns(pattern):
    """Anchors first, runs of anchors (empty sentences), only anchors, none at all."""
    B, T = 2, 48
    ids, mask = token_stream(B, T, pattern, "mixed", anchor_every=5, seed=7)
    x = torch.randn(B, T, WIDTH, generator=torch.Generator().manual_seed(3))
    stack = RecentStack(WIDTH, seed=2)
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    with torch.no_grad():
        expected = stack.dense_pass(x, layout, 2)
    got, cache = run_cached(stack, x, ids, mask, forward_starts(T, 32, 7), 2)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=5e-5, rtol=1e-5)
    assert cache.lengths() == kept_with_recent(layout, 2)


def test_recent_rows_of_a_batch_equal_each_row_alone():
    ids, mask = token_stream(2, 40, "random", left_pad=(0, 7), anchor_every=5, seed=3)
    x = torch.randn(2, 40, WIDTH, generator=torch.Generator().manual_seed(2))
    stack = RecentStack(WIDTH, seed=1)
    starts = forward_starts(40, 24, 8)
    both, _ = run_cached(stack, x, ids, mask, starts, 3)
    for b in range(2):
        alone, _ = run_cached(stack, x[b:b + 1], ids[b:b + 1], mask[b:b + 1], starts, 3)
        keep = mask[b].bool()
        torch.testing.assert_close(both[b][keep], alone[0][keep], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recent_cache_in_low_precision_keeps_the_error_rule(dtype):
    """One layer's attention through the cache's protocol with q/k/v in ``dtype``: its error against the fp32
    oracle at most ~2x plain PyTorch's at that dtype (flash-attention's rule)."""
    from helpers import H_KV, H_Q, D, assert_close_by_error_rule, qkv

    B, T, chunk = 2, 70, 9
    ids, mask = token_stream(B, T, "random", "left", anchor_every=5, seed=4)
    q, k, v = qkv(B, H_Q, H_KV, T, T, D, dtype=dtype)
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    cache = AnchorCache(initial_capacity=8, recent=2)
    outs = []
    with torch.no_grad():
        for a in range(0, T, chunk):
            e = min(T, a + chunk)
            q_layout = anllm_ext.token_layout(ids[:, a:e], [ANCHOR], mask[:, a:e], start=cache.next_start())
            k_layout = cache.begin_forward(q_layout)
            kk, vv = cache.update(k[:, :, a:e], v[:, :, a:e], 0)
            outs.append(cache.attend(q[:, :, a:e], kk, vv, q_layout, k_layout))
            cache.end_forward(q_layout)
    got = torch.cat(outs, dim=2)
    ref32 = anchor_attention_ref(q, k, v, layout, layout, recent=2)
    in_dtype = anchor_attention_ref(q, k, v, layout, layout, compute_dtype=None, recent=2)
    keep = mask.bool()[:, None, :, None].expand_as(got)
    assert got.dtype == dtype
    assert_close_by_error_rule(got[keep], in_dtype[keep], ref32[keep], dtype)


@pytest.mark.parametrize("bad, error, message", [
    (dict(recent=-1), ValueError, "recent must be an integer >= 0"),
    (dict(recent=1.5), TypeError, "recent must be an integer"),
    (dict(recent=True), TypeError, "recent must be an integer"),
    (dict(recent=2, compact=False), ValueError, "recent needs compact=True"),
])
def test_recent_rejects_bad_settings(bad, error, message):
    with pytest.raises(error, match=message):
        AnchorCache(**bad)


# ------------------------------------------------------------------ a transformers model through the patch

def dense_recent_logits(model, ids, mask, recent, anchors, sink=0):
    """The unpatched model, one pass, its attention the dense oracle under the widened mask (an attention sink of
    ``sink`` tokens in its layout)."""
    def attention(module, query, key, value, layout, scaling):
        return anchor_attention_ref(query, key, value, layout, layout, scale=scaling, recent=recent)

    return dense_oracle_logits(model, ids, mask, "anllm_recent_ref", attention, anchors, sink)


def cached_recent_logits(model, ids, mask, starts, recent):
    return cached_model_logits(model, ids, mask, starts, recent=recent)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("recent", [1, 3])
def test_patched_model_with_recent_matches_the_dense_oracle(family, recent):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR)
    ids, mask = model_stream(3, 56, seed=4, left_pad=(0, 3, 8))
    starts = forward_starts(56, 40, 9)
    got, cache = cached_recent_logits(model, ids, mask, starts, recent)
    want = dense_recent_logits(reference, ids, mask, recent, (MODEL_ANCHOR,))
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-5)
    plain, plain_cache = cached_recent_logits(model, ids, mask, starts, 0)
    assert (got[keep] - plain[keep]).abs().max() > 1e-3
    assert sum(cache.stats()["kept_slots"]) > sum(plain_cache.stats()["kept_slots"])


def test_generate_with_a_recent_cache_matches_stepping_it_by_hand():
    """anllm_ext.generate with a cache built with recent=N: greedy tokens equal the argmax of the dense oracle
    run over the prompt and the tokens it produced (teacher forcing)."""
    base = tiny_model("llama", seed=3)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR)
    ids, mask = model_stream(1, 40, seed=9)
    out = anllm_ext.generate(model, ids, attention_mask=mask, cache=AnchorCache(model.config, recent=2),
                             prefill_chunk=16, max_new_tokens=6, do_sample=False)
    full = torch.ones_like(out)
    want = dense_recent_logits(reference, out, full, 2, (MODEL_ANCHOR,))[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert out[:, ids.shape[1]:].tolist() == want.tolist()


@needs_smollm2
def test_bundled_anllm_with_recent_matches_the_dense_oracle():
    """The bundled AnLLM: prose with a question, chunked prefill and three decode steps through a cache keeping two
    recent sentences, against the dense oracle; the window lowers the loss of the text (what it is for)."""
    from anllm_ext.models import load_model

    torch.set_num_threads(2)
    base, tok = load_model("smollm2-anllm")
    reference = copy.deepcopy(base)
    model = patch(base)
    text = TEXT + " " + TEXT + "\n\nWho kept the light burning? It was"
    ids = tok(text, return_tensors="pt")["input_ids"][:, :150]
    mask = torch.ones_like(ids)
    starts = forward_starts(ids.shape[1], ids.shape[1] - 3, 64)
    got, cache = cached_recent_logits(model, ids, mask, starts, 2)
    want = dense_recent_logits(reference, ids, mask, 2, patched_anchor_ids(model), patched_sink(model))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # logits are O(10)
    plain, plain_cache = cached_recent_logits(model, ids, mask, starts, 0)

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()

    assert loss(got) < loss(plain)
    assert plain_cache.lengths()[0] < cache.lengths()[0] < ids.shape[1] * 0.6


def test_continuations_scored_with_recent_sentences_match_the_dense_oracle():
    """The cached+recent mode's continuation scoring (contexts prefilled once, left-padded, their rows repeated for
    the continuations, scored in one forward) gives the dense oracle's log-probabilities."""
    from anllm_ext.evaluation import model_mode, score_continuations

    base = tiny_model("llama", seed=5)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR)
    ids, _ = model_stream(3, 40, seed=11)
    contexts = [ids[0, :40].tolist(), ids[1, :27].tolist(), ids[2, :33].tolist()]
    requests = [(contexts[0], [5, MODEL_ANCHOR, 9]), (contexts[0], [12]), (contexts[1], [3, 4, 5, 6]),
                (contexts[2], [MODEL_ANCHOR, 8]), (contexts[1], [21, 22])]
    with model_mode(model, "cached+recent"), torch.no_grad():
        got = score_continuations(model, requests, "cached+recent", batch_size=3, prefill_chunk=7, recent=2).logprobs
    plain = score_continuations(model, requests, "cached", batch_size=3, prefill_chunk=7).logprobs
    for (ctx, cont), score, without in zip(requests, got, plain):
        seq = torch.tensor([ctx + cont])
        logp = torch.log_softmax(dense_recent_logits(reference, seq, torch.ones_like(seq), 2, (MODEL_ANCHOR,))[0], -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert score == pytest.approx(want, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, plain)) > 1e-3
