"""The CUDA kernels (csrc/cuda/, the exact sources) run under the CUDA emulator (csrc/emu/) against the
plain-PyTorch oracle (anllm_ext.reference): forward incl. the split-key decode path, backward (dq, dkv,
anchor dkv), the fused append, compaction and the device key index. `make test-cuda-emu` runs this.
Shapes are small (emulation runs every GPU thread as a fiber on the CPU); lengths straddle the kernels'
tile (16/32/64) and chunk (64) boundaries. Tolerances: the rules of the CPU tests (test_attention.py)."""
import math

import pytest
import torch

import anllm_ext
from anllm_ext import reference

from emu_helpers import SEEDS, emu, needs_emu, parts
from helpers import assert_close_by_error_rule, kept_slots, layout, qkv, token_stream

pytestmark = needs_emu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sub_layout(lay, start):
    """The layout of the last tokens of `lay` from `start` on (queries of a chunk over all keys)."""
    return anllm_ext.Layout(*(t[:, start:] for t in parts(lay)))


def emu_forward(q, k, v, ql, kl, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return emu().anchor_attention_fwd(q, k, v, *parts(ql), *parts(kl), scale)


def check_forward(q, k, v, ql, kl, dtype):
    out, lse = emu_forward(q, k, v, ql, kl)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref32, ref_lse = reference.anchor_attention_ref(q, k, v, ql, kl, return_lse=True)
    ref_dtype = reference.anchor_attention_ref(q, k, v, ql, kl, compute_dtype=None)
    assert_close_by_error_rule(out, ref_dtype, ref32, dtype)
    # rows that see nothing: lse -inf exactly where the oracle's is
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    seen = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)
    return out, lse


def launched(name):
    return any(line.startswith(name) for line in emu().emu_launch_log(False))


@pytest.fixture(autouse=True)
def _fresh_log():
    if needs_emu.args[0]:
        return
    emu().emu_launch_log(True)


# ------------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 127, 129])
@pytest.mark.parametrize("pattern", ["random", "consecutive", "all"])
def test_forward_lengths_patterns(seed, T, pattern):
    emu().emu_set_seed(seed)
    torch.manual_seed(seed * 1000 + T)
    ids, mask = token_stream(2, T, pattern, "mixed")
    lay = layout(ids, mask)
    q, k, v = qkv(2, 3, 1, T, T, 64)
    check_forward(q, k, v, lay, lay, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("D", [40, 64, 128, 256])
def test_forward_dtypes_gqa_headdims(dtype, group, D):
    emu().emu_set_seed(D + group)
    torch.manual_seed(D * 10 + group)
    T = 65 if D <= 128 else 33
    ids, mask = token_stream(2, T, "random", "mixed")
    lay = layout(ids, mask)
    q, k, v = qkv(2, group, 1, T, T, D, dtype)
    check_forward(q, k, v, lay, lay, dtype)


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    emu().emu_set_seed(3)
    ids, mask = token_stream(3, 70, "random", "none")
    mask[1] = 0  # a row of padding only
    mask[2, 10:] = 0
    lay = layout(ids, mask)
    q, k, v = qkv(3, 2, 2, 70, 70, 64)
    out, lse = check_forward(q, k, v, lay, lay, torch.float32)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[2, :, 10:] == 0).all() and torch.isneginf(lse[2, :, 10:]).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("Tq, group, D, dtype", [
    (1, 4, 128, torch.float32), (1, 3, 64, torch.bfloat16), (3, 1, 256, torch.float16), (1, 1, 40, torch.float32),
])
def test_decode_split_keys_and_combine(seed, Tq, group, D, dtype):
    """Few queries over a long cache: the launcher splits the key tiles over blocks (split-key path) and
    merges the partial results in combine_kernel."""
    emu().emu_set_seed(seed)
    torch.manual_seed(seed + Tq + D)
    Tk = 1100
    ids, mask = token_stream(2, Tk, "cache_like", "left")
    lay = layout(ids, mask)
    q, k, v = qkv(2, group, 1, Tq, Tk, D, dtype)
    check_forward(q, k, v, sub_layout(lay, Tk - Tq), lay, dtype)
    assert launched("combine"), emu().emu_launch_log(False)


