"""The bundled AnLLM served by vLLM: the anllm_ext plugin (AnSAN attention, compaction in the paged cache)
against the same weights in plain vLLM (full attention, vLLM's own CPU backend), same prompts, same engine
settings, same fixed KV pool (``--kv-blocks`` blocks of 128 slots).

All requests arrive at once. Prints, per engine: prompt/output tokens, wall time, output tokens/s, time to
first token (mean / max, from the start), peak requests running, KV blocks in use (peak / mean over steps)
and preemptions. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so its scheduler
can be read after every step. Run it in the vLLM virtualenv (`make test-vllm` builds it):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--requests 16] [--sentences 40] [--max-tokens 32] [--kv-blocks 32]
        [--engines plain,anllm] [--threads 1] [--json OUT.json] [--progress N]
    python benchmarks/bench_vllm.py --replot OUT.json --plot OUT.png     # where matplotlib is
"""
import argparse
import importlib.metadata
import json
import sys
import os
import re
import shutil
import statistics
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_common_args, print_header, run_info, write_json  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process


def prompts(n: int, sentences: int):
    from anllm_ext.sample_text import sample_text

    text = re.sub(r"\s+", " ", sample_text(200000))
    parts = [s.strip() + "." for s in text.split(". ") if 20 < len(s.strip()) < 300]
    return [" ".join(parts[(i * 17 + k) % len(parts)] for k in range(sentences)) for i in range(n)]


def plain_copy(anllm_dir: Path) -> Path:
    """The same weights without the anchor configuration: plain vLLM serves them. Copied again whenever the
    AnLLM's export changed (its source stamp differs)."""
    from anllm_ext.vllm.export import SOURCE_FILE

    target = anllm_dir.parent / (anllm_dir.name + "-plain")
    stamp = (anllm_dir / SOURCE_FILE).read_text()
    if not (target / SOURCE_FILE).is_file() or (target / SOURCE_FILE).read_text() != stamp:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(anllm_dir, target)
        config = json.loads((target / "config.json").read_text())
        config.pop("anllm")
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def run(model_dir: Path, texts, args):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=args.max_model_len, seed=0,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.requests,
              num_gpu_blocks_override=args.kv_blocks + 1)  # + vLLM's null block
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    tok = llm.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(ids):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    first, new, steps, preempted = {}, {}, [], set()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - start
        for o in outs:
            new[o.request_id] = len(o.outputs[0].token_ids)
            if new[o.request_id] and o.request_id not in first:
                first[o.request_id] = now
        steps.append((round(now, 2), len(scheduler.running), pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()))
        preempted |= {r for r, req in scheduler.requests.items() if req.num_preemptions}
        if args.progress and len(steps) % args.progress == 0:
            print(f"  step {len(steps)}: {now:.0f} s, {len(scheduler.running)} running, {steps[-1][2]} blocks, "
                  f"{sum(1 for k in new if new[k] >= args.max_tokens)} finished", flush=True)
    wall = time.perf_counter() - start
    engine.engine_core.shutdown()
    out_tokens = sum(new.values())
    _, running, blocks = zip(*steps)
    return {"prompt_tokens": sum(map(len, ids)), "prompt_tokens_min_max": [min(map(len, ids)), max(map(len, ids))],
            "output_tokens": out_tokens, "wall_s": round(wall, 1),
            "output_tokens_per_s": round(out_tokens / wall, 2),
            "tokens_per_s": round((sum(map(len, ids)) + out_tokens) / wall, 1),
            "ttft_mean_s": round(statistics.mean(first.values()), 1), "ttft_max_s": round(max(first.values()), 1),
            "peak_running": max(running), "mean_running": round(statistics.mean(running), 1),
            "kv_blocks_peak": max(blocks), "kv_blocks_mean": round(statistics.mean(blocks), 1),
            "kv_blocks_pool": args.kv_blocks, "steps": len(steps), "preempted_requests": len(preempted),
            "per_step": {"t_s": [s[0] for s in steps], "running": list(running), "kv_blocks": list(blocks)}}


def plot(results: dict, pool_blocks: int, path: str) -> None:
    """Requests running and KV blocks in use against time, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, r in results.items():
        series = r["per_step"]
        top.plot(series["t_s"], series["running"], label=name)
        bottom.plot(series["t_s"], series["kv_blocks"], label=name)
    bottom.axhline(pool_blocks, color="grey", linestyle=":", label="KV pool")
    top.set_ylabel("requests running")
    bottom.set_ylabel("KV blocks in use (128 slots)")
    bottom.set_xlabel("seconds since all requests arrived")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


ENGINES = {"plain": "plain vLLM (full attention)", "anllm": "anllm_ext plugin (AnSAN + compaction)"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--sentences", type=int, default=40, help="sentences per prompt (~30 tokens each: 135 make prompts of ~4,000 tokens)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="vLLM's token budget per step")
    p.add_argument("--kv-blocks", type=int, default=32, help="the fixed KV pool, in blocks of 128 slots")
    p.add_argument("--engines", default="plain,anllm", help="which engines to run, in order: plain, anllm")
    p.add_argument("--progress", type=int, default=0, metavar="N", help="print the engine's state every N steps")
    p.add_argument("--plot", help="also draw requests running and KV blocks in use against time (PNG)")
    p.add_argument("--replot", metavar="JSON", help="only draw --plot from the results a run wrote (no engine runs)")
    add_common_args(p, default_threads=1)
    args = p.parse_args()
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the engines run, not after)
        except ImportError:
            p.error("--plot needs matplotlib, which the vLLM virtualenv lacks: run without --plot there, then "
                    "`python benchmarks/bench_vllm.py --replot OUT.json --plot OUT.png` where matplotlib is")
    if args.replot:
        if not args.plot:
            p.error("--replot needs --plot")
        data = json.loads(Path(args.replot).read_text())
        plot(data["results"], data["run"]["args"]["kv_blocks"], args.plot)
        return
    engines = args.engines.split(",")
    if not engines or set(engines) - set(ENGINES):
        p.error(f"--engines takes a comma-separated list of {sorted(ENGINES)}, got {args.engines!r}")
    import torch

    torch.set_num_threads(args.threads)
    from anllm_ext.vllm.export import cached_export

    anllm_dir = cached_export("smollm2-anllm")
    texts = prompts(args.requests, args.sentences)
    info = run_info("bench_vllm", args)
    info["vllm"] = importlib.metadata.version("vllm-cpu") if _installed("vllm-cpu") else importlib.metadata.version("vllm")
    print_header(info)
    results = {}
    for engine in engines:
        model_dir = anllm_dir if engine == "anllm" else plain_copy(anllm_dir)
        results[ENGINES[engine]] = run(model_dir, texts, args)
        print(ENGINES[engine], {k: v for k, v in results[ENGINES[engine]].items() if k != "per_step"}, flush=True)
    write_json(info, results, args.json)
    if args.plot:
        plot(results, args.kv_blocks, args.plot)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":  # the engine needs it (vLLM may spawn processes)
    main()
