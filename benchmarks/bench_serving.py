"""Serving throughput: batched decoding with long prompts, anchor cache vs full caches, same run.

SmolLM2-135M-Instruct (bundled; or ``--model DIR``), EP anchors (sentence-final periods), prompts of
English prose (Python documentation, Debian python3.11-doc): every row of a batch is a different slice
of the text, all of the same length. Caches, each with greedy decoding of ``--new-tokens`` tokens (EOS
ignored):

  anchor   ``AnchorCache`` via ``anllm_ext.generate`` (patched model, chunked prefill with compaction,
           real-time compaction at decoded anchors);
  dynamic  transformers' ``DynamicCache`` (unpatched model), holding every token;
  static   transformers' ``StaticCache`` preallocated for the full length (prompt + new tokens).

Per (cache, context, batch): prefill seconds, decode tokens/s (all rows; from the first generated token
to the last), KV bytes per row (anchor: the peak in use, which a server must hold; dynamic: at the end;
static: allocated). Then, for a KV budget (``--budget-gib``), the largest batch each cache fits at each
context (budget / KV bytes per row), and the decode throughput measured at that batch, capped at
``--budget-batch-cap`` rows (the cap is reported). Writes JSON (benchmarks/common.py format) and a PNG.

    .venv/bin/python benchmarks/bench_serving.py --contexts 2048 8192 --batches 1 4 16 --threads 2
    .venv/bin/python benchmarks/bench_serving.py --smoke          # tiny sizes: checks that it runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, print_header, run_info, write_json  # noqa: E402

CACHES = ("anchor", "dynamic", "static")


class _FirstToken:
    """A generate() streamer that timestamps the first generated token (the end of the prefill)."""

    def __init__(self):
        self.t_first = None
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
        elif self.t_first is None:
            self.t_first = time.perf_counter()

    def end(self):
        pass


def _prompts(tok, batch: int, context: int) -> torch.Tensor:
    from anllm_ext.sample_text import sample_text

    text = sample_text(max(40000, 6 * context * batch // 4))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stride = max(1, (len(ids) - context) // max(batch, 1))
    if len(ids) < context:
        raise ValueError(f"the sample text has {len(ids)} tokens, fewer than the context {context}")
    return torch.tensor([ids[b * stride : b * stride + context] for b in range(batch)])


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_one(model, anchors, ids: torch.Tensor, cache_kind: str, new_tokens: int, prefill_chunk: int) -> dict:
    from transformers import DynamicCache, StaticCache

    from anllm_ext import generate, patched, unpatch
    from anllm_ext.cache import cache_kv_bytes
    from anllm_ext.hf import cache_kwarg

    B, T = ids.shape
    mask = torch.ones_like(ids)
    timer = _FirstToken()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=timer,
              pad_token_id=model.generation_config.eos_token_id or 0)
    _sync(ids.device)
    t0 = time.perf_counter()
    if cache_kind == "anchor":
        with patched(model, anchors):
            out, cache = generate(model, ids, mask, prefill_chunk=prefill_chunk, return_cache=True, **kw)
        _sync(ids.device)
        st = cache.stats()
        kv_row = st["peak_kv_bytes"] / B
        kv_end_row = st["kv_bytes"] / B
    else:
        unpatch(model)
        if cache_kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = StaticCache(config=model.config, max_cache_len=T + new_tokens)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, disable_compile=True,
                                 **{cache_kwarg(model): cache}, **kw)
        _sync(ids.device)
        kv_row = kv_end_row = cache_kv_bytes(cache) / B
    t1 = time.perf_counter()
    new = out.shape[1] - T
    t_first = timer.t_first or t1
    return {
        "cache": cache_kind, "context": T, "batch": B, "new_tokens": new,
        "prefill_s": t_first - t0,
        "decode_tokens_per_s": B * (new - 1) / (t1 - t_first) if new > 1 and t1 > t_first else float("nan"),
        "kv_bytes_per_row": kv_row, "kv_bytes_per_row_end": kv_end_row,
    }


def _table(rows, keys):
    print("  ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>16.4g}" if isinstance(r[k], float) else f"{str(r[k]):>16}" for k in keys))


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in CACHES:
        for B in sorted({r["batch"] for r in runs}):
            pts = sorted((r["context"], r) for r in runs if r["cache"] == kind and r["batch"] == B)
            if not pts:
                continue
            xs = [c for c, _ in pts]
            axes[0].plot(xs, [1e3 * B / r["decode_tokens_per_s"] for _, r in pts], marker="o", label=f"{kind} B={B}")
            if B == min(r["batch"] for r in runs):
                axes[1].plot(xs, [r["kv_bytes_per_row"] / 2**20 for _, r in pts], marker="o", label=kind)
    for kind in CACHES:
        pts = [b for b in results["budget"] if b["cache"] == kind]
        if pts:
            axes[2].bar([f"{kind}\n{b['context']}" for b in pts], [b["max_batch"] for b in pts], label=kind)
    axes[0].set(xlabel="context (tokens)", ylabel="decode latency per step (ms)", title="decode step")
    axes[1].set(xlabel="context (tokens)", ylabel="KV MiB per request", title="KV bytes per request")
    axes[2].set(ylabel="largest batch", title=f"requests in {results['budget_gib']} GiB of KV")
    axes[2].set_yscale("log")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--budget-gib", type=float, default=4.0, help="KV memory budget of the serving comparison")
    p.add_argument("--budget-batch-cap", type=int, default=64, help="largest batch actually run for the budget")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", default=None, help="write a PNG here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (contexts 192, batches 1 2, 6 new tokens)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.new_tokens, args.prefill_chunk, args.budget_batch_cap = [192], [1, 2], 6, 64, 3
    torch.set_num_threads(args.threads)

    from anllm_ext import ep_anchor_ids
    from anllm_ext.models import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, tok = load_model(args.model, dtype=dtype, device=args.device)
    anchors = ep_anchor_ids(tok)
    info = run_info("bench_serving", args)
    print_header(info)
    keys = ["cache", "context", "batch", "prefill_s", "decode_tokens_per_s", "kv_bytes_per_row"]
    # warm-up (not recorded): the first generate of a process pays one-time costs (lazy init, allocator growth)
    warm = _prompts(tok, 1, min(args.contexts)).to(args.device)[:, :256]
    for kind in args.caches:
        run_one(model, anchors, warm, kind, 4, args.prefill_chunk)
    runs = []
    for T in args.contexts:
        for B in args.batches:
            ids = _prompts(tok, B, T).to(args.device)
            for kind in args.caches:
                r = run_one(model, anchors, ids, kind, args.new_tokens, args.prefill_chunk)
                runs.append(r)
                print(f"  {kind:>8} context {T} batch {B}: {r['decode_tokens_per_s']:.1f} tokens/s", flush=True)
    print("\nper run:")
    _table(runs, keys)

    budget = args.budget_gib * 2**30
    budget_rows = []
    for T in args.contexts:
        for kind in args.caches:
            per_row = max(r["kv_bytes_per_row"] for r in runs if r["cache"] == kind and r["context"] == T)
            max_batch = int(budget // per_row)
            run_b = min(max_batch, args.budget_batch_cap)
            row = {"cache": kind, "context": T, "kv_bytes_per_row": per_row, "max_batch": max_batch,
                   "measured_batch": run_b, "capped": run_b < max_batch, "decode_tokens_per_s": float("nan")}
            same = [r for r in runs if (r["cache"], r["context"], r["batch"]) == (kind, T, run_b)]
            if same:  # measured above at this batch already
                row["decode_tokens_per_s"] = same[0]["decode_tokens_per_s"]
            elif run_b >= 1:
                ids = _prompts(tok, run_b, T).to(args.device)
                row["decode_tokens_per_s"] = run_one(model, anchors, ids, kind, args.new_tokens,
                                                     args.prefill_chunk)["decode_tokens_per_s"]
            budget_rows.append(row)
    print(f"\nin a KV budget of {args.budget_gib} GiB (throughput measured at min(max batch, {args.budget_batch_cap})):")
    _table(budget_rows, ["cache", "context", "kv_bytes_per_row", "max_batch", "measured_batch", "decode_tokens_per_s"])
    results = {"runs": runs, "budget": budget_rows, "budget_gib": args.budget_gib}
    write_json(info, results, args.json)
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