def test_prefill_chunk_over_long_cache():
    emu().emu_set_seed(5)
    Tk, Tq = 1100, 40
    ids, mask = token_stream(1, Tk, "random", "none")
    lay = layout(ids, mask)
    q, k, v = qkv(1, 2, 1, Tq, Tk, 64)
    check_forward(q, k, v, sub_layout(lay, Tk - Tq), lay, torch.float32)


# ------------------------------------------------------------------------------------------------
# forward on tensor cores (fwd_wmma.cuh: bf16/fp16 with WMMA fragments, fp32 accumulation and softmax
# statistics): every bf16/fp16 call that is not decode-like (group * Tq > 32) runs it


def wmma_launched():
    return any(line.startswith("wmma_kernel in") for line in emu().emu_launch_log(False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [33, 63, 64, 65, 127, 129])
@pytest.mark.parametrize("pattern", ["random", "consecutive", "all", "none"])
def test_tensor_core_forward_lengths_patterns(dtype, T, pattern):
    """Lengths around the tensor-core kernel's 64-query / 64-key tiles, anchors everywhere / nowhere /
    in runs, mixed padding, under varying schedules."""
    emu().emu_set_seed(T % 3)
    torch.manual_seed(T * 7 + len(pattern))
    ids, mask = token_stream(2, T, pattern, "mixed")
    lay = layout(ids, mask)
    q, k, v = qkv(2, 3, 1, T, T, 64, dtype)
    check_forward(q, k, v, lay, lay, dtype)
    assert wmma_launched()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [40, 128, 256])
def test_tensor_core_prefill_chunk_over_long_cache_splits_keys(dtype, D):
    """A chunk of queries over a long cache: few blocks, so the key tiles are split across blocks
    (nsplit > 1) and combine_kernel merges the tensor-core kernel's partial results."""
    emu().emu_set_seed(D)
    torch.manual_seed(D)
    Tk, Tq = 1100, 40
    ids, mask = token_stream(1, Tk, "cache_like", "left")
    lay = layout(ids, mask)
    q, k, v = qkv(1, 2, 1, Tq, Tk, D, dtype)
    check_forward(q, k, v, sub_layout(lay, Tk - Tq), lay, dtype)
    assert wmma_launched() and launched("combine")


def test_tensor_core_fully_masked_rows_are_zero_with_minus_inf_lse():
    emu().emu_set_seed(4)
    ids, mask = token_stream(3, 70, "random", "none")
    mask[1] = 0
    mask[2, 10:] = 0
    lay = layout(ids, mask)
    q, k, v = qkv(3, 2, 2, 70, 70, 64, torch.bfloat16)
    out, lse = check_forward(q, k, v, lay, lay, torch.bfloat16)
    assert wmma_launched()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[2, :, 10:] == 0).all() and torch.isneginf(lse[2, :, 10:]).all()


def test_decode_stays_on_the_split_key_kernel():
    """Few queries (group * Tq <= 32): the memory-bound decode path keeps fwd_kernel (K/V read once per
    key/value head for all query heads of its group), in bf16 too."""
    emu().emu_set_seed(2)
    ids, mask = token_stream(1, 600, "cache_like", "none")
    lay = layout(ids, mask)
    q, k, v = qkv(1, 4, 2, 1, 600, 128, torch.bfloat16)
    check_forward(q, k, v, sub_layout(lay, 599), lay, torch.bfloat16)
    assert not wmma_launched() and launched("kernel in") and launched("combine")


