"""transformers integration on tiny random Llama / Mistral / Qwen2 / Qwen3 models (fp32, CPU).

Core property: anchor-cached inference (chunked prefill + token-by-token decoding with real-time
compaction) gives the logits of one masked pass over the whole text, and the patched single pass
equals transformers' eager attention given the dense AnSAN mask (forward and gradients).
"""
import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

import anllm_ext
from anllm_ext.errors import UnsupportedError
from anllm_ext.hf import cache_kwarg
from anllm_ext import AnchorCache, patch, prefill, unpatch
from anllm_ext.layout import token_layout
from anllm_ext.reference import ansan_mask

from helpers import (FAMILIES, MODEL_ANCHOR, MODEL_VOCAB, cached_logits, single_pass_logits, model_stream,
                     tiny_model)

ANCHOR, VOCAB = MODEL_ANCHOR, MODEL_VOCAB


def on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def assert_close_valid(a, b, mask, atol=2e-5, rtol=1e-5):
    if mask is not None:
        keep = mask.bool()
        a, b = a[keep], b[keep]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_cached_equals_single_pass(family, chunk, device):
    model = patch(tiny_model(family), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(1, 48, seed=1))
    ref = single_pass_logits(model, ids, mask)
    got, cache = cached_logits(model, ids, mask, n_prompt=36, chunk=chunk)
    assert_close_valid(got, ref, mask)
    # the cache really dropped closed segments
    assert cache.lengths()[0] < 48


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_batch_mixed_left_padding(family, device):
    model = patch(tiny_model(family), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(3, 40, seed=2, left_pad=(0, 5, 11)))
    ref = single_pass_logits(model, ids, mask)
    got, cache = cached_logits(model, ids, mask, n_prompt=30, chunk=7)
    assert_close_valid(got, ref, mask)
    # padding never enters the kept cache
    for row in range(3):
        assert bool(cache.kept_layout(row).valid.all())


