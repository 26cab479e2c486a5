"""Decode-step speed and prefill memory of anchor-based inference vs transformers' DynamicCache.

SmolLM2-135M-Instruct (bundled), fp32, CPU, EP anchors (sentence-final periods), a long context of
English prose (Python documentation, Debian python3.11-doc). One run measures:

  A. anchor cache: chunked prefill of the context (compaction after each chunk), then greedy decode
     steps (real-time compaction when a decoded token is an anchor);
  B. DynamicCache holding the full context (unpatched model, sdpa), then the same number of steps;
  C. DynamicCache holding as many slots as the anchor cache keeps after prefill (unpatched, sdpa).

and prints per-step decode times (median) and the ratios the issue asks for:
  full / anchor  (target >= 1.8),  anchor / same-slots  (target <= 1.10),
  anchor prefill peak KV / full KV  (target <= 0.10).

    .venv/bin/python benchmarks/bench_decode.py --context 8190 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def decode_steps(model, cache, first_token, steps, warmup):
    """Greedy decode `warmup + steps` tokens; returns per-step seconds (warm-up excluded)."""
    times = []
    nxt = first_token
    with torch.no_grad():
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append(t1 - t0)
    return times


def full_prefill(model, ids, chunk):
    """Prefill an unpatched model's DynamicCache (chunked, only to bound the activation memory)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8190, help="context tokens before decoding")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=256, help="anchor-cache prefill chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="local model dir (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--skip-full", action="store_true", help="skip the full-context DynamicCache run")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    import anllm_ext
    from anllm_ext import ep_anchor_ids, patch, prefill, unpatch
    from anllm_ext.cache import cache_kv_bytes
    from anllm_ext.models import load_model, sample_text

    model, tok = load_model(args.model)
    anchors = ep_anchor_ids(tok)
    text = sample_text(6 * args.context)
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.context]
    if ids.shape[1] < args.context:
        print(f"warning: only {ids.shape[1]} tokens of text available", file=sys.stderr)
    T = ids.shape[1]
    n_anchor = int(torch.isin(ids, torch.tensor(anchors)).sum())
    print(f"model {type(model).__name__} fp32, {torch.get_num_threads()} threads, context {T} tokens, "
          f"{n_anchor} EP anchors, transformers {__import__('transformers').__version__}, torch {torch.__version__}")

    # A. anchor cache
    patch(model, anchors)
    t0 = time.perf_counter()
    cache, last = prefill(model, ids, chunk_size=args.prefill_chunk)
    t_pre_a = time.perf_counter() - t0
    st = cache.stats()
    kept = st["kept_slots"][0]
    times_a = decode_steps(model, cache, last[:, -1:].argmax(-1), args.steps, args.warmup)
    unpatch(model)
    slot_bytes = st["kv_bytes"] / max(kept, 1)
    full_bytes = T * slot_bytes
    print(f"A anchor cache : prefill {t_pre_a:.1f} s ({T / t_pre_a:.0f} tok/s, chunk {args.prefill_chunk}), "
          f"kept {kept} slots, peak in use {st['peak_kv_bytes'] / 2**20:.1f} MiB, "
          f"peak allocated {st['peak_allocated_kv_bytes'] / 2**20:.1f} MiB, "
          f"decode {1e3 * statistics.median(times_a):.1f} ms/step")

    # C. DynamicCache with as many slots as the anchor cache keeps
    cache_c, first_c = full_prefill(model, ids[:, -kept:], 512)
    times_c = decode_steps(model, cache_c, first_c, args.steps, args.warmup)
    print(f"C DynamicCache, {kept} slots: decode {1e3 * statistics.median(times_c):.1f} ms/step")
    del cache_c

    # B. DynamicCache with the full context
    if not args.skip_full:
        t0 = time.perf_counter()
        cache_b, first_b = full_prefill(model, ids, 1024)
        t_pre_b = time.perf_counter() - t0
        full_bytes = cache_kv_bytes(cache_b)
        times_b = decode_steps(model, cache_b, first_b, args.steps, args.warmup)
        print(f"B DynamicCache, full {T} slots: prefill {t_pre_b:.1f} s, KV {full_bytes / 2**20:.1f} MiB, "
              f"decode {1e3 * statistics.median(times_b):.1f} ms/step")
        del cache_b

    ma, mc = statistics.median(times_a), statistics.median(times_c)
    print("\nratios (medians):")
    if not args.skip_full:
        mb = statistics.median(times_b)
        print(f"  decode step, full DynamicCache / anchor cache     = {mb / ma:.2f}x   (target >= 1.8)")
    print(f"  decode step, anchor cache / same-slots DynamicCache = {ma / mc:.3f}    (target <= 1.10)")
    print(f"  prefill peak KV in use, anchor / full              = {st['peak_kv_bytes'] / full_bytes:.3f}   (target <= 0.10)")
    print(f"  prefill peak KV allocated, anchor / full           = {st['peak_allocated_kv_bytes'] / full_bytes:.3f}")
    print(f"  KV after prefill, anchor / full                    = {st['kv_bytes'] / full_bytes:.3f}   "
          f"(reduction {100 * st['reduction']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
