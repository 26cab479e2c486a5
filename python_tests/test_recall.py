"""Anchor-indexed recall (anllm_ext/recall.py): an AnchorCache with a RecallConfig must give, forward by
forward, what the dense oracle gives: one pass over the whole text whose mask is the AnSAN mask plus, for every
real non-anchor query, the evicted tokens of the segments its forward chose through their anchors
(anllm_ext.reference.recall_attention_ref, written independently of the cache). Batches, left padding,
prefill chunks and decode steps, both choice rules and both re-choice cadences; a transformers model through
the patch too. Every comparison also checks that recall changed the output (else it would prove nothing)."""
import copy

import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache, RecallConfig, patch
from anllm_ext.reference import anchor_attention_ref, recall_attention_ref

from anllm_ext.hf import patched_anchor_ids, patched_sink
from helpers import (ANCHOR, LAYERS, MODEL_ANCHOR, TEXT, ToyStack, cached_model_logits, dense_oracle_logits,
                     forward_starts, model_stream, needs_smollm2, run_stack_cached, tiny_model, token_stream)

WIDTH = 32


class RecallStack(ToyStack):
    """The cache tests' toy attention stack with sharper attention (so the choice matters) and a dense pass that
    recalls as the oracle says."""

    def __init__(self, seed=0):
        super().__init__(WIDTH, seed, sharpen=1.5)

    def dense_pass(self, x, layout, chunk_starts, recall, recent=0):
        carry = {}
        for i in range(LAYERS):
            q, k, v = self.heads(i, x)
            if recall is None:
                attn = anchor_attention_ref(q, k, v, layout, layout, recent=recent)
            else:
                attn = recall_attention_ref(q, k, v, layout, chunk_starts, recall.budget, recall.every, recall.score,
                                            pool=recall.pool, carry=carry, index=recall.index, layer=i,
                                            layers=recall.layers or (), question=recall.question, recent=recent)
            x = self.merge(i, x, attn)
        return x


def run_cached(stack, x, ids, mask, starts, recall, recent=0):
    return run_stack_cached(stack, x, ids, mask, starts, recall=recall, recent=recent)


CONFIGS = [RecallConfig(budget=2), RecallConfig(budget=1, score="max"), RecallConfig(budget=3, every="sentence"),
           RecallConfig(budget=2, every="sentence", score="max"), RecallConfig(budget=2, score="peak"),
           RecallConfig(budget=2, score="peak", pool="running"),
           RecallConfig(budget=1, every="sentence", pool="running"), RecallConfig(budget=2, every="prompt", score="peak"),
           RecallConfig(budget=1, every="prompt", pool="running"), RecallConfig(budget=2, index="tokens"),
           RecallConfig(budget=1, score="max", index="tokens"),
           RecallConfig(budget=2, every="prompt", score="peak", index="tokens"),
           RecallConfig(budget=2, every="sentence", score="peak", pool="running", index="tokens"),
           RecallConfig(budget=1, every="prompt", score="peak", index="tokens", pool="layers", layers=(1,)),
           RecallConfig(budget=2, pool="layers", layers=(0, 2)),
           RecallConfig(budget=1, every="prompt", score="peak", question=True),
           RecallConfig(budget=2, every="prompt", score="peak", index="tokens", pool="layers", layers=(0, 2),
                        question=True)]


def _recall_id(r):
    return f"{r.budget}-{r.every}-{r.score}-{r.pool}{r.layers or ''}-{r.index}{'-question' if r.question else ''}"