def test_batch_rows_equal_rows_alone(device):
    model = patch(tiny_model("llama"), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(3, 40, seed=3, left_pad=(4, 0, 9)))
    batched, _ = cached_logits(model, ids, mask, n_prompt=28, chunk=6)
    for b in range(3):
        n = int((mask[b] == 0).sum())
        alone, _ = cached_logits(model, ids[b : b + 1, n:], None, n_prompt=28 - n, chunk=6)
        torch.testing.assert_close(batched[b, n:], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_pass_equals_eager_dense_mask_with_grads(family, device):
    model = patch(tiny_model(family), ANCHOR).to(device)
    eager = copy.deepcopy(model)
    unpatch(eager)
    eager.set_attn_implementation("eager")
    ids, mask = on(device, *model_stream(2, 33, seed=4, left_pad=(0, 6)))
    layout = token_layout(ids, ANCHOR, mask)
    allowed = ansan_mask(layout, layout)[:, None]  # [B,1,T,T]
    additive = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)
    w = torch.randn(2, 33, VOCAB).to(device)
    keep = mask.bool()

    model.train()  # dropout is 0 in these configs; training mode must work
    out_p = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (out_p * w)[keep].sum().backward()
    out_e = eager(input_ids=ids, attention_mask=additive, position_ids=layout.positions, use_cache=False).logits
    (out_e * w)[keep].sum().backward()

    assert_close_valid(out_p.detach(), out_e.detach(), mask, atol=2e-5, rtol=1e-5)
    grads_e = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[name].grad, atol=2e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_padding_outputs_are_zeros(device):
    """Padding queries see no key: every layer's attention output there is exactly zero (the layers' output
    projections have no bias), in one masked pass and against the anchor cache; all logits are finite."""
    model = patch(tiny_model("llama"), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(2, 20, seed=5, left_pad=(0, 8)))
    pad = mask == 0
    outputs = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
             for layer in model.model.layers]
    try:
        single = single_pass_logits(model, ids, mask)
        n_single = len(outputs)
        cached, _ = cached_logits(model, ids, mask, n_prompt=20, chunk=6)  # prompt chunks of 6 columns
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(single).all() and torch.isfinite(cached).all()
    assert n_single == len(model.model.layers) and len(outputs) > n_single
    for k, out in enumerate(outputs):
        where = pad if k < n_single else pad[:, 6 * ((k - n_single) // n_single):][:, : out.shape[1]]
        assert out.shape[:2] == where.shape
        assert bool(where.any()) == (k < n_single or (k - n_single) // n_single < 2)  # padding: columns 0-7
        assert torch.equal(out[where], torch.zeros_like(out[where])), f"attention output {k}: padding not zero"
        assert bool((out[~where].abs().sum(-1) > 0).all())  # real tokens do attend


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_no_anchor_input_equals_unpatched(family):
    model = tiny_model(family)
    ids, _ = model_stream(2, 30, seed=6, anchor_p=0.0)
    assert not bool((ids == ANCHOR).any())
    ref = single_pass_logits(model, ids)
    # no anchor generated either (both runs suppress it): then the tokens must be the same
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, suppress_tokens=[ANCHOR])
    gen_ref = model.generate(ids, **gen_kw)
    patch(model, ANCHOR)
    got = single_pass_logits(model, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    gen = anllm_ext.generate(model, ids, prefill_chunk=8, **gen_kw)
    assert not bool((gen[:, 30:] == ANCHOR).any())
    assert torch.equal(gen, gen_ref)
    assert torch.equal(model.generate(ids, **gen_kw), gen_ref)  # the default AnchorCache
    unpatch(model)
    torch.testing.assert_close(single_pass_logits(model, ids), ref, atol=0, rtol=0)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_greedy_generation_equals_repeated_single_passes(family, device):
    model = patch(tiny_model(family, seed=3), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(2, 26, seed=7, left_pad=(0, 4)))
    n_new = 12
    out, cache = anllm_ext.generate(model, ids, mask, prefill_chunk=6, max_new_tokens=n_new,
                                    return_cache=True, pad_token_id=0)
    seq, msk = ids.clone(), mask.clone()
    for _ in range(n_new):
        nxt = single_pass_logits(model, seq, msk)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        msk = torch.cat([msk, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)
    assert cache.stats()["tokens_seen"] == 26 + n_new - 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("default_cache", ["anchor", "full"])
def test_plain_forward_and_generate_build_the_cache_they_need(family, default_cache, device):
    """`model(ids)` and `model.generate(ids)` with no cache on a patched model of every family (Mistral with its
    configured sliding window): the patched model creates a cache that holds the anchor layout (transformers'
    own default for Mistral is a sliding-window cache), and the results equal single masked passes."""
    model = patch(tiny_model(family, seed=3), ANCHOR, default_cache=default_cache).to(device)
    ids, mask = on(device, *model_stream(2, 30, seed=8, left_pad=(0, 3)))
    ref = single_pass_logits(model, ids, mask)
    with torch.no_grad():
        first = model(ids[:, :20], attention_mask=mask[:, :20])  # use_cache defaults to True: a cache is made
        cache = first.past_key_values
        assert type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)
        rest = model(ids[:, 20:], attention_mask=mask, **{cache_kwarg(model): cache}).logits
    assert_close_valid(torch.cat([first.logits, rest], 1), ref, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = anllm_ext.generate(model, ids, mask, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out, expected)


def test_a_configured_sliding_window_is_replaced_by_the_ansan_mask(device):
    """Mistral with a window of 8 over 40 tokens: patched, every layer attends under the AnSAN mask alone (as the
    same weights with no window), in one pass, cached, and in generate."""
    windowed = patch(tiny_model("mistral", seed=4, sliding_window=8), ANCHOR).to(device)
    no_window = patch(tiny_model("mistral", seed=4, sliding_window=None), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(2, 40, seed=9, anchor_p=0.08, left_pad=(0, 5)))
    ref = single_pass_logits(no_window, ids, mask)
    assert_close_valid(single_pass_logits(windowed, ids, mask), ref, mask)
    got, _ = cached_logits(windowed, ids, mask, n_prompt=30, chunk=7)
    assert_close_valid(got, ref, mask)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(windowed.generate(ids, attention_mask=mask, **kw), no_window.generate(ids, attention_mask=mask, **kw))
    # unpatched, the window is the model's again: its logits differ from the AnSAN pass beyond the window
    unpatch(windowed)
    assert not torch.allclose(single_pass_logits(windowed, ids, mask)[mask.bool()], ref[mask.bool()], atol=1e-3)


def test_generated_anchor_triggers_compaction(device):
    model = patch(tiny_model("llama", seed=3), ANCHOR).to(device)
    ids, = on(device, model_stream(1, 20, seed=8, anchor_p=0.0)[0])
    from transformers import LogitsProcessor, LogitsProcessorList

    class OnlyAnchor(LogitsProcessor):  # every generated token is an anchor
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            out[:, ANCHOR] = 0.0
            return out

    out, cache = anllm_ext.generate(model, ids, prefill_chunk=8, max_new_tokens=5, return_cache=True, pad_token_id=0,
                                    logits_processor=LogitsProcessorList([OnlyAnchor()]))
    assert bool((out[0, 20:] == ANCHOR).all())
    # the prompt (no anchors) is one segment that the first generated anchor closed
    lay = cache.kept_layout(0)
    assert bool(lay.is_anchor.all()), lay
    assert cache.lengths() == [4]  # 5 generated anchors, the last not yet fed back


def test_sampling_and_beam_search_run(device):
    model = patch(tiny_model("llama"), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(2, 18, seed=9, left_pad=(0, 3)))
    torch.manual_seed(0)
    s = anllm_ext.generate(model, ids, mask, max_new_tokens=5, do_sample=True, top_k=10, prefill_chunk=8, pad_token_id=0)
    assert s.shape == (2, 23) and torch.equal(s[:, :18], ids)
    # the same seed with a full cache (patched, exact mask) samples the same tokens
    torch.manual_seed(0)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0,
                          cache_implementation="dynamic")
    assert torch.equal(s, full)
    # every sampled token is among the 10 most likely of one masked pass over what precedes it
    logits = single_pass_logits(model, s[:, :-1], torch.cat([mask, torch.ones_like(mask[:, :4])], 1))
    top = logits[:, 17:].topk(10, dim=-1).indices  # [2, 5, 10]: the steps that chose tokens 18..22
    assert bool((top == s[:, 18:, None]).any(-1).all())
    torch.manual_seed(1)  # another seed samples another continuation: the seed is really used
    other = anllm_ext.generate(model, ids, mask, max_new_tokens=5, do_sample=True, top_k=10, prefill_chunk=8,
                               pad_token_id=0)
    assert not torch.equal(other, s)
    b = anllm_ext.generate(model, ids, mask, max_new_tokens=5, num_beams=3, prefill_chunk=8, pad_token_id=0)
    assert b.shape == (2, 23)
    # beam search with the anchor cache equals beam search with a full cache (patched, exact mask)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0,
                         cache_implementation="dynamic")
    assert torch.equal(b, ref)


def test_dynamic_cache_on_patched_model_is_exact(device):
    model = patch(tiny_model("llama"), ANCHOR).to(device)
    ids, mask = on(device, *model_stream(2, 30, seed=10, left_pad=(3, 0)))
    ref = single_pass_logits(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids[:, :20], attention_mask=mask[:, :20], use_cache=True)
        steps = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers < 5.24: past_key_values
        for t in range(20, 30):
            o = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(o.logits)
    assert_close_valid(torch.cat(steps, 1), ref, mask)


def test_peak_bounded_by_anchors_open_segment_and_chunk(device):
    model = patch(tiny_model("llama"), ANCHOR).to(device)
    ids, = on(device, model_stream(1, 300, seed=11, anchor_p=0.1)[0])
    chunk = 32
    cache, _ = prefill(model, ids, prefill_chunk=chunk)
    lay = token_layout(ids, ANCHOR)
    open_seg = int(lay.segments[0, -1]) + int(lay.is_anchor[0, -1])
    expected = lay.is_anchor[0] | (lay.segments[0] == open_seg)
    assert cache.lengths() == [int(expected.sum())]
    assert cache.kept_layout(0).positions[0].tolist() == lay.positions[0][expected].tolist()
    # peak = max over chunks of (kept before the chunk + chunk)
    peak = 0
    for e in range(chunk, 300 + chunk, chunk):
        s = e - chunk
        before = lay.is_anchor[0, :s] | (lay.segments[0, :s] == (int(lay.segments[0, s]) if s < 300 else -1))
        peak = max(peak, int(before.sum()) + min(chunk, 300 - s))
    assert cache.peak_slots == peak


def test_errors_are_clear():
    model = tiny_model("llama", attention_dropout=0.1)
    patch(model, ANCHOR)
    ids, _ = model_stream(1, 12, seed=12)
    model.train()
    with pytest.raises(UnsupportedError, match="dropout"):
        model(input_ids=ids, use_cache=False)
    model.eval()
    # an AnchorCache used without the patch
    unpatch(model)
    with pytest.raises(RuntimeError, match="patched"):
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): AnchorCache(model.config)})
    # a 4-D mask on a patched model
    patch(model, ANCHOR)
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=torch.zeros(1, 1, 12, 12), use_cache=False)
    # a sliding-window cache the user built (it would drop keys the AnSAN mask allows)
    m2 = patch(tiny_model("mistral", sliding_window=8), ANCHOR)
    with pytest.raises(UnsupportedError, match="DynamicSlidingWindowLayer"):
        m2(input_ids=ids, **{cache_kwarg(m2): DynamicCache(config=m2.config)})
    with pytest.raises(UnsupportedError, match="DynamicSlidingWindowLayer"):
        m2.generate(ids, max_new_tokens=2, **{cache_kwarg(m2): DynamicCache(config=m2.config)})
    # assisted decoding
    with pytest.raises(UnsupportedError):
        AnchorCache(model.config).crop(-1)


