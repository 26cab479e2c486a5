"""anchor_attention_append_ (write a chunk's keys/values into a preallocated cache, then attend; one
call per layer of an AnchorCache) against the separate write + anchor_attention and the oracle."""
import pytest
import torch

import anllm_ext
from anllm_ext import reference

from helpers import DTYPES, assert_close_by_error_rule, layout, qkv, token_stream


def cache_problem(B, Hq, Hkv, T, D, offsets, cap, dtype=torch.float32, device="cpu", pattern="random"):
    """Caches [B,Hkv,cap,D] with rows holding offsets[b] slots, a chunk of T new tokens per row, and the
    layouts: keys = the first max(offsets)+T slots (row b's slots past offsets[b]+T invalid)."""
    Tk = max(offsets) + T
    ids, mask = token_stream(B, Tk, pattern, "none", device=device)
    full = layout(ids, mask)
    off = torch.tensor(offsets, device=device)
    slot = torch.arange(Tk, device=device)[None, :]
    valid = full.valid & (slot < (off + T)[:, None])
    kl = anllm_ext.Layout(full.positions, full.segments, full.is_anchor & valid, valid)
    idx = off[:, None] + torch.arange(T, device=device)[None, :]
    ql = anllm_ext.Layout(*(t.gather(1, idx) for t in kl.as_tuple()))
    q, k_new, v_new = qkv(B, Hq, Hkv, T, T, D, dtype, device)
    k_cache = torch.randn(B, Hkv, cap, D, device=device).to(dtype)
    v_cache = torch.randn(B, Hkv, cap, D, device=device).to(dtype)
    return q, k_new, v_new, k_cache, v_cache, ql, kl


def written_separately(k_new, v_new, k_cache, v_cache, offsets):
    k, v = k_cache.clone(), v_cache.clone()
    T = k_new.shape[2]
    for b, o in enumerate(offsets):
        k[b, :, o : o + T] = k_new[b]
        v[b, :, o : o + T] = v_new[b]
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("T", [1, 5, 65])
@pytest.mark.parametrize("offsets", [[0], [389], [40, 40, 40], [0, 17, 63]])
def test_equals_write_then_attention_and_oracle(device, dtype, group, T, offsets):
    B = len(offsets)
    q, k_new, v_new, k_cache, v_cache, ql, kl = cache_problem(
        B, 2 * group, 2, T, 64, offsets, cap=max(offsets) + T + 11, dtype=dtype, device=device
    )
    k_want, v_want = written_separately(k_new, v_new, k_cache, v_cache, offsets)
    out = anllm_ext.anchor_attention_append_(q, k_new, v_new, k_cache, v_cache, offsets, ql, kl)
    # The cache: new slots written, every other slot untouched.
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    Tk = kl.positions.shape[1]
    k_used, v_used = k_want[:, :, :Tk], v_want[:, :, :Tk]
    # Bit-identical to the separate calls (the same kernel over the same slots)...
    assert torch.equal(out, anllm_ext.anchor_attention(q, k_used, v_used, ql, kl))
    # ... and within the error rule of the oracle.
    ref32 = reference.anchor_attention_ref(q, k_used, v_used, ql, kl)
    ref_dtype = reference.anchor_attention_ref(q, k_used, v_used, ql, kl, compute_dtype=None)
    assert_close_by_error_rule(out, ref_dtype, ref32, dtype)


@pytest.mark.parametrize("pattern", ["cache_like", "none", "all", "at_zero"])
def test_anchor_patterns_and_strided_new_keys(device, pattern):
    """transformers hands k/v over as transposed views of [B, T, H, D] projections."""
    offsets = [30, 12]
    q, _, _, k_cache, v_cache, ql, kl = cache_problem(2, 4, 2, 3, 64, offsets, cap=64, device=device, pattern=pattern)
    k_new = torch.randn(2, 3, 2, 64, device=device).transpose(1, 2)
    v_new = torch.randn(2, 3, 2, 64, device=device).transpose(1, 2)
    k_want, v_want = written_separately(k_new, v_new, k_cache, v_cache, offsets)
    out = anllm_ext.anchor_attention_append_(q, k_new, v_new, k_cache, v_cache, offsets, ql, kl)
    Tk = kl.positions.shape[1]
    ref = reference.anchor_attention_ref(q, k_want[:, :, :Tk], v_want[:, :, :Tk], ql, kl)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_opcheck(device):
    offsets = [7, 3]
    q, k_new, v_new, k_cache, v_cache, ql, kl = cache_problem(2, 4, 2, 2, 64, offsets, cap=16, device=device)
    args = (q, k_new, v_new, k_cache, v_cache, offsets, *ql.as_tuple(), *kl.as_tuple(), 0.125)
    torch.library.opcheck(torch.ops.anllm.anchor_attention_append_.default, args)


def _problem():
    return dict(zip("q k_new v_new k_cache v_cache ql kl".split(), cache_problem(2, 4, 2, 2, 64, [5, 3], cap=12)),
                offsets=[5, 3])


@pytest.mark.parametrize("change, match", [
    (lambda d: dict(offsets=[5]), "one entry per row"),
    (lambda d: dict(offsets=[6, 3]), "offsets\\[0\\] = 6 puts 2 new tokens outside"),
    (lambda d: dict(offsets=[-1, 3]), "offsets\\[0\\] = -1"),
    (lambda d: dict(k_cache=d["k_cache"][:, :, :4], v_cache=d["v_cache"][:, :, :4]), "the cache holds 4"),
    (lambda d: dict(v_cache=d["v_cache"][:, :1]), "same shape"),
    (lambda d: dict(k_new=d["k_new"][:, :, :1], v_new=d["v_new"][:, :, :1]), "k_new must have shape"),
    (lambda d: dict(v_new=d["v_new"][..., :32]), "k_new and v_new must have the same shape"),
    (lambda d: dict(v_cache=d["v_cache"].half()), "share one dtype"),
    (lambda d: dict(k_cache="cache"), "k_cache must be a tensor"),
    (lambda d: dict(kl="not a layout"), "k_layout must be an anllm_ext.Layout"),
])
def test_bad_input_raises_clear_error(change, match):
    d = _problem()
    d.update(change(d))
    with pytest.raises((RuntimeError, TypeError), match=match):
        anllm_ext.anchor_attention_append_(
            d["q"], d["k_new"], d["v_new"], d["k_cache"], d["v_cache"], d["offsets"], d["ql"], d["kl"]
        )


def test_mixed_devices_are_rejected():
    d = _problem()
    with pytest.raises(RuntimeError, match="is on meta"):
        anllm_ext.anchor_attention_append_(
            d["q"], d["k_new"], d["v_new"], d["k_cache"].to("meta"), d["v_cache"], d["offsets"], d["ql"], d["kl"]
        )
