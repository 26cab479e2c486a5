"""A short run of the op fuzz driver (tools/fuzz_ops.py; the long run and the sanitizer build are
`make fuzz` / `make sanitize`), and reproducers of what it found.

Valid calls must equal the oracle, malformed ones must raise an error naming the problem. Each bug it
found in a kernel file keeps a reproducer below (they were strict xfails until fixed). A bug found and
not yet fixed goes into KNOWN_BUGS in tools/fuzz_ops.py (the driver then skips such calls) with a strict
xfail here.
"""
import os
import subprocess
import sys

import pytest
import torch

import anllm_ext

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")
sys.path.insert(0, TOOLS)
import fuzz_ops  # noqa: E402

# A fixed number of calls (reproducible in CI; ~20-40 s on 2 idle cores), optionally capped in time.
FUZZ_CALLS = int(os.environ.get("ANLLM_FUZZ_CALLS", 200))
FUZZ_SECONDS = float(os.environ["ANLLM_FUZZ_SECONDS"]) if os.environ.get("ANLLM_FUZZ_SECONDS") else None


def test_fuzz_short_run():
    summary = fuzz_ops.run(calls=FUZZ_CALLS, seconds=FUZZ_SECONDS, seed=int(os.environ.get("ANLLM_FUZZ_SEED", 0)),
                           max_failures=10, log=lambda msg: None)
    failures = [f"{f['op']} seed={f['seed']} ({f['kind']}): {f['message']}" for f in summary["failures"]]
    assert not failures, "\n".join(failures)
    done = summary["calls_per_op"]
    for name, st in summary["ops"].items():  # every op really ran, valid and malformed
        assert st["valid"] >= done // 4 and st["malformed"] >= done // 10, (name, st)


def test_fuzz_detects_a_wrong_kernel(monkeypatch):
    """The driver itself can fail: a kernel that scales its output slightly is caught as a mismatch."""
    real = anllm_ext.anchor_attention_with_lse
    monkeypatch.setattr(anllm_ext, "anchor_attention_with_lse", lambda *a, **k: tuple(
        t * 1.001 if i == 0 else t for i, t in enumerate(real(*a, **k))))
    summary = fuzz_ops.run(calls=30, seed=3, only=["anchor_attention"], malformed_share=0.0, log=lambda msg: None)
    assert any(f["kind"] == "mismatch" for f in summary["failures"])


