"""The bundled AnLLM served by vLLM: the anllm_ext plugin (AnSAN attention) against the same weights in plain
vLLM (full attention, vLLM's own CPU backend), same prompts, same engine settings, same KV pool.

Prints, per engine: prompt/output tokens, wall time, output tokens/s and mean / max time to first token
(vLLM's per-request first_token_latency). Run it in the vLLM virtualenv (`make test-vllm` builds it):
    .venv-vllm/bin/python benchmarks/bench_vllm.py [--requests 16] [--sentences 40] [--max-tokens 32]

The plugin does not compact the paged cache yet (docs/vllm.md), so both engines hold the same KV blocks
per request; this measures the cost of the AnSAN attention path, not the memory payoff.
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


def run(model_dir: Path, texts, max_tokens: int, max_model_len: int):
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0,
              disable_log_stats=False)  # per-request metrics (first-token latency)
    tok = llm.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    ttft = [o.metrics.first_token_latency for o in outs if o.metrics is not None]
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": sum(map(len, ids)), "output_tokens": new, "wall_s": round(wall, 2),
            "output_tokens_per_s": round(new / wall, 2),
            "ttft_mean_s": round(statistics.mean(ttft), 2) if ttft else None,
            "ttft_max_s": round(max(ttft), 2) if ttft else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--sentences", type=int, default=40, help="sentences per prompt (~25 tokens each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from anllm_ext.vllm.export import cached_export

    anllm_dir = cached_export("smollm2-anllm")
    texts = prompts(args.requests, args.sentences)
    results = {}
    for name, model_dir in (("plain vLLM (full attention)", plain_copy(anllm_dir)), ("anllm_ext plugin (AnSAN)", anllm_dir)):
        results[name] = run(model_dir, texts, args.max_tokens, args.max_model_len)
        print(name, results[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