def test_strided_inputs_as_transformers_passes_them():
    emu().emu_set_seed(6)
    B, T, H, D = 2, 70, 2, 64
    ids, mask = token_stream(B, T, "random", "mixed")
    lay = layout(ids, mask)
    qkv_proj = torch.randn(B, T, 3, H, D)
    q, k, v = (qkv_proj[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, D], strided
    assert not q.is_contiguous()
    check_forward(q, k, v, lay, lay, torch.float32)


# ------------------------------------------------------------------------------------------------
# backward


def backward_case(B, Hkv, group, T, D, dtype, pattern, padding, seed):
    emu().emu_set_seed(seed)
    torch.manual_seed(seed * 7 + T + D)
    ids, mask = token_stream(B, T, pattern, padding)
    lay = layout(ids, mask)
    q, k, v = qkv(B, Hkv * group, Hkv, T, T, D, dtype)
    return check_backward(q, k, v, lay, dtype)


def check_backward(q, k, v, lay, dtype):
    """The emulated backward (dq, dk, dv for a random dout and dlse) against autograd of the oracle, each with
    flash-attention's error rule; returns (dq, dk, dv)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = emu_forward(q, k, v, lay, lay, scale)
    dout = torch.randn(out.shape).to(dtype)
    dlse = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0)
    delta = (dout.float() * out.float()).sum(-1) - dlse  # as anllm_ext.ops' autograd does
    ours = emu().anchor_attention_bwd(dout, q, k, v, lse, delta, *parts(lay), *parts(lay), scale)

    def ref_grads(compute_dtype):
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, l = reference.anchor_attention_ref(qr, kr, vr, lay, lay, compute_dtype=compute_dtype, return_lse=True)
        loss = (o.float() * dout.float()).sum() + (l.nan_to_num(neginf=0) * dlse).sum()
        return torch.autograd.grad(loss, (qr, kr, vr))

    ref32, ref_dtype = ref_grads(torch.float32), ref_grads(None)
    for name, a, r32, rd in zip("q k v".split(), ours, ref32, ref_dtype):
        assert a.dtype == dtype and a.shape == r32.shape and torch.isfinite(a).all(), name
        assert_close_by_error_rule(a, rd, r32, dtype, f"d{name}")
    return ours


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T, pattern, padding, group", [
    (1, "none", "none", 1), (63, "random", "mixed", 3), (65, "consecutive", "left", 4),
    (129, "all", "right", 1), (127, "cache_like", "mixed", 3),
])
def test_backward_lengths_patterns(seed, T, pattern, padding, group):
    backward_case(2, 1, group, T, 64, torch.float32, pattern, padding, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, group", [(40, 3), (64, 1), (128, 4), (256, 3)])
def test_backward_dtypes_headdims(dtype, D, group):
    backward_case(1, 1, group, 65 if D <= 128 else 33, D, dtype, "random", "mixed", D)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, pattern, padding, group", [
    (33, "random", "mixed", 3), (63, "consecutive", "left", 1), (64, "all", "right", 4), (65, "none", "mixed", 1),
    (127, "cache_like", "mixed", 3), (129, "random", "left", 4),
])
def test_tensor_core_dq_lengths_patterns(dtype, T, pattern, padding, group):
    """bf16/fp16 with a dout of the same dtype: dq on tensor cores (bwd_wmma.cuh: dq_wmma_kernel)."""
    emu().emu_launch_log(True)
    backward_case(2, 1, group, T, 64, dtype, pattern, padding, T % 3)
    assert any(line.startswith("dq_wmma in") for line in emu().emu_launch_log(False))


def dkv_wmma_launched():
    """dk/dv ran on tensor cores: both dkv_wmma_kernel variants launched, neither CUDA-core dkv_kernel."""
    log = emu().emu_launch_log(False)
    return (any(line.startswith("dkv_wmma_own in") for line in log)
            and any(line.startswith("dkv_wmma_anc in") for line in log)
            and not any(line.startswith(("own in", "anc in")) for line in log))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hkv, group, T, D, pattern, padding", [
    (2, 1, 1, 1, 64, "none", "none"), (2, 1, 4, 1, 40, "all", "none"), (2, 1, 3, 63, 40, "random", "mixed"),
    (2, 1, 4, 64, 128, "all", "left"), (2, 2, 1, 65, 64, "consecutive", "right"), (2, 1, 1, 65, 128, "none", "mixed"),
    (2, 1, 4, 129, 40, "cache_like", "mixed"), (1, 1, 3, 129, 128, "random", "left"),
    (2, 1, 3, 129, 64, "random", "right"), (1, 1, 3, 33, 256, "random", "mixed"),
])
def test_tensor_core_dkv_lengths_headdims_gqa(dtype, B, Hkv, group, T, D, pattern, padding):
    """bf16/fp16 with a dout of the same dtype: dk/dv on tensor cores (bwd_wmma.cuh: dkv_wmma_kernel, its
    own-segment and anchor variants), against autograd of the fp32 oracle with flash-attention's rule, over
    lengths around the 64-key / 64-query tiles, head dims 40/64/128 (and 256), GQA 1/3/4 and padding."""
    emu().emu_launch_log(True)
    backward_case(B, Hkv, group, T, D, dtype, pattern, padding, T % 3)
    assert dkv_wmma_launched(), emu().emu_launch_log(False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_dkv_fully_masked_rows(dtype):
    """A row of padding only and a row padded after 10 tokens: their padded keys get zero dk/dv, rows that saw
    nothing give nothing, and the rest matches the oracle."""
    emu().emu_set_seed(4)
    emu().emu_launch_log(True)
    torch.manual_seed(4)
    ids, mask = token_stream(3, 70, "random", "none")
    mask[1] = 0
    mask[2, 10:] = 0
    lay = layout(ids, mask)
    q, k, v = qkv(3, 4, 2, 70, 70, 64, dtype)
    dq, dk, dv = check_backward(q, k, v, lay, dtype)
    assert dkv_wmma_launched()
    for g in (dq, dk, dv):
        assert (g[1] == 0).all() and (g[2, :, 10:] == 0).all()


def test_tensor_core_dkv_long_split_anchor_queries():
    """Tq >= 1024 in bf16: the tensor-core anchor kernel splits the query range over blocks (qsplit > 1,
    atomicAdd into the anchors' rows)."""
    emu().emu_launch_log(True)
    backward_case(1, 1, 2, 1100, 40, torch.bfloat16, "random", "left", 11)
    assert dkv_wmma_launched()


def test_backward_long_split_anchor_queries():
    """Tq >= 1024: the anchor dk/dv kernel splits the query range over blocks (qsplit > 1, atomicAdd)."""
    backward_case(1, 1, 2, 1100, 40, torch.float32, "random", "left", 11)


def test_backward_reads_fp32_dout_as_fp32():
    """Regression (found with the emulator): the CUDA backward rounded an fp32 dout to the dtype of q (bf16 here) before
    use; the CPU kernel keeps fp32. Now the kernels read it as fp32."""
    emu().emu_set_seed(1)
    torch.manual_seed(1)
    T, D = 40, 64
    ids, mask = token_stream(1, T, "random", "none")
    lay = layout(ids, mask)
    q, k, v = qkv(1, 2, 1, T, T, D, torch.bfloat16)
    out, lse = emu_forward(q, k, v, lay, lay, 0.125)
    dout = torch.randn(out.shape)  # fp32, most values not representable in bf16
    delta = (dout * out.float()).sum(-1)
    g32 = emu().anchor_attention_bwd(dout, q, k, v, lse, delta, *parts(lay), *parts(lay), 0.125)
    g16 = emu().anchor_attention_bwd(dout.bfloat16(), q, k, v, lse, delta, *parts(lay), *parts(lay), 0.125)
    assert not torch.equal(g32[0], g16[0]) and not torch.equal(g32[2], g16[2])
    cpu = torch.ops.anllm.anchor_attention_bwd(dout, q, k, v, lse, delta, *parts(lay), *parts(lay), 0.125)
    for a, c in zip(g32, cpu):  # the CPU kernel (fp32 dout) and the emulated CUDA kernels agree
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=1e-2)


def test_backward_flags_its_atomics_under_deterministic_algorithms(capfd):
    """Regression (found with the emulator): above 1024 queries the anchor dk/dv kernel sums with atomicAdd across query
    splits (order-dependent low bits); torch.use_deterministic_algorithms(True) must raise, warn_only warn.
    Below that there is a single writer per row and nothing to flag."""
    def bwd_args(T):
        ids, mask = token_stream(1, T, "random", "none")
        lay = layout(ids, mask)
        q, k, v = qkv(1, 1, 1, T, T, 8)
        lse = torch.zeros(1, 1, T)
        return (torch.zeros_like(q), q, k, v, lse, torch.zeros_like(lse), *parts(lay), *parts(lay), 0.3)

    args, small = bwd_args(1100), bwd_args(65)
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        emu().anchor_attention_bwd(*small)  # 65 queries: deterministic, no alert
        with pytest.raises(RuntimeError, match="anchor_attention_bwd on CUDA.*atomicAdd"):
            emu().anchor_attention_bwd(*args)
        torch.use_deterministic_algorithms(True, warn_only=True)
        capfd.readouterr()
        emu().anchor_attention_bwd(*args)  # warns (through c10's warning handler: stderr here)
        assert "anchor_attention_bwd on CUDA with more than 1024 queries" in capfd.readouterr().err
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_fast_math_exp_log_within_fp32_tolerance():
    """--use_fast_math (__expf/__logf as ex2.approx(x log2 e) / lg2.approx(x) ln 2): measured against exact
    expf/logf on the same kernels, both well inside the fp32 tolerance of the oracle tests (2e-5)."""
    torch.manual_seed(2)
    ids, mask = token_stream(2, 129, "random", "mixed")
    lay = layout(ids, mask)
    q, k, v = qkv(2, 2, 1, 129, 129, 64)
    q = q * 3  # sharper softmax: larger |score - max| arguments to exp
    ref, ref_lse = reference.anchor_attention_ref(q, k, v, lay, lay, return_lse=True)
    errs = {}
    try:
        for fast in (False, True):
            emu().emu_set_fast_math(fast)
            emu().emu_set_seed(0)
            out, lse = emu_forward(q, k, v, lay, lay)
            seen = ~torch.isneginf(ref_lse)
            errs[fast] = ((out - ref).abs().max().item(), (lse - ref_lse)[seen].abs().max().item())
    finally:
        emu().emu_set_fast_math(True)
    print("max error (out, lse) exact exp/log:", errs[False], "fast math:", errs[True])
    assert max(errs[True]) < 2e-5 and max(errs[False]) < 2e-5


# ------------------------------------------------------------------------------------------------
# fused append (AnchorCache's per-layer decode op)


@pytest.mark.parametrize("Tn, same_offsets, dtype", [(1, False, torch.float32), (5, True, torch.bfloat16),
                                                     (1, True, torch.float16)])
def test_append_writes_cache_and_attends(Tn, same_offsets, dtype):
    emu().emu_set_seed(Tn)
    torch.manual_seed(Tn)
    B, Hkv, group, Cap, Tk, D = 2, 2, 2, 90, 70, 64
    ids, mask = token_stream(B, Tk, "random", "left")
    lay = layout(ids, mask)
    ql = sub_layout(lay, Tk - Tn)
    k_cache = torch.randn(B, Hkv, Cap, D).to(dtype)
    v_cache = torch.randn(B, Hkv, Cap, D).to(dtype)
    q = torch.randn(B, Hkv * group, Tn, D).to(dtype)
    k_new, v_new = torch.randn(B, Hkv, Tn, D).to(dtype), torch.randn(B, Hkv, Tn, D).to(dtype)
    offsets = [Tk - Tn] * B if same_offsets else [Tk - Tn, Tk - Tn - 3]
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    for b, o in enumerate(offsets):
        k_exp[b, :, o:o + Tn] = k_new[b]
        v_exp[b, :, o:o + Tn] = v_new[b]
    out, lse = emu().anchor_attention_append_(q, k_new, v_new, k_cache, v_cache, offsets, *parts(ql), *parts(lay),
                                              1.0 / math.sqrt(D))
    assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)
    ref32 = reference.anchor_attention_ref(q, k_exp[:, :, :Tk], v_exp[:, :, :Tk], ql, lay)
    ref_dtype = reference.anchor_attention_ref(q, k_exp[:, :, :Tk], v_exp[:, :, :Tk], ql, lay, compute_dtype=None)
    assert_close_by_error_rule(out, ref_dtype, ref32, dtype)