def test_fuzz_detects_a_missing_check():
    """... and a malformed call that is accepted: a wrapper that swallows the error is caught."""
    def swallowing(*args, **kwargs):
        try:
            return anllm_ext.ops.anchor_attention(*args, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            return None

    rng, gen = fuzz_ops.random.Random(0), torch.Generator().manual_seed(0)
    q, k, v, q_lay, k_lay, _ = fuzz_ops.attention_problem(rng, gen, batches=[1])
    with pytest.raises(fuzz_ops.Malformed, match="accepted without an error"):
        fuzz_ops.expect_error(lambda: swallowing(q.double(), k, v, q_lay, k_lay), ["dtype"], "float64 q")


# -------------------------------------------------------------------- fixed in the wrapper (ops.py)
def test_append_rejects_one_buffer_for_keys_and_values():
    cache = torch.randn(1, 1, 8, 4)
    lay = anllm_ext.token_layout(torch.full((1, 4), 5), [1])
    q, k_new = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    with pytest.raises(ValueError, match="k_cache and v_cache share memory"):
        anllm_ext.anchor_attention_append_(q, k_new, k_new, cache, cache, [3], lay[:, 3:], lay)


def test_zero_head_dim_names_the_problem():
    q = torch.randn(1, 1, 2, 0)
    lay = anllm_ext.token_layout(torch.full((1, 2), 5), [1])
    with pytest.raises(ValueError, match="head dim"):
        anllm_ext.anchor_attention(q, q, q, lay, lay)


# -------------------------------------------------------------------- found in csrc/, not fixed yet
def _run_isolated(code):
    """Runs code in a fresh interpreter (a crash must not take the test process with it)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.abspath(__file__)))


def test_backward_of_an_empty_batch():  # was a SIGFPE (B=0 divided the backward's work split by zero)
    r = _run_isolated(
        "import torch, anllm_ext\n"
        "lay = anllm_ext.token_layout(torch.zeros(0, 5, dtype=torch.long), [1])\n"
        "q, k, v = (torch.randn(0, 1, 5, 8, requires_grad=True) for _ in range(3))\n"
        "anllm_ext.anchor_attention(q, k, v, lay, lay).sum().backward()\n"
        "assert q.grad.shape == q.shape\n")
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-500:]}"


def test_layout_start_position_overflow_is_an_error():
    with pytest.raises((ValueError, RuntimeError), match="position"):
        anllm_ext.token_layout(torch.zeros(1, 4, dtype=torch.long), [1], start=(2**63 - 2, 0))


def test_compact_empty_caches():
    keys, values = [torch.zeros(0, 2, 8, 4)], [torch.zeros(0, 2, 8, 4)]
    keep, lengths = torch.zeros(0, 8, dtype=torch.bool), torch.zeros(0, dtype=torch.long)
    assert anllm_ext.compact_kv_(keys, values, keep, lengths).shape == (0,)


def test_compact_rejects_overlapping_views():
    base = torch.randn(1, 2, 10, 4)
    keep, lengths = torch.rand(1, 8) < 0.5, torch.tensor([8])
    with pytest.raises(RuntimeError, match="overlap|share memory"):
        anllm_ext.compact_slots_([base[:, :, :8], base[:, :, 2:10]], keep, lengths)


def test_append_with_new_keys_overlapping_their_slots():
    k_cache, v_cache = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    lay = anllm_ext.token_layout(torch.full((1, 10), 5), [1])
    k_new = k_cache[:, :, 5:9]  # the slots just before the destination 6..9
    want = k_new.clone()
    try:
        anllm_ext.anchor_attention_append_(torch.randn(1, 1, 4, 8), k_new, v_cache[:, :, :4].clone(),
                                           k_cache, v_cache, [6], lay[:, 6:10], lay)
    except (RuntimeError, ValueError) as exc:  # an error naming the overlap is a fix too
        assert "overlap" in str(exc)
        return
    assert torch.equal(k_cache[:, :, 6:10], want)


def test_append_offsets_near_int64_max_name_the_problem():
    """Found under UBSan/ASan: offsets[b] + Tq overflowed int64 in the kernel's range check, which then
    passed and the copy wrote far outside the cache. The wrapper rejects such offsets."""
    cache_k, cache_v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    lay = anllm_ext.token_layout(torch.full((1, 4), 5), [1])
    q = torch.randn(1, 1, 1, 4)
    for bad in (2**63 - 1, 2**63 - 9, 2**62 + 1, -1, 4):
        with pytest.raises((ValueError, RuntimeError), match="offsets"):
            anllm_ext.anchor_attention_append_(q, q, q, cache_k, cache_v, [bad], lay[:, 3:], lay)


def test_raw_append_op_offsets_near_int64_max():
    r = _run_isolated(
        "import torch, anllm_ext\n"
        "lay = anllm_ext.token_layout(torch.full((1, 4), 5), [1])\n"
        "k, v, q = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 1, 4)\n"
        "try:\n"
        "    torch.ops.anllm.anchor_attention_append_(q, q, q, k, v, [2**63 - 1], *lay[:, 3:].as_tuple(),\n"
        "                                             *lay.as_tuple(), 0.5)\n"
        "except RuntimeError as e:\n"
        "    assert 'offsets' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('accepted')\n")
    assert r.returncode == 0, f"exit status {r.returncode}: {r.stderr[-500:]}"


def test_calls_that_failed_the_long_sanitized_run():
    """Both were the driver's own errors (10,000 calls per op under ASan/UBSan, docs/benchmarks.md): a gradient
    tolerance scaled by a gradient that is exactly 0 (one visible key per query), and a 'smaller cache'
    that was not smaller (Tk = 0)."""
    fuzz_ops.replay("anchor_attention_grad", 796663)
    fuzz_ops.replay("anchor_attention_append_", 867668)
