"""Compaction in vLLM's paged KV cache: after every step an AnLLM request holds exactly the blocks of its kept
slots (anchors + open segment), the rest go back to vLLM's block pool, so a fixed small pool runs more
requests at once than plain vLLM with the same weights, and the tokens stay those of anllm_ext.generate.

The engines run in a process of their own (engine_probe.py) with a pool of a few 128-slot blocks
(``num_gpu_blocks_override``), so the scheduler's bookkeeping can be read after every step. The kept-slot rule
itself (with recent sentences kept too, and with an attention sink) is unit-tested at the end, with numpy and
torch only."""
import numpy as np
import pytest

from anllm_ext.vllm.compaction import KeepRule
from engine_probe import probe
from vllm_helpers import blocks_for, reference, sentences

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
            assert blocks == blocks_for(KeepRule(anchor_ids), tokens[:n], B), (n, blocks, held)
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
    runs (empty sentences), none, all; streams shorter than a sink, and anchor ids inside it."""
    rng = np.random.default_rng(0)
    fixed = ([3, 1, 2], [1, 2, 7], [1, 2], [3, 7, 3], [1, 3, 7, 7, 2, 3, 5], [7], [1, 1, 1, 1, 3])
    return [rng.integers(0, 10, size=n) for n in (1, 2, 3, 4, 5, 9, 40, 300)] + [np.array(ids) for ids in fixed]


def _oracle_layout(ids, sink):
    """The brute-force layout (token by token) of one stream."""
    import torch

    from anllm_ext.reference import token_layout_ref

    return token_layout_ref(torch.from_numpy(np.asarray(ids))[None], STREAMS_ANCHORS, sink=sink)


@pytest.mark.parametrize("sink", [0, 1, 2, 4])
@pytest.mark.parametrize("recent", [0, 1, 2, 5])
def test_kept_slots_rule_is_anchor_caches(recent, sink):
    """kept_indices / num_kept / peak_kept / anchor_positions against AnchorCache's rule over the brute-force
    layout (valid & (anchor | segment >= open segment - recent), an anchor: an anchor id or a position below the
    sink) and against the mask: the kept slots are exactly the keys that the next non-anchor token may read
    under ``ansan_mask(..., recent)`` (what any later token may read is a subset)."""
    from anllm_ext.reference import ansan_mask

    rule = KeepRule(STREAMS_ANCHORS, recent, sink)
    for ids in _streams():
        layout = _oracle_layout(ids, sink)
        open_segment = layout.is_anchor.sum()
        expected = (layout.is_anchor | (layout.segments >= open_segment - recent))[0].nonzero().flatten().numpy()
        assert rule.anchor_positions(ids).tolist() == layout.is_anchor[0].nonzero().flatten().tolist(), ids
        assert rule.kept_indices(ids).tolist() == expected.tolist(), ids
        assert rule.num_kept(ids) == len(expected)
        assert rule.peak_kept(ids) == max(rule.num_kept(ids[:n]) for n in range(len(ids) + 1))
        if len(ids) < sink:  # every token is a sink token: all kept
            assert rule.kept_indices(ids).tolist() == list(range(len(ids)))
            continue
        following = _oracle_layout(np.append(ids, 0), sink)  # one more token, past the sink: no anchor
        readable = ansan_mask(following, following, recent)[0, -1, :-1].nonzero().flatten()
        assert rule.kept_indices(ids).tolist() == readable.tolist(), ids


def test_kept_slots_rule_defaults_and_empty_stream():
    """No sink and no recent sentences by default (the plain anchor cache); an empty stream keeps nothing."""
    ids = _streams()[7]
    default, explicit = KeepRule(STREAMS_ANCHORS), KeepRule(STREAMS_ANCHORS, recent=0, sink=0)
    assert default.kept_indices(ids).tolist() == explicit.kept_indices(ids).tolist()
    assert default.num_kept(ids) == explicit.num_kept(ids) and default.peak_kept(ids) == explicit.peak_kept(ids)
    for rule in (default, KeepRule(STREAMS_ANCHORS, recent=2, sink=3)):
        assert rule.kept_indices([]).tolist() == [] and rule.num_kept([]) == 0 and rule.peak_kept([]) == 0
        assert rule.anchor_block_ends([], 2).tolist() == []


@pytest.mark.parametrize("sink", [0, 1, 3])
@pytest.mark.parametrize("block_size", [1, 2, 5])
def test_anchor_blocks_are_functions_of_the_tokens_they_summarise(sink, block_size):
    """anchor_block_ends: one past every ``block_size``-th anchor of the brute-force layout (sink included);
    a prefix of the stream has the blocks that end inside it, and the layout of the tokens a block summarises
    is the same in every stream that starts with them (what makes a cached anchor block reusable)."""
    rule = KeepRule(STREAMS_ANCHORS, sink=sink)
    rng = np.random.default_rng(block_size)
    for ids in _streams():
        layout = _oracle_layout(ids, sink)
        ends = rule.anchor_block_ends(ids, block_size)
        assert ends.tolist() == (layout.is_anchor[0].nonzero().flatten()[block_size - 1::block_size] + 1).tolist()
        for n in range(len(ids) + 1):
            assert rule.anchor_block_ends(ids[:n], block_size).tolist() == ends[ends <= n].tolist()
        for end in ends.tolist():
            other = np.concatenate([ids[:end], rng.integers(0, 10, size=5)])
            again = _oracle_layout(other, sink)
            assert all(a[0, :end].tolist() == b[0, :end].tolist()
                       for a, b in zip(layout.as_tuple(), again.as_tuple()))


@pytest.mark.parametrize("sink", [0, 1, 3])
@pytest.mark.parametrize("recent", [0, 1, 3])
def test_kept_slots_are_those_an_anchor_cache_keeps_chunk_by_chunk(recent, sink):
    """An AnchorCache(recent=...) fed a stream in random chunks (what vLLM's steps are), laid out with the sink,
    keeps, after every chunk, the tokens kept_indices names, in that order."""
    import torch

    from anllm_ext import AnchorCache, token_layout

    rule = KeepRule(STREAMS_ANCHORS, recent, sink)
    rng = np.random.default_rng(10 * recent + sink)
    for ids in _streams():
        cache, a = AnchorCache(initial_capacity=8, recent=recent), 0
        while a < len(ids):
            e = min(len(ids), a + int(rng.integers(1, 24)))
            chunk = token_layout(torch.from_numpy(ids[a:e])[None], STREAMS_ANCHORS, start=cache.next_start(), sink=sink)
            cache.begin_forward(chunk)
            cache.end_forward(chunk)  # no layers: the slot layout alone is compacted
            assert cache.kept_layout(0).positions[0].tolist() == rule.kept_indices(ids[:e]).tolist()
            a = e


def test_kept_slots_rule_rejects_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        KeepRule(STREAMS_ANCHORS).kept_indices(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="recent must be an integer >= 0"):
        KeepRule(STREAMS_ANCHORS, -1)
    with pytest.raises(TypeError, match="recent must be an integer"):
        KeepRule(STREAMS_ANCHORS, 1.5)
    for sink in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="sink must be an int >= 0"):
            KeepRule(STREAMS_ANCHORS, sink=sink)
    with pytest.raises(ValueError, match="block_size must be positive"):
        KeepRule(STREAMS_ANCHORS).anchor_block_ends([1, 3], 0)
