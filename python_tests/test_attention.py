"""anchor_attention against the dense plain-PyTorch oracle (anllm_ext.reference)."""
import contextlib

import pytest
import torch

import anllm_ext
from anllm_ext import reference

from helpers import DTYPES, assert_close_by_error_rule, kept_slots, layout, qkv, token_stream

@contextlib.contextmanager
def uninitialized_memory_is_nan():
    """``torch.empty`` (the kernels' ``at::empty`` too) fills floating memory with NaN, so an output row a
    kernel forgets to write stays NaN instead of holding whatever the allocator handed back."""
    import torch.utils.deterministic as det

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4)).all()  # the fill is really on
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        det.fill_uninitialized_memory = saved[2]


def check_forward(q, k, v, ql, kl, dtype):
    out = anllm_ext.anchor_attention(q, k, v, ql, kl)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    ref32 = reference.anchor_attention_ref(q, k, v, ql, kl)
    ref_dtype = reference.anchor_attention_ref(q, k, v, ql, kl, compute_dtype=None)
    assert_close_by_error_rule(out, ref_dtype, ref32, dtype)
    return out


@pytest.mark.parametrize("T", [1, 2, 17, 63, 64, 65, 1100])
@pytest.mark.parametrize("pattern", ["random", "at_zero", "consecutive", "all", "none", "cache_like"])
def test_forward_lengths_and_anchor_patterns(device, T, pattern):
    ids, mask = token_stream(2, T, pattern, "mixed", device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(2, 6, 2, T, T, 64, device=device)
    check_forward(q, k, v, lay, lay, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 128, 40, 256])
@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
def test_forward_dtypes_gqa_headdims_padding(device, dtype, group, D, padding):
    T = 150
    ids, mask = token_stream(3, T, "random", padding, device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(3, 2 * group, 2, T, T, D, dtype, device)
    with uninitialized_memory_is_nan():  # the kernel writes every output row itself (no zero fill)
        out = check_forward(q, k, v, lay, lay, dtype)
    # Padding queries see nothing: zeros, never NaN.
    assert (out.float().permute(0, 2, 1, 3)[~lay.valid] == 0).all()


def test_fully_masked_rows_give_zero_and_minus_inf_lse(device):
    ids, mask = token_stream(2, 10, "random", "none", device=device)
    mask[0] = 0
    lay = layout(ids, mask)
    q, k, v = qkv(2, 2, 2, 10, 10, 64, device=device)
    out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, lay, lay)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    _, ref_lse = reference.anchor_attention_ref(q, k, v, lay, lay, return_lse=True)
    torch.testing.assert_close(lse[1], ref_lse[1], atol=1e-5, rtol=1e-5)


def test_strided_inputs_as_transformers_passes_them(device):
    """transformers hands over q/k/v as transposed views of [B, T, H, D] projections."""
    B, T, Hq, Hkv, D = 2, 90, 6, 2, 64
    ids, mask = token_stream(B, T, "random", "left", device=device)
    lay = layout(ids, mask)
    q = torch.randn(B, T, Hq, D, device=device).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, device=device).transpose(1, 2)
    v = torch.randn(B, Hkv, T, D, device=device)  # different strides from k
    check_forward(q, k, v, lay, lay, torch.float32)


