"""Compaction in vLLM's paged KV cache: after every step an AnLLM request holds exactly the blocks of its kept
slots (anchors + open segment), the rest go back to vLLM's block pool, so a fixed small pool runs more
requests at once than plain vLLM with the same weights, and the tokens stay those of anllm_ext.generate.

The engines run in a process of their own (engine_probe.py) with a pool of a few 128-slot blocks
(``num_gpu_blocks_override``), so the scheduler's bookkeeping can be read after every step. The kept-slot rule
itself (with recent sentences kept too) is unit-tested at the end, with numpy and torch only."""
import numpy as np
import pytest

from anllm_ext.vllm.compaction import num_kept
from engine_probe import probe
from vllm_helpers import reference, sentences

MAX_NEW = 8
# a pool of 12 usable 128-slot blocks (+ vLLM's null block); max_model_len must fit in it
POOL = dict(max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=16, num_gpu_blocks_override=13)


@pytest.fixture(scope="module")
def prompts_of(tokenizer):
    """``prompts_of(count, sentences)``: distinct prompts of that many sentences each."""
    sents = sentences()

    def make(count, n):
        return [tokenizer(" ".join(sents[(17 * i + k) % len(sents)] for k in range(n)))["input_ids"]
                for i in range(count)]

    return make


def _assert_equal_to_generate(anllm_dir, prompt_ids, outputs):
    """The first MAX_NEW tokens of each output are anllm_ext.generate's greedy tokens."""
    expected = reference(anllm_dir, prompt_ids, anchors=True, max_new=MAX_NEW)
    for i, (got, (want, _)) in enumerate(zip(outputs, expected)):
        assert got[: len(want)] == want, f"prompt {i} ({len(prompt_ids[i])} tokens): vLLM {got} != anllm_ext.generate {want}"


