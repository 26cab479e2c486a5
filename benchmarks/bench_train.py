"""Training step of SmolLM2-135M: AnSAN through the patched model vs the baselines a user would run.

    python benchmarks/bench_train.py --threads 2 --blocks 512 2048 8192

Per block size (batch 1, fp32, AdamW, forward + backward + optimizer step), in the same run:
  anllm   the patched model (fused AnSAN kernel, forward and backward);
  causal  the unpatched model with causal SDPA (what plain causal training costs: the speed target);
  dense   eager attention with the dense AnSAN mask as a 4-D additive mask (what the authors' code does).
Every configuration runs in its own subprocess, so its peak memory (the process's peak RSS minus its RSS
before the first step) is its own. The dense mask is skipped where its saved attention probabilities alone
would exceed --dense-limit-gb (they grow as T^2 per layer).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, print_header, run_info, write_json  # noqa: E402

METHODS = ("anllm", "causal", "dense")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(method: str, block: int, steps: int, threads: int) -> dict:
    """One configuration, in this process: timed training steps and the memory they added."""
    import torch

    import anllm_ext
    from anllm_ext.layout import token_layout
    from anllm_ext.models import load_model
    from anllm_ext.sample_text import sample_text
    from anllm_ext.reference import ansan_mask

    torch.set_num_threads(threads)
    model, tok = load_model(attn_implementation="eager" if method == "dense" else "sdpa")
    anchors = anllm_ext.ep_anchor_ids(tok)
    ids = tok(sample_text(6 * block), return_tensors="pt")["input_ids"][:, :block]
    if ids.shape[1] < block:
        raise SystemExit(f"not enough text for {block} tokens")
    kwargs = {"input_ids": ids, "labels": ids}
    if method == "anllm":
        anllm_ext.patch(model, anchors)
    elif method == "dense":
        lay = token_layout(ids, anchors)
        allowed = ansan_mask(lay, lay)[:, None]
        kwargs["attention_mask"] = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        kwargs["position_ids"] = lay.positions
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rss_before = _rss_bytes()
    times = []
    for i in range(steps + 1):  # the first step (optimizer state allocation, warm-up) is not timed
        t0 = time.perf_counter()
        loss = model(**kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times.sort()
    step_s = times[len(times) // 2]
    return {"method": method, "block": block, "step_s": step_s, "tokens_per_s": block / step_s,
            "peak_added_bytes": max(0, peak - rss_before), "peak_rss_bytes": peak, "loss": float(loss)}


def dense_prob_bytes(block: int, heads: int = 9, layers: int = 30) -> int:
    """What eager attention keeps for backward: the fp32 probabilities [heads, T, T] of every layer (x2 with
    the scores it also saves)."""
    return 2 * heads * block * block * 4 * layers


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--dense-limit-gb", type=float, default=8.0)
    p.add_argument("--one", nargs=2, metavar=("METHOD", "BLOCK"), help=argparse.SUPPRESS)  # child process
    add_common_args(p)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps, args.threads)))
        return
    info = run_info("bench_train", args)
    print_header(info)
    rows = []
    for block in args.blocks:
        for method in args.methods:
            if method == "dense" and dense_prob_bytes(block) > args.dense_limit_gb * 2**30:
                rows.append({"method": method, "block": block, "skipped": f"needs ~{dense_prob_bytes(block) / 2**30:.0f} GiB"})
                print(f"T={block:5d} {method:7s} skipped: {rows[-1]['skipped']} for its saved attention", flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", method, str(block), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"method": method, "block": block, "failed": out.stderr.strip().splitlines()[-1:]})
                print(f"T={block:5d} {method:7s} failed: {rows[-1]['failed']}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"T={block:5d} {method:7s} {r['step_s']*1e3:9.0f} ms/step {r['tokens_per_s']:8.1f} tok/s "
                  f"peak +{r['peak_added_bytes'] / 2**20:8.0f} MiB", flush=True)
    by = {(r["method"], r["block"]): r for r in rows if "step_s" in r}
    for block in args.blocks:
        a = by.get(("anllm", block))
        for base in ("causal", "dense"):
            b = by.get((base, block))
            if a and b:
                print(f"T={block:5d} anllm vs {base}: {b['step_s'] / a['step_s']:.2f}x the speed, "
                      f"{a['peak_added_bytes'] / max(b['peak_added_bytes'], 1):.2f}x the added memory")
    write_json(info, {"rows": rows}, args.json)


if __name__ == "__main__":
    main()
