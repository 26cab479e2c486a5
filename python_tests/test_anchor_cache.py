"""AnchorCache on its own, without `anllm_ext.patch` or a transformers model: a hand-written attention stack
drives the cache's public protocol (next_start -> begin_forward -> per layer update + attend -> end_forward)
chunk by chunk, and must give what one AnSAN-masked pass over the whole text gives (the inference invariant,
docs/method.md), with the cache keeping only the anchors and the open segment."""
import pytest
import torch

import anllm_ext
from anllm_ext import AnchorCache
from anllm_ext.reference import anchor_attention_ref

from helpers import ANCHOR, kept_slots, token_stream

H_Q, H_KV, D, LAYERS = 4, 2, 16, 3


class ToyStack(torch.nn.Module):
    """Attention-only layers (q/k/v/o projections, residual): the smallest model whose later layers read the
    cached keys/values of earlier layers' outputs."""

    def __init__(self, width=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q = torch.nn.ModuleList(torch.nn.Linear(width, H_Q * D, bias=False) for _ in range(LAYERS))
        self.kv = torch.nn.ModuleList(torch.nn.Linear(width, 2 * H_KV * D, bias=False) for _ in range(LAYERS))
        self.o = torch.nn.ModuleList(torch.nn.Linear(H_Q * D, width, bias=False) for _ in range(LAYERS))

    def heads(self, i, x):
        B, T, _ = x.shape
        q = self.q[i](x).view(B, T, H_Q, D).transpose(1, 2)
        k, v = self.kv[i](x).view(B, T, 2, H_KV, D).permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, i, x, attn):
        B, _, T, _ = attn.shape
        return x + self.o[i](attn.transpose(1, 2).reshape(B, T, H_Q * D))

    def masked_pass(self, x, layout):
        """One pass over the whole text under the AnSAN mask (the plain-PyTorch oracle)."""
        for i in range(LAYERS):
            q, k, v = self.heads(i, x)
            x = self.merge(i, x, anchor_attention_ref(q, k, v, layout, layout))
        return x

    def cached_chunk(self, x, ids, mask, cache: AnchorCache):
        """One chunk through the cache's public protocol, as a model of one's own would run it."""
        q_layout = anllm_ext.token_layout(ids, [ANCHOR], mask, start=cache.next_start())
        k_layout = cache.begin_forward(q_layout)
        for i in range(LAYERS):
            q, k, v = self.heads(i, x)
            k, v = cache.update(k, v, i)  # transformers' Cache API: creates layer i on first use
            x = self.merge(i, x, cache.attend(q, k, v, q_layout, k_layout))
        cache.end_forward(q_layout)
        return x


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
