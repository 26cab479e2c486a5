"""Small problems that launch every anllm CUDA kernel once, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --device cpu          # the same calls on the CPU kernels

Kernels reached: the device-side layout index (every attention call), the forward's tiled prefill path
(head dims 40, 64, 128, 256; fp32 and bf16), its decode path with a split key range and the combine
kernel, the backward's dQ and dK/dV kernels, the fused cache write + attention, and compaction's plan and
move kernels. Ragged lengths, padding and rows that see nothing are included, since edges are where
out-of-bounds accesses hide. Every result is checked against the plain-PyTorch reference, so the run
also fails (exit 1) on a wrong result, not only on a sanitizer report. Run it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so each tensor is its own allocation and memcheck sees overruns.
"""
from __future__ import annotations

import argparse
import sys

import torch

import anllm_ext
from anllm_ext.reference import anchor_attention_ref, compact_ref

ANCHOR = 1


def stream(B, T, device, every=6, left_pad=()):
    ids = torch.randint(2, 50, (B, T))
    ids[torch.rand(B, T) < 1.0 / every] = ANCHOR
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(left_pad):
        mask[b, :n] = 0
    return ids.to(device), mask.to(device)


def close(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    ok = err <= tol * scale
    print(f"{'ok ' if ok else 'BAD'} {name}: max abs err {err:.2e} (tol {tol:.0e} x {scale:.1f})", flush=True)
    return ok


def attention_checks(device):
    ok = True
    # prefill tiles: B=2, GQA 4/2, ragged length, left padding (a padded query sees nothing)
    for D, dtype in ((40, torch.float32), (64, torch.float32), (64, torch.bfloat16), (128, torch.bfloat16),
                     (256, torch.float16)):
        ids, mask = stream(2, 77, device, left_pad=(0, 9))
        lay = anllm_ext.token_layout(ids, ANCHOR, mask)
        q, k, v = (torch.randn(2, h, 77, D, device=device).to(dtype).requires_grad_(True) for h in (4, 2, 2))
        out = anllm_ext.anchor_attention(q, k, v, lay, lay)
        ref = anchor_attention_ref(q.float(), k.float(), v.float(), lay, lay)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        ok &= close(f"forward D={D} {dtype}", out, ref, tol)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)  # dQ kernel and dK/dV kernel
        want = torch.autograd.grad(ref, (q, k, v), dout.float())
        for name, g, w in zip(("dq", "dk", "dv"), grads, want):
            ok &= close(f"backward {name} D={D} {dtype}", g, w, 2 * tol)
    # decode: one query over a long cache splits the key range across blocks, then the combine kernel
    ids, _ = stream(1, 3000, device, every=24)
    lay = anllm_ext.token_layout(ids, ANCHOR)
    q_lay = anllm_ext.token_layout(torch.full((1, 1), 5, device=device), ANCHOR, start=lay.next_start())
    q = torch.randn(1, 8, 1, 64, device=device)
    k, v = (torch.randn(1, 2, 3000, 64, device=device) for _ in range(2))
    with torch.no_grad():
        ok &= close("decode (split keys + combine)", anllm_ext.anchor_attention(q, k, v, q_lay, lay),
                    anchor_attention_ref(q, k, v, q_lay, lay), 1e-4)
        # the fused cache write + attention of one AnchorCache layer: 3 new tokens into a 40-slot buffer
        k_cache, v_cache = (torch.randn(2, 2, 40, 64, device=device) for _ in range(2))
        old_ids, _ = stream(2, 30, device)
        old = anllm_ext.token_layout(old_ids, ANCHOR)
        new = anllm_ext.token_layout(stream(2, 3, device)[0], ANCHOR, start=old.next_start())
        qn, kn, vn = (torch.randn(2, h, 3, 64, device=device) for h in (4, 2, 2))
        k_all = torch.cat([k_cache[:, :, :30], kn], 2)
        v_all = torch.cat([v_cache[:, :, :30], vn], 2)
        k_lay = anllm_ext.Layout.cat([old, new])
        want = anchor_attention_ref(qn, k_all, v_all, new, k_lay)
        got = anllm_ext.anchor_attention_append_(qn, kn, vn, k_cache, v_cache, [30, 30], new, k_lay)
        ok &= close("append_ (write + attention)", got, want, 1e-4)
        ok &= close("append_ wrote the new keys", k_cache[:, :, 30:33], kn, 0.0)
    return ok


def compaction_checks(device):
    keys = [torch.randn(3, 2, 50, 16, device=device) for _ in range(2)]
    values = [torch.randn(3, 2, 50, 16, device=device).to(torch.bfloat16) for _ in range(2)]
    keep = torch.rand(3, 50, device=device) < 0.3
    lengths = torch.tensor([50, 31, 0], device=device)  # a full row, a short one, an empty one
    want, want_len = compact_ref(keys + values, keep, lengths)
    got_len = anllm_ext.compact_kv_(keys, values, keep, lengths)
    ok = bool(torch.equal(got_len.cpu(), want_len.cpu()))
    print(f"{'ok ' if ok else 'BAD'} compaction lengths {got_len.tolist()}", flush=True)
    for i, (got, w) in enumerate(zip(keys + values, want)):
        for b, n in enumerate(want_len.tolist()):
            ok &= close(f"compaction tensor {i} row {b}", got[b, :, :n], w[b, :, :n], 0.0)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize.py needs a CUDA GPU (torch.cuda.is_available() is False); use --device cpu to rehearse.")
        return 2
    torch.manual_seed(0)
    device = torch.device(args.device)
    ok = attention_checks(device) & compaction_checks(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("gpu_sanitize: all results match the reference" if ok else "gpu_sanitize: WRONG RESULTS", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
