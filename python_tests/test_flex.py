"""The FlexAttention baselines (anllm_ext.flex): the AnSAN mask_mod and the decomposed variant (own segment
+ gathered anchors) against the dense oracle. FlexAttention on the CPU has no backward, so these check the
forward; the GPU benchmark (benchmarks/bench_gpu.py) times both directions."""
import pytest
import torch

import anllm_ext
from anllm_ext import reference
from anllm_ext.flex import flex_ansan_attention, gather_anchors
from helpers import ANCHOR, kept_slots, qkv, token_stream

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention warns it is slow


@pytest.mark.parametrize("decomposed", [True, False], ids=["decomposed", "mask_mod"])
@pytest.mark.parametrize("pattern", ["random", "at_zero", "consecutive", "all", "none"])
@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
def test_flex_equals_the_oracle(decomposed, pattern, padding, hq, hkv):
    ids, mask = token_stream(2, 140, pattern, padding)
    lay = anllm_ext.token_layout(ids, [ANCHOR], mask)
    q, k, v = qkv(2, hq, hkv, 140, 140, 32)
    out = flex_ansan_attention(q, k, v, lay, lay, decomposed=decomposed)
    ref = reference.anchor_attention_ref(q, k, v, lay, lay)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    # padding queries and queries that see nothing give zeros
    padding_rows = (~lay.valid)[:, None, :, None].expand_as(out)
    assert (out[padding_rows] == 0).all()


@pytest.mark.parametrize("decomposed", [True, False], ids=["decomposed", "mask_mod"])
def test_flex_over_a_compacted_cache_in_any_key_order(decomposed):
    """Keys = a compacted cache (anchors + open segment of the first 90 tokens) followed by a new chunk of 50,
    shuffled: the layouts carry the rule, not the key order."""
    ids, mask = token_stream(2, 140, "random", "mixed")
    lay = anllm_ext.token_layout(ids, [ANCHOR], mask)
    kept = kept_slots(lay[:, :90])
    k_valid = torch.cat([lay.valid[:, :90] & kept, lay.valid[:, 90:]], dim=1)
    k_lay = anllm_ext.Layout(lay.positions, lay.segments, lay.is_anchor & k_valid, k_valid)
    perm = torch.randperm(140)
    k_lay = k_lay[:, perm]
    q_lay = lay[:, 90:]
    q, k, v = qkv(2, 6, 3, 50, 140, 64)
    out = flex_ansan_attention(q, k, v, q_lay, k_lay, decomposed=decomposed)
    torch.testing.assert_close(out, reference.anchor_attention_ref(q, k, v, q_lay, k_lay), atol=2e-6, rtol=1e-5)


def test_gather_anchors_packs_each_rows_anchors_in_order():
    ids = torch.tensor([[5, 1, 7, 1, 9], [1, 3, 3, 3, 3]])
    lay = anllm_ext.token_layout(ids, [1])
    k = torch.arange(10.0).reshape(2, 1, 5, 1)
    ka, va, a_lay = gather_anchors(k, k, lay)
    assert ka[0, 0, :, 0].tolist() == [1.0, 3.0] and ka[1, 0, :1, 0].tolist() == [5.0]
    assert a_lay.valid.tolist() == [[True, True], [True, False]]
    assert a_lay.positions[0].tolist() == [1, 3] and a_lay.segments[0].tolist() == [0, 1]


def test_compiled_decomposed_flex_equals_the_oracle():
    """How FlexAttention is meant to run (torch.compile; on the CPU inference only)."""
    ids, mask = token_stream(1, 256, "random", "left")
    lay = anllm_ext.token_layout(ids, [ANCHOR], mask)
    q, k, v = qkv(1, 4, 2, 256, 256, 64)
    out = flex_ansan_attention(q, k, v, lay, lay, decomposed=True, compile=True)
    torch.testing.assert_close(out, reference.anchor_attention_ref(q, k, v, lay, lay), atol=1e-5, rtol=1e-4)


def test_bad_shapes_raise():
    lay = anllm_ext.token_layout(torch.ones(1, 8, dtype=torch.long), [1])
    q, k, v = qkv(1, 3, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        flex_ansan_attention(q, k, v, lay, lay)
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="do not match"):
        flex_ansan_attention(q, k, v, lay[:, :4], lay)
