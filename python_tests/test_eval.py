"""anllm_ext.evaluation on tiny random Llama models: perplexity and multiple-choice scoring against
independent computations, cached == one masked pass, batched == one at a time, bad inputs."""
import json
import math

import pytest
import torch

import anllm_ext
from anllm_ext import evaluation as ev

from helpers import ANCHOR, needs_smollm2

VOCAB = 64


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    anllm_ext.patch(model, [ANCHOR])
    yield model
    anllm_ext.unpatch(model)


def _blocks(lengths, every=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        b = torch.randint(2, VOCAB, (n,), generator=g)
        b[every - 1 :: every] = ANCHOR
        out.append(b.tolist())
    return out


def _nll_by_hand(model, block):
    """Mean over tokens 1.. of -log p(token | prefix): one unpadded forward, log-softmax by hand."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([block]), use_cache=False).logits[0].double()
    logz = torch.logsumexp(logits[:-1], dim=-1)
    picked = logits[:-1].gather(-1, torch.tensor(block[1:])[:, None]).squeeze(-1)
    return (logz - picked).sum().item(), len(block) - 1


def test_perplexity_matches_hand_computation(tiny):
    blocks = _blocks([40, 33, 17, 5])
    res = ev.perplexity(tiny, blocks, prefill_chunk=8, batch_size=3, progress=False)
    assert set(res.modes) == {"full", "ansan", "cached"}
    # full: the unpatched model, one block at a time; ansan: the patched model, one block at a time
    for mode in ("full", "ansan"):
        with ev.model_mode(tiny, mode):
            total = [_nll_by_hand(tiny, b) for b in blocks]
        nll = sum(t for t, _ in total) / sum(n for _, n in total)
        assert res[mode].tokens == sum(n for _, n in total) == 91
        assert res[mode].nll == pytest.approx(nll, abs=1e-5)
        assert res[mode].perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert anllm_ext.is_patched(tiny)  # the full mode restored the patch
    assert res["full"].nll != pytest.approx(res["ansan"].nll, abs=1e-4)  # the mask matters on this model


def test_perplexity_cached_equals_one_pass(tiny):
    blocks = _blocks([64, 50, 23])
    res = ev.perplexity(tiny, blocks, modes=("ansan", "cached"), prefill_chunk=9, batch_size=2, progress=False)
    assert res.max_abs_diff_cached_vs_ansan < 1e-4
    assert res["cached"].nll == pytest.approx(res["ansan"].nll, abs=1e-5)
    # KV kept = anchors + open segment per block, counted independently
    kept = sum(sum(1 for t in b if t == ANCHOR) + (len(b) - 1 - max(i for i, t in enumerate(b) if t == ANCHOR))
               for b in blocks)
    assert res["cached"].kv_kept_slots == kept
    assert res["cached"].kv_full_slots == sum(len(b) for b in blocks)
    assert res["cached"].c_down == pytest.approx(1 - kept / sum(len(b) for b in blocks))
    assert res["cached"].kv_kept < res["cached"].kv_peak < 1.0


def test_perplexity_batched_equals_single(tiny):
    blocks = _blocks([30, 12, 25, 7, 19])
    one = ev.perplexity(tiny, blocks, batch_size=1, prefill_chunk=5, progress=False)
    many = ev.perplexity(tiny, blocks, batch_size=4, prefill_chunk=5, progress=False)
    for mode in ev.MODES:
        assert many[mode].nll == pytest.approx(one[mode].nll, abs=1e-5)
    d = many.to_dict()
    assert json.loads(many.to_json())["modes"]["cached"]["c_down"] == pytest.approx(d["modes"]["cached"]["c_down"])
    assert "cached" in many.table() and "C-down" in many.table()


def test_perplexity_bad_inputs(tiny):
    with pytest.raises(ValueError, match="block 1 has 1 tokens"):
        ev.perplexity(tiny, [[3, 4, 5], [3]], progress=False)
    with pytest.raises(ValueError, match="unknown evaluation mode 'fast'"):
        ev.perplexity(tiny, [[3, 4, 5]], modes=("fast",), progress=False)
    with pytest.raises(ValueError, match="no blocks"):
        ev.perplexity(tiny, [], progress=False)
    anllm_ext.unpatch(tiny)
    try:
        with pytest.raises(ValueError, match="needs a patched model"):
            ev.perplexity(tiny, [[3, 4, 5]], modes=("ansan",), progress=False)
        # anchor_ids= patches for the call only
        res = ev.perplexity(tiny, [[3, 1, 4, 5]], modes=("ansan",), anchor_ids=[ANCHOR], progress=False)
        assert res["ansan"].tokens == 3 and not anllm_ext.is_patched(tiny)
    finally:
        anllm_ext.patch(tiny, [ANCHOR])


# ------------------------------------------------------------------------------------ continuation scoring


def _requests():
    b = _blocks([30, 12], every=5, seed=3)
    return [(b[0][:20], [5, 6, 7]), (b[0][:20], [9]), (b[1], [3, 4]), (b[0][:20], [11, 12, 13, 14]),
            (b[1], [1, 8]), (b[0][:7], [2])]


def _continuation_by_hand(model, ctx, cont):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return sum(logp[p, t].item() for p, t in zip(pos, cont)), all(logits[p].argmax().item() == t for p, t in zip(pos, cont))


@pytest.mark.parametrize("mode", ev.MODES)
def test_scores_match_hand_computation_and_batching(tiny, mode):
    reqs = _requests()
    with ev.model_mode(tiny, mode):
        by_hand = [_continuation_by_hand(tiny, list(c), list(o)) for c, o in reqs]
        one = ev.score_continuations(tiny, reqs, mode, batch_size=1, prefill_chunk=6)
        many = ev.score_continuations(tiny, reqs, mode, batch_size=5, prefill_chunk=6)
    ref_mode = "ansan" if mode == "cached" else mode
    if ref_mode != mode:  # the cached scores are checked against one masked pass of the whole sequence
        with ev.model_mode(tiny, ref_mode):
            by_hand = [_continuation_by_hand(tiny, list(c), list(o)) for c, o in reqs]
    for (lp, greedy), a, b, ga in zip(by_hand, one.logprobs, many.logprobs, one.greedy):
        assert a == pytest.approx(lp, abs=1e-4)
        assert b == pytest.approx(a, abs=1e-5)
        assert ga == greedy
    if mode == "cached":  # three distinct contexts, each prefilled once and compacted
        ctxs = {tuple(c) for c, _ in reqs}
        assert one.kv_full_slots == sum(len(c) for c in ctxs)
        assert one.kv_kept_slots < one.kv_full_slots
