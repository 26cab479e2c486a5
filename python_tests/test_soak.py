"""Long run of the AnchorCache, and generate() interrupted mid-decode.

The soak test generates >= 100,000 tokens (``ANLLM_SOAK_TOKENS``; batch x steps) with a tiny Llama
through ``anllm_ext.generate`` and an ``AnchorCache``, anchors forced at a different period in every
row. At checkpoints it checks, from inside the decoding loop (a logits processor sees every step):
- the kept slots are exactly the anchors + the open segment of the whole history (token_layout of all
  tokens so far, computed independently), with their true absolute positions, which keep counting past
  the prompt;
- the last logits equal those of a fresh anchor-cache run over the same tokens;
- the cache's capacity follows its growth policy from the kept slots, and the process's resident
  memory does not grow beyond that.
The real-model version of this run is tools/soak_smollm2.py.
"""
import math
import os

import pytest
import torch

import anllm_ext
from helpers import kept_slots, tiny_causal_lm, token_stream

ANCHOR, PAD, VOCAB = 3, 0, 64
SOAK_TOKENS = int(os.environ.get("ANLLM_SOAK_TOKENS", 100_000))


def tiny_llama(layers=1):
    return tiny_causal_lm(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1 << 20,
                          bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False)


def prompts(B, generator):
    """Left-padded prompts of different lengths (padding in the cache's history from the start)."""
    return token_stream(B, 24, generator=generator, vocab=VOCAB, low=4, anchor=ANCHOR, anchor_p=0.15,
                        left_pad=[b % 7 for b in range(B)])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SoakChecker:
    """A logits processor: forces an anchor every ``periods[b]`` tokens of row b (and no anchor
    otherwise), and at checkpoints checks the cache against the token history it is given."""

    def __init__(self, model, cache, prompt_mask, periods, checkpoints, fresh_checks):
        self.model, self.cache, self.prompt_mask = model, cache, prompt_mask
        self.periods = torch.tensor(periods)
        self.checkpoints, self.fresh_checks = set(checkpoints), set(fresh_checks)
        self.P = prompt_mask.shape[1]
        self.rss, self.capacity, self.checked, self.fresh_done = [], [], 0, 0

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.P  # tokens generated and fed so far
        if step in self.checkpoints:
            self.check(input_ids, scores, step)
        force = (step + 1) % self.periods == 0  # the token chosen now is the anchor of its row
        scores[:, ANCHOR] = float("-inf")
        scores[force] = float("-inf")
        scores[force, ANCHOR] = 0.0
        return scores

    def check(self, input_ids, scores, step):
        B = input_ids.shape[0]
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(B, step)], dim=1)
        lay = anllm_ext.token_layout(input_ids, [ANCHOR], mask)
        want = kept_slots(lay)
        real_prompt = self.prompt_mask.sum(1)
        for b in range(B):
            got = self.cache.kept_layout(b)
            idx = want[b].nonzero().squeeze(1)
            assert torch.equal(got.positions[0], lay.positions[b, idx]), f"row {b} step {step}: kept positions"
            assert torch.equal(got.segments[0], lay.segments[b, idx]), f"row {b} step {step}: kept segments"
            assert torch.equal(got.is_anchor[0], lay.is_anchor[b, idx]), f"row {b} step {step}: kept anchors"
        # positions keep counting past the prompt: the next token of row b is its real token number
        assert self.cache.next_start().position.tolist() == (real_prompt + step).tolist()
        self.capacity.append((step, self.cache.capacity, max(self.cache.lengths())))
        self.rss.append((step, rss_bytes()))
        self.checked += 1
        if step in self.fresh_checks:
            _, fresh = anllm_ext.prefill(self.model, input_ids, mask, prefill_chunk=512)
            torch.testing.assert_close(scores, fresh[:, -1].float(), atol=1e-4, rtol=1e-4)
            self.fresh_done += 1


