"""The CPU kernels run their parallel loops on several threads, and the results do not depend on how many.

Until the build passed -fopenmp, ATen's parallel_for (a header template) compiled to a serial loop in
this extension, so no test ever exercised the kernels' parallel work splits. These tests do: every op
against the oracle at 1, 2 and 3 threads (3 gives uneven splits), on problem shapes that take each
kernel's parallel paths (prefill tiles, decode-style split keys, backward splits, many compaction items).
"""
import sys

import pytest
import torch

import anllm_ext
from anllm_ext import _C, reference

from helpers import kept_slots, layout, qkv, token_stream

THREADS = [1, 2, 3]


def test_extension_is_built_with_openmp():
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("setup.py compiles with OpenMP only on Linux with an OpenMP torch")
    assert _C.with_openmp == 1, "anllm_ext._C was compiled without -fopenmp: its kernels would run on one thread"


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_prefill_forward_and_backward_at_any_thread_count(threads):
    torch.manual_seed(threads)
    ids, mask = token_stream(2, 300, "random", "mixed")
    lay = layout(ids, mask)
    q, k, v = qkv(2, 9, 3, 300, 300, 64, requires_grad=True)
    out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, lay, lay)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.anchor_attention_ref(qr, kr, vr, lay, lay, return_lse=True)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), (qr, kr, vr))
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    for name, got, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("threads", THREADS, indirect=True)
@pytest.mark.parametrize("B, Tq", [(1, 1), (1, 5), (2, 1)])
def test_decode_against_compacted_cache_at_any_thread_count(threads, B, Tq):
    # A compacted cache (anchors in one run, then the open segment) long enough that few query tiles
    # split their keys over the threads (B=1), or not (B=2: enough tiles).
    torch.manual_seed(10 * threads + Tq + B)
    ids, mask = token_stream(B, 1600 + Tq, "cache_like", "left")
    full = layout(ids, mask)
    keep = kept_slots(full[:, :-Tq])
    rows = [torch.cat([keep[b].nonzero().squeeze(1), torch.arange(1600, 1600 + Tq)]) for b in range(B)]
    n = min(len(r) for r in rows)
    index = torch.stack([r[-n:] for r in rows])  # equal lengths: the longer row drops its oldest slots
    k_lay = anllm_ext.Layout(*(t.gather(1, index) for t in full.as_tuple()))
    q_lay = full[:, -Tq:]
    q, k, v = qkv(B, 9, 3, Tq, n, 64)
    out = anllm_ext.anchor_attention(q, k, v, q_lay, k_lay)
    ref = reference.anchor_attention_ref(q, k, v, q_lay, k_lay)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("threads", THREADS, indirect=True)
def test_compaction_at_any_thread_count(threads):
    torch.manual_seed(threads)
    keys = [torch.randn(3, 3, 500, 64) for _ in range(7)]
    values = [torch.randn(3, 3, 500, 64) for _ in range(7)]
    keep = torch.rand(3, 500) < 0.1
    lengths = torch.tensor([500, 0, 333])
    expected, expected_len = reference.compact_ref(keys + values, keep, lengths)
    new_len = anllm_ext.compact_kv_(keys, values, keep, lengths)
    assert torch.equal(new_len, expected_len)
    for got, exp in zip(keys + values, expected):
        for b in range(3):
            assert torch.equal(got[b, :, : int(new_len[b])], exp[b, :, : int(new_len[b])])