def test_cached_decode_equals_one_masked_pass():
    """An AnchorCache-like loop on the emulated ops: prefill, compaction to anchors + open segment, then
    decode steps with the fused append; every step's output equals the full pass's row (the inference invariant, docs/method.md)."""
    emu().emu_set_seed(9)
    torch.manual_seed(9)
    B, H, D, T, P = 2, 2, 64, 60, 40
    ids, mask = token_stream(B, T, "periodic", "left", anchor_every=7)
    lay = layout(ids, mask)
    q, k, v = qkv(B, H, H, T, T, D)
    full, _ = emu_forward(q, k, v, lay, lay)
    k_cache, v_cache = torch.zeros(B, H, T, D), torch.zeros(B, H, T, D)
    k_cache[:, :, :P], v_cache[:, :, :P] = k[:, :, :P], v[:, :, :P]
    pl = anllm_ext.Layout(*(t[:, :P] for t in parts(lay)))
    cache = [torch.zeros(B, T, dtype=t.dtype) for t in parts(pl)]  # the cache's per-slot layout
    for c, t in zip(cache, parts(pl)):
        c[:, :P] = t
    keep = torch.zeros(B, T, dtype=torch.bool)
    keep[:, :P] = kept_slots(pl)
    lengths = emu().compact_([k_cache, v_cache] + cache, keep, torch.full((B,), P, dtype=torch.int64))
    assert (lengths < P).all()
    for t in range(P, T):
        L = int(lengths.max()) + 1
        kl = [torch.zeros(B, L, dtype=c.dtype) for c in cache]
        for x, c, new in zip(kl, cache, parts(lay)):
            for b in range(B):
                n = int(lengths[b])
                x[b, :n] = c[b, :n]
                x[b, n] = new[b, t]
                c[b, n] = new[b, t]
        ql = anllm_ext.Layout(*(p[:, t:t + 1] for p in parts(lay)))
        out, _ = emu().anchor_attention_append_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], k_cache, v_cache,
                                                [int(n) for n in lengths], *parts(ql), *kl, 1.0 / math.sqrt(D))
        torch.testing.assert_close(out, full[:, :, t:t + 1], atol=3e-5, rtol=1e-5)
        lengths = lengths + 1


