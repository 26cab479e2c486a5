"""Experiment 2's curves: held-out perplexity of every saved checkpoint of the two arms against training tokens:
the causal model with its full cache, the AnSAN model under anchor-cached inference (and its full attention).

    python docs/experiments/scratch_curve.py --runs RUNS --ckpts RUNS/exp2-ckpts --out docs/results/training/exp2-scale

RUNS holds scratch-init/ and the runs exp2-ansan/, exp2-causal/ (docs/experiments/scratch_ansan_vs_causal.sh); CKPTS the weights of
each checkpoint, ARM-STEP/ (the Trainer keeps only its last two). The held-out blocks are the run's own: the
same document split (seed 0) and the same 32 blocks of 512 tokens, rebuilt with the library's data steps.
Writes OUT.json and OUT.png and prints a Markdown table.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from anllm_ext.evaluation import perplexity  # noqa: E402
from anllm_ext.training import AnLLMArguments, build_datasets, load_for_training  # noqa: E402

DATA = "/usr/share/doc/python3.11/html/_sources"


def held_out_blocks(init_dir: str, block: int, n_blocks: int):
    args = AnLLMArguments(data=[DATA], model=init_dir, anchor_mode="ep", block_size=block, eval_blocks=n_blocks,
                          attention="causal")
    _, tok, config = load_for_training(args)
    _, eval_ds = build_datasets(args, tok, config, seed=0)
    return [list(r) for r in eval_ds["input_ids"]], list(config.anchor_ids)


def tokens_at(results: dict, step: int) -> int:
    seen = [h["num_input_tokens_seen"] for h in results["log_history"] if h.get("step") == step
            and "num_input_tokens_seen" in h]
    return int(seen[0]) if seen else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--ckpts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--arms", default="ansan,causal", help="arms to score now (the others are read from --out)")
    a = ap.parse_args()
    runs = Path(a.runs)
    blocks, anchors = held_out_blocks(str(runs / "scratch-init"), a.block_size, a.eval_blocks)
    out = Path(a.out)
    arms = a.arms.split(",")
    old = json.loads(out.with_suffix(".json").read_text())["points"] if out.with_suffix(".json").exists() else []
    points = [p for p in old if p["arm"] not in arms]
    for arm in arms:
        results = json.loads((runs / f"exp2-{arm}" / "anllm_results.json").read_text())
        steps = sorted(int(p.name.split("-")[-1]) for p in Path(a.ckpts).glob(f"exp2-{arm}-*"))
        for step in steps:
            model = tf.AutoModelForCausalLM.from_pretrained(str(Path(a.ckpts) / f"exp2-{arm}-{step}")).eval()
            modes = ("full", "cached") if arm == "ansan" else ("full",)
            with torch.no_grad():
                r = perplexity(model, blocks, modes=modes, prefill_chunk=128, progress=False, anchor_ids=anchors)
            point = {"arm": arm, "step": step, "tokens": tokens_at(results, step)}
            point.update({f"{m}_ppl": r[m].perplexity for m in modes})
            if arm == "ansan":
                point["kv_kept"] = r["cached"].kv_kept
            print(json.dumps(point), flush=True)
            points.append(point)
    by_step = {}
    for p in points:
        by_step.setdefault(p["step"], {}).update({f"{p['arm']}_{k}": v for k, v in p.items() if k.endswith("ppl")},
                                                 tokens=p["tokens"])
    rows = ["| step | tokens | causal, full cache | AnSAN, anchor cache | ratio | AnSAN, full attention |",
            "|---|---|---|---|---|---|"]
    for step, d in sorted(by_step.items()):
        c, s = d.get("causal_full_ppl"), d.get("ansan_cached_ppl")
        ratio = f"{s / c:.3f}" if c and s else "-"
        cell = lambda x: "-" if x is None else f"{x:.2f}"
        rows.append(f"| {step} | {d['tokens']:,} | {cell(c)} | {cell(s)} | {ratio} | {cell(d.get('ansan_full_ppl'))} |")
    print("\n".join(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"blocks": len(blocks), "block_size": a.block_size,
                                                    "points": points}, indent=2) + "\n")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, mode, label in (("causal", "full_ppl", "causal, full cache"), ("ansan", "cached_ppl", "AnSAN, anchor cache"),
                             ("ansan", "full_ppl", "AnSAN, full attention")):
        pts = [p for p in points if p["arm"] == arm]
        ax1.plot([p["tokens"] for p in pts], [p[mode] for p in pts], marker="o", label=label)
    ratios = [(d["tokens"], d["ansan_cached_ppl"] / d["causal_full_ppl"]) for d in by_step.values()
              if "ansan_cached_ppl" in d and "causal_full_ppl" in d]
    if ratios:
        ax2.plot(*zip(*sorted(ratios)), marker="o")
    ax1.set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log", title="from scratch, 17M Llama")
    ax2.set(xlabel="training tokens", ylabel="AnSAN anchor-cached / causal full", title="perplexity ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("wrote", out.with_suffix(".json"), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
