"""The quality table of docs/training.md from the JSON files of ``docs/experiments/eval_heldout.sh``: per model, the
held-out prose perplexity with full attention and under the anchor cache, the anchor cache's ratio to the
*original* model's full-attention perplexity, the KV kept, and the capitals task (0-shot under the anchor
cache; 3-shot full / anchor cache).

    python docs/experiments/quality_table.py --original docs/results/quality/eval_original.json \
        docs/results/quality/eval_distill.json docs/results/quality/eval_exp4-lm.json
"""
import argparse
import json
from pathlib import Path


def summary(path) -> dict:
    out = {}
    for r in json.loads(Path(path).read_text())["results"]:
        if r["task"] == "perplexity":
            out.update(full=r["modes"]["full"]["perplexity"], cached=r["modes"]["cached"]["perplexity"],
                       kv_kept=r["modes"]["cached"]["kv_kept"])
        else:
            out[r["config"]["shots"]] = {m: v["accuracy"] for m, v in r["modes"].items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--original", required=True, help="the eval JSON of the original model (--anchors ep)")
    ap.add_argument("evals", nargs="+")
    a = ap.parse_args()
    base = summary(a.original)["full"]
    print(f"| model | full / anchor-cached (ratio to the original's full {base:.2f}) | KV kept | "
          "capitals 0-shot cached | 3-shot full / cached |")
    print("|---|---|---|---|---|")
    for path in [a.original, *a.evals]:
        s = summary(path)
        print(f"| {Path(path).stem.removeprefix('eval_')} | {s['full']:.2f} / {s['cached']:.2f} "
              f"({s['cached'] / base:.2f}x) | {s['kv_kept']:.1%} | {s[0]['cached']:.3f} | "
              f"{s[3]['full']:.3f} / {s[3]['cached']:.3f} |")


if __name__ == "__main__":
    main()