# ------------------------------------------------------------------------------------------------
# compaction


def check_compact(tensors, keep, lengths, slot_dim=2):
    expected, expected_len = reference.compact_ref(tensors, keep, lengths, slot_dim=slot_dim)
    new_len = emu().compact_(tensors, keep, lengths)
    assert torch.equal(new_len, expected_len)
    for t, e in zip(tensors, expected):
        for b in range(t.shape[0]):
            n = int(expected_len[b])
            assert torch.equal(t[b].narrow(slot_dim - 1, 0, n), e[b].narrow(slot_dim - 1, 0, n))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype, D, density", [(torch.float32, 64, 0.5), (torch.float32, 256, 0.3),
                                               (torch.bfloat16, 40, 0.8), (torch.float16, 3, 0.5)])
def test_compact_random_keep(seed, dtype, D, density):
    """Moves that overlap their sources (chunks of 16 KiB / slot: 16 slots for D=256 fp32), odd slot sizes
    (6 bytes: byte-wise moves), several tensors in one call."""
    emu().emu_set_seed(seed)
    torch.manual_seed(seed + D)
    B, H, cap = 3, 2, 150
    k, v = torch.randn(B, H, cap, D).to(dtype), torch.randn(B, H, cap, D).to(dtype)
    keep = torch.rand(B, cap) < density
    lengths = torch.tensor([cap, 97, 64])
    check_compact([k, v], keep, lengths)