def test_soak_100k_tokens():
    from transformers import LogitsProcessorList

    from anllm_ext.cache import AnchorCache, _round_up

    B = 32
    steps = math.ceil(SOAK_TOKENS / B)
    g = torch.Generator().manual_seed(0)
    ids, mask = prompts(B, g)
    model = tiny_llama()
    anllm_ext.patch(model, [ANCHOR])
    cache = AnchorCache(model.config, initial_capacity=64)
    periods = [5 + (b * 7) % 13 for b in range(B)]  # 5 .. 17 tokens per segment
    every = max(steps // 40, 1)
    checkpoints = list(range(1, steps, every)) + [steps - 1]
    checker = SoakChecker(model, cache, mask, periods, checkpoints,
                          fresh_checks=[checkpoints[1], checkpoints[len(checkpoints) // 2], checkpoints[-1]])
    out = anllm_ext.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=steps,
                             prefill_chunk=16, logits_processor=LogitsProcessorList([checker]),
                             eos_token_id=None, pad_token_id=PAD)
    generated = out[:, ids.shape[1]:]
    assert generated.numel() >= SOAK_TOKENS
    assert checker.checked == len(set(checkpoints)) and checker.fresh_done == 3
    # every row got its anchors exactly at its period
    for b in range(B):
        where = (generated[b] == ANCHOR).nonzero().squeeze(1)
        assert torch.equal(where, torch.arange(periods[b] - 1, steps, periods[b]))

    # the kept slots at the end: every anchor + the open segment, nothing else (the cache has been fed
    # all generated tokens but the last, which generate() chose and never fed back)
    st = cache.stats()
    fed = steps - 1
    n_prompt_anchors = ((ids == ANCHOR) & (mask == 1)).sum(1)
    for b in range(B):
        assert st["kept_slots"][b] == int(n_prompt_anchors[b]) + fed // periods[b] + fed % periods[b]
    # capacity follows the growth policy from the most slots any row needed (kept + one new token)
    most = max(int(n_prompt_anchors[b]) + fed // periods[b] + periods[b] for b in range(B))
    assert cache.capacity <= max(_round_up(math.ceil(most * cache.growth)), _round_up(ids.shape[1] + 64))
    # resident memory after the warm-up stays within the KV growth plus allocator slack
    (s0, rss0), (s1, rss1) = checker.rss[2], checker.rss[-1]
    kv_growth = (checker.capacity[-1][1] - checker.capacity[2][1]) * B * cache._slot_bytes()
    assert rss1 - rss0 <= kv_growth + (16 << 20), (
        f"resident memory grew by {(rss1 - rss0) / 2**20:.1f} MiB between steps {s0} and {s1}"
        f" (KV capacity growth {kv_growth / 2**20:.2f} MiB)")


# ---------------------------------------------------------------------------------------- interrupts
class Boom(Exception):
    pass


def _reference(model, ids, mask, n):
    return anllm_ext.generate(model, ids, attention_mask=mask, max_new_tokens=n, prefill_chunk=8,
                              eos_token_id=None, pad_token_id=PAD)


@pytest.fixture(scope="module")
def patched_tiny():
    model = tiny_llama(layers=2)
    anllm_ext.patch(model, [ANCHOR])
    g = torch.Generator().manual_seed(1)
    ids, mask = prompts(3, g)
    return model, ids, mask


def test_interrupt_in_stopping_criterion_leaves_cache_usable(patched_tiny):
    """An exception in a stopping criterion (after a committed forward): continuing with the same cache
    gives exactly the tokens of an uninterrupted run."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from anllm_ext.cache import AnchorCache

    model, ids, mask = patched_tiny
    n, stop_at = 40, 17
    ref = _reference(model, ids, mask, n)

    class RaiseAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.shape[1] - ids.shape[1] == stop_at:
                self.seen = input_ids.clone()
                raise Boom("stop")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    crit = RaiseAt()
    cache = AnchorCache(model.config)
    with pytest.raises(Boom):
        anllm_ext.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=n, prefill_chunk=8,
                           stopping_criteria=StoppingCriteriaList([crit]), eos_token_id=None, pad_token_id=PAD)
    seen = crit.seen  # prompt + stop_at tokens; the last one chosen but not yet fed
    assert torch.equal(seen, ref[:, : seen.shape[1]])
    assert cache.get_seq_length() == seen.shape[1] - 1
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], seen.shape[1] - ids.shape[1])], dim=1)
    out = anllm_ext.generate(model, seen, attention_mask=full_mask, cache=cache,
                             max_new_tokens=ref.shape[1] - seen.shape[1], prefill_chunk=8,
                             eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out, ref)


def test_interrupt_inside_forward_leaves_cache_usable(patched_tiny):
    """An exception raised inside a decode step's forward (a layer hook, between the cache's reservation
    of slots and its commit): the cache keeps the tokens committed before, and continuing from them gives
    exactly the tokens of an uninterrupted run."""
    from anllm_ext.cache import AnchorCache

    model, ids, mask = patched_tiny
    n, fail_at_call = 40, 12
    ref = _reference(model, ids, mask, n)
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == fail_at_call:
            raise Boom("inside the forward")

    cache = AnchorCache(model.config)
    handle = model.model.layers[1].register_forward_hook(hook)
    try:
        with pytest.raises(Boom):
            anllm_ext.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=n, prefill_chunk=8,
                               eos_token_id=None, pad_token_id=PAD)
    finally:
        handle.remove()
    done = cache.get_seq_length()  # columns committed before the failing forward
    assert ids.shape[1] <= done < ref.shape[1]
    cont = ref[:, : done + 1]  # the committed tokens + the one whose forward failed
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], cont.shape[1] - ids.shape[1])], dim=1)
    out = anllm_ext.generate(model, cont, attention_mask=full_mask, cache=cache,
                             max_new_tokens=ref.shape[1] - cont.shape[1], prefill_chunk=8,
                             eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out, ref)
