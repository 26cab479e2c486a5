"""Needle recall against hot KV fraction, one marker per run and haystack length, from the JSON files of
needle_recall.py and needle_kvpress.py; also prints the table docs/evaluation.md shows.

    python docs/experiments/plot_needle.py docs/results/recall/needle.json docs/results/recall/kvpress.json \
        --out docs/results/recall/needle.png
"""
import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = {}
    for path in args.json:
        if Path(path).exists():
            runs.update(json.loads(Path(path).read_text())["runs"])
    lengths = sorted({int(n) for r in runs.values() for n in r["by_length"]})
    print("| run | " + " | ".join(f"{n} tokens: found / hot KV / s" for n in lengths) + " | needle in recall (first / mean) |")
    print("|---|" + "---|" * (len(lengths) + 1))
    for name, r in runs.items():
        cells = []
        for n in lengths:
            c = r["by_length"].get(str(n)) or r["by_length"].get(n)
            cells.append("-" if c is None else
                         f"{round(c['score'] * c['trials'])}/{c['trials']} / {c['hot_fraction']:.1%} / {c['seconds']:.1f}")
        firsts = [t["needle_hit_first"] for t in r["trials"] if t.get("needle_hit_first") is not None]
        means = [t["needle_hit_mean"] for t in r["trials"] if t.get("needle_hit_mean") is not None]
        hit = f"{sum(firsts) / len(firsts):.2f} / {sum(means) / len(means):.2f}" if firsts else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {hit} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for name, r in runs.items():
            c = r["by_length"].get(str(n)) or r["by_length"].get(n)
            if c is None:
                continue
            marker = "s" if name.startswith("original-") and "@" in name else "o"
            ax.scatter(c["hot_fraction"], c["score"], marker=marker, s=40)
            ax.annotate(name.replace("anllm-", "").replace("original-", "orig "), (c["hot_fraction"], c["score"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("hot KV fraction (largest over the answer's forwards)")
        ax.set_ylabel("needle found")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{n}-token haystack (GPL-3), SmolLM2-135M")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