def test_compact_edge_cases():
    emu().emu_set_seed(4)
    B, H, cap, D = 4, 1, 70, 16
    k = torch.randn(B, H, cap, D)
    keep = torch.ones(B, cap, dtype=torch.bool)
    keep[0] = False  # keep nothing
    keep[2, 5] = False  # a single drop
    lengths = torch.tensor([cap, cap, 0, 65])  # row 1 keeps everything, row 2 is empty
    check_compact([k], keep, lengths)


def test_compact_per_slot_tensors_views_and_mixed_heads():
    emu().emu_set_seed(8)
    B, cap = 2, 130
    big = torch.randn(B, 4, cap, 32)
    k = big[:, 1:3]  # a head-sliced view: planes contiguous, batch stride of 4 heads
    v = torch.randn(B, 1, cap, 8, dtype=torch.float16)
    pos = torch.arange(B * cap, dtype=torch.int64).view(B, cap)
    seg = torch.randint(0, 100, (B, cap), dtype=torch.int32)
    flags = torch.rand(B, cap) < 0.5
    keep = torch.rand(B, cap) < 0.6
    lengths = torch.tensor([cap, 100])
    big_before = big.clone()
    expected, expected_len = reference.compact_ref([k, v], keep, lengths)
    exp_slots, _ = reference.compact_ref([pos, seg, flags], keep, lengths, slot_dim=1)
    new_len = emu().compact_([k, v, pos, seg, flags], keep, lengths)
    assert torch.equal(new_len, expected_len)
    for b in range(B):
        n = int(new_len[b])
        assert torch.equal(k[b, :, :n], expected[0][b, :, :n]) and torch.equal(v[b, :, :n], expected[1][b, :, :n])
        for t, e in zip((pos, seg, flags), exp_slots):
            assert torch.equal(t[b, :n], e[b, :n])
    # heads outside the view untouched
    assert torch.equal(big[:, 0], big_before[:, 0]) and torch.equal(big[:, 3], big_before[:, 3])


