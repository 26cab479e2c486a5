"""Tables and loss curves of training runs, from the ``anllm_results.json`` each run writes.

    python docs/experiments/report_training.py --out docs/results/training NAME=RUN_DIR [NAME=RUN_DIR ...]

Writes ``NAME.json`` (the run's results without the bulky parts), ``losses.png`` (training loss against
tokens, every run) and prints a Markdown table of held-out perplexity (full attention, one AnSAN pass,
anchor-cached) before and after training, with the KV kept.
"""
import argparse
import json
from pathlib import Path

MODES = ("full", "ansan", "cached")


def load(run_dir: Path) -> dict:
    return json.loads((run_dir / "anllm_results.json").read_text())


def ppl(res: dict, when: str, mode: str):
    block = res.get(when) or {}
    m = block.get("modes", {}).get(mode)
    return None if m is None else m["perplexity"]


def table(runs: dict) -> str:
    head = ("| run | steps | tokens | minutes | " + " | ".join(f"{m} before | {m} after" for m in MODES)
            + " | AnSAN / full after | KV kept (cached) |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in runs.items():
        cells = [name, str(r["train_steps"]), f"{r['train_tokens']:,}", f"{r['train_seconds'] / 60:.0f}"]
        for m in MODES:
            for when in ("eval_before", "eval_after"):
                v = ppl(r, when, m)
                cells.append("-" if v is None else f"{v:.1f}")
        full, cached = ppl(r, "eval_after", "full"), ppl(r, "eval_after", "cached")
        cells.append("-" if not (full and cached) else f"{cached / full:.2f}x")
        kept = (r.get("eval_after") or {}).get("modes", {}).get("cached", {}).get("kv_kept")
        cells.append("-" if kept is None else f"{100 * kept:.1f}%")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        pts = [(h["num_input_tokens_seen"], h["loss"]) for h in r["log_history"] if "loss" in h]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for spec in a.runs:
        name, d = spec.split("=", 1)
        runs[name] = load(Path(d))
        (out / f"{name}.json").write_text(json.dumps(runs[name], indent=2) + "\n")
    plot(runs, out / "losses.png")
    print(table(runs))


if __name__ == "__main__":
    main()