def test_beam_search_with_many_generated_anchors(device):
    """Beams that generate different anchors: the AnchorCache (rows reordered with the beams) and
    transformers' DynamicCache on the patched model (layout rows follow the reordering) agree, and the
    best beam's score equals a single masked pass over the final sequence."""
    many = list(range(7, 27))  # 20 of 64 ids are anchors: beams close segments at different places
    model = patch(tiny_model("llama", seed=5), many).to(device)
    ids, mask = on(device, *model_stream(2, 20, seed=13, left_pad=(0, 5)))
    kw = dict(max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    a = anllm_ext.generate(model, ids, mask, prefill_chunk=6, **kw)
    b = model.generate(ids, attention_mask=mask, cache_implementation="dynamic", **kw)  # DynamicCache
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-4, rtol=1e-4)
    gen = a.sequences[:, 20:]
    assert bool(torch.isin(gen, torch.tensor(many, device=device)).any())
    # the sequence score is the length-normalised sum of the chosen tokens' log-probs of one pass
    full_mask = torch.cat([mask, torch.ones_like(gen)], 1)
    logp = torch.log_softmax(single_pass_logits(model, a.sequences, full_mask)[:, 19:-1], -1)
    tok_lp = logp.gather(-1, gen[..., None])[..., 0].sum(-1) / gen.shape[1]  # length_penalty 1: / new tokens
    torch.testing.assert_close(tok_lp, a.sequences_scores, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_and_inputs_embeds():
    model = patch(tiny_model("qwen2"), ANCHOR)
    ids, mask = model_stream(2, 24, seed=14, left_pad=(0, 3))
    w = torch.randn(2, 24, VOCAB)
    model.train()
    (model(input_ids=ids, attention_mask=mask, use_cache=False).logits * w)[mask.bool()].sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    (model(input_ids=ids, attention_mask=mask, use_cache=False).logits * w)[mask.bool()].sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-5)
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()
    # inputs_embeds need an explicit layout
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="anllm_layout"):
        model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
    out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                anllm_layout=token_layout(ids, ANCHOR, mask)).logits
    assert_close_valid(out, single_pass_logits(model, ids, mask), mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cached_and_single_pass(dtype, device):
    """bf16/fp16 models: the patched pass and anchor-cached inference agree with the fp32 computation
    about as well as transformers' own attention at that dtype does."""
    model32 = tiny_model("llama").to(device)
    ids, mask = on(device, *model_stream(2, 40, seed=6))  # no padding: eager attention at low precision turns it into NaN
    layout = token_layout(ids, ANCHOR, mask)
    dense = ansan_mask(layout, layout)[:, None]

    def eager_logits(m, dt):
        additive = torch.zeros(dense.shape, dtype=dt, device=device).masked_fill(~dense, torch.finfo(dt).min)
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=additive, position_ids=layout.positions, use_cache=False).logits.float()

    eager32 = copy.deepcopy(model32)
    eager32.set_attn_implementation("eager")
    ref32 = eager_logits(eager32, torch.float32)
    eager_lp = copy.deepcopy(eager32).to(dtype)
    torch_err = (eager_logits(eager_lp, dtype) - ref32)[mask.bool()].abs().max().item()

    model = patch(copy.deepcopy(model32).to(dtype), ANCHOR)
    single = single_pass_logits(model, ids, mask).float()
    cached, _ = cached_logits(model, ids, mask, n_prompt=30, chunk=8)
    for got in (single, cached.float()):
        err = (got - ref32)[mask.bool()].abs().max().item()
        assert err <= 2 * torch_err + 1e-2, (err, torch_err)


