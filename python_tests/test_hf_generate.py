"""`model.generate()` on a patched model: the AnchorCache is the default cache (greedy, sampling, beam
search, streamers, stopping criteria, left padding), each exact against `anllm_ext.generate` (explicit
AnchorCache, chunked prefill) or repeated single masked passes; `default_cache="full"`,
`cache_implementation="dynamic"` or an explicit cache keep transformers' full cache."""
import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

import anllm_ext
from anllm_ext import AnchorCache, patch, unpatch
from anllm_ext.hf import cache_kwarg

from helpers import MODEL_ANCHOR as ANCHOR, generated_cache, needs_smollm2, single_pass_logits, model_stream, tiny_model

MANY = list(range(7, 27))  # 20 of 64 ids are anchors: generated tokens close segments often


def greedy_by_single_passes(model, ids, mask, n_new):
    seq, msk = ids.clone(), mask.clone()
    for _ in range(n_new):
        nxt = single_pass_logits(model, seq, msk)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        msk = torch.cat([msk, torch.ones_like(nxt)], 1)
    return seq


def assert_compacted(cache, tokens_seen):
    assert isinstance(cache, AnchorCache), type(cache).__name__
    assert cache.compactions > 0
    assert max(cache.lengths()) < tokens_seen  # it dropped closed segments: not a full cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_default_is_anchor_cache_and_exact(family):
    model = patch(tiny_model(family, seed=3), ANCHOR)
    ids, mask = model_stream(2, 26, seed=7, left_pad=(0, 4))
    n_new = 10
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert_compacted(generated_cache(out), 26 + n_new - 1)
    assert torch.equal(out.sequences, greedy_by_single_passes(model, ids, mask, n_new))
    explicit = anllm_ext.generate(model, ids, mask, prefill_chunk=6, max_new_tokens=n_new, pad_token_id=0)
    assert torch.equal(out.sequences, explicit)


def test_sampling_seeded_equals_explicit_anchor_cache():
    model = patch(tiny_model("llama", seed=4), ANCHOR)
    ids, mask = model_stream(2, 20, seed=8, left_pad=(3, 0))
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20, temperature=1.5, pad_token_id=0)
    torch.manual_seed(11)
    default = model.generate(ids, return_dict_in_generate=True, **kw)
    assert_compacted(generated_cache(default), 20 + 12 - 1)
    torch.manual_seed(11)
    explicit = model.generate(ids, **{cache_kwarg(model): AnchorCache(model.config)}, **kw)
    assert torch.equal(default.sequences, explicit)
    torch.manual_seed(12)  # another seed samples another continuation: the seed is really used
    assert not torch.equal(model.generate(ids, **kw), explicit)


def test_beam_search_default_equals_explicit_and_full_cache():
    model = patch(tiny_model("llama", seed=5), MANY)
    ids, mask = model_stream(2, 20, seed=13, left_pad=(0, 5))
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=4, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    default = model.generate(ids, **kw)
    assert isinstance(generated_cache(default), AnchorCache)
    explicit = anllm_ext.generate(model, ids, prefill_chunk=6, **kw)
    full = model.generate(ids, cache_implementation="dynamic", **kw)
    assert isinstance(generated_cache(full), DynamicCache)
    assert bool(torch.isin(default.sequences[:, 20:], torch.tensor(MANY)).any())  # beams generated anchors
    for other in (explicit, full):
        assert torch.equal(default.sequences, other.sequences)
        torch.testing.assert_close(default.sequences_scores, other.sequences_scores, atol=1e-4, rtol=1e-4)


class Recorder:
    """A transformers streamer: generate() puts the prompt, then each new token, then calls end()."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.detach().clone())

    def end(self):
        self.ended = True


def test_streamer_sees_every_token():
    model = patch(tiny_model("llama", seed=3), ANCHOR)
    ids, _ = model_stream(1, 24, seed=9)
    rec = Recorder()
    out = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=0, streamer=rec,
                         return_dict_in_generate=True)
    assert_compacted(generated_cache(out), 24 + 9 - 1)
    assert rec.ended and torch.equal(rec.puts[0].reshape(-1), ids[0])
    assert torch.cat([p.reshape(-1) for p in rec.puts[1:]]).tolist() == out.sequences[0, 24:].tolist()
    assert torch.equal(out.sequences, greedy_by_single_passes(model, ids, torch.ones_like(ids), 9))


class StopAtAnchor(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.isin(input_ids[:, -1], torch.tensor(MANY, device=input_ids.device))


def test_stopping_criteria_stop_at_a_generated_anchor():
    model = patch(tiny_model("llama", seed=5), MANY)
    ids, _ = model_stream(1, 16, seed=14, anchor_p=0.0)
    ids[ids >= 7] = 3  # no anchor in the prompt: the first one the model generates stops it
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([StopAtAnchor()]))
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    new = out.sequences[0, 16:].tolist()
    assert len(new) < 30 and new[-1] in MANY and not any(t in MANY for t in new[:-1])
    assert isinstance(generated_cache(out), AnchorCache)
    assert torch.equal(out.sequences, anllm_ext.generate(model, ids, prefill_chunk=5, **kw))
    assert torch.equal(out.sequences, greedy_by_single_passes(model, ids, torch.ones_like(ids), len(new)))


def test_full_cache_switches():
    """default_cache="full", cache_implementation="dynamic" and an explicit DynamicCache keep the full
    cache, with the same tokens (the patched model's mask is exact on either cache)."""
    model = patch(tiny_model("llama", seed=3), ANCHOR)
    ids, mask = model_stream(2, 22, seed=15, left_pad=(0, 6))
    kw = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    anchor = model.generate(ids, **kw)
    assert isinstance(generated_cache(anchor), AnchorCache)
    runs = [model.generate(ids, cache_implementation="dynamic", **kw),
            model.generate(ids, **{cache_kwarg(model): DynamicCache(config=model.config)}, **kw)]
    patch(model, ANCHOR, default_cache="full")
    runs.append(model.generate(ids, **kw))
    with anllm_ext.patched(model, ANCHOR):  # a temporary re-patch keeps the model's default cache
        runs.append(model.generate(ids, **kw))
    runs.append(model.generate(ids, **kw))
    for run in runs:
        assert type(generated_cache(run)) is DynamicCache
        assert torch.equal(run.sequences, anchor.sequences)
    patch(model, ANCHOR)  # back to the anchor default
    assert isinstance(generated_cache(model.generate(ids, **kw)), AnchorCache)
    with pytest.raises(ValueError, match="default_cache"):
        patch(model, ANCHOR, default_cache="static")
    unpatch(model)  # the unpatched model gets transformers' own default again
    assert type(generated_cache(model.generate(ids, **kw))) is DynamicCache


@needs_smollm2
def test_smollm2_generate_uses_anchor_cache():
    from anllm_ext.models import load_model

    model, tok = load_model()
    text = ("The river rose all night. The bridge closed at dawn. Buses took the long road. "
            "Shops opened late. The mayor spoke at noon. By evening the water")
    ids = tok(text, return_tensors="pt").input_ids
    anchors = anllm_ext.ep_anchor_ids(tok)
    with anllm_ext.patched(model, anchors):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.eos_token_id)
        cache = generated_cache(out)
        assert_compacted(cache, ids.shape[1] + 5)
        assert int(cache.kept_layout(0).is_anchor.sum()) == int(torch.isin(out.sequences[0, :-1], torch.tensor(anchors)).sum())
        explicit = anllm_ext.generate(model, ids, prefill_chunk=16, max_new_tokens=6, pad_token_id=tok.eos_token_id)
    assert torch.equal(out.sequences, explicit)