# ------------------------------------------------------------------------------------------------
# the device key index (layout_index.cu)

I32_MAX, I32_MIN = 2**31 - 1, -2**31
I64_MAX, I64_MIN = 2**63 - 1, -2**63


def index_oracle(lay, chunk=64):
    pos, seg, anc, val = parts(lay)
    B, T = pos.shape
    nC = (T + chunk - 1) // chunk
    i32 = torch.empty(5, B, nC, dtype=torch.int32)
    i64 = torch.empty(4, B, nC, dtype=torch.int64)
    anchors = []
    for b in range(B):
        for c in range(nC):
            sl = slice(c * chunk, min((c + 1) * chunk, T))
            v = val[b, sl]
            s, p, na = seg[b, sl][v], pos[b, sl][v], pos[b, sl][v & ~anc[b, sl]]
            i32[0, b, c] = s.min() if len(s) else I32_MAX
            i32[1, b, c] = s.max() if len(s) else I32_MIN
            i32[2, b, c] = (1 if len(s) else 0) | (2 if len(na) else 0)
            i64[0, b, c] = p.min() if len(p) else I64_MAX
            i64[1, b, c] = p.max() if len(p) else I64_MIN
            i64[2, b, c] = na.max() if len(na) else I64_MIN
        i32[3, b] = torch.cummax(i32[1, b], 0).values
        i32[4, b] = torch.cummin(i32[0, b].flip(0), 0).values.flip(0)
        i64[3, b] = torch.cummax(i64[2, b], 0).values
        idx = (val[b] & anc[b]).nonzero().squeeze(1)
        apos = pos[b, idx]
        smin = torch.cummin(apos.flip(0), 0).values.flip(0) if len(idx) else apos
        anchors.append((idx.to(torch.int32), seg[b, idx], apos, smin))
    return i32, i64, anchors


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("T, pattern, padding", [(1, "none", "none"), (63, "random", "mixed"), (64, "all", "left"),
                                                 (65, "consecutive", "right"), (129, "cache_like", "mixed"),
                                                 (1100, "random", "mixed")])
def test_device_key_index(seed, T, pattern, padding):
    emu().emu_set_seed(seed)
    torch.manual_seed(seed + T)
    ids, mask = token_stream(2, T, pattern, padding)
    lay = layout(ids, mask)
    if T == 129:  # an unsorted row: the index must stay exact (conservative) for any layout
        perm = torch.randperm(T)
        lay = anllm_ext.Layout(*(t[:, perm].contiguous() for t in parts(lay)))
    got = emu().emu_side_index(*parts(lay), True)
    i32, i64, anchors = index_oracle(lay)
    assert torch.equal(got[0], i32) and torch.equal(got[1], i64)
    for b, (idx, seg, pos, smin) in enumerate(anchors):
        n = int(got[4][b])
        assert n == len(idx)
        assert torch.equal(got[2][0, b, :n], idx) and torch.equal(got[2][1, b, :n], seg)
        assert torch.equal(got[3][0, b, :n], pos) and torch.equal(got[3][1, b, :n], smin)
    got_q = emu().emu_side_index(*parts(lay), False)
    assert len(got_q) == 2 and torch.equal(got_q[0], i32) and torch.equal(got_q[1], i64)


# ------------------------------------------------------------------------------------------------
# launch configuration


