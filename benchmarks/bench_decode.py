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
    p.add_argument("--steps", type=int, default=96, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=256, help="anchor-cache prefill chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="local model dir (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--skip-full", action="store_true", help="skip the full-context DynamicCache run")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from anllm_ext import ep_anchor_ids, patch, prefill
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

    # Two model objects sharing nothing but the weights' values: the anchor one is patched, the
    # baseline one keeps transformers' sdpa attention. Decode steps of the configurations are
    # interleaved so that load changes on a shared machine hit all alike, and the order rotates each
    # round (A C B, C B A, B A C, ...) so that each configuration follows each other one equally often:
    # a full-cache step leaves the caches full of dirty lines that whoever runs next pays to write back.
    import copy

    # Both models run on heap copies of the weights, so no configuration runs on the loaded model's
    # memory mapping of the safetensors file while the others run on a copy. (With the anchor model on
    # the mapping, A / C measured 0.987-1.008 over six runs; with both on copies, 0.973-0.983 over six.
    # An A-against-A test of mapping vs copy showed no difference, so the cause is not understood; the
    # equal set-up is the fair one either way.)
    base = copy.deepcopy(model)
    model = copy.deepcopy(model)
    patch(model, anchors)

    # A. anchor cache
    t0 = time.perf_counter()
    cache_a, last = prefill(model, ids, chunk_size=args.prefill_chunk)
    t_pre_a = time.perf_counter() - t0
    st = cache_a.stats()
    kept = st["kept_slots"][0]
    slot_bytes = st["kv_bytes"] / max(kept, 1)
    full_bytes = T * slot_bytes
    print(f"A anchor cache : prefill {t_pre_a:.1f} s ({T / t_pre_a:.0f} tok/s, chunk {args.prefill_chunk}), "
          f"kept {kept} slots, peak in use {st['peak_kv_bytes'] / 2**20:.1f} MiB, "
          f"peak allocated {st['peak_allocated_kv_bytes'] / 2**20:.1f} MiB")
    runs = {"A": [model, cache_a, last[:, -1:].argmax(-1), []]}

    # C. DynamicCache with as many slots as the anchor cache keeps
    cache_c, first_c = full_prefill(base, ids[:, -kept:], 512)
    runs["C"] = [base, cache_c, first_c, []]

    # B. DynamicCache with the full context
    if not args.skip_full:
        t0 = time.perf_counter()
        cache_b, first_b = full_prefill(base, ids, 1024)
        t_pre_b = time.perf_counter() - t0
        full_bytes = cache_kv_bytes(cache_b)
        print(f"B DynamicCache, full {T} slots: prefill {t_pre_b:.1f} s ({T / t_pre_b:.0f} tok/s), "
              f"KV {full_bytes / 2**20:.1f} MiB")
        runs["B"] = [base, cache_b, first_b, []]

    with torch.no_grad():
        keys = list(runs)
        for i in range(args.warmup + args.steps):
            for key in keys[i % len(keys):] + keys[: i % len(keys)]:
                run = runs[key]
                mdl, cache, nxt, times = run
                t0 = time.perf_counter()
                out = mdl(input_ids=nxt, cache=cache, use_cache=True)
                run[2] = out.logits[:, -1:].argmax(-1)
                t1 = time.perf_counter()
                if i >= args.warmup:
                    times.append(t1 - t0)
    times_a, times_c = runs["A"][3], runs["C"][3]
    print(f"decode ms/step (median of {args.steps}, interleaved): anchor {1e3 * statistics.median(times_a):.1f}, "
          f"DynamicCache {kept} slots {1e3 * statistics.median(times_c):.1f}"
          + ("" if args.skip_full else f", DynamicCache full {T} slots {1e3 * statistics.median(runs['B'][3]):.1f}"))
    if not args.skip_full:
        times_b = runs["B"][3]
    st = cache_a.stats()  # after decoding: compaction kept it small

    ma, mc = statistics.median(times_a), statistics.median(times_c)
    # Paired ratios: the configurations' steps of one round run back to back, so the median of the
    # per-round ratios cancels the load swings of a shared machine better than a ratio of medians.
    ac = statistics.median(a / c for a, c in zip(times_a, times_c))
    print("\nratios (median of per-round ratios; ratio of the medians in brackets):")
    if not args.skip_full:
        mb = statistics.median(times_b)
        ba = statistics.median(b / a for a, b in zip(times_a, times_b))
        print(f"  decode step, full DynamicCache / anchor cache     = {ba:.2f}x [{mb / ma:.2f}x]  (target >= 1.8)")
        bc = statistics.median(b / c for b, c in zip(times_b, times_c))
        print(f"  (ceiling: full / same-slots DynamicCache           = {bc:.2f}x [{mb / mc:.2f}x])")
    print(f"  decode step, anchor cache / same-slots DynamicCache = {ac:.3f} [{ma / mc:.3f}]  (target <= 1.10)")
    print(f"  peak KV in use (prefill+decode), anchor / full    = {st['peak_kv_bytes'] / full_bytes:.3f}   (target <= 0.10)")
    print(f"  peak KV allocated, anchor / full                  = {st['peak_allocated_kv_bytes'] / full_bytes:.3f}")
    print(f"  KV after decoding, anchor / full                  = {st['kv_bytes'] / full_bytes:.3f}   "
          f"(reduction {100 * st['reduction']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
