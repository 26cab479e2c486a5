"""Decode-step speed and KV memory of anchor-based inference against the caches a user would run instead.

SmolLM2-135M-Instruct (bundled), fp32, CPU, EP anchors (sentence-final periods), a long context of
English prose (Python documentation, Debian python3.11-doc). The configurations (``--configs``):

  A. anchor cache (``AnchorCache``): chunked prefill of the context (compaction after each chunk), then
     greedy decode steps (real-time compaction when a decoded token is an anchor);
  B. transformers' ``DynamicCache`` holding the full context (unpatched model, sdpa attention);
  C. a ``DynamicCache`` holding as many slots as A keeps after the prefill (it re-concatenates the
     whole cache every step);
  S. transformers' ``StaticCache`` of that many slots plus the decode steps (preallocated, ``index_copy_``
     writes; attends over its whole length with a mask, as transformers runs it);
  P. a preallocated cache of the same slots: the new K/V are copied into a buffer, SDPA attends over
     the slots in use (a view, no mask). Nothing in a same-slots cache is cheaper than this;
  R. the anchor cache keeping the last ``--recent`` closed sentences hot (``AnchorCache(recent=N)``): what the
     window's extra attention costs a decode step, against A and B.

C, S and P hold the same slots as A, so B / (C, S or P) is the ceiling of B / A for this model, and
A / P is the cost of the anchor machinery. Prefill: A and B run the same chunk size.

    .venv/bin/python benchmarks/bench_decode.py --context 8190 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

from common import add_common_args, print_header, run_info, write_json


def williams_orders(n: int):
    """Round orders in which every configuration directly precedes every other one equally often (a
    Williams design): a full-cache step leaves the CPU caches full of dirty lines that whoever runs
    next pays to write back, so that cost must fall on all alike."""
    first, lo, hi = [0], 1, n - 1
    while lo <= hi:
        first.append(lo)
        lo += 1
        if lo <= hi:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def preallocated_cache(config, capacity: int):
    """A transformers cache whose layers write into buffers of ``capacity`` slots allocated once and
    return views of the slots in use: the write cost of a StaticCache with the attention cost of a
    DynamicCache of the same slots."""
    from transformers.cache_utils import Cache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.used = 0

        def lazy_initialization(self, key_states, value_states):
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self.keys = key_states.new_empty(B, H, capacity, D)
            self.values = value_states.new_empty(B, value_states.shape[1], capacity, value_states.shape[3])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            T = key_states.shape[2]
            if self.used + T > capacity:
                raise RuntimeError(f"preallocated cache full ({capacity} slots)")
            self.keys.narrow(2, self.used, T).copy_(key_states)
            self.values.narrow(2, self.used, T).copy_(value_states)
            self.used += T
            return self.keys.narrow(2, 0, self.used), self.values.narrow(2, 0, self.used)

        def get_seq_length(self) -> int:
            return self.used

    return Cache(layers=[PreallocatedLayer() for _ in range(config.num_hidden_layers)])


def baseline_prefill(model, ids, chunk, cache):
    """Prefill an unpatched model's cache in chunks; returns (cache, next token, seconds)."""
    from anllm_ext.hf import cache_kwarg

    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s : s + chunk], use_cache=True, logits_to_keep=1,
                        **{cache_kwarg(model): cache})
    return cache, out.logits[:, -1:].argmax(-1), time.perf_counter() - t0


