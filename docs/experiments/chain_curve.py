"""The curve of a chain of LoRA runs, each continuing the previous one's adapter (``anllm train --model ADAPTER
--lora``): held-out perplexity against the tokens of the whole chain, from figures already measured (no
model is scored here). FIRST is the first run's ``adapter_curve.py`` JSON (its checkpoints, step 0 the
original model); each LINK is NAME=RESULTS.json=EVAL.json: a continued run's ``anllm_results.json`` (its
tokens) and the ``anllm eval`` JSON of its final adapter on the same held-out text.

    python docs/experiments/chain_curve.py --first docs/results/training/exp4-curve.json \
        exp6=docs/results/training/exp6-cont.json=docs/results/quality/eval_exp6-cont.json \
        exp7=docs/results/training/exp7-cont.json=docs/results/quality/handbook_exp7-cont.json \
        --out docs/results/training/chain-curve
"""
import argparse
import json
from pathlib import Path

from adapter_curve import plot  # this script's folder is on sys.path
from quality_table import summary


def eval_point(eval_json: Path) -> dict:
    s = summary(eval_json)
    return {"full_ppl": s["full"], "cached_ppl": s["cached"], "kv_kept": s["kv_kept"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--first", required=True, help="adapter_curve.py JSON of the first run")
    ap.add_argument("links", nargs="+", help="NAME=anllm_results.json=eval.json, in chain order")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    first = json.loads(Path(a.first).read_text())
    points = [{"run": first["run"], **p} for p in first["points"]]
    base_full = first.get("original", points[0])["full_ppl"]
    for link in a.links:
        name, results, evaluation = link.split("=")
        tokens = points[-1]["tokens"] + json.loads(Path(results).read_text())["train_tokens"]
        points.append({"run": name, "step": None, "tokens": tokens, **eval_point(Path(evaluation))})
    rows = ["| run | tokens (whole chain) | full attention | anchor cache | anchor cache / original full | KV kept |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {p['run']} | {p['tokens']:,} | {p['full_ppl']:.2f} | {p['cached_ppl']:.2f} | "
             f"{p['cached_ppl'] / base_full:.2f}x | {p['kv_kept']:.1%} |" for p in points]
    print("\n".join(rows))
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"first": a.first, "links": a.links, "text": first["text"],
                                                    "points": points}, indent=2) + "\n")
    plot(points, base_full, out, "chain of continued runs: held-out prose")
    print("wrote", out.with_suffix(".json"), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
