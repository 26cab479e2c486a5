"""Compaction in vLLM's paged KV cache: after every step an AnLLM request holds exactly the blocks of its kept
slots (anchors + open segment), the rest go back to vLLM's block pool, so a fixed small pool runs more
requests at once than plain vLLM with the same weights, and the tokens stay those of anllm_ext.generate.

The engines run in a process of their own (engine_probe.py) with a pool of a few 128-slot blocks
(``num_gpu_blocks_override``), so the scheduler's bookkeeping can be read after every step."""
import numpy as np
import pytest

from anllm_ext.vllm.compaction import num_kept
from conftest import sentences
from engine_probe import probe
from vllm_helpers import reference

MAX_NEW = 8
SMALL_POOL = dict(max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=16, num_gpu_blocks_override=13)


@pytest.fixture(scope="module")
def tokenizer(anllm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(anllm_dir), local_files_only=True)


@pytest.fixture(scope="module")
def anchor_ids(anllm_dir):
    from anllm_ext.config import AnchorConfig

    return np.asarray(AnchorConfig.find_pretrained(anllm_dir).anchor_ids)


@pytest.fixture(scope="module")
def long_prompts(tokenizer):
    """12 prompts of ~600 tokens (24 sentences each, different ones)."""
    sents = sentences()
    return [tokenizer(" ".join(sents[(17 * i + k) % len(sents)] for k in range(24)))["input_ids"] for i in range(12)]


def _assert_equal_to_generate(anllm_dir, prompt_ids, outputs):
    """The first MAX_NEW tokens of each output are anllm_ext.generate's greedy tokens."""
    expected = reference(anllm_dir, prompt_ids, anchors=True, max_new=MAX_NEW)
    for i, (got, (want, _)) in enumerate(zip(outputs, expected)):
        assert got[: len(want)] == want, f"prompt {i} ({len(prompt_ids[i])} tokens): vLLM {got} != anllm_ext.generate {want}"


def test_blocks_held_are_those_of_the_kept_slots(anllm_dir, long_prompts, anchor_ids):
    prompt = sum(long_prompts[:2], [])[:1000]  # one request, prefilled in 4 chunks, then decoded
    report = probe(anllm_dir, [prompt], MAX_NEW, **SMALL_POOL)
    assert report["scheduler"] == "AnchorScheduler"
    B = report["block_size"]
    tokens = prompt + report["outputs"][0]
    held = report["held"][0]
    assert len(held) >= 4 + MAX_NEW - 2, held  # the last step finishes the request (no longer held)
    for n, blocks in held:
        assert blocks == -(-num_kept(tokens[:n], anchor_ids) // B), (n, blocks, held)
    n_last, blocks_last = held[-1]
    assert blocks_last < -(-n_last // B) / 3, held  # far fewer than a full cache's blocks
    assert max(s["blocks"] for s in report["steps"]) <= -(-(num_kept(prompt, anchor_ids) + 256) // B) + 1
    _assert_equal_to_generate(anllm_dir, [prompt], report["outputs"])


def test_small_pool_runs_more_requests_than_plain_vllm(anllm_dir, plain_dir, long_prompts):
    # 32 new tokens: requests live long enough (3 prefill steps + 31 decode steps) for memory, not the
    # 256-token step budget, to limit how many run at once
    anllm = probe(anllm_dir, long_prompts, 32, **SMALL_POOL)
    plain = probe(plain_dir, long_prompts, 32, **SMALL_POOL)
    peak_anllm = max(s["running"] for s in anllm["steps"])
    peak_plain = max(s["running"] for s in plain["steps"])
    assert plain["scheduler"] == "Scheduler" and peak_plain <= 2, peak_plain  # 12 blocks hold two ~600-token prompts
    assert peak_anllm >= 3 * peak_plain, (peak_anllm, peak_plain)
    assert len(anllm["steps"]) < len(plain["steps"]), (len(anllm["steps"]), len(plain["steps"]))
    _assert_equal_to_generate(anllm_dir, long_prompts, anllm["outputs"])


def test_prefix_caching_requested_is_safe(anllm_dir, long_prompts):
    """With prefix caching asked for, two requests sharing a long system prompt still get
    anllm_ext.generate's tokens: the scheduler keeps caching off for an AnLLM (compacted blocks do not hold
    the tokens their hashes name), so nothing is reused, rightly or wrongly."""
    system = long_prompts[0][:400]
    prompts = [system + long_prompts[1][:40], system + long_prompts[2][:60]]
    report = probe(anllm_dir, prompts, MAX_NEW, enable_prefix_caching=True, **SMALL_POOL)
    assert report["prefix_caching"] is False
    _assert_equal_to_generate(anllm_dir, prompts, report["outputs"])
