"""Greedy generation through vLLM with the plugin equals anllm_ext.generate (transformers + AnchorCache) on
the bundled AnLLM, token for token, with the same logprobs, for prompts of many lengths submitted together
(continuous batching and chunked prefill mix them). Reference and engine run in this virtualenv (one
transformers, the same exported weights), so the comparison needs no stored results."""
import pytest
import torch

from vllm_helpers import ENGINE_ARGS, reference, shutdown

MAX_NEW = 12
CHUNK = 256  # vLLM's token budget per step: long prompts are prefilled in chunks, beside other requests' decodes


@pytest.fixture(scope="module")
def tokenizer(anllm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(anllm_dir), local_files_only=True)


@pytest.fixture(scope="module")
def prompt_ids(prompts, tokenizer):
    return [tokenizer(p)["input_ids"] for p in prompts]


@pytest.fixture(scope="module")
def vllm_outputs(anllm_dir, prompt_ids):
    """(token ids, logprobs of those tokens) per prompt, all prompts submitted at once."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(anllm_dir), max_num_batched_tokens=CHUNK, max_num_seqs=8, **ENGINE_ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]))
    shutdown(llm)
    return result


def test_prompts_cover_many_lengths_and_sentences(prompt_ids):
    lengths = sorted(len(i) for i in prompt_ids)
    assert len(prompt_ids) >= 20 and lengths[0] < 32 and lengths[-1] > 1400, lengths
    assert len(set(lengths)) >= 20


def test_greedy_tokens_and_logprobs_equal_anllm_generate(anllm_dir, prompt_ids, vllm_outputs):
    expected = reference(anllm_dir, prompt_ids, anchors=True, max_new=MAX_NEW)
    for i, ((ids, lps), (ref_ids, ref_lps)) in enumerate(zip(vllm_outputs, expected)):
        assert ids == ref_ids, f"prompt {i} ({len(prompt_ids[i])} tokens): vLLM {ids} != anllm_ext.generate {ref_ids}"
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-3, rtol=0,
                                   msg=lambda m: f"prompt {i}: logprobs differ: {m}")


def test_anchor_attention_is_what_runs(anllm_dir, prompt_ids, vllm_outputs):
    """The same weights under full (causal) attention give other logprobs: the engine ran the AnSAN mask."""
    longest = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))[:3]
    full = reference(anllm_dir, [prompt_ids[i] for i in longest], anchors=False, max_new=1)
    gaps = [abs(vllm_outputs[i][1][0] - f[1][0]) for i, f in zip(longest, full)]
    assert max(gaps) > 1e-2, gaps
