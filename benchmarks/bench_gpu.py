"""GPU benchmark of the anllm CUDA kernels (needs a CUDA GPU; exits with a message otherwise).

    python benchmarks/bench_gpu.py [--out results/gpu_results.txt] [--T 8192] [--quick]

Measures (CUDA events, warm-up, median of N):
  1. attention forward and forward+backward, T tokens, B=1, Hq=32, Hkv=8, D=128, bf16, an anchor every
     24 tokens: our op vs F.scaled_dot_product_attention with the dense boolean AnSAN mask vs causal
     SDPA (flash when available); throughput per visible pair relative to causal SDPA per causal pair;
  2. compaction of 30 layers of K and V [1, 8, T, 128] bf16 keeping ~4% of the slots (anchors + open
     segment): achieved GB/s (read + write of the kept bytes) vs a device-to-device copy of the same
     bytes and vs an index gather (the authors' approach);
  3. decode (Tq=1) against the compacted cache: our op vs SDPA over the compacted cache vs SDPA over
     the full cache; and a layer's whole cache step: anchor_attention_append_ (write + attend) vs a
     DynamicCache's torch.cat + SDPA over the compacted-size and the full-size cache.
Also prints max errors against the dense oracle so a wrong kernel cannot look fast.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ANCHOR_ID = 7


def bench(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Report:
    def __init__(self, path):
        self.path = path
        self.lines = []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def save(self):
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a") as f:
                f.write("\n".join(self.lines) + "\n")


def make_ids(T, every, device):
    ids = torch.randint(100, 1000, (1, T), device=device)
    ids[:, every - 1 :: every] = ANCHOR_ID
    return ids


def attention_section(rep, anllm_ext, T, iters):
    from anllm_ext.reference import ansan_mask

    dev = "cuda"
    B, Hq, Hkv, D = 1, 32, 8, 128
    dt = torch.bfloat16
    ids = make_ids(T, 24, dev)
    lay = anllm_ext.token_layout(ids, ANCHOR_ID)
    q = torch.randn(B, Hq, T, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    g = Hq // Hkv
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = ansan_mask(lay, lay)[:, None]  # [1,1,T,T] bool
    visible = int(mask.sum())
    causal = T * (T + 1) // 2
    rep(f"## attention  T={T} B={B} Hq={Hq} Hkv={Hkv} D={D} bf16, anchor every 24 tokens")
    rep(f"visible pairs per head {visible} = {100.0 * visible / causal:.2f}% of causal pairs")

    ours = lambda: anllm_ext.anchor_attention(q, k, v, lay, lay)  # noqa: E731
    dense = lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)  # noqa: E731
    caus = lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)  # noqa: E731

    with torch.no_grad():
        out = ours()
        ref = dense()
        err = (out.float() - ref.float()).abs().max().item()
    rep(f"max |ours - SDPA(dense mask)| forward = {err:.3e}")

    res = {}
    with torch.no_grad():
        res["fwd", "ours"] = bench(ours, iters=iters)
        res["fwd", "sdpa_dense_mask"] = bench(dense, iters=iters)
        res["fwd", "sdpa_causal"] = bench(caus, iters=iters)

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    krg = lambda: kg.repeat_interleave(g, 1)  # noqa: E731
    vrg = lambda: vg.repeat_interleave(g, 1)  # noqa: E731
    dout = torch.randn_like(q)

    def fb(fn):
        def run():
            qg.grad = kg.grad = vg.grad = None
            fn().backward(dout)
        return run

    fb_ours = fb(lambda: anllm_ext.anchor_attention(qg, kg, vg, lay, lay))
    fb_dense = fb(lambda: F.scaled_dot_product_attention(qg, krg(), vrg(), attn_mask=mask))
    fb_caus = fb(lambda: F.scaled_dot_product_attention(qg, krg(), vrg(), is_causal=True))

    fb_ours()
    mine = [t.grad.float().clone() for t in (qg, kg, vg)]
    fb_dense()
    theirs = [t.grad.float().clone() for t in (qg, kg, vg)]
    for name, a, b in zip(("dq", "dk", "dv"), mine, theirs):
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        rep(f"{name}: max abs diff vs SDPA(dense mask) {(a - b).abs().max().item():.3e}, rel norm {rel:.3e}")

    res["fwd+bwd", "ours"] = bench(fb_ours, iters=iters)
    res["fwd+bwd", "sdpa_dense_mask"] = bench(fb_dense, iters=iters)
    res["fwd+bwd", "sdpa_causal"] = bench(fb_caus, iters=iters)

    for phase in ("fwd", "fwd+bwd"):
        c = res[phase, "sdpa_causal"]
        for name in ("ours", "sdpa_dense_mask", "sdpa_causal"):
            ms = res[phase, name]
            pairs = causal if name == "sdpa_causal" else visible
            rel = (pairs / ms) / (causal / c)
            rep(f"{phase:8s} {name:16s} {ms:9.3f} ms   speed-up vs causal {c / ms:6.2f}x   "
                f"per-pair throughput vs causal SDPA {rel:6.3f}")
    del mask
    torch.cuda.empty_cache()
    return lay


def compaction_section(rep, anllm_ext, T, iters):
    dev = "cuda"
    L, H, D = 30, 8, 128
    dt = torch.bfloat16
    ids = make_ids(T - 10, 24, dev)  # leaves an open segment at the end
    ids = torch.cat([ids, torch.randint(100, 1000, (1, 10), device=dev)], 1)
    lay = anllm_ext.token_layout(ids, ANCHOR_ID)
    last_seg = lay.segments[0, -1]
    keep = lay.is_anchor | (lay.segments == last_seg)
    lengths = torch.full((1,), T, dtype=torch.long, device=dev)
    n_kept = int(keep.sum())
    keys = [torch.randn(1, H, T, D, device=dev, dtype=dt) for _ in range(L)]
    vals = [torch.randn(1, H, T, D, device=dev, dtype=dt) for _ in range(L)]
    kept_bytes = 2 * L * H * n_kept * D * 2
    rep(f"## compaction  {L} layers K+V [1,{H},{T},{D}] bf16, kept {n_kept}/{T} slots "
        f"({100.0 * n_kept / T:.2f}%), kept bytes {kept_bytes / 1e6:.1f} MB")

    # Correctness on copies first.
    probe = [keys[0].clone(), vals[0].clone()]
    (want_k, want_v), want_len = anllm_ext.reference.compact_ref(probe, keep, lengths)
    new_len = anllm_ext.compact_kv_([probe[0]], [probe[1]], keep, lengths)
    ok = torch.equal(new_len, want_len) and torch.equal(probe[0][:, :, :n_kept], want_k[:, :, :n_kept]) \
        and torch.equal(probe[1][:, :, :n_kept], want_v[:, :, :n_kept])
    rep(f"compaction matches the reference gather: {ok}")

    # Repeated in-place calls redo the same moves (same keep), so the timing is representative.
    ours = lambda: anllm_ext.compact_kv_(keys, vals, keep, lengths)  # noqa: E731
    src = torch.empty(kept_bytes // 2, device=dev, dtype=dt)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    idx = keep[0].nonzero().squeeze(1)

    def gather():
        for t in keys + vals:
            t[:, :, :n_kept] = t.index_select(2, idx)

    t_ours = bench(ours, iters=iters)
    t_copy = bench(copy, iters=iters)
    t_gather = bench(gather, iters=iters)
    for name, ms in (("compact_ (ours)", t_ours), ("d2d copy of kept bytes", t_copy), ("index gather", t_gather)):
        rep(f"{name:24s} {ms:8.3f} ms   {2 * kept_bytes / ms / 1e6:8.1f} GB/s (read+write of kept bytes)")
    del keys, vals, src, dst
    torch.cuda.empty_cache()


def decode_section(rep, anllm_ext, T, iters):
    dev = "cuda"
    B, Hq, Hkv, D = 1, 32, 8, 128
    dt = torch.bfloat16
    g = Hq // Hkv
    ids = make_ids(T, 24, dev)
    lay = anllm_ext.token_layout(ids, ANCHOR_ID)
    k_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    v_full = torch.randn(B, Hkv, T, D, device=dev, dtype=dt)
    last_seg = lay.segments[0, -1]
    keep = lay.is_anchor | (lay.segments == last_seg)
    lengths = torch.full((1,), T, dtype=torch.long, device=dev)
    kc, vc = k_full.clone(), v_full.clone()
    lay_c = [t.clone() for t in lay.as_tuple()]
    n = int(anllm_ext.compact_kv_([kc], [vc], keep, lengths)[0])
    anllm_ext.compact_slots_(lay_c, keep, lengths)
    klay = anllm_ext.Layout(*(t[:, :n] for t in lay_c))
    kc, vc = kc[:, :, :n], vc[:, :, :n]
    # The next token: position T, in the open segment (the last token of ids is an anchor when T % 24
    # == 0, then the new token opens a new segment).
    nxt = torch.randint(100, 1000, (1, 1), device=dev)
    qlay = anllm_ext.token_layout(nxt, ANCHOR_ID, start=lay.next_start())
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    rep(f"## decode  Tq=1 at position {T}, cache {T} -> {n} slots after compaction, Hq={Hq} Hkv={Hkv} D={D} bf16")

    kcr, vcr = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
    kfr, vfr = k_full.repeat_interleave(g, 1), v_full.repeat_interleave(g, 1)
    with torch.no_grad():
        out = anllm_ext.anchor_attention(q, kc, vc, qlay, klay)
        ref = F.scaled_dot_product_attention(q, kcr, vcr)  # every kept slot is visible to the new token
        rep(f"max |ours - SDPA(compacted cache)| = {(out.float() - ref.float()).abs().max().item():.3e}")
        t_ours = bench(lambda: anllm_ext.anchor_attention(q, kc, vc, qlay, klay), iters=iters * 5)
        t_sdpa_c = bench(lambda: F.scaled_dot_product_attention(q, kcr, vcr), iters=iters * 5)
        t_sdpa_f = bench(lambda: F.scaled_dot_product_attention(q, kfr, vfr), iters=iters * 5)
    rep(f"decode ours (compacted cache, mask evaluated)  {t_ours * 1e3:9.1f} us")
    rep(f"decode SDPA over compacted cache (no mask)     {t_sdpa_c * 1e3:9.1f} us")
    rep(f"decode SDPA over full cache (no mask)          {t_sdpa_f * 1e3:9.1f} us")

    # A layer's whole cache step. AnchorCache: anchor_attention_append_ writes the new token's K/V into
    # the preallocated buffer and attends, in one op. DynamicCache: torch.cat of cache and new K/V, then
    # SDPA (compacted-size and full-size cache).
    k_new = torch.randn(B, Hkv, 1, D, device=dev, dtype=dt)
    v_new = torch.randn(B, Hkv, 1, D, device=dev, dtype=dt)
    k_buf = torch.empty(B, Hkv, n + 64, D, device=dev, dtype=dt)
    v_buf = torch.empty_like(k_buf)
    k_buf[:, :, :n], v_buf[:, :, :n] = kc, vc
    klay_new = anllm_ext.Layout.cat([klay, qlay])
    kcc, vcc = kc.contiguous(), vc.contiguous()

    def dynamic(k_old, v_old):
        kk, vv = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

    with torch.no_grad():
        fused = anllm_ext.anchor_attention_append_(q, k_new, v_new, k_buf, v_buf, [n], qlay, klay_new)
        rep(f"max |fused layer step - cat + SDPA| = {(fused.float() - dynamic(kcc, vcc).float()).abs().max().item():.3e}")
        t_fused = bench(lambda: anllm_ext.anchor_attention_append_(q, k_new, v_new, k_buf, v_buf, [n], qlay, klay_new),
                        iters=iters * 5)
        t_dyn_c = bench(lambda: dynamic(kcc, vcc), iters=iters * 5)
        t_dyn_f = bench(lambda: dynamic(k_full, v_full), iters=iters * 5)
    rep(f"layer step AnchorCache (append_ + attention)   {t_fused * 1e3:9.1f} us")
    rep(f"layer step DynamicCache, {n} slots (cat + SDPA) {t_dyn_c * 1e3:9.1f} us")
    rep(f"layer step DynamicCache, {T} slots (cat + SDPA) {t_dyn_f * 1e3:9.1f} us")


def main():
    ap = argparse.ArgumentParser()
    default_out = os.path.join(os.environ["OUT"], "gpu_results.txt") if os.environ.get("OUT") else \
        os.path.join("results", "gpu_results.txt")
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
        sys.exit(2)
    import anllm_ext

    if not torch._C._dispatch_has_kernel_for_dispatch_key("anllm::anchor_attention_fwd", "CUDA"):
        print("anllm_ext was built without CUDA kernels; rebuild with a CUDA toolkit (see setup.py).")
        sys.exit(2)
    rep = Report(args.out)
    rep(f"# bench_gpu {time.strftime('%Y-%m-%d %H:%M:%S')}  {torch.cuda.get_device_name()}  torch {torch.__version__}")
    sections = (("attention", attention_section), ("compaction", compaction_section), ("decode", decode_section))
    for name, fn in sections:
        try:
            fn(rep, anllm_ext, args.T, args.iters)
        except Exception as e:  # keep the other sections' numbers
            rep(f"!! {name} section failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    rep.save()
    print(f"results appended to {args.out}")


if __name__ == "__main__":
    main()
