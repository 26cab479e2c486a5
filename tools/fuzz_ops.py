"""Fuzz driver for the anllm ops: random valid calls against the plain-PyTorch oracle, and malformed
calls that must raise a Python exception naming the problem.

    python tools/fuzz_ops.py --calls 10000 [--seconds 600] [--seed 0] [--json out.json]

``--calls`` is per op; the run stops early when ``--seconds`` (for the whole run) is spent. Ops:
``token_layout``, ``anchor_attention`` (forward, with the log-sum-exp), ``anchor_attention_grad``
(backward), ``anchor_attention_append_`` and ``compact_kv_`` / ``compact_slots_``. Valid inputs vary
batch (0-3), lengths (0, 1, tile edges, ~140), head dims (1-256), GQA ratios (1-4), dtypes, strides
(transposed and sliced views) and layouts with anchors and padding anywhere (arbitrary positions,
segments and key orders, not only what token_layout produces). About a third of the calls are
malformed: wrong ranks, dtypes, devices (``meta`` tensors stand in for another device), shapes,
negative or oversized lengths/offsets/positions, overlapping buffers.

``--emu LIB`` runs the CUDA kernels instead, under the CUDA emulator (LIB: the library csrc/emu/build.py
builds): the op wrappers are routed to ``torch.ops.anllm_cuda_emu`` (python_tests/emu_helpers.py), and
token_layout, which has no CUDA kernel, is left out.

Exit status 1 when any valid call differs from the oracle, any malformed call is accepted, or an error
message does not name the problem. Run it under the sanitizers with ``tools/build_sanitized.sh``
(``SAN_EMU=1``: the emulated CUDA kernels).
Failures print a one-line reproducer (``--only OP --seed S --calls 1``-style: op, call seed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import traceback


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=10000, help="calls per op")
    p.add_argument("--seconds", type=float, default=None, help="time limit for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated ops to fuzz (default: all)")
    p.add_argument("--malformed", type=float, default=0.33, help="share of malformed calls")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--import-from", default=None,
                   help="import anllm_ext from this source tree (default: the one holding this file if it has "
                        "an in-place build, else the installed package)")
    p.add_argument("--max-failures", type=int, default=20, help="stop after this many failures")
    p.add_argument("--trace", action="store_true", help="print every call's op and seed before it runs (crashes)")
    p.add_argument("--include-known", action="store_true", help="also run calls that hit a known crash")
    p.add_argument("--emu", default=None, metavar="LIB",
                   help="fuzz the CUDA kernels under the CUDA emulator (LIB: build/cuda_emu/anllm_ext_cuda_emu.so)")
    return p.parse_args(argv)


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # Standalone: the tree given, else this file's source tree when it holds an in-place build, else the
    # installed anllm_ext.
    import glob

    _tree = ARGS.import_from or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    if ARGS.import_from or glob.glob(os.path.join(_tree, "anllm_ext", "_C*.so")):
        sys.path.insert(0, os.path.abspath(_tree))

import torch  # noqa: E402

import anllm_ext  # noqa: E402
from anllm_ext import reference  # noqa: E402
from anllm_ext.layout import Layout, _token_layout_aten  # noqa: E402

ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
RAW = torch.ops.anllm  # the operators the raw calls reach (torch.ops.anllm_cuda_emu under --emu)
# The CUDA ops' contract differs from the CPU ops' where checking would need a host sync of device data
# (csrc/cuda/): key positions are any int64 (the CPU kernels fold them into int32 and raise outside
# [0, 2^31 - 1)), and compaction lengths outside [0, Cap] are clamped (the CPU kernel raises). Under --emu
# those calls are valid calls, checked against the oracle.
CUDA_CONTRACT = False
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Bugs this fuzzer found in files it may not fix (csrc/*.cpp). Calls that would hit one are skipped and
# counted unless --include-known, so a run still finds everything else; each has a reproducer in
# python_tests/test_fuzz.py (xfail until fixed). Remove an entry once its fix is in.
KNOWN_BUGS = {
    # none open. Fixed (each keeps its reproducer in python_tests/test_fuzz.py): token_layout's
    # start-position overflow, the compaction's empty tensors and overlapping views, new keys/values that
    # are views of the cache in anchor_attention_append_, the raw append op's offsets overflow.
}
SKIP_KNOWN = True


class SkipKnown(Exception):
    """The call would hit a known bug (KNOWN_BUGS)."""


def avoid_known(name, *args):
    if SKIP_KNOWN and KNOWN_BUGS[name](*args):
        raise SkipKnown(name)


class Malformed(Exception):
    """A malformed call was accepted, or its error did not name the problem."""


class Mismatch(Exception):
    """A valid call differs from the oracle."""


# ------------------------------------------------------------------------------------------ inputs
def rand_len(rng: random.Random, hi: int = 140) -> int:
    """Lengths around the kernels' edges (0, 1, tiles of 16/64/128) more often than elsewhere."""
    r = rng.random()
    if r < 0.15:
        return rng.choice([0, 1, 2])
    if r < 0.3:
        return min(hi, rng.choice([15, 16, 17, 63, 64, 65, 127, 128, 129]))
    if r < 0.9:
        return rng.randint(1, min(hi, 40))
    return rng.randint(1, hi)


def rand_head_dim(rng: random.Random) -> int:
    return rng.choice([1, 2, 3, 8, 16, 31, 32, 40, 64, 64, 64, 80, 96, 128, 255, 256]) if rng.random() < 0.7 \
        else rng.randint(1, 256)