@pytest.mark.parametrize("recall", CONFIGS, ids=_recall_id)
@pytest.mark.parametrize("chunk", [1, 6, 32])
def test_recall_cache_matches_the_dense_oracle(recall, chunk):
    B, T, prefill = 3, 72, 48
    ids, mask = token_stream(B, T, "random", left_pad=(0, 4, 9), anchor_every=6, seed=chunk)
    x = torch.randn(B, T, WIDTH, generator=torch.Generator().manual_seed(1))
    stack = RecallStack()
    starts = forward_starts(T, prefill, chunk)
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    with torch.no_grad():
        expected = stack.dense_pass(x, layout, starts, recall)
        without = stack.dense_pass(x, layout, starts, None)
    got, cache = run_cached(stack, x, ids, mask, starts, recall)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=5e-5, rtol=1e-5)
    if recall.every == "prompt" and chunk == 1:  # one-token forwards only: the first chose, from an empty store
        torch.testing.assert_close(got[valid], without[valid], atol=5e-5, rtol=1e-5)
        return
    assert (got[valid] - without[valid]).abs().max() > 1e-2  # recall changed the output
    # the hot cache is what it is without recall; the evicted real tokens are all cold
    assert cache.lengths() == run_cached(stack, x, ids, mask, starts, None)[1].lengths()
    evicted = (valid.sum(1) - torch.tensor(cache.lengths())).tolist()
    stats = cache.stats()
    assert stats["cold_slots"] == evicted and stats["cold_kv_bytes"] > 0
    assert 0 < max(stats["recalled_slots"]) and stats["hot_kv_bytes"] > stats["kv_bytes"]


@pytest.mark.parametrize("recall", [CONFIGS[i] for i in (0, 4, 6, 7, 9, 14, 15, 16)], ids=_recall_id)
@pytest.mark.parametrize("chunk", [1, 6])
def test_recall_with_recent_sentences_matches_the_dense_oracle(recall, chunk):
    """A cache keeping the last 2 sentences hot and recalling among the ones before (AnchorCache(recent=2,
    recall=...)): the oracle's hot mask is the widened one, its candidates the segments the window has left."""
    B, T, prefill = 3, 72, 48
    ids, mask = token_stream(B, T, "random", left_pad=(0, 4, 9), anchor_every=5, seed=chunk + 20)
    x = torch.randn(B, T, WIDTH, generator=torch.Generator().manual_seed(1))
    stack = RecallStack()
    starts = forward_starts(T, prefill, chunk)
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    with torch.no_grad():
        expected = stack.dense_pass(x, layout, starts, recall, recent=2)
        without = stack.dense_pass(x, layout, starts, None, recent=2)
    got, cache = run_cached(stack, x, ids, mask, starts, recall, recent=2)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=5e-5, rtol=1e-5)
    if not (recall.every == "prompt" and chunk == 1):  # one-token forwards only: the first chose from an empty store
        assert (got[valid] - without[valid]).abs().max() > 1e-2  # recall changed the output
    # hot: what the cache keeps with the window alone; cold: every other real token
    assert cache.lengths() == run_cached(stack, x, ids, mask, starts, None, recent=2)[1].lengths()
    assert cache.stats()["cold_slots"] == (valid.sum(1) - torch.tensor(cache.lengths())).tolist()


def test_recall_of_a_decode_step_equals_recall_alone():
    """Rows of a batch choose independently: a left-padded batch equals each row run alone."""
    recall = RecallConfig(budget=2)
    ids, mask = token_stream(2, 40, "random", left_pad=(0, 7), anchor_every=5, seed=3)
    x = torch.randn(2, 40, WIDTH, generator=torch.Generator().manual_seed(2))
    stack = RecallStack(seed=1)
    starts = forward_starts(40, 24, 8)
    both, _ = run_cached(stack, x, ids, mask, starts, recall)
    for b in range(2):
        alone, _ = run_cached(stack, x[b : b + 1], ids[b : b + 1], mask[b : b + 1], starts, recall)
        keep = mask[b].bool()
        torch.testing.assert_close(both[b][keep], alone[0][keep], atol=2e-5, rtol=1e-5)


