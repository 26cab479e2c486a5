"""The training curves of the conversion runs (self-distillation, ``--distill-alpha 1``: the logged ``loss`` is the
per-token KL to the full-attention teacher) against tokens seen, one line per run, labelled by the JSON's name.

    python docs/experiments/conversion_curves.py docs/results/conversion/chat-distill.json \
        docs/results/conversion/distill-full.json docs/results/conversion/chat-distill-recall.json \
        --out docs/results/conversion/losses.png
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="anllm_results.json copies, one per run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="Self-distillation on chat conversations (training batches)")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4))
    for path in args.runs:
        logs = [h for h in json.load(open(path))["log_history"] if "loss" in h]
        ax.plot([h["num_input_tokens_seen"] for h in logs], [h["loss"] for h in logs], marker="o", ms=3,
                label=Path(path).stem)
    ax.set(xlabel="training tokens", ylabel="KL(teacher || AnSAN student) per token", ylim=(0, None),
           title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