def test_explicit_scale(device):
    ids, mask = token_stream(1, 40, "random", "none", device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(1, 2, 1, 40, 40, 64, device=device)
    out = anllm_ext.anchor_attention(q, k, v, lay, lay, scale=0.3)
    torch.testing.assert_close(out, reference.anchor_attention_ref(q, k, v, lay, lay, scale=0.3), atol=2e-5, rtol=1e-5)


def compacted_cache(ids, mask, k, v, upto):
    """Keys an anchor cache holds after the first `upto` tokens, per row, padded to a common length."""
    prefix = layout(ids[:, :upto], mask[:, :upto])
    keep = kept_slots(prefix)
    B = ids.shape[0]
    n = int(keep.sum(1).max())
    parts = [anllm_ext.Layout(*(torch.zeros(B, n, dtype=t.dtype, device=t.device) for t in prefix.as_tuple()))]
    kc = torch.zeros(B, k.shape[1], n, k.shape[3], dtype=k.dtype, device=k.device)
    vc = torch.zeros_like(kc)
    for b in range(B):
        idx = keep[b].nonzero().squeeze(1)
        m = idx.numel()
        for dst, src in zip(parts[0].as_tuple(), prefix.as_tuple()):
            dst[b, :m] = src[b, idx]
        kc[b, :, :m] = k[b, :, idx]
        vc[b, :, :m] = v[b, :, idx]
    return parts[0], kc, vc, prefix.next_start()


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("pattern", ["random", "consecutive", "none", "at_zero"])
def test_new_tokens_against_compacted_cache_equal_full_pass(device, chunk, padding, pattern):
    """The inference invariant at op level: queries of a new chunk over (compacted cache + chunk) give
    the same outputs as over the whole uncompacted prefix."""
    B, T, upto = 3, 300, 230
    ids, mask = token_stream(B, T, pattern, padding, device=device)
    full = layout(ids, mask)
    q, k, v = qkv(B, 6, 2, T, T, 64, device=device)
    cache_layout, kc, vc, start = compacted_cache(ids, mask, k, v, upto)
    hi = upto + chunk
    new = layout(ids[:, upto:hi], mask[:, upto:hi], start=start)
    keys = anllm_ext.Layout.cat([cache_layout, new])
    kk = torch.cat([kc, k[:, :, upto:hi]], dim=2)
    vv = torch.cat([vc, v[:, :, upto:hi]], dim=2)
    out = anllm_ext.anchor_attention(q[:, :, upto:hi], kk, vv, new, keys)
    expected = reference.anchor_attention_ref(q, k, v, full, full)[:, :, upto:hi]
    torch.testing.assert_close(out, expected, atol=3e-5, rtol=1e-5)
    # The compacted cache really is small.
    if pattern == "random":
        assert cache_layout.shape[1] < upto // 2


def test_unsorted_keys_still_exact(device):
    """The mask is the AnSAN mask rule (docs/method.md) on whatever layouts are given, even keys in no particular order."""
    B, T = 2, 200
    ids, mask = token_stream(B, T, "random", "mixed", device=device)
    lay = layout(ids, mask)
    perm = torch.randperm(T, device=device)
    klay = lay[:, perm]
    q, k, v = qkv(B, 4, 2, T, T, 64, device=device)
    out = anllm_ext.anchor_attention(q, k[:, :, perm], v[:, :, perm], lay, klay)
    torch.testing.assert_close(out, reference.anchor_attention_ref(q, k, v, lay, lay), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, pattern, padding, group", [
    (1, "none", "none", 1), (65, "random", "mixed", 3), (200, "consecutive", "left", 4),
    (130, "all", "right", 1), (97, "at_zero", "none", 3), (150, "cache_like", "mixed", 3),
])
def test_backward_matches_reference_autograd(device, dtype, T, pattern, padding, group):
    B, Hkv, D = 2, 2, 64
    ids, mask = token_stream(B, T, pattern, padding, device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(B, Hkv * group, Hkv, T, T, D, dtype, device, requires_grad=True)
    out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, lay, lay)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0)
    ours = torch.autograd.grad((out.float() * dout.float()).sum() + (lse.nan_to_num(neginf=0) * dlse).sum(), (q, k, v))

    def ref_grads(compute_dtype):
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        o, l = reference.anchor_attention_ref(qr, kr, vr, lay, lay, compute_dtype=compute_dtype, return_lse=True)
        loss = (o.float() * dout.float()).sum() + (l.nan_to_num(neginf=0) * dlse).sum()
        return torch.autograd.grad(loss, (qr, kr, vr))

    ref32 = ref_grads(torch.float32)
    ref_dtype = ref_grads(None)
    for name, a, r32, rd in zip("q k v".split(), ours, ref32, ref_dtype):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert_close_by_error_rule(a, rd, r32, dtype, f"d{name}")