def test_question_recall_reaches_decoding_only():
    """question=True: the prompt's forwards see what they see without it; the decode steps also see the segments
    the prompt's last forward closed (row by row, left padding included)."""
    B, T, prefill = 3, 60, 48
    ids, mask = token_stream(B, T, "random", left_pad=(0, 4, 9), anchor_every=6, seed=5)
    x = torch.randn(B, T, WIDTH, generator=torch.Generator().manual_seed(3))
    starts = forward_starts(T, prefill, 16)
    plain = RecallConfig(budget=1, every="prompt", score="peak")
    with_question = RecallConfig(budget=1, every="prompt", score="peak", question=True)
    got, cache = run_cached(RecallStack(), x, ids, mask, starts, with_question)
    before, _ = run_cached(RecallStack(), x, ids, mask, starts, plain)
    valid = mask.bool()
    torch.testing.assert_close(got[:, :prefill][valid[:, :prefill]], before[:, :prefill][valid[:, :prefill]])
    assert (got[:, prefill:] - before[:, prefill:]).abs().max() > 1e-2
    layout = anllm_ext.token_layout(ids, [ANCHOR], mask)
    words = layout.valid & ~layout.is_anchor
    for b in range(B):  # every layer's decode choice holds each segment with words the last prompt forward closed
        last = {s for s in layout.segments[b, 32:prefill][layout.is_anchor[b, 32:prefill]].tolist()
                if (words[b] & (layout.segments[b] == s)).any()}
        assert last and all(last <= set(c[b].tolist()) for c in cache.recall.chosen.values())


def test_without_recall_the_cache_keeps_no_cold_figures():
    cache = AnchorCache(initial_capacity=8)
    assert cache.recall is None and "cold_kv_bytes" not in cache.stats()


@pytest.mark.parametrize("bad, message", [
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(budget=2.0), "budget must be an integer >= 1"),
    (dict(every="chunk"), "every must be one of"),
    (dict(question=True), "question=True goes with every='prompt'"),
    (dict(every="prompt", question=1), "question must be True or False"),
    (dict(score="sum"), "score must be one of"),
    (dict(pool="all"), "pool must be one of"),
    (dict(index="keys"), "index must be one of"),
    (dict(pool="layers"), "layers goes with pool='layers'"),
    (dict(layers=(1,)), "layers goes with pool='layers'"),
    (dict(pool="layers", layers=()), "non-empty list of layer indices"),
    (dict(pool="layers", layers=(-1,)), "non-empty list of layer indices"),
])
def test_recall_config_rejects_bad_settings(bad, message):
    with pytest.raises(ValueError, match=message):
        RecallConfig(**bad)


def test_recall_layers_must_exist_in_the_model():
    with pytest.raises(ValueError, match=r"name a layer the model does not have \(it has 2"):
        AnchorCache(tiny_model("llama").config, recall=RecallConfig(pool="layers", layers=(1, 2)))
    AnchorCache(tiny_model("llama").config, recall=RecallConfig(pool="layers", layers=(1,)))


def test_recall_needs_a_compacting_cache_and_a_recall_config():
    with pytest.raises(ValueError, match="recall needs compact=True"):
        AnchorCache(compact=False, recall=RecallConfig())
    with pytest.raises(TypeError, match="recall must be an anllm_ext.RecallConfig"):
        AnchorCache(recall={"budget": 2})


# ------------------------------------------------------------------ a transformers model through the patch

def dense_recall_logits(model, ids, mask, starts, recall, anchors=(MODEL_ANCHOR,), sink=0):
    """The unpatched model, one pass, its attention replaced by the dense recall oracle (an attention sink of
    ``sink`` tokens in its layout)."""
    carry = {}

    def attention(module, query, key, value, layout, scaling):
        if module.layer_idx == 0:
            carry.clear()
        return recall_attention_ref(query, key, value, layout, starts, recall.budget, recall.every, recall.score,
                                    scale=scaling, pool=recall.pool, carry=carry, index=recall.index,
                                    layer=module.layer_idx, layers=recall.layers or (), question=recall.question)

    return dense_oracle_logits(model, ids, mask, "anllm_recall_ref", attention, anchors, sink)