def test_deferred_cache_writes():
    """AnchorLayer.update defers its write to the fused attention call; a layer whose attention call never
    comes is still written (at the next update or at the end of the forward), and a model that changes the
    keys between update and attention gets a clear error rather than a wrong cache."""
    model = patch(tiny_model("llama"), ANCHOR)
    cache = AnchorCache(model.config)
    ids = torch.full((1, 4), ANCHOR + 1)  # no anchor: nothing is compacted away
    q = token_layout(ids, ANCHOR)
    cache.begin_forward(q)
    new = [(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)) for _ in range(2)]
    with torch.no_grad():
        for layer, (k, v) in zip(cache.layers, new):
            assert layer.update(k, v) == (k, v)
    cache.end_forward(q)
    for layer, (k, v) in zip(cache.layers, new):
        assert torch.equal(layer.keys[:, :, :4], k) and torch.equal(layer.values[:, :, :4], v)

    cache = AnchorCache(model.config)
    layer0 = cache.layers[0]
    plain_update = layer0.update
    layer0.update = lambda k, v, *a, **kw: tuple(t.clone() for t in plain_update(k, v, *a, **kw))
    ids, _ = model_stream(1, 12, seed=13)
    with pytest.raises(UnsupportedError, match="did not pass the keys/values"):
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
