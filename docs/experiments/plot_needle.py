"""Needle recall against hot KV fraction, one marker per run and haystack length, from the JSON files of
needle_recall.py and needle_kvpress.py; also prints the table docs/evaluation.md shows.

    python docs/experiments/plot_needle.py docs/results/recall/needle.json docs/results/recall/kvpress.json \
        --out docs/results/recall/needle.png [--prefix "" ""]
"""
import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefix", nargs="+", help="one per JSON file, put before its run names (\"\" for none): "
                    "keeps apart runs of the same name from different files")
    args = ap.parse_args()
    if args.prefix is not None and len(args.prefix) != len(args.json):
        ap.error(f"--prefix takes one value per JSON file ({len(args.json)}), got {len(args.prefix)}")
    runs, haystack = {}, None
    for path, prefix in zip(args.json, args.prefix or [""] * len(args.json)):
        if Path(path).exists():
            data = json.loads(Path(path).read_text())
            runs.update({prefix + name: r for name, r in data["runs"].items()})
            haystack = haystack or Path(str(data.get("setup", {}).get("haystack", "?"))).name
    lengths = sorted({int(n) for r in runs.values() for n in r["by_length"]})
    print("| run | " + " | ".join(f"{n} tokens: found / hot KV / s / needle recalled" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name, r in runs.items():
        cells = []
        for n in lengths:
            c = r["by_length"].get(str(n)) or r["by_length"].get(n)
            hits = [t["needle_hit_first"] for t in r["trials"]
                    if t["length"] == n and t.get("needle_hit_first") is not None]
            hit = f"{sum(hits) / len(hits):.2f}" if hits else "-"
            cells.append("-" if c is None else f"{round(c['score'] * c['trials'])}/{c['trials']} / "
                         f"{c['hot_fraction']:.1%} / {c['seconds']:.1f} / {hit}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths) + 2.5, 4.2), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, n in zip(axes[0], lengths):
        for i, (name, r) in enumerate(runs.items()):
            c = r["by_length"].get(str(n)) or r["by_length"].get(n)
            if c is None:
                continue
            marker = "s" if name.startswith("original-") and "@" in name else "o"
            jitter = 0.012 * (i % 5 - 2)  # keeps equal scores apart
            ax.scatter(c["hot_fraction"], c["score"] + jitter, marker=marker, s=40, color=colours(i % 20), label=name)
        ax.set_xscale("log")
        ax.set_xlabel("hot KV fraction (largest over the answer's forwards)")
        ax.set_ylabel("needle found")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{n}-token haystack ({haystack}), SmolLM2-135M")
        ax.grid(alpha=0.3)
    handles = {}  # every run once, also those absent from the last panel
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