def cached_recall_logits(model, ids, mask, starts, recall):
    return cached_model_logits(model, ids, mask, starts, recall=recall)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("recall", [RecallConfig(budget=2), RecallConfig(budget=2, every="sentence", score="peak"),
                                    RecallConfig(budget=2, score="peak", pool="running"),
                                    RecallConfig(budget=2, every="prompt", score="peak"),
                                    RecallConfig(budget=2, every="prompt", score="peak", index="tokens"),
                                    RecallConfig(budget=2, every="prompt", score="peak", index="tokens",
                                                 pool="layers", layers=(1,)),
                                    RecallConfig(budget=1, every="prompt", score="peak", index="tokens",
                                                 question=True)],
                         ids=_recall_id)
def test_patched_model_with_recall_matches_the_dense_oracle(family, recall):
    base = tiny_model(family)
    reference = copy.deepcopy(base)
    model = patch(base, MODEL_ANCHOR)
    ids, mask = model_stream(3, 56, seed=4, left_pad=(0, 3, 8))
    starts = forward_starts(56, 40, 9)
    got, cache = cached_recall_logits(model, ids, mask, starts, recall)
    want = dense_recall_logits(reference, ids, mask, starts, recall)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-5, rtol=1e-5)
    plain, _ = cached_recall_logits(model, ids, mask, starts, None)
    assert (got[keep] - plain[keep]).abs().max() > 1e-3  # recall changed the logits
    assert sum(cache.stats()["cold_slots"]) > 0


@needs_smollm2
@pytest.mark.parametrize("recall", [RecallConfig(budget=2),
                                    RecallConfig(budget=1, every="prompt", score="peak", index="tokens", question=True)],
                         ids=_recall_id)
def test_bundled_anllm_with_recall_matches_the_dense_oracle(recall):
    """The bundled AnLLM (smollm2-anllm): a held-out paragraph with a needle sentence, a question, chunked prefill
    and three decode steps through the cache with recall, against the dense oracle; batch of one (the tiny
    models cover batches and padding)."""
    from anllm_ext.models import load_model

    torch.set_num_threads(2)
    base, tok = load_model("smollm2-anllm")
    reference = copy.deepcopy(base)
    model = patch(base)
    text = (TEXT + " The secret code of the Harbor archive is 4821. " + TEXT +
            "\n\nWhat is the secret code of the Harbor archive? It is")
    ids = tok(text, return_tensors="pt")["input_ids"][:, :150]
    mask = torch.ones_like(ids)
    starts = forward_starts(ids.shape[1], ids.shape[1] - 3, 64)
    got, cache = cached_recall_logits(model, ids, mask, starts, recall)
    want = dense_recall_logits(reference, ids, mask, starts, recall, anchors=patched_anchor_ids(model),
                               sink=patched_sink(model))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # logits are O(10)
    plain, _ = cached_recall_logits(model, ids, mask, starts, None)
    assert (got - plain).abs().max() > 1e-2
    assert cache.stats()["hot_fraction"] < 0.6


def test_generate_with_recall_cuts_the_prompt_from_the_end():
    """With recall, anllm_ext.generate cuts the prompt's chunks from the end: the forward that chooses for the
    answer (every="prompt") holds the prompt's last prefill_chunk tokens, not the remainder of a division."""
    model = patch(tiny_model("llama"), MODEL_ANCHOR)
    ids, mask = model_stream(1, 23, seed=1)
    sizes = []
    for recall in (RecallConfig(every="prompt"), None):
        cache = AnchorCache(model.config, recall=recall)
        cache.callbacks.append(lambda c, n: sizes.append(n))
        anllm_ext.generate(model, ids, mask, prefill_chunk=5, max_new_tokens=3, cache=cache)
        sizes.append("|")
    # 22 prompt columns in chunks of 5, then the last prompt column and two decode steps; without recall
    # transformers' own chunked prefill of the 23 (short chunk last), then two decode steps
    assert sizes == [2, 5, 5, 5, 5, 1, 1, 1, "|", 5, 5, 5, 5, 3, 1, 1, "|"]