def test_launch_bounds_known_and_shared_memory_within_limits():
    """Every kernel of csrc/cuda/ ran with static + dynamic shared memory within the device's limit (checked
    at every launch; the static part is measured) and with its __launch_bounds__ known to the emulator, so
    its thread-count check is live: the non-template kernels' from the ELF section the attribute names, the
    template kernels' (GCC drops that section on template instantiations) from the `<kernel>_launch_bound`
    constant their attribute uses, registered by ANLLM_KERNEL at the launch site."""
    emu().emu_set_seed(0)
    ids, mask = token_stream(1, 130, "random", "none")
    lay = layout(ids, mask)
    for D in (64, 128, 256):
        q, k, v = qkv(1, 1, 1, 130, 130, D)
        out, lse = emu_forward(q, k, v, lay, lay)
        emu().anchor_attention_bwd(torch.randn_like(out), q, k, v, lse, torch.zeros_like(lse), *parts(lay), *parts(lay),
                                   0.1)
    # the split-key decode path: its combine kernel
    ids, mask = token_stream(1, 1100, "cache_like", "none")
    lay = layout(ids, mask)
    q, k, v = qkv(1, 1, 1, 1, 1100, 64)
    emu_forward(q, k, v, sub_layout(lay, 1099), lay)
    assert launched("combine")
    emu().compact_([torch.randn(1, 1, 130, 8)], torch.rand(1, 130) < 0.5, torch.tensor([130]))
    bounds = {}
    for source in ("anchor_attention_fwd.cu:", "anchor_attention_bwd.cu:", "layout_index.cu:", "compact.cu:"):
        info = emu().emu_kernel_info(source)  # every kernel launched from this file so far
        assert info, source
        for bound, static_smem, launches in zip(info[0::3], info[1::3], info[2::3]):
            assert launches > 0 and 0 <= static_smem <= 48 * 1024, source
            bounds.setdefault(source, []).append(bound)
    assert bounds["layout_index.cu:"] == [1024]
    assert sorted(bounds["compact.cu:"]) == [256, 1024]
    assert set(bounds["anchor_attention_fwd.cu:"]) == {128} and len(bounds["anchor_attention_fwd.cu:"]) >= 4
    assert set(bounds["anchor_attention_bwd.cu:"]) == {128} and len(bounds["anchor_attention_bwd.cu:"]) >= 9


def test_template_kernels_declare_their_launch_bound_constant():
    """Source rule behind the check above: a template kernel's __launch_bounds__ argument is its
    `<kernel>_launch_bound` constant (what ANLLM_KERNEL registers), and launchers take template kernels
    only through ANLLM_KERNEL, so no template kernel runs unchecked."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    for path in sorted(root.glob("*.cu")):
        src = re.sub(r"//[^\n]*", "", path.read_text())  # code only
        for m in re.finditer(r"template\s*<[^>]*>\s*__global__\s+void\s+__launch_bounds__\(([^)]*)\)\s*(\w+)", src):
            bound, name = m.group(1), m.group(2)
            assert bound == f"{name}_launch_bound", f"{path.name}: {name} uses __launch_bounds__({bound})"
            assert re.search(rf"constexpr int {name}_launch_bound = ", src), name
            assert not re.search(rf"\b{name}<", src), \
                f"{path.name}: {name} instantiated without ANLLM_KERNEL"


def test_fp32_sharp_softmax_call_of_the_long_fuzz_run(monkeypatch):
    """The one failure of the 2,000-calls-per-op sanitized run (docs/gpu.md): an fp32 forward with head dim 255
    and scale 1.61 (a sharp softmax over long dot products) whose error against float64, 4.5e-5, exceeded the
    driver's fixed atol against the fp32 oracle while the fp32 oracle's own error is 2.9e-5: the driver's
    tolerance, not the kernel. The driver now applies the project's 2x rule there; the call passes it."""
    import sys
    from pathlib import Path

    from emu_helpers import route_ops_to_emulator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import fuzz_ops

    route_ops_to_emulator(monkeypatch.setattr)
    fuzz_ops.replay("anchor_attention", 1940195164)
    with pytest.raises(fuzz_ops.Mismatch, match="fp32 error"):  # the rule still bites: a 1e-3 error fails it
        exact = anllm_ext.anchor_attention_with_lse
        monkeypatch.setattr(fuzz_ops.anllm_ext, "anchor_attention_with_lse",
                            lambda *a: (lambda o: (o[0] + 1e-3, o[1]))(exact(*a)))
        fuzz_ops.replay("anchor_attention", 1940195164)