def test_blocks_held_are_those_of_the_kept_slots(anllm_dir, prompts_of, anchor_ids):
    """Two requests sharing a ~600-token system prompt, each prefilled in chunks beside the other's steps,
    then decoded: after every step each holds the blocks of its kept slots, no more, no fewer. Prefix
    caching is on (vLLM's default; it reuses blocks full of anchors only, none here: ~24 anchors in 128-slot
    blocks; reuse: test_vllm_prefix_cache.py), and the tokens are anllm_ext.generate's."""
    system, a, b = prompts_of(3, 24)
    prompts = [system + a[:40], system + b[:60]]
    report = probe(anllm_dir, prompts, MAX_NEW, enable_prefix_caching=True, **POOL)
    assert report["scheduler"] == "AnchorScheduler" and report["prefix_caching"] is True
    B = report["block_size"]
    for prompt, output, held in zip(prompts, report["outputs"], report["held"]):
        tokens = prompt + output
        assert len(held) >= 3 + MAX_NEW - 2, held  # the last step finishes the request (no longer held)
        for n, blocks in held:
            assert blocks == -(-num_kept(tokens[:n], anchor_ids) // B), (n, blocks, held)
        n_last, blocks_last = held[-1]
        assert blocks_last <= -(-n_last // B) / 3, held  # far fewer than a full cache's blocks
    _assert_equal_to_generate(anllm_dir, prompts, report["outputs"])


def test_small_pool_runs_more_requests_than_plain_vllm(anllm_dir, plain_dir, prompts_of):
    """8 prompts of ~300 tokens, 24 new tokens each, 8 usable blocks: plain vLLM (same weights, no anchor
    configuration) runs two at a time, the AnLLM several times more (its requests shrink to one block once
    prefilled), in fewer steps. (Its tokens under this churn: test_vllm_exact.py, where all 20 requests
    compact while others prefill and decode.)"""
    prompts = prompts_of(8, 12)
    pool = dict(max_model_len=512, max_num_batched_tokens=128, max_num_seqs=16, num_gpu_blocks_override=9)
    anllm = probe(anllm_dir, prompts, 24, **pool)
    plain = probe(plain_dir, prompts, 24, **pool)
    peak_anllm = max(s["running"] for s in anllm["steps"])
    peak_plain = max(s["running"] for s in plain["steps"])
    assert plain["scheduler"] == "Scheduler" and peak_plain == 2, peak_plain
    assert peak_anllm >= 3 * peak_plain, (peak_anllm, peak_plain)
    assert len(anllm["steps"]) < len(plain["steps"]), (len(anllm["steps"]), len(plain["steps"]))


def test_preempted_request_recomputes_to_the_same_tokens(anllm_dir, tokenizer, anchor_ids):
    """Two requests of three sentences (compacted to their anchors) then a count ("1, 2, 3, ...": no anchor,
    so the open segment grows as they decode) in a pool of 3 blocks: the second is preempted when both need
    a second block, its blocks are freed, it is recomputed from token 0 later, and both generate
    anllm_ext.generate's tokens."""
    prompts = [tokenizer("We count. We count again. Here it goes. " + ", ".join(str(i) for i in range(s, s + n)) + ",")
               ["input_ids"] for s, n in ((1, 28), (301, 22))]
    assert all(np.isin(p, anchor_ids).sum() == 3 for p in prompts)
    report = probe(anllm_dir, prompts, 40, max_model_len=256, max_num_batched_tokens=128, max_num_seqs=4,
                   num_gpu_blocks_override=4)
    assert report["preempted"] == ["r1"], report["preempted"]
    expected = reference(anllm_dir, prompts, anchors=True, max_new=40)
    assert report["outputs"] == [want for want, _ in expected]


STREAMS_ANCHORS = np.array([3, 7])


def _streams():
    """Random streams of token ids 0..9 (anchors 3 and 7: ~1 token in 5), anchors at the start, at the end, in
    runs (empty sentences), none, all."""
    rng = np.random.default_rng(0)
    fixed = ([3, 1, 2], [1, 2, 7], [1, 2], [3, 7, 3], [1, 3, 7, 7, 2, 3, 5])
    return [rng.integers(0, 10, size=n) for n in (1, 2, 5, 40, 300)] + [np.array(ids) for ids in fixed]


@pytest.mark.parametrize("recent", [0, 1, 2, 5])
def test_kept_slots_rule_is_anchor_caches(recent):
    """kept_indices / num_kept / peak_kept against AnchorCache's rule (valid & (anchor | segment >= open segment
    - recent)) and against the mask: the kept slots are exactly the keys that the next non-anchor token may
    read under ``ansan_mask(..., recent)`` (what any later token may read is a subset)."""
    import torch

    from anllm_ext import token_layout
    from anllm_ext.reference import ansan_mask
    from anllm_ext.vllm.compaction import kept_indices, peak_kept

    anchors = STREAMS_ANCHORS
    for ids in _streams():
        layout = token_layout(torch.from_numpy(ids)[None], anchors)
        open_segment = layout.is_anchor.sum()
        expected = (layout.is_anchor | (layout.segments >= open_segment - recent))[0].nonzero().flatten().numpy()
        assert kept_indices(ids, anchors, recent).tolist() == expected.tolist(), ids
        assert num_kept(ids, anchors, recent) == len(expected)
        assert peak_kept(ids, anchors, recent) == max(num_kept(ids[:n], anchors, recent) for n in range(len(ids) + 1))
        following = token_layout(torch.from_numpy(np.append(ids, 0))[None], anchors)  # one more, non-anchor token
        readable = ansan_mask(following, following, recent)[0, -1, :-1].nonzero().flatten()
        assert kept_indices(ids, anchors, recent).tolist() == readable.tolist(), ids
    if recent == 0:  # the default is the rule without recent sentences
        ids = _streams()[4]
        assert kept_indices(ids, anchors).tolist() == kept_indices(ids, anchors, 0).tolist()
        assert num_kept(ids, anchors) == num_kept(ids, anchors, 0)
        assert peak_kept(ids, anchors) == peak_kept(ids, anchors, 0)


@pytest.mark.parametrize("recent", [0, 1, 3])
def test_kept_slots_are_those_an_anchor_cache_keeps_chunk_by_chunk(recent):
    """An AnchorCache(recent=...) fed a stream in random chunks (what vLLM's steps are) keeps, after every chunk,
    the tokens kept_indices names, in that order."""
    import torch

    from anllm_ext import AnchorCache, token_layout
    from anllm_ext.vllm.compaction import kept_indices

    rng = np.random.default_rng(recent)
    for ids in _streams():
        cache, a = AnchorCache(initial_capacity=8, recent=recent), 0
        while a < len(ids):
            e = min(len(ids), a + int(rng.integers(1, 24)))
            chunk = token_layout(torch.from_numpy(ids[a:e])[None], STREAMS_ANCHORS, start=cache.next_start())
            cache.begin_forward(chunk)
            cache.end_forward(chunk)  # no layers: the slot layout alone is compacted
            assert cache.kept_layout(0).positions[0].tolist() == kept_indices(ids[:e], STREAMS_ANCHORS, recent).tolist()
            a = e


def test_kept_slots_rule_rejects_bad_input():
    from anllm_ext.vllm.compaction import kept_indices, peak_kept

    with pytest.raises(ValueError, match="1-D"):
        kept_indices(np.zeros((2, 2), dtype=np.int64), STREAMS_ANCHORS)
    for fn in (kept_indices, num_kept, peak_kept):
        with pytest.raises(ValueError, match="recent must be an integer >= 0"):
            fn([1, 3, 2], STREAMS_ANCHORS, -1)
        with pytest.raises(TypeError, match="recent must be an integer"):
            fn([1, 3, 2], STREAMS_ANCHORS, 1.5)