def test_gradients_match_float64_finite_differences(device):
    """Every gradient entry of the fp32 backward kernel against central differences of the float64 oracle
    (an independent check: no autograd on either side of the comparison)."""
    ids, mask = token_stream(1, 9, "random", "left", device=device, anchor_every=3)
    lay = layout(ids, mask)
    q, k, v = qkv(1, 2, 1, 9, 9, 8, device=device, requires_grad=True)
    out = anllm_ext.anchor_attention(q, k, v, lay, lay)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))

    inputs = [t.detach().double() for t in (q, k, v)]

    def loss64():
        return float((reference.anchor_attention_ref(*inputs, lay, lay, compute_dtype=None) * w.double()).sum())

    eps = 1e-6
    for which, g in enumerate(grads):
        flat = inputs[which].view(-1)
        fd = torch.empty(flat.numel(), dtype=torch.float64)
        for idx in range(flat.numel()):
            x = float(flat[idx])
            flat[idx] = x + eps
            up = loss64()
            flat[idx] = x - eps
            down = loss64()
            flat[idx] = x
            fd[idx] = (up - down) / (2 * eps)
        assert fd.abs().max() > 1e-3  # the check is not vacuous
        torch.testing.assert_close(g.double().cpu().view(-1), fd, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{'qkv'[which]}: {m}")


def test_opcheck(device):
    ids, mask = token_stream(2, 70, "random", "mixed", device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(2, 4, 2, 70, 70, 64, device=device, requires_grad=True)
    args = (q, k, v, *lay.as_tuple(), *lay.as_tuple(), 0.125)
    torch.library.opcheck(torch.ops.anllm.anchor_attention_fwd.default, args)


def test_torch_compile_inductor_values_and_grads(device):
    """fullgraph compile with inductor (the default backend): outputs and gradients equal the oracle's."""
    ids, mask = token_stream(2, 50, "random", "left", device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(2, 4, 2, 50, 50, 64, device=device, requires_grad=True)
    w = torch.randn(2, 4, 50, 64, device=device)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(q, k, v, w, *parts):
        ql = anllm_ext.Layout(*parts)
        return (anllm_ext.anchor_attention(q * 2, k, v, ql, ql) * w).sum()

    loss = f(q, k, v, w, *lay.as_tuple())
    grads = torch.autograd.grad(loss, (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_loss = (reference.anchor_attention_ref(qr * 2, kr, vr, lay, lay) * w).sum()
    ref_grads = torch.autograd.grad(ref_loss, (qr, kr, vr))
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-3, rtol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def _inputs(device, **over):
    ids, mask = token_stream(2, 20, "random", "none", device=device)
    lay = layout(ids, mask)
    q, k, v = qkv(2, 4, 2, 20, 20, 64, device=device)
    d = dict(q=q, k=k, v=v, ql=lay, kl=lay)
    d.update(over)
    return d


@pytest.mark.parametrize("change, match", [
    (lambda d: dict(q=d["q"][0]), "q must be a 4-D"),
    (lambda d: dict(q=d["q"].double()), "float32, bfloat16 or float16"),
    (lambda d: dict(k=d["k"].half()), "share one dtype"),
    (lambda d: dict(q=torch.randn(2, 3, 20, 64)), "multiple of the number of key/value heads"),
    (lambda d: dict(q=torch.randn(2, 4, 20, 32)), "same head dim"),
    (lambda d: dict(v=d["v"][:, :, :10]), "same shape"),
    (lambda d: dict(k=d["k"][:1], v=d["v"][:1]), "batch sizes differ"),
    (lambda d: dict(kl=d["kl"][:, :10]), "key layout positions must have shape"),
    (lambda d: dict(ql=anllm_ext.Layout(d["ql"].positions.int(), *d["ql"].as_tuple()[1:])), "dtype"),
    (lambda d: dict(q=torch.randn(2, 4, 20, 300), k=torch.randn(2, 2, 20, 300), v=torch.randn(2, 2, 20, 300)), "head dim must be"),
    (lambda d: dict(ql="not a layout"), "q_layout must be an anllm_ext.Layout"),
])
def test_bad_input_raises_clear_error(change, match):
    d = _inputs("cpu")
    d.update(change(d))
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        anllm_ext.anchor_attention(d["q"], d["k"], d["v"], d["ql"], d["kl"])


def test_mixed_devices_are_rejected():
    d = _inputs("cpu")
    with pytest.raises(RuntimeError, match="is on meta"):
        anllm_ext.anchor_attention(d["q"], d["k"].to("meta"), d["v"], d["ql"], d["kl"])
    with pytest.raises(RuntimeError, match="is on meta"):
        anllm_ext.anchor_attention(d["q"], d["k"], d["v"], d["ql"], d["kl"].to("meta"))


def test_layout_on_other_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    d = _inputs("cpu")
    with pytest.raises(RuntimeError, match="is on"):
        anllm_ext.anchor_attention(d["q"], d["k"], d["v"], d["ql"].to("cuda"), d["kl"])


@pytest.mark.parametrize("pattern", ["random", "cache_like", "none", "all"])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("group", [1, 4])
def test_few_queries_over_long_keys(device, pattern, Tq, group):
    """Decode-shaped problems (few query tiles, many keys: the key range is split across threads and
    merged by log-sum-exp), including a padded query that sees nothing."""
    T = 1200
    ids, mask = token_stream(1, T, pattern, "none", device=device)
    mask[0, -1] = 0
    lay = layout(ids, mask)
    q, k, v = qkv(1, group, 1, Tq, T, 64, device=device)
    ql = lay[:, T - Tq:]
    with uninitialized_memory_is_nan():  # the kernel writes every output row itself (no zero fill)
        out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, ql, lay)
    ref, ref_lse = reference.anchor_attention_ref(q, k, v, ql, lay, return_lse=True)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=3e-5, rtol=1e-5)
    assert (out[:, :, -1] == 0).all() and torch.isneginf(lse[:, :, -1]).all()
