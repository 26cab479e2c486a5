"""The CUDA kernels are registered for every op whenever the extension was compiled with CUDA.

Runs on CPU-only machines: registration needs no GPU. Whether the extension was compiled with CUDA is
read from the shared library itself (it links libc10_cuda only when csrc/cuda/*.cu were built), so the
test cannot pass vacuously because registration failed. Set ANLLM_EXPECT_CUDA=1 to turn a CPU-only
build into a failure instead of a skip (e.g. in a CI job that builds with the CUDA toolkit).
"""
import os

import pytest
import torch

import anllm_ext
from anllm_ext import _C

OPS = ("anchor_attention_fwd", "anchor_attention_bwd", "anchor_attention_append_", "compact_")
CPU_ONLY_OPS = ("token_layout",)  # other devices compute the layout with ATen ops (anllm_ext/layout.py)
# Device-agnostic ops: registered once, for every backend (csrc/append_attention.cpp).
COMPOSITE_OPS = ("anchor_attention_append_",)


def _has_kernel(op: str, key: str) -> bool:
    """Whether calls of anllm::op on `key` tensors reach a kernel (its own or a composite one)."""
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"anllm::{op}", key)


def _built_with_cuda() -> bool:
    with open(_C.__file__, "rb") as f:
        return b"libc10_cuda.so" in f.read()


def test_cpu_kernels_registered():
    for op in OPS + CPU_ONLY_OPS:
        assert _has_kernel(op, "CPU"), op


def test_device_agnostic_ops_registered_once():
    for op in COMPOSITE_OPS:
        name = f"anllm::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), op


def test_cuda_kernels_registered():
    if not _built_with_cuda():
        if os.environ.get("ANLLM_EXPECT_CUDA", "") == "1":
            pytest.fail("ANLLM_EXPECT_CUDA=1 but anllm_ext._C was built without CUDA kernels")
        pytest.skip("anllm_ext._C was built CPU-only (no CUDA toolkit, CPU torch or ANLLM_FORCE_CPU=1)")
    missing = [op for op in OPS if not _has_kernel(op, "CUDA")]
    assert not missing, f"CUDA kernels missing for {missing}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_smoke():
    """Minimal end-to-end call of each op on the GPU (the full suites cover semantics)."""
    ids = torch.tensor([[1, 5, 9, 2, 5, 3, 4, 9, 6]], device="cuda")
    lay = anllm_ext.token_layout(ids, 9)
    q = torch.randn(1, 4, 9, 64, device="cuda", requires_grad=True)
    k = torch.randn(1, 2, 9, 64, device="cuda", requires_grad=True)
    v = torch.randn(1, 2, 9, 64, device="cuda", requires_grad=True)
    out = anllm_ext.anchor_attention(q, k, v, lay, lay)
    ref = anllm_ext.reference.anchor_attention_ref(q, k, v, lay, lay)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    out.sum().backward()
    # the fused write + attention of an AnchorCache layer: the 9 tokens into an empty 12-slot cache
    k_cache, v_cache = (torch.zeros(1, 2, 12, 64, device="cuda") for _ in range(2))
    fused = anllm_ext.anchor_attention_append_(q.detach(), k.detach(), v.detach(), k_cache, v_cache, [0], lay, lay)
    torch.testing.assert_close(fused, out.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(k_cache[:, :, :9], k.detach()) and torch.equal(v_cache[:, :, :9], v.detach())
    kc = torch.arange(2 * 3 * 10 * 8, dtype=torch.float32, device="cuda").reshape(2, 3, 10, 8)
    keep = torch.rand(2, 10, device="cuda") < 0.5
    lengths = torch.tensor([10, 7], device="cuda")
    (want,), want_len = anllm_ext.reference.compact_ref([kc], keep, lengths)
    new_len = anllm_ext.compact_kv_([kc], [], keep, lengths)
    assert torch.equal(new_len, want_len)
    for b in range(2):
        n = int(want_len[b])
        assert torch.equal(kc[b, :, :n], want[b, :, :n])
