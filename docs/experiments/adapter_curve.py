"""Curves of a LoRA run: held-out perplexity of every saved adapter checkpoint against training tokens, with
full attention and under the anchor cache, as ``anllm eval`` scores them (the same blocks of the same texts).

    python docs/experiments/adapter_curve.py --run RUNS/exp4-lm --ckpts RUNS/exp4-ckpts \
        --text data/heldout/handbook.txt --out docs/results/training/exp4-curve

RUN is the run's output directory (its ``anllm_results.json`` gives the tokens seen at each step, its
``adapter/anllm_config.json`` the anchors); CKPTS holds each checkpoint's adapter as RUNNAME-STEP/ (the
Trainer keeps only its last two; a watcher copies them). Step 0 is the base model under the same anchors, or
with --start the adapter a continued run started from (``anllm train --model ADAPTER --lora``); the ratio is
always to the original base model's full attention. Writes OUT.json and OUT.png and prints a Markdown table.
"""
import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import anllm_ext  # noqa: E402
from anllm_ext.config import CONFIG_FILE, AnchorConfig  # noqa: E402
from anllm_ext.data import load_documents  # noqa: E402
from anllm_ext.evaluation import perplexity, text_blocks  # noqa: E402
from anllm_ext.models import default_model_dir, load_model  # noqa: E402
from scratch_curve import tokens_at  # noqa: E402  (this script's folder is on sys.path)


def score(model_dir, blocks, a, anchor_ids):
    model, _ = load_model(model_dir)
    anllm_ext.patch(model, anchor_ids)
    with torch.no_grad():
        r = perplexity(model, blocks, ("full", "cached"), a.prefill_chunk, progress=False)
    return {"full_ppl": r["full"].perplexity, "cached_ppl": r["cached"].perplexity, "kv_kept": r["cached"].kv_kept}


def plot(points, base_full, out: Path, title: str):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [p["tokens"] for p in points]
    ax1.plot(tokens, [p["cached_ppl"] for p in points], marker="o", label="anchor cache")
    ax1.plot(tokens, [p["full_ppl"] for p in points], marker="o", label="full attention")
    ax1.axhline(base_full, color="gray", ls="--", label="original model, full attention")
    ax2.plot(tokens, [p["cached_ppl"] / base_full for p in points], marker="o", label="anchor cache / original full")
    ax2.axhline(1.3, color="red", ls=":", label="target 1.3x")
    ax1.set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log", title=title)
    ax2.set(xlabel="training tokens", ylabel="ratio", yscale="log", title="anchor-cached / original full")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--ckpts", required=True)
    ap.add_argument("--text", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--max-blocks", type=int, default=12)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--steps", help="comma-separated steps to score (default: all saved)")
    ap.add_argument("--start", help="the adapter a continued run started from (its step 0; default: the base model)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run, out = Path(a.run), Path(a.out)
    results = json.loads((run / "anllm_results.json").read_text())
    config_file = run / "adapter" / CONFIG_FILE
    anchors = AnchorConfig.from_pretrained(run / "adapter")
    anchor_ids = list(anchors.anchor_ids)
    texts = list(load_documents(a.text)["text"])
    # the adapters keep the base model's tokenizer: one set of blocks for every checkpoint
    tok = tf.AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    blocks = text_blocks(tok, texts, anchors, a.block_size, a.max_blocks)
    ckpts = {int(p.name.rsplit("-", 1)[1]): p for p in Path(a.ckpts).glob(f"{run.name}-*")}
    wanted = {int(s) for s in a.steps.split(",")} if a.steps else set(ckpts)
    original = score(None, blocks, a, anchor_ids)
    print(json.dumps({"original": original}), flush=True)
    points = [{"step": 0, "tokens": 0, **(score(a.start, blocks, a, anchor_ids) if a.start else original)}]
    print(json.dumps(points[0]), flush=True)
    for step in sorted(wanted & set(ckpts)):
        shutil.copy(config_file, ckpts[step] / CONFIG_FILE)  # the checkpoint's adapter lacks the anchors file
        point = {"step": step, "tokens": tokens_at(results, step), **score(ckpts[step], blocks, a, anchor_ids)}
        print(json.dumps(point), flush=True)
        points.append(point)
    base_full = original["full_ppl"]
    rows = ["| step | tokens | full attention | anchor cache | anchor cache / original full | KV kept |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {p['step']} | {p['tokens']:,} | {p['full_ppl']:.2f} | {p['cached_ppl']:.2f} | "
             f"{p['cached_ppl'] / base_full:.2f}x | {p['kv_kept']:.1%} |" for p in points]
    print("\n".join(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"run": run.name, "text": a.text, "block_size": a.block_size,
                                                    "max_blocks": a.max_blocks, "start": a.start,
                                                    "original": original, "points": points}, indent=2) + "\n")
    plot(points, base_full, out, f"{run.name}: held-out prose")
    print("wrote", out.with_suffix(".json"), out.with_suffix(".png"))


if __name__ == "__main__":
    main()
