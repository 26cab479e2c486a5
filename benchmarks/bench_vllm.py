"""The bundled AnLLM served by vLLM: the anllm_ext plugin (AnSAN attention, compaction in the paged cache)
against the same weights in plain vLLM (full attention, vLLM's own CPU backend), same prompts, same engine
settings, same fixed KV pool (``--kv-blocks`` blocks of 128 slots).

All requests arrive at once. Prints, per engine: prompt/output tokens, wall time, output tokens/s, time to
first token (mean / max, from the start), peak requests running, KV blocks in use (peak / mean over steps)
and preemptions. The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so its scheduler
can be read after every step. Run it in the vLLM virtualenv (`make test-vllm` builds it):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--requests 16] [--sentences 40] [--max-tokens 32] [--kv-blocks 32]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process


def prompts(n: int, sentences: int):
    from anllm_ext.sample_text import sample_text

    text = re.sub(r"\s+", " ", sample_text(200000))
    parts = [s.strip() + "." for s in text.split(". ") if 20 < len(s.strip()) < 300]
    return [" ".join(parts[(i * 17 + k) % len(parts)] for k in range(sentences)) for i in range(n)]


def plain_copy(anllm_dir: Path) -> Path:
    """The same weights without the anchor configuration: plain vLLM serves them."""
    target = anllm_dir.parent / (anllm_dir.name + "-plain")
    if not target.is_dir():
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
    first, new, running, blocks, preempted = {}, {}, [], [], set()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - start
        for o in outs:
            new[o.request_id] = len(o.outputs[0].token_ids)
            if new[o.request_id] and o.request_id not in first:
                first[o.request_id] = now
        running.append(len(scheduler.running))
        blocks.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        preempted |= {r for r, req in scheduler.requests.items() if req.num_preemptions}
    wall = time.perf_counter() - start
    engine.engine_core.shutdown()
    out_tokens = sum(new.values())
    return {"prompt_tokens": sum(map(len, ids)), "output_tokens": out_tokens, "wall_s": round(wall, 1),
            "output_tokens_per_s": round(out_tokens / wall, 2),
            "ttft_mean_s": round(statistics.mean(first.values()), 1), "ttft_max_s": round(max(first.values()), 1),
            "peak_running": max(running), "kv_blocks_peak": max(blocks), "kv_blocks_mean": round(statistics.mean(blocks), 1),
            "kv_blocks_pool": args.kv_blocks, "steps": len(running), "preempted_requests": len(preempted)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--sentences", type=int, default=40, help="sentences per prompt (~25 tokens each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="vLLM's token budget per step")
    p.add_argument("--kv-blocks", type=int, default=32, help="the fixed KV pool, in blocks of 128 slots")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from anllm_ext.vllm.export import cached_export

    anllm_dir = cached_export("smollm2-anllm")
    texts = prompts(args.requests, args.sentences)
    results = {}
    for name, model_dir in (("plain vLLM (full attention)", plain_copy(anllm_dir)), ("anllm_ext plugin (AnSAN + compaction)", anllm_dir)):
        results[name] = run(model_dir, texts, args)
        print(name, results[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":  # the engine needs it (vLLM may spawn processes)
    main()
