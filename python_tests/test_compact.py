"""compact_kv_ / compact_slots_ against index-gather compaction (anllm_ext.reference.compact_ref)."""
import pytest
import torch

import anllm_ext
from anllm_ext import reference


def make_caches(layers, B, H, cap, D, dtype, device):
    keys = [torch.randn(B, H, cap, D, device=device).to(dtype) for _ in range(layers)]
    values = [torch.randn(B, H, cap, D, device=device).to(dtype) for _ in range(layers)]
    return keys, values


def check_compaction(keys, values, keep, lengths):
    expected, expected_len = reference.compact_ref(keys + values, keep, lengths)
    originals = [t.clone() for t in keys + values]
    ptrs = [t.data_ptr() for t in keys + values]
    new_len = anllm_ext.compact_kv_(keys, values, keep, lengths)
    assert torch.equal(new_len.cpu(), expected_len.cpu())
    assert [t.data_ptr() for t in keys + values] == ptrs  # in place
    for got, exp, orig in zip(keys + values, expected, originals):
        for b in range(got.shape[0]):
            n = int(new_len[b])
            assert torch.equal(got[b, :, :n], exp[b, :, :n])
            # Slots past the old length are never touched.
            L = int(lengths[b])
            assert torch.equal(got[b, :, L:], orig[b, :, L:])
    return new_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, cap, D", [(1, 3, 1, 64), (2, 2, 63, 64), (3, 1, 65, 128), (2, 3, 1100, 64)])
@pytest.mark.parametrize("density", [0.0, 0.04, 0.5, 1.0])
def test_random_keep(device, dtype, B, H, cap, D, density):
    keys, values = make_caches(3, B, H, cap, D, dtype, device)
    keep = torch.rand(B, cap, device=device) < density
    lengths = torch.randint(0, cap + 1, (B,), device=device)
    check_compaction(keys, values, keep, lengths)


def test_edge_cases_keep_nothing_everything_empty_row(device):
    B, H, cap, D = 4, 2, 50, 64
    keys, values = make_caches(2, B, H, cap, D, torch.float32, device)
    keep = torch.zeros(B, cap, dtype=torch.bool, device=device)
    keep[1] = True  # keep everything
    keep[2, ::3] = True  # every third
    keep[3, -5:] = True  # a run at the end
    lengths = torch.tensor([50, 50, 0, 50], device=device)  # row 2 is empty
    new_len = check_compaction(keys, values, keep, lengths)
    assert new_len.tolist() == [0, 50, 0, 5]


def test_layout_slots_compacted_like_kv(device):
    B, cap = 3, 40
    pos = torch.arange(cap, device=device).repeat(B, 1)
    seg = (pos // 5).to(torch.int32)
    flags = pos % 5 == 4
    keep = flags | (pos >= 35)
    lengths = torch.tensor([40, 20, 7], device=device)
    expected, expected_len = reference.compact_ref([pos, seg, flags], keep, lengths, slot_dim=1)
    new_len = anllm_ext.compact_slots_([pos, seg, flags], keep, lengths)
    assert torch.equal(new_len, expected_len)
    for got, exp in zip([pos, seg, flags], expected):
        for b in range(B):
            assert torch.equal(got[b, : new_len[b]], exp[b, : new_len[b]])


def test_many_layers_one_call_and_mixed_head_counts(device):
    keys = [torch.randn(2, h, 30, 16, device=device) for h in (1, 4, 2)]
    values = [torch.randn(2, h, 30, 16, device=device) for h in (1, 4, 2)]
    keep = torch.rand(2, 30, device=device) < 0.3
    check_compaction(keys, values, keep, torch.tensor([30, 17], device=device))


def test_opcheck_compact(device):
    keys, values = make_caches(2, 2, 2, 20, 8, torch.float32, device)
    keep = torch.rand(2, 20, device=device) < 0.5
    torch.library.opcheck(torch.ops.anllm.compact_.default, (keys + values, keep, torch.tensor([20, 11], device=device)))


@pytest.mark.parametrize("make, match", [
    (lambda k, keep, L: (k, keep.int(), L), "keep must have dtype"),
    (lambda k, keep, L: (k, keep, L.int()), "lengths must have dtype"),
    (lambda k, keep, L: (k, keep[0], L), "keep must be a 2-D"),
    (lambda k, keep, L: (k, keep, L[:1]), "lengths must be a 1-D"),
    (lambda k, keep, L: (k, keep, torch.tensor([3, 21])), "outside"),
    (lambda k, keep, L: (k, keep, torch.tensor([-1, 2])), "outside"),
    (lambda k, keep, L: ([k[0][:, :, :10]] , keep, L), "capacity"),
    (lambda k, keep, L: ([k[0][:1]], keep, L), "batch"),
    (lambda k, keep, L: ([torch.randn(2, 20, 2, 8).permute(0, 2, 1, 3)], keep, L), "contiguous slots"),
    (lambda k, keep, L: ([k[0], k[0]], keep, L), "share memory"),
    (lambda k, keep, L: ([torch.randn(1, 1, 20, 8).expand(2, 2, 20, 8)], keep, L), "overlapping memory"),
    (lambda k, keep, L: ([k[0][0]], keep, L), "must be \\[batch"),
    (lambda k, keep, L: ([k[0].to("meta")], keep, L), "is on meta"),
])
def test_bad_input_raises_clear_error(make, match):
    keys, _ = make_caches(1, 2, 2, 20, 8, torch.float32, "cpu")
    keep = torch.ones(2, 20, dtype=torch.bool)
    tensors, keep, lengths = make(keys, keep, torch.tensor([20, 5]))
    with pytest.raises(RuntimeError, match=match):
        anllm_ext.compact_slots_(tensors, keep, lengths)