def strided(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values as ``t`` [B,H,T,D] in a random memory layout: contiguous, [B,T,H,D] transposed (as
    transformers' projections give it), or a slice of a larger buffer (padded head dim or tokens)."""
    kind = rng.randrange(4)
    B, H, T, D = t.shape
    if kind == 1:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == 2:
        big = torch.zeros(B, H, T + rng.randint(1, 5), D + rng.randint(1, 9), dtype=t.dtype)
        big[:, :, :T, :D] = t
        return big[:, :, :T, :D]
    if kind == 3 and B > 1:
        big = torch.zeros(2 * B, H, T, D, dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t


def rand_layout(rng: random.Random, gen: torch.Generator, B: int, T: int, anchor_p=None, pad_p=None) -> Layout:
    """Any layout the AnSAN mask rule (docs/method.md) is defined for: arbitrary positions (unsorted, repeated), segments
    (negative too), anchors and padding anywhere; half of the time a realistic one (token_layout of a
    random stream, possibly continuing a compacted cache)."""
    if rng.random() < 0.5:
        ids = torch.randint(2, 20, (B, T), generator=gen)
        ids[torch.rand(B, T, generator=gen) < (anchor_p if anchor_p is not None else rng.random() * 0.5)] = 1
        mask = (torch.rand(B, T, generator=gen) >= (pad_p if pad_p is not None else rng.random() * 0.3)).long()
        start = (torch.randint(0, 5000, (B,), generator=gen), torch.randint(-3, 300, (B,), generator=gen))
        return anllm_ext.token_layout(ids, [1], mask, start=start if rng.random() < 0.5 else None)
    span = rng.choice([4, 50, 5000, 2**31 - 2])
    pos = torch.randint(0, span, (B, T), generator=gen)
    seg_lo = rng.choice([0, -5, -(2**31)])
    seg = torch.randint(0, rng.choice([1, 3, 10]), (B, T), generator=gen).to(torch.int32) + seg_lo
    anc = torch.rand(B, T, generator=gen) < rng.random()
    val = torch.rand(B, T, generator=gen) >= rng.random() * 0.5
    return Layout(pos, seg, anc, val)


def rand_qkv(rng, gen, B, Hq, Hkv, Tq, Tk, D, dtype):
    q = torch.randn(B, Hq, Tq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=gen).to(dtype)
    return strided(q, rng), strided(k, rng), strided(v, rng)


def attention_problem(rng, gen, batches=(0, 1, 1, 1, 2, 3)):
    B = rng.choice(batches)
    Hkv = rng.choice([1, 1, 2, 3])
    Hq = Hkv * rng.choice([1, 2, 3, 4])
    Tq, Tk, D = rand_len(rng, 130), rand_len(rng, 140), rand_head_dim(rng)
    dtype = rng.choice(DTYPES) if rng.random() < 0.4 else torch.float32
    if rng.random() < 0.3:  # decode-like: one query at the end of a cache
        Tq = 1
    q, k, v = rand_qkv(rng, gen, B, Hq, Hkv, Tq, Tk, D, dtype)
    if rng.random() < 0.3 and Tq <= Tk:  # self-attention of one chunk: shared layout
        k_lay = rand_layout(rng, gen, B, Tk)
        q_lay = k_lay[:, Tk - Tq:]
    else:
        q_lay, k_lay = rand_layout(rng, gen, B, Tq), rand_layout(rng, gen, B, Tk)
    scale = None if rng.random() < 0.8 else rng.uniform(0.01, 2.0)
    return q, k, v, q_lay, k_lay, scale


# ------------------------------------------------------------------------------------------ checks
def check_close(name, ours, ref, atol, rtol):
    if ours.shape != ref.shape:
        raise Mismatch(f"{name}: shape {tuple(ours.shape)} != oracle {tuple(ref.shape)}")
    if ours.numel() == 0:
        return
    o, r = ours.double(), ref.double()
    same_inf = (o == r) | (torch.isnan(o) & torch.isnan(r))
    err = torch.where(same_inf, torch.zeros_like(o), (o - r).abs())
    bad = ~(err <= atol + rtol * r.abs().nan_to_num(posinf=0, neginf=0))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise Mismatch(f"{name}: {int(bad.sum())} elements differ, e.g. at {i}: {o[tuple(i)].item()} vs oracle "
                       f"{r[tuple(i)].item()} (atol {atol}, rtol {rtol})")


def check_fp32(name, ours, q, k, v, q_lay, k_lay, scale, ref=None):
    """fp32 outputs: within atol 2e-5 / rtol 2e-4 of the fp32 oracle or, where the problem itself amplifies
    rounding (large scales, head dims ~256: sharp softmax over long dot products), by the project's rule: our
    error against the float64 oracle at most 2x that of the fp32 oracle, plus 2e-5. ``ref``: the fp32 oracle's
    output when the caller has it already."""
    if ref is None:
        ref = reference.anchor_attention_ref(q, k, v, q_lay, k_lay, scale)
    try:
        check_close(name, ours, ref, 2e-5, 2e-4)
        return
    except Mismatch:
        pass
    ref64 = reference.anchor_attention_ref(q, k, v, q_lay, k_lay, scale, compute_dtype=torch.float64)
    err = (ours.double() - ref64).abs().max().item()
    err_plain = (ref.double() - ref64).abs().max().item()
    if not err <= 2 * err_plain + 2e-5:
        raise Mismatch(f"{name}: fp32 error {err:.3g} against float64 > 2 x the fp32 oracle's {err_plain:.3g} + 2e-5")


def check_low_precision(name, ours, q, k, v, q_lay, k_lay, scale):
    """The project's rule for bf16/fp16: our error against fp32 is at most 2x that of plain PyTorch at
    our dtype, plus one rounding of the output."""
    ref32 = reference.anchor_attention_ref(q, k, v, q_lay, k_lay, scale)
    plain = reference.anchor_attention_ref(q, k, v, q_lay, k_lay, scale, compute_dtype=None)
    if ours.numel() == 0:
        return
    err_ours = (ours.float() - ref32.float()).abs().max().item()
    err_plain = (plain.float() - ref32.float()).abs().max().item()
    ulp = 2.0 ** (-7 if ours.dtype == torch.bfloat16 else -10) * max(1.0, ref32.float().abs().max().item())
    if not err_ours <= 2 * err_plain + ulp:
        raise Mismatch(f"{name}: {ours.dtype} error {err_ours:.3g} > 2 x plain PyTorch's {err_plain:.3g} + {ulp:.3g}")


def expect_error(fn, keywords, what):
    """fn() must raise one of ERRORS whose message names the problem (contains one of ``keywords``)."""
    try:
        fn()
    except ERRORS as exc:
        msg = str(exc).lower()
        if not any(k.lower() in msg for k in keywords):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Malformed(f"{what}: raised {type(exc).__name__} without naming the problem "
                            f"(expected one of {keywords}): {first[:300]}")
        return
    raise Malformed(f"{what}: accepted without an error")


# ------------------------------------------------------------------------------------------ ops
def fuzz_token_layout(rng, gen, malformed):
    B, T = rng.choice([0, 1, 2, 3]), rand_len(rng, 130)
    id_dtype = rng.choice([torch.int64, torch.int64, torch.int32, torch.int16, torch.uint8])
    ids = torch.randint(0, 30, (B, T), generator=gen).to(id_dtype)
    n_anchor_ids = rng.choice([0, 1, 1, 2, 3, 17, 40])
    anchor_ids = [rng.randrange(30) for _ in range(n_anchor_ids)]
    if anchor_ids:
        ids[torch.rand(B, T, generator=gen) < rng.random() * 0.5] = anchor_ids[0]
    mask = None
    if rng.random() < 0.7:
        mask = (torch.rand(B, T, generator=gen) >= rng.random() * 0.4)
        mask = mask.to(rng.choice([torch.int64, torch.bool, torch.int32, torch.float32]))
        if rng.random() < 0.2:
            mask = mask.t().contiguous().t() if B == T else mask
    start = None
    if rng.random() < 0.5:
        start = (torch.randint(0, 10**6, (B,), generator=gen), torch.randint(-100, 10**4, (B,), generator=gen))
        if rng.random() < 0.3:
            start = (rng.randrange(10**6), rng.randrange(10**4))  # scalars broadcast to every row
    anchors_arg = anchor_ids if rng.random() < 0.5 else torch.tensor(anchor_ids, dtype=torch.int64)
    if not malformed:
        lay = anllm_ext.token_layout(ids, anchors_arg, mask, start=start)
        ref = _token_layout_aten(ids, anchor_ids, mask, start)
        for name, a, b in zip(("positions", "segments", "is_anchor", "valid"), lay.as_tuple(), ref.as_tuple()):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                raise Mismatch(f"token_layout {name} differs from the ATen formulation")
        if T > 0:
            for name, a, b in zip(("next position", "next segment"), lay.next_start(), ref.next_start()):
                if not torch.equal(a, b):
                    raise Mismatch(f"token_layout {name} differs: {a.tolist()} vs {b.tolist()}")
            if lay.has_boundary() != ref.has_boundary():
                raise Mismatch("token_layout boundary flag differs")
        return
    kind = rng.randrange(7)
    if kind == 0:
        bad = ids.reshape(-1) if rng.random() < 0.5 else ids[None]
        expect_error(lambda: anllm_ext.token_layout(bad, anchors_arg, None), ["2-d", "input_ids"], "ids of rank != 2")
    elif kind == 1:
        expect_error(lambda: anllm_ext.token_layout(ids.float(), anchors_arg, None), ["integer", "dtype"], "float ids")
    elif kind == 2:
        bad = torch.ones(B, T + 1)
        expect_error(lambda: anllm_ext.token_layout(ids, anchors_arg, bad), ["attention_mask"], "mask of another shape")
    elif kind == 3:
        bad = torch.ones(B, T, device="meta")
        expect_error(lambda: anllm_ext.token_layout(ids, anchors_arg, bad), ["device", "is on", "meta"],
                     "mask on another device")
    elif kind == 4:
        bad = (torch.zeros(B + 2, dtype=torch.long), torch.zeros(B + 2, dtype=torch.long))
        expect_error(lambda: anllm_ext.token_layout(ids, anchors_arg, mask, start=bad), ["start", "shape", "size"],
                     "start of another batch size")
    elif kind == 5:
        if B == 0:
            return
        seg = rng.choice([2**31, 2**40, -(2**31) - 5])
        bad = (torch.zeros(B, dtype=torch.long), torch.full((B,), seg, dtype=torch.long))
        expect_error(lambda: anllm_ext.token_layout(ids, anchors_arg, mask, start=bad), ["segment"],
                     f"start segment {seg} outside int32")
    else:
        if B == 0 or T == 0:
            return
        pos = rng.choice([2**63 - 1, 2**63 - 1 - T // 2, -(2**63)])
        bad = (torch.full((B,), pos, dtype=torch.long), torch.zeros(B, dtype=torch.long))
        expect_error(lambda: anllm_ext.token_layout(ids, anchors_arg, None, start=bad), ["position"],
                     f"start position {pos} (positions overflow int64)")


def fuzz_attention(rng, gen, malformed):
    q, k, v, q_lay, k_lay, scale = attention_problem(rng, gen)
    if not malformed:
        out, lse = anllm_ext.anchor_attention_with_lse(q, k, v, q_lay, k_lay, scale)
        ref, ref_lse = reference.anchor_attention_ref(q, k, v, q_lay, k_lay, scale, return_lse=True)
        if out.dtype != q.dtype or lse.dtype != torch.float32:
            raise Mismatch(f"anchor_attention dtypes {out.dtype}/{lse.dtype} for {q.dtype} inputs")
        if q.dtype == torch.float32:
            check_fp32("anchor_attention out", out, q, k, v, q_lay, k_lay, scale, ref=ref)
            check_close("anchor_attention lse", lse, ref_lse, 1e-4, 1e-5)
        else:
            check_low_precision("anchor_attention out", out, q, k, v, q_lay, k_lay, scale)
            check_close("anchor_attention lse", lse, ref_lse, 2e-2, 2e-3)
        return
    malformed_attention(rng, gen, q, k, v, q_lay, k_lay, anllm_ext.anchor_attention)


def malformed_attention(rng, gen, q, k, v, q_lay, k_lay, attn):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    kind = rng.randrange(14)
    call = lambda *a: (lambda: attn(*a))
    if kind == 0:
        which = rng.randrange(3)
        args = [q, k, v]
        args[which] = args[which].flatten(0, 1) if rng.random() < 0.5 else args[which][None]
        expect_error(call(*args, q_lay, k_lay), ["4-d", "must be"], "q/k/v of rank != 4")
    elif kind == 1:
        expect_error(call(q.double(), k.double(), v.double(), q_lay, k_lay), ["float32", "dtype"], "float64 inputs")
    elif kind == 2:
        other = torch.float16 if k.dtype != torch.float16 else torch.float32
        expect_error(call(q, k.to(other), v, q_lay, k_lay), ["dtype"], "k of another dtype")
    elif kind == 3:
        if Hq == 1:
            return
        bad_q = torch.randn(B, Hq + 1 if (Hq + 1) % Hkv else Hq + 2, Tq, D, generator=gen).to(q.dtype)
        if bad_q.shape[1] % Hkv == 0:
            return
        expect_error(call(bad_q, k, v, q_lay, k_lay), ["multiple", "heads"], "Hq not a multiple of Hkv")
    elif kind == 4:
        bad_k = torch.randn(B + 1, Hkv, Tk, D, generator=gen).to(q.dtype)
        expect_error(call(q, bad_k, bad_k, q_lay, rand_layout(rng, gen, B + 1, Tk)), ["batch"], "k of another batch")
    elif kind == 5:
        bad_v = torch.randn(B, Hkv, Tk + 1, D, generator=gen).to(q.dtype)
        expect_error(call(q, k, bad_v, q_lay, k_lay), ["same shape", "v"], "v of another shape")
    elif kind == 6:
        bad = torch.randn(B, Hkv, Tk, D + 1, generator=gen).to(q.dtype)
        expect_error(call(q, bad, bad, q_lay, k_lay), ["head dim"], "k of another head dim")
    elif kind == 7:
        D2 = rng.choice([0, 257, 512])
        qq, kk = torch.randn(B, Hq, Tq, D2).to(q.dtype), torch.randn(B, Hkv, Tk, D2).to(q.dtype)
        expect_error(call(qq, kk, kk, q_lay, k_lay), ["head dim"], f"head dim {D2}")
    elif kind == 8:
        bad_lay = rand_layout(rng, gen, B, Tk + 1)
        expect_error(call(q, k, v, q_lay, bad_lay), ["layout", "shape"], "key layout of another length")
    elif kind == 9:
        parts = list(k_lay.as_tuple())
        i = rng.randrange(4)
        parts[i] = parts[i].to(torch.int32 if parts[i].dtype != torch.int32 else torch.int64)
        expect_error(call(q, k, v, q_lay, Layout(*parts)), ["dtype", "layout"], "layout part of another dtype")
    elif kind == 10:
        parts = list(q_lay.as_tuple())
        i = rng.randrange(4)
        parts[i] = torch.empty(parts[i].shape, dtype=parts[i].dtype, device="meta")
        expect_error(call(q, k, v, Layout(*parts), k_lay), ["device", "is on", "meta"], "layout on another device")
    elif kind == 11:
        bad = torch.empty(k.shape, dtype=k.dtype, device="meta")
        expect_error(call(q, bad, v, q_lay, k_lay), ["device", "is on", "meta"], "k on another device")
    elif kind == 12:
        if B == 0 or Tk == 0 or Tq == 0:  # with no query the kernels return at once; nothing reads the keys
            return
        pos, seg, anc, val = (t.clone() for t in k_lay.as_tuple())
        b, j = rng.randrange(B), rng.randrange(Tk)
        val[b, j] = True
        pos[b, j] = rng.choice([-1, -(2**40), 2**31 - 1, 2**40])
        bad_lay = Layout(pos, seg, anc, val)
        if CUDA_CONTRACT:  # any int64 position is valid on CUDA
            res = attn(q, k, v, q_lay, bad_lay)
            out = res[0] if isinstance(res, (tuple, list)) else res
            if q.dtype == torch.float32:
                check_close(f"key position {pos[b, j].item()} (CUDA)", out,
                            reference.anchor_attention_ref(q, k, v, q_lay, bad_lay), 2e-5, 2e-4)
            else:
                check_low_precision(f"key position {pos[b, j].item()} (CUDA)", out, q, k, v, q_lay, bad_lay, None)
            return
        expect_error(call(q, k, v, q_lay, bad_lay), ["position"], f"key position {pos[b, j].item()}")
    else:
        which = rng.randrange(3)
        args = [q, k, v]
        args[which] = args[which].tolist() if rng.random() < 0.5 else None
        expect_error(call(*args, q_lay, k_lay), ["tensor"], "q/k/v not a tensor")


def fuzz_attention_grad(rng, gen, malformed):
    q, k, v, q_lay, k_lay, scale = attention_problem(rng, gen, batches=[0] + [1] * 5 + [2] * 3 + [3])
    # bf16/fp16: the tensor-core backward on CUDA. Only at softmax scales up to 2/sqrt(D): far above it (a
    # near one-hot softmax) delta = rowsum(dout * out) from the rounded output, the flash-attention design
    # that every device shares, errs by more than 2x plain PyTorch's autograd (docs/gpu.md).
    low = (q.dtype != torch.float32 and not malformed
           and (scale is None or scale <= 2.0 / math.sqrt(q.shape[-1])))
    if not low:
        q, k, v = q.float(), k.float(), v.float()
    if q.shape[2] * k.shape[2] * q.shape[1] > 60000:  # the oracle's backward is dense: keep it small
        q, k, v = q[:, :, :32], k[:, :, :48], v[:, :, :48]
        q_lay, k_lay = q_lay[:, :32], k_lay[:, :48]
    if malformed:
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = anllm_ext.anchor_attention(qg, kg, vg, q_lay, k_lay, scale)
        kind = rng.randrange(2)
        if kind == 0:  # gradient of the wrong shape
            bad = torch.randn(*out.shape[:-1], out.shape[-1] + 1)
            expect_error(lambda: torch.autograd.grad(out, (qg, kg, vg), bad), ["shape", "size", "mismatch"],
                         "output gradient of another shape")
        else:
            lse = torch.zeros(q.shape[:3])
            delta = torch.zeros(q.shape[0], q.shape[1], q.shape[2] + 1)
            expect_error(lambda: RAW.anchor_attention_bwd(
                out.detach(), q, k, v, lse, delta, *q_lay.as_tuple(), *k_lay.as_tuple(), 1.0),
                ["delta", "shape", "lse"], "raw backward with delta of another shape")
        return
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = anllm_ext.anchor_attention_with_lse(qg, kg, vg, q_lay, k_lay, scale)
    g, glse = torch.randn(out.shape, generator=gen).to(out.dtype), torch.randn(lse.shape, generator=gen)
    use_lse = rng.random() < 0.3
    loss = (out * g).sum() + ((lse.nan_to_num(neginf=0) * glse).sum() if use_lse else 0)
    grads = torch.autograd.grad(loss, (qg, kg, vg), allow_unused=True)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.anchor_attention_ref(qr, kr, vr, q_lay, k_lay, scale, compute_dtype=torch.float64,
                                                  return_lse=True)
    ref_loss = (ref * g.double()).sum() + ((ref_lse.nan_to_num(neginf=0) * glse.double()).sum() if use_lse else 0)
    ref_grads = torch.autograd.grad(ref_loss, (qr, kr, vr), allow_unused=True)
    # The error rule of the project's tests: our error against the float64 oracle at most 2x that of the
    # plain-PyTorch oracle run at our dtype (gradients summed over many queries carry the rounding of their
    # largest terms), plus 1e-4 of the gradient's scale in fp32, one rounding of it in bf16/fp16.
    q3, k3, v3 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    r3, r3_lse = reference.anchor_attention_ref(q3, k3, v3, q_lay, k_lay, scale, return_lse=True,
                                                compute_dtype=None if low else torch.float32)
    loss3 = (r3 * g).sum() + ((r3_lse.nan_to_num(neginf=0) * glse).sum() if use_lse else 0)
    plain_grads = torch.autograd.grad(loss3, (q3, k3, v3), allow_unused=True)
    # The scale is that of the largest of the three reference gradients: all are sums of the same softmax-
    # gradient terms dO.v - rowsum(dO * O). Where the true dq/dk vanish (a query that sees one key) these
    # terms cancel exactly in autograd's softmax backward but to fp32 rounding in the flash-style form
    # the kernel uses, so a per-gradient scale of 0 would demand exact zeros.
    grad_scale = max([1.0] + [r.nan_to_num().abs().max().item() for r in ref_grads if r is not None and r.numel()])
    for name, a, b, c, t in zip(("dq", "dk", "dv"), grads, ref_grads, plain_grads, (q, k, v)):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t, dtype=torch.float64) if b is None else b.nan_to_num()
        c = torch.zeros_like(t) if c is None else c
        if a.shape != b.shape:
            raise Mismatch(f"anchor_attention backward {name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        if a.numel() == 0:
            continue
        err = (a.double() - b).abs().max().item()
        err_plain = (c.double() - b).abs().max().item()
        floor = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}.get(t.dtype, 1e-4)
        bound = 2 * err_plain + floor * grad_scale
        if not err <= bound:
            raise Mismatch(f"anchor_attention backward {name} ({t.dtype}): error {err:.3g} against float64 > 2 x "
                           f"the plain oracle's at that dtype {err_plain:.3g} + {floor:.3g} of the scale "
                           f"(bound {bound:.3g})")


def fuzz_append(rng, gen, malformed):
    B = rng.choice([0, 1, 1, 2, 3])
    Hkv = rng.choice([1, 2, 3])
    Hq = Hkv * rng.choice([1, 3, 4])
    D = rand_head_dim(rng)
    T = rng.choice([0, 1, 1, 1, 2, 5, 17]) if rng.random() < 0.8 else rand_len(rng, 70)
    Tk = T + rand_len(rng, 100)
    cap = Tk + rng.choice([0, 0, 1, 64])
    dtype = rng.choice(DTYPES) if rng.random() < 0.3 else torch.float32
    k_cache = torch.randn(B, Hkv, cap, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, Hkv, cap, D, generator=gen).to(dtype)
    q = strided(torch.randn(B, Hq, T, D, generator=gen).to(dtype), rng)
    k_new = strided(torch.randn(B, Hkv, T, D, generator=gen).to(dtype), rng)
    v_new = strided(torch.randn(B, Hkv, T, D, generator=gen).to(dtype), rng)
    offsets = [rng.randint(0, Tk - T) for _ in range(B)]
    if rng.random() < 0.5:
        offsets = [Tk - T] * B
    k_lay = rand_layout(rng, gen, B, Tk)
    if rng.random() < 0.5:  # the new tokens' layout is the query layout, as in a cache
        q_lay = rand_layout(rng, gen, B, T)
    else:
        q_lay = k_lay[:, Tk - T:]
    if not malformed:
        k_exp, v_exp = k_cache.clone(), v_cache.clone()
        for b in range(B):
            k_exp[b, :, offsets[b]:offsets[b] + T] = k_new[b]
            v_exp[b, :, offsets[b]:offsets[b] + T] = v_new[b]
        out = anllm_ext.anchor_attention_append_(q, k_new, v_new, k_cache, v_cache, offsets, q_lay, k_lay)
        if not (torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)):
            raise Mismatch("anchor_attention_append_ wrote other cache slots than offsets[b] .. offsets[b] + T")
        kk, vv = k_exp[:, :, :Tk], v_exp[:, :, :Tk]
        if dtype == torch.float32:
            check_fp32("anchor_attention_append_ out", out, q, kk, vv, q_lay, k_lay, None)
        else:
            check_low_precision("anchor_attention_append_ out", out, q, kk, vv, q_lay, k_lay, None)
        return
    call = lambda *a: (lambda: anllm_ext.anchor_attention_append_(*a))
    kind = rng.randrange(11)
    if kind == 0:
        expect_error(call(q, k_new, v_new, k_cache, v_cache, offsets + [0], q_lay, k_lay), ["offsets"],
                     "one offset too many")
    elif kind == 1:
        if B == 0:
            return
        bad = list(offsets)
        bad[rng.randrange(B)] = rng.choice([-1, -(2**62), Tk - T + 1, Tk + 5, 2**62, 2**63 - 1, 2**63 - 1 - T // 2])
        expect_error(call(q, k_new, v_new, k_cache, v_cache, bad, q_lay, k_lay), ["offsets"],
                     f"offsets {bad} outside the {Tk} slots")
    elif kind == 2:
        bad = torch.randn(B, Hkv, T, D + 1).to(dtype)
        expect_error(call(q, bad, v_new, k_cache, v_cache, offsets, q_lay, k_lay), ["k_new"], "k_new of another shape")
    elif kind == 3:
        bad = torch.randn(B, Hkv, cap + 1, D).to(dtype)
        expect_error(call(q, k_new, v_new, k_cache, bad, offsets, q_lay, k_lay), ["same shape", "v_cache"],
                     "v_cache of another shape")
    elif kind == 4:
        if Tk == 0:  # no smaller cache exists
            return
        small = k_cache[:, :, : Tk - 1].contiguous()
        expect_error(call(q, k_new, v_new, small, small.clone(), offsets, q_lay, k_lay), ["slots", "cache holds"],
                     "cache smaller than the key layout")
    elif kind == 5:
        other = torch.float16 if dtype != torch.float16 else torch.float32
        expect_error(call(q, k_new, v_new, k_cache, v_cache.to(other), offsets, q_lay, k_lay), ["dtype"],
                     "v_cache of another dtype")
    elif kind == 6:
        if B == 0 or T == 0:
            return
        expect_error(call(q, k_new, v_new, k_cache, k_cache, offsets, q_lay, k_lay),
                     ["share memory", "overlap", "same tensor", "alias"], "k_cache and v_cache the same tensor")
    elif kind == 7:
        # k_new a view of the cache overlapping, but not equal to, the slots it is written to (k_new
        # exactly equal to its destination is a harmless self-copy)
        off, shift = (offsets[0] if B else 0), rng.choice([-1, 1])
        if B == 0 or T < 2 or len(set(offsets)) != 1 or not 0 <= off + shift <= cap - T:
            return
        alias = k_cache[:, :, off + shift:off + shift + T]
        expect_error(call(q, alias, v_new, k_cache, v_cache, offsets, q_lay, k_lay),
                     ["overlap", "share memory", "alias"], "k_new a view of the cache overlapping its destination")
    elif kind == 8:
        bad = torch.empty(k_cache.shape, dtype=dtype, device="meta")
        expect_error(call(q, k_new, v_new, bad, v_cache, offsets, q_lay, k_lay), ["device", "is on", "meta"],
                     "k_cache on another device")
    elif kind == 9:
        expect_error(call(q[0] if B else q[None], k_new, v_new, k_cache, v_cache, offsets, q_lay, k_lay),
                     ["4-d", "q"], "q of rank != 4")
    else:
        bad_q = torch.randn(B + 1, Hq, T, D).to(dtype)
        expect_error(call(bad_q, k_new, v_new, k_cache, v_cache, offsets, rand_layout(rng, gen, B + 1, T), k_lay),
                     ["batch", "shape"], "q of another batch")


def fuzz_compact(rng, gen, malformed):
    B = rng.choice([0] + [1] * 5 + [2] * 3 + [3])
    cap = rand_len(rng, 300)
    n = rng.choice([1, 2, 3, 6])
    tensors = []
    for _ in range(n):
        if rng.random() < 0.7:
            H, D = rng.choice([1, 2, 3]), rng.choice([1, 3, 8, 64, 100])
            dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8])
            t = torch.randn(B, H, cap, D, generator=gen).mul(50).to(dtype)
            if rng.random() < 0.2 and B > 1:  # rows not adjacent in memory
                big = torch.zeros(2 * B, H, cap, D, dtype=dtype)
                big[::2] = t
                t = big[::2]
        else:
            dtype = rng.choice([torch.int64, torch.int32, torch.bool, torch.float32])
            t = torch.randint(0, 100, (B, cap), generator=gen).to(dtype)
        tensors.append(t)
    keep = torch.rand(B, cap, generator=gen) < rng.random()
    lengths = torch.tensor([rng.randint(0, cap) for _ in range(B)], dtype=torch.int64)
    if not malformed:
        four = [i for i, t in enumerate(tensors) if t.dim() == 4]
        two = [i for i, t in enumerate(tensors) if t.dim() == 2]
        refs, ref_len = reference.compact_ref([tensors[i] for i in four], keep, lengths, slot_dim=2)
        refs2, ref_len2 = reference.compact_ref([tensors[i] for i in two], keep, lengths, slot_dim=1)
        if four and rng.random() < 0.5:
            half = len(four) // 2
            new_len = anllm_ext.compact_kv_([tensors[i] for i in four[:half]], [tensors[i] for i in four[half:]],
                                            keep, lengths)
            if two:
                anllm_ext.compact_slots_([tensors[i] for i in two], keep, lengths)
        else:
            new_len = anllm_ext.compact_slots_(tensors, keep, lengths)
        if not torch.equal(new_len, ref_len):
            raise Mismatch(f"compaction lengths {new_len.tolist()} != oracle {ref_len.tolist()}")
        ref_of = dict(zip(four, refs))
        ref_of.update({i: r for i, r in zip(two, refs2)})
        for i, t in enumerate(tensors):
            for b in range(B):
                m = int(ref_len[b])
                got = t[b, :, :m] if t.dim() == 4 else t[b, :m]
                exp = ref_of[i][b, :, :m] if t.dim() == 4 else ref_of[i][b, :m]
                if not torch.equal(got, exp):
                    raise Mismatch(f"compaction of tensors[{i}] ({tuple(t.shape)}, {t.dtype}) row {b} differs")
        return
    call = lambda ts, kp, ln: (lambda: anllm_ext.compact_slots_(ts, kp, ln))
    kind = rng.randrange(12)
    if kind == 0:
        expect_error(call(tensors, keep.reshape(-1), lengths), ["keep"], "keep of rank 1")
    elif kind == 1:
        expect_error(call(tensors, keep.long(), lengths), ["keep", "dtype"], "keep not bool")
    elif kind == 2:
        expect_error(call(tensors, keep, lengths.int()), ["lengths", "dtype"], "lengths int32")
    elif kind == 3:
        expect_error(call(tensors, keep, torch.zeros(B + 1, dtype=torch.long)), ["lengths"], "lengths of another size")
    elif kind == 4:
        if B == 0:
            return
        bad = lengths.clone()
        bad[rng.randrange(B)] = rng.choice([-1, cap + 1, 2**62, -(2**63)])
        if CUDA_CONTRACT:  # clamped to [0, cap] on CUDA
            clamped = bad.clamp(0, cap)
            four = [t for t in tensors if t.dim() == 4]
            two = [t for t in tensors if t.dim() == 2]
            refs4, ref_len = reference.compact_ref(four, keep, clamped, slot_dim=2)
            refs2, _ = reference.compact_ref(two, keep, clamped, slot_dim=1)
            new_len = anllm_ext.compact_slots_(tensors, keep, bad)
            if not torch.equal(new_len, ref_len):
                raise Mismatch(f"compaction with lengths {bad.tolist()} (CUDA: clamped): {new_len.tolist()} != "
                               f"{ref_len.tolist()}")
            for t, r in zip(four + two, refs4 + refs2):
                for row in range(B):
                    m = int(ref_len[row])
                    got, exp = (t[row, :, :m], r[row, :, :m]) if t.dim() == 4 else (t[row, :m], r[row, :m])
                    if not torch.equal(got, exp):
                        raise Mismatch(f"compaction with lengths {bad.tolist()} (CUDA: clamped) row {row} differs")
            return
        expect_error(call(tensors, keep, bad), ["lengths"], f"lengths {bad.tolist()} outside [0, {cap}]")
    elif kind == 5:
        bad = torch.ones(B, 2, cap + 1, 4)
        expect_error(call(tensors + [bad], keep, lengths), ["capacity"], "a tensor of another capacity")
    elif kind == 6:
        bad = torch.zeros(B + 1, cap)
        expect_error(call(tensors + [bad], keep, lengths), ["batch"], "a tensor of another batch")
    elif kind == 7:
        bad = torch.zeros(B, cap, 3)
        expect_error(call(tensors + [bad], keep, lengths), ["tensors[", "shape"], "a 3-D tensor")
    elif kind == 8:
        if cap < 2 or B == 0:  # an empty tensor has no slots to move, whatever its strides
            return
        bad = torch.zeros(B, 2, 5, cap).transpose(2, 3)
        expect_error(call(tensors + [bad], keep, lengths), ["contiguous"], "slots not contiguous")
    elif kind == 9:
        if cap < 2:
            return
        bad = torch.zeros(1, 1, cap, 4).expand(B, 3, cap, 4) if B > 1 else torch.zeros(B, 1, cap, 1).expand(B, 1, cap, 4)
        if B == 0:
            return
        expect_error(call(tensors + [bad], keep, lengths), ["overlap", "contiguous"], "an expanded tensor")
    elif kind == 10:
        expect_error(call(tensors + [tensors[0]], keep, lengths), ["share memory"], "the same tensor twice")
    else:
        if B == 0 or cap < 4:
            return
        base = torch.randn(B, 2, cap + 2, 4)
        a, b2 = base[:, :, :cap], base[:, :, 2:cap + 2]  # two views of overlapping memory
        if a.stride(2) != a.size(3):
            return
        expect_error(call([a, b2], keep, lengths), ["share memory", "overlap"], "two overlapping views")


def fuzz_raw_ops(rng, gen, malformed):
    """The torch.ops.anllm operators called directly (what torch.compile and C++ callers reach), with the
    same checks: every malformed call must raise a message naming the problem."""
    q, k, v, q_lay, k_lay, scale = attention_problem(rng, gen)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = 1.0 / math.sqrt(q.shape[-1])
    fwd = RAW.anchor_attention_fwd
    if not malformed:
        with torch.no_grad():
            out, lse = fwd(q, k, v, *q_lay.as_tuple(), *k_lay.as_tuple(), s)
        if q.dtype == torch.float32:
            check_fp32("anchor_attention_fwd (raw op)", out, q, k, v, q_lay, k_lay, s)
        else:
            check_low_precision("anchor_attention_fwd (raw op)", out, q, k, v, q_lay, k_lay, s)
        return
    raw = lambda q_, k_, v_, ql, kl: fwd(q_, k_, v_, *ql.as_tuple(), *kl.as_tuple(), s)
    malformed_attention(rng, gen, q, k, v, q_lay, k_lay, raw)


OPS = {
    "token_layout": fuzz_token_layout,
    "anchor_attention": fuzz_attention,
    "anchor_attention_grad": fuzz_attention_grad,
    "anchor_attention_append_": fuzz_append,
    "compact": fuzz_compact,
    "raw_ops": fuzz_raw_ops,
}


def run(calls: int, seconds=None, seed: int = 0, only=None, malformed_share: float = 0.33, max_failures: int = 20,
        log=print, trace: bool = False, progress_every: float = 0.0):
    """Fuzz every op ``calls`` times (round robin) or until ``seconds`` pass; returns the summary dict."""
    names = [n for n in OPS if only is None or n in only]
    unknown = set(only or ()) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {list(OPS)}")
    stats = {n: {"valid": 0, "malformed": 0, "failures": 0, "skipped_known_bug": 0} for n in names}
    failures = []
    t0 = last_progress = time.perf_counter()
    done = 0
    for i in range(calls):
        if seconds is not None and time.perf_counter() - t0 > seconds:
            break
        for name in names:
            call_seed = (seed * 1_000_003 + i) * 97 + names.index(name)
            rng = random.Random(call_seed)
            gen = torch.Generator().manual_seed(call_seed)
            malformed = rng.random() < malformed_share
            stats[name]["malformed" if malformed else "valid"] += 1
            if trace:
                print(f"call {name} seed={call_seed} malformed={malformed}", flush=True)
            try:
                OPS[name](rng, gen, malformed)
            except SkipKnown:
                stats[name]["malformed" if malformed else "valid"] -= 1
                stats[name]["skipped_known_bug"] += 1
            except (Mismatch, Malformed) as exc:
                kind = "mismatch" if isinstance(exc, Mismatch) else "malformed"
                failures.append({"op": name, "seed": call_seed, "kind": kind, "message": str(exc)})
                stats[name]["failures"] += 1
                log(f"FAIL {name} seed={call_seed} ({kind}): {exc}")
            except Exception as exc:  # a valid call raised, or a malformed one raised something unexpected
                kind = "valid call raised" if not malformed else f"unexpected {type(exc).__name__}"
                msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:500]
                failures.append({"op": name, "seed": call_seed, "kind": kind, "message": msg})
                stats[name]["failures"] += 1
                log(f"FAIL {name} seed={call_seed} ({kind}): {msg}")
            if len(failures) >= max_failures:
                break
        done = i + 1
        if progress_every and time.perf_counter() - last_progress > progress_every:
            last_progress = time.perf_counter()  # a killed run (OOM, time limit) still leaves its counts
            log(f"progress: {done} calls per op in {last_progress - t0:.0f} s, {len(failures)} failures, "
                + ", ".join(f"{n} {st['valid']}/{st['malformed']}" for n, st in stats.items()))
        if len(failures) >= max_failures:
            log(f"stopping after {len(failures)} failures")
            break
    elapsed = time.perf_counter() - t0
    return {"calls_per_op": done, "requested_calls_per_op": calls, "seconds": elapsed, "seed": seed,
            "ops": stats, "failures": failures, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "extension": os.path.abspath(anllm_ext.ops._C.__file__), "emulated": RAW is not torch.ops.anllm}


def replay(op: str, call_seed: int, malformed: bool = None):
    """Re-run one call (for reproducers in tests): raises what the fuzz run recorded."""
    rng = random.Random(call_seed)
    gen = torch.Generator().manual_seed(call_seed)
    m = rng.random() < 0.33
    OPS[op](rng, gen, m if malformed is None else malformed)


def use_emulator(lib: str):
    """Routes the ops to the emulated CUDA kernels of `lib` (see --emu)."""
    global RAW, CUDA_CONTRACT
    CUDA_CONTRACT = True
    os.environ["ANLLM_CUDA_EMU_LIB"] = os.path.abspath(lib)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python_tests"))
    import emu_helpers

    if not emu_helpers.LOADED:
        raise SystemExit(f"--emu: cannot load {lib}")
    emu_helpers.route_ops_to_emulator()
    RAW = torch.ops.anllm_cuda_emu
    OPS.pop("token_layout")  # no CUDA kernel: ATen ops on a GPU


def main() -> int:
    args = ARGS
    global SKIP_KNOWN
    SKIP_KNOWN = not args.include_known
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.emu:
        use_emulator(args.emu)
    only = args.only.split(",") if args.only else None
    print(f"fuzzing {', '.join(only or OPS)}: {args.calls} calls per op"
          + (f", at most {args.seconds:.0f} s" if args.seconds else "") + f", seed {args.seed}")
    print(f"extension: {anllm_ext.ops._C.__file__}" + (f"; CUDA kernels emulated: {args.emu}" if args.emu else ""))
    summary = run(args.calls, args.seconds, args.seed, only, args.malformed, args.max_failures, trace=args.trace,
                  log=lambda msg: print(msg, flush=True), progress_every=60.0)
    for name, st in summary["ops"].items():
        print(f"  {name:26s} valid {st['valid']:6d}  malformed {st['malformed']:6d}  failures {st['failures']}"
              + (f"  skipped (known bug) {st['skipped_known_bug']}" if st["skipped_known_bug"] else ""))
    print(f"{summary['calls_per_op']} calls per op in {summary['seconds']:.1f} s, "
          f"{len(summary['failures'])} failures")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
