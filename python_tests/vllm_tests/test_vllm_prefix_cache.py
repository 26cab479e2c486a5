"""Prefix caching with compaction: a shared system prompt is prefilled and compacted once; a later request
that starts with it takes the cached blocks of its anchors (vLLM's ``num_cached_tokens`` says how many of its
tokens they stand for) and computes only the rest, and every request's tokens stay anllm_ext.generate's.
A request whose prompt differs inside an anchor block reuses only the blocks before it.

The engine runs in a process of its own (engine_probe.py), each request added once the ones before have
computed their prompts (a block is cached after the step that computed it; they still decode, so the reused
blocks are shared by running requests), with 32-slot blocks so a ~1,600-token system prompt fills two
blocks with anchors."""

from anllm_ext.vllm.compaction import KeepRule
from engine_probe import probe
from vllm_helpers import assert_holds_its_kept_blocks, expected_cached, reference, sentences

MAX_NEW = 8
B = 32
ENGINE = dict(block_size=B, max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=4,
              num_gpu_blocks_override=200, enable_prefix_caching=True)


def test_second_request_reuses_the_compacted_system_prompt(anllm_dir, tokenizer, anchor_ids):
    sents = sentences()
    system = tokenizer(" ".join(sents[k] for k in range(60)))["input_ids"]
    rule = KeepRule(anchor_ids)
    ends = rule.anchor_block_ends(system, B)
    assert len(ends) >= 2, (len(system), ends)  # two blocks full of anchors: a chain of two hashes
    tail_a, tail_b = (tokenizer(" " + " ".join(sents[200 + 3 * i + k] for k in range(3)))["input_ids"] for i in (0, 1))
    # a token changed between the first and the second anchor block's last anchors: only the first is reusable
    edited = list(system)
    p = next(i for i in range(int(ends[0]) + 2, int(ends[1]) - 1) if edited[i] not in anchor_ids)
    edited[p] = next(t for t in range(edited[p] + 1, edited[p] + 100) if t not in anchor_ids)
    prompts = [system + tail_a, system + tail_b, edited + tail_a]
    report = probe(anllm_dir, prompts, MAX_NEW, staggered=True, **ENGINE)
    assert report["prefix_caching"] is True and report["block_size"] == B
    assert max(s["running"] for s in report["steps"]) == 3  # the reused blocks were shared by running requests

    expected = [0, expected_cached(prompts[0], prompts[1], rule, B), expected_cached(prompts[0], prompts[2], rule, B)]
    assert expected[1] >= ends[1] and expected[2] == ends[0], (expected, ends)
    assert report["cached"] == expected, (report["cached"], expected)

    # a request holding reused blocks still holds exactly its kept slots' blocks (+ the new tokens' while a step runs)
    assert_holds_its_kept_blocks(report, prompts, rule)
    want = reference(anllm_dir, prompts, anchors=True, max_new=MAX_NEW)
    for i, (got, (ids, _)) in enumerate(zip(report["outputs"], want)):
        assert got == ids, f"prompt {i}: vLLM {got} != anllm_ext.generate {ids}"
