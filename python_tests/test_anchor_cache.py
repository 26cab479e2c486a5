"""AnchorCache on its own, without `anllm_ext.patch` or a transformers model: a hand-written attention stack
drives the cache's public protocol (next_start -> begin_forward -> per layer update + attend -> end_forward)
chunk by chunk, and must give what one AnSAN-masked pass over the whole text gives (the inference invariant,
docs/method.md), with the cache keeping only the anchors and the open segment."""
import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache

from helpers import ANCHOR, D, H_KV, LAYERS, ToyStack, kept_slots, token_stream

@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_standalone_cache_matches_one_masked_pass(chunk, padding):
    B, T, width = 3, 64, 32
    ids, mask = token_stream(B, T, "random", padding, anchor_every=6, seed=chunk)
    x = torch.randn(B, T, width, generator=torch.Generator().manual_seed(1))
    stack = ToyStack(width)
    with torch.no_grad():
        expected = stack.masked_pass(x, anllm_ext.token_layout(ids, [ANCHOR], mask))
        cache = AnchorCache(initial_capacity=8)
        outs = [stack.cached_chunk(x[:, s:s + chunk], ids[:, s:s + chunk], mask[:, s:s + chunk], cache)
                for s in range(0, T, chunk)]
    got = torch.cat(outs, dim=1)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=2e-5, rtol=1e-5)
    # what stays: exactly the slots the inference invariant keeps, every layer alike
    want = kept_slots(anllm_ext.token_layout(ids, [ANCHOR], mask)).sum(dim=1).tolist()
    assert cache.lengths() == want
    assert len(cache.layers) == LAYERS and cache.get_seq_length() == T


def test_standalone_cache_update_outside_a_forward_says_what_to_call():
    cache = AnchorCache(initial_capacity=8)
    k = torch.zeros(1, H_KV, 2, D)
    with pytest.raises(RuntimeError, match="begin_forward"):
        cache.update(k, k, 0)
