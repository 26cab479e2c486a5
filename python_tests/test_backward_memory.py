"""The CPU backward's scratch memory is bounded by a byte budget, whatever the thread count.

To keep every thread busy when B * Hkv is small, the backward splits the query tiles of each key head
over several work items; every split but the first accumulates dk/dv into its own fp32 partial of
B x Hkv x Tk x D. Sized by the thread count alone that was splits x B x Hkv x Tk x D x 8 bytes (about
8.6 GB at 64 threads, Tk = 32k, D = 128); the partials now stay within ANLLM_CPU_BWD_SCRATCH_MB
(default 512 MiB) and the split count drops instead.
"""
import os
import subprocess
import sys

import pytest
import torch

import anllm_ext
from anllm_ext import _C, reference

from helpers import layout, qkv, token_stream

MiB = 1 << 20
DEFAULT_BUDGET = 512 * MiB


def partial_bytes(B, Hkv, Tk, D):
    return 2 * B * Hkv * Tk * D * 4  # one fp32 dk and dv


@pytest.mark.parametrize("threads", [1, 2, 16, 64, 256])
def test_planned_scratch_stays_within_the_budget_at_any_thread_count(threads, monkeypatch):
    monkeypatch.delenv("ANLLM_CPU_BWD_SCRATCH_MB", raising=False)
    B, Hkv, T, D = 1, 8, 32768, 128  # a long-context case: 268 MB per split
    splits, scratch = _C.cpu_backward_plan(B, Hkv, T, T, D, threads)
    assert scratch == (splits - 1) * partial_bytes(B, Hkv, T, D)
    assert scratch <= DEFAULT_BUDGET
    assert splits >= 1
    # Smaller problems still split for parallelism: 4 items per thread while the budget allows.
    splits, scratch = _C.cpu_backward_plan(1, 1, 4096, 4096, 64, threads)
    assert splits == min(4 * threads, 4096 // 64, 1 + DEFAULT_BUDGET // partial_bytes(1, 1, 4096, 64))
    assert scratch <= DEFAULT_BUDGET


def test_budget_comes_from_the_environment(monkeypatch):
    per_split = partial_bytes(1, 1, 2048, 64)  # 1 MiB
    monkeypatch.setenv("ANLLM_CPU_BWD_SCRATCH_MB", "0")
    assert _C.cpu_backward_plan(1, 1, 2048, 2048, 64, 64) == (1, 0)
    monkeypatch.setenv("ANLLM_CPU_BWD_SCRATCH_MB", "3")
    assert _C.cpu_backward_plan(1, 1, 2048, 2048, 64, 64) == (4, 3 * per_split)
    for bad in ("-1", "lots", "1.5"):
        monkeypatch.setenv("ANLLM_CPU_BWD_SCRATCH_MB", bad)
        with pytest.raises(RuntimeError, match="ANLLM_CPU_BWD_SCRATCH_MB must be a whole number of MiB"):
            _C.cpu_backward_plan(1, 1, 2048, 2048, 64, 64)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("budget_mib", ["0", "2", "512"])
def test_budgeted_backward_matches_the_reference(threads, budget_mib, monkeypatch):
    # 1 MiB per split here: budget 0 runs one split, 2 runs three, 512 as many as the threads want.
    monkeypatch.setenv("ANLLM_CPU_BWD_SCRATCH_MB", budget_mib)
    B, Hq, Hkv, T, D = 1, 2, 1, 2048, 64
    splits, _ = _C.cpu_backward_plan(B, Hkv, T, T, D, threads)
    assert splits == min({"0": 1, "2": 3, "512": 4 * threads}[budget_mib], T // 64)
    ids, mask = token_stream(B, T, "random", "left", anchor_every=32)
    lay = layout(ids, mask)
    q, k, v = qkv(B, Hq, Hkv, T, T, D, requires_grad=True)
    out = anllm_ext.anchor_attention(q, k, v, lay, lay)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_out = reference.anchor_attention_ref(qr, kr, vr, lay, lay)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), (qr, kr, vr))
    for name, got, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# A long sequence's backward at 64 threads (as on a big server; oversubscribed here, which only costs
# time): measures the peak resident memory the backward adds, in a fresh process.
LONG_BACKWARD = r"""
import os, resource, sys
import torch
import anllm_ext
from anllm_ext import _C
sys.path.insert(0, sys.argv[1])
from helpers import layout, qkv, token_stream

torch.manual_seed(0)
torch.set_num_threads(64)
B, Hq, Hkv, T, D = 1, 2, 1, 16384, 64
ids, mask = token_stream(B, T, "periodic", "none", anchor_every=64)
lay = layout(ids, mask)
q, k, v = qkv(B, Hq, Hkv, T, T, D, requires_grad=True)
out = anllm_ext.anchor_attention(q, k, v, lay, lay)
dout = torch.randn_like(out)
loss = (out * dout).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
grads = torch.autograd.grad(loss, (q, k, v))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
splits, scratch = _C.cpu_backward_plan(B, Hkv, T, T, D, 64)
# The same gradients with no scratch at all (one split): the budget changes the work split only.
os.environ["ANLLM_CPU_BWD_SCRATCH_MB"] = "0"
out = anllm_ext.anchor_attention(q, k, v, lay, lay)
serial = torch.autograd.grad((out * dout).sum(), (q, k, v))
for name, got, ref in zip("qkv", grads, serial):
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
print(splits, scratch, after - before)
"""


def test_long_sequence_backward_memory_stays_within_the_budget():
    budget = 64 * MiB
    env = {**os.environ, "ANLLM_CPU_BWD_SCRATCH_MB": str(budget // MiB)}
    result = subprocess.run([sys.executable, "-c", LONG_BACKWARD, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    splits, scratch, grown = (int(x) for x in result.stdout.split())
    per_split = partial_bytes(1, 1, 16384, 64)  # 8 MiB: unbounded, 64 threads would take 256 splits (2 GiB)
    assert splits == 1 + budget // per_split and scratch == budget
    # What the backward may add: the scratch, its three results (16 MiB), and allocator slack.
    outputs = (2 + 1 + 1) * 16384 * 64 * 4
    assert grown <= scratch + outputs + 48 * MiB, f"the backward grew the peak RSS by {grown / MiB:.0f} MiB"
