"""The conversion table of docs/training.md from eval_conversion.sh's JSON files: per held-out domain the
original's full-attention perplexity and each AnLLM's own full attention and anchor cache (with the ratio to
the original's full attention), then in-context recall and the capitals task.

    python docs/experiments/quality_domains_table.py --dir docs/results/conversion --original original \
        --models bundled chat-distill [--json docs/results/conversion/summary.json]
"""
import argparse
import json
from pathlib import Path

DOMAINS = ("handbook-tech", "reference", "faq", "glossary", "narrative", "quotations")


def ppl(directory: Path, name: str, domain: str, mode: str):
    path = directory / f"ppl_{name}_{domain}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["results"][0]["modes"][mode]


def needle(directory: Path, name: str, run: str):
    path = directory / f"needle_{name}.json"
    if not path.exists() or run not in json.loads(path.read_text())["runs"]:
        return None
    trials = json.loads(path.read_text())["runs"][run]["trials"]
    return sum(t["found"] for t in trials), len(trials)


def mc(directory: Path, name: str):
    path = directory / f"mc_{name}.json"
    if not path.exists():
        return {}
    out = {}
    for r in (r for r in json.loads(path.read_text())["results"] if r["task"] == "multiple_choice"):
        for mode, m in r["modes"].items():
            out[(r["config"]["shots"], mode)] = m["accuracy"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="docs/results/conversion")
    ap.add_argument("--original", default="original")
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    d = Path(args.dir)
    summary = {"perplexity": {}, "recall": {}, "capitals": {}}
    head = "| domain | original full | " + " | ".join(f"{m} full | {m} anchor cache (ratio, KV kept)" for m in args.models) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(args.models)))
    for domain in DOMAINS:
        base = ppl(d, args.original, domain, "full")
        if base is None:
            continue
        row = [domain, f"{base['perplexity']:.1f}"]
        summary["perplexity"][domain] = {"original_full": base["perplexity"]}
        for m in args.models:
            full, cached = ppl(d, m, domain, "full"), ppl(d, m, domain, "cached")
            if full is None:
                row += ["-", "-"]
                continue
            ratio = cached["perplexity"] / base["perplexity"]
            row += [f"{full['perplexity']:.1f}", f"{cached['perplexity']:.1f} ({ratio:.2f}x, {cached['kv_kept']:.1%})"]
            summary["perplexity"][domain][m] = {"full": full["perplexity"], "cached": cached["perplexity"],
                                                "ratio": ratio, "kv_kept": cached["kv_kept"]}
        print("| " + " | ".join(row) + " |")
    print()
    print("| model | run | recall (fact in ~300 / ~1,000 tokens, asked in chat) |")
    print("|---|---|---|")
    for name, run in [(args.original, "original-full")] + [(m, r) for m in args.models for r in ("anllm-full", "anllm-cached")]:
        got = needle(d, name, run)
        if got:
            print(f"| {name} | {run} | {got[0]} / {got[1]} |")
            summary["recall"][f"{name}:{run}"] = got
    print()
    print("| model | capitals 0-shot full / cached | 3-shot full / cached |")
    print("|---|---|---|")
    for name in [args.original] + args.models:
        acc = mc(d, name)
        if acc:
            cells = [f"{acc.get((s, 'full'), float('nan')):.3f} / {acc.get((s, 'cached'), float('nan')):.3f}" for s in (0, 3)]
            print(f"| {name} | " + " | ".join(cells) + " |")
            summary["capitals"][name] = {f"{s}-shot {mode}": v for (s, mode), v in acc.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