def kv_bytes_allocated(cache) -> int:
    """Bytes of the K/V tensors a transformers cache holds (its whole buffers, used or not)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8190, help="context tokens before decoding")
    p.add_argument("--steps", type=int, default=96, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prefill-chunk", type=int, default=256, help="prefill chunk of A and B alike")
    p.add_argument("--configs", default="ABCSP", help="which configurations to run (letters, see above)")
    p.add_argument("--recent", type=int, default=2, help="closed sentences configuration R keeps hot")
    p.add_argument("--model", default=None, help="local model dir (default: bundled SmolLM2-135M-Instruct)")
    add_common_args(p)
    args = p.parse_args(argv)
    configs = [c for c in "ABCSPR" if c in args.configs.upper()]
    if "A" not in configs:
        p.error("--configs must include A (the anchor cache)")

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import DynamicCache, StaticCache

    from anllm_ext import AnchorCache, ep_anchor_ids, patch, prefill
    from anllm_ext.models import load_model
    from anllm_ext.sample_text import sample_text

    info = run_info("bench_decode", args)
    print_header(info)
    model, tok = load_model(args.model)
    anchors = ep_anchor_ids(tok)
    ids = tok(sample_text(6 * args.context), return_tensors="pt")["input_ids"][:, : args.context]
    if ids.shape[1] < args.context:
        print(f"warning: only {ids.shape[1]} tokens of text available", file=sys.stderr)
    T = ids.shape[1]
    n_anchor = int(torch.isin(ids, torch.tensor(anchors)).sum())
    print(f"model {type(model).__name__} fp32, context {T} tokens, {n_anchor} EP anchors, "
          f"{args.steps} timed steps, configurations {''.join(configs)}")

    # Both models run on heap copies of the weights (none on the loaded model's memory mapping of the
    # safetensors file): the anchor model is patched, the baseline keeps transformers' sdpa attention.
    base = copy.deepcopy(model)
    model = copy.deepcopy(model)
    patch(model, anchors)
    results = {"context_tokens": T, "anchors_in_context": n_anchor, "steps": args.steps, "prefill": {}}

    # A. anchor cache
    t0 = time.perf_counter()
    cache_a, last = prefill(model, ids, prefill_chunk=args.prefill_chunk)
    t_pre_a = time.perf_counter() - t0
    kept = cache_a.stats()["kept_slots"][0]
    results["prefill"]["A"] = {"seconds": t_pre_a, "tokens_per_s": T / t_pre_a, "chunk": args.prefill_chunk}
    print(f"A anchor cache: prefill {t_pre_a:.1f} s ({T / t_pre_a:.0f} tok/s, chunk {args.prefill_chunk}), "
          f"kept {kept} slots")
    runs = {"A": [model, cache_a, last[:, -1:].argmax(-1), []]}

    if "R" in configs:
        t0 = time.perf_counter()
        cache_r, last_r = prefill(model, ids, prefill_chunk=args.prefill_chunk,
                                  cache=AnchorCache(model.config, recent=args.recent))
        t_pre_r = time.perf_counter() - t0
        results["prefill"]["R"] = {"seconds": t_pre_r, "tokens_per_s": T / t_pre_r, "chunk": args.prefill_chunk,
                                   "recent": args.recent, "kept_slots": cache_r.stats()["kept_slots"][0]}
        print(f"R anchor cache + {args.recent} recent sentences: prefill {t_pre_r:.1f} s ({T / t_pre_r:.0f} tok/s), "
              f"kept {cache_r.stats()['kept_slots'][0]} slots")
        runs["R"] = [model, cache_r, last_r[:, -1:].argmax(-1), []]

    same = ids[:, -kept:]  # the same-slots caches prefill this many tokens (their content is irrelevant)
    slots_needed = kept + args.warmup + args.steps
    if "C" in configs:
        cache, nxt, _ = baseline_prefill(base, same, args.prefill_chunk, DynamicCache(config=base.config))
        runs["C"] = [base, cache, nxt, []]
    if "S" in configs:
        cache, nxt, _ = baseline_prefill(base, same, args.prefill_chunk,
                                         StaticCache(config=base.config, max_cache_len=slots_needed))
        runs["S"] = [base, cache, nxt, []]
    if "P" in configs:
        cache, nxt, _ = baseline_prefill(base, same, args.prefill_chunk, preallocated_cache(base.config, slots_needed))
        runs["P"] = [base, cache, nxt, []]
    full_bytes = None
    if "B" in configs:
        cache_b, nxt, t_pre_b = baseline_prefill(base, ids, args.prefill_chunk, DynamicCache(config=base.config))
        full_bytes = kv_bytes_allocated(cache_b)
        results["prefill"]["B"] = {"seconds": t_pre_b, "tokens_per_s": T / t_pre_b, "chunk": args.prefill_chunk}
        print(f"B DynamicCache, full {T} slots: prefill {t_pre_b:.1f} s ({T / t_pre_b:.0f} tok/s, "
              f"chunk {args.prefill_chunk}), KV {full_bytes / 2**20:.1f} MiB")
        runs["B"] = [base, cache_b, nxt, []]

    keys = [c for c in configs if c in runs]
    orders = williams_orders(len(keys))
    from anllm_ext.hf import cache_kwarg

    kwarg = {k: cache_kwarg(runs[k][0]) for k in keys}  # "cache" (transformers >= 5.24) or "past_key_values"
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            for j in orders[i % len(orders)]:
                run = runs[keys[j]]
                mdl, cache, nxt, times = run
                t0 = time.perf_counter()
                out = mdl(input_ids=nxt, use_cache=True, **{kwarg[keys[j]]: cache})
                run[2] = out.logits[:, -1:].argmax(-1)
                t1 = time.perf_counter()
                if i >= args.warmup:
                    times.append(t1 - t0)

    med = {k: statistics.median(runs[k][3]) for k in keys}
    print(f"\ndecode ms/step (median of {args.steps}, interleaved): "
          + ", ".join(f"{k} {1e3 * m:.1f}" for k, m in med.items()))

    def paired(num, den):
        """Median of the per-round ratios (the steps of one round run back to back, so load swings of a
        shared machine cancel better than in a ratio of medians), and the ratio of the medians."""
        return (statistics.median(a / b for a, b in zip(runs[num][3], runs[den][3])), med[num] / med[den])

    ratios = {}
    lines = [("B", "A", "full DynamicCache / anchor cache (target >= 1.8)")]
    lines += [("A", c, f"anchor cache / same-slots {name} (target <= 1.10)")
              for c, name in (("C", "DynamicCache"), ("S", "StaticCache"), ("P", "preallocated cache"))]
    lines += [("B", c, f"ceiling: full / same-slots {name}")
              for c, name in (("C", "DynamicCache"), ("S", "StaticCache"), ("P", "preallocated cache"))]
    lines += [("B", "R", f"full DynamicCache / anchor cache + {args.recent} recent sentences"),
              ("R", "A", f"anchor cache + {args.recent} recent sentences / anchor cache (the window's cost)")]
    print("\nratios (median of per-round ratios; ratio of the medians in brackets):")
    for num, den, label in lines:
        if num in med and den in med:
            r, rm = paired(num, den)
            ratios[f"{num}/{den}"] = {"paired_median": r, "ratio_of_medians": rm, "what": label}
            print(f"  decode step {num} / {den}: {r:.3f} [{rm:.3f}]  {label}")
    same_slots = [c for c in "CSP" if c in med]
    if same_slots:
        fastest = min(same_slots, key=lambda c: med[c])
        r, rm = paired("A", fastest)
        ratios["A/fastest same-slots"] = {"paired_median": r, "ratio_of_medians": rm, "against": fastest}
        print(f"  anchor cache / fastest same-slots cache ({fastest}): {r:.3f} [{rm:.3f}]"
              f"  ({'faster' if r < 1 else 'slower'} than it)")

    st = cache_a.stats()  # after decoding: compaction kept it small
    slot_bytes = st["kv_bytes"] / max(sum(st["kept_slots"]), 1)
    if full_bytes is None:
        full_bytes = T * slot_bytes
    memory = {
        "full_kv_bytes": full_bytes,
        "peak_allocated_kv_bytes": st["peak_allocated_kv_bytes"],
        "peak_in_use_kv_bytes": st["peak_kv_bytes"],
        "allocated_after_decode_kv_bytes": st["allocated_kv_bytes"],
        "in_use_after_decode_kv_bytes": st["kv_bytes"],
        "reduction_in_use_after_decode": st["reduction"],
    }
    results["memory"] = memory
    print("\nKV memory of the anchor cache against the full cache (allocated = the buffers' capacity, "
          "growth slack included; in use = the slots holding tokens):")
    print(f"  peak allocated, prefill + decode / full   = {memory['peak_allocated_kv_bytes'] / full_bytes:.3f}"
          f"   ({memory['peak_allocated_kv_bytes'] / 2**20:.1f} MiB; the headline, target <= 0.10)")
    print(f"  peak in use, prefill + decode / full      = {memory['peak_in_use_kv_bytes'] / full_bytes:.3f}"
          f"   ({memory['peak_in_use_kv_bytes'] / 2**20:.1f} MiB)")
    print(f"  after decoding: allocated / full          = {memory['allocated_after_decode_kv_bytes'] / full_bytes:.3f}")
    print(f"  after decoding: in use / full             = {memory['in_use_after_decode_kv_bytes'] / full_bytes:.3f}"
          f"   (reduction {100 * st['reduction']:.1f}%)")
    if "B" in results["prefill"]:
        pa, pb = results["prefill"]["A"]["tokens_per_s"], results["prefill"]["B"]["tokens_per_s"]
        results["prefill"]["A/B tokens_per_s"] = pa / pb
        print(f"\nprefill at chunk {args.prefill_chunk}: anchor {pa:.0f} tok/s, full {pb:.0f} tok/s ({pa / pb:.2f}x)")

    results["decode_ms_median"] = {k: 1e3 * m for k, m in med.items()}
    results["decode_ms_all"] = {k: [1e3 * t for t in runs[k][3]] for k in keys}
    results["kept_slots_after_prefill"] = kept
    results["ratios"] = ratios
    info["transformers"] = transformers.__version__
    write_json(info, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
