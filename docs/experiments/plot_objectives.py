"""Experiment 3 curves: the AnSAN student's next-token loss on its training batches against tokens seen, for the
LM objective and for self-distillation (which logs that loss as ``lm_loss`` beside its KL).

    python docs/experiments/plot_objectives.py docs/results/training/exp3-lm.json docs/results/training/exp3-distill.json \
        --out docs/results/training/exp3.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for path in args.runs:
        r = json.load(open(path))
        name = r.get("objective", {}).get("loss", path)
        logs = [h for h in r["log_history"] if "loss" in h]
        tokens = [h["num_input_tokens_seen"] for h in logs]
        ax1.plot(tokens, [h.get("lm_loss", h["loss"]) for h in logs], marker="o", ms=3, label=name)
        if any("distill_kl" in h for h in logs):
            ax2.plot(tokens, [h["distill_kl"] for h in logs], marker="o", ms=3, label=f"{name}: KL to teacher")
    ax1.set(xlabel="training tokens", ylabel="AnSAN next-token loss (training batches)", title="LM loss of the student")
    ax2.set(xlabel="training tokens", ylabel="KL(teacher || student)", title="distillation objective")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
