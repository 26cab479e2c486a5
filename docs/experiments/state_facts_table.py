"""The state-facts table of docs/training.md from docs/experiments/state_facts_eval.sh's JSON: per model, accuracy
over the 144 questions (48 per relation) at 0 and 3 shots, full attention / anchor cache, then 3-shot per relation.

    python docs/experiments/state_facts_table.py docs/results/quality/state_facts original smollm2-anllm
"""
import argparse
from pathlib import Path

from quality_table import summary

RELATIONS = ("capital", "postal", "flower")


def mean(acc: dict, shots: int, mode: str) -> float:
    """Accuracy over the three relations' questions (48 each)."""
    return sum(acc[r][shots][mode] for r in RELATIONS) / len(RELATIONS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("names", nargs="+")
    a = ap.parse_args()
    print("| model | 0-shot full / cached | 3-shot full / cached | 3-shot full / cached: capital, postal, flower |")
    print("|---|---|---|---|")
    for name in a.names:
        acc = {rel: summary(Path(a.dir) / f"{name}-{rel}.json") for rel in RELATIONS}  # {shots: {mode: acc}}
        per_rel = ", ".join(f"{acc[r][3]['full']:.3f} / {acc[r][3]['cached']:.3f}" for r in RELATIONS)
        print(f"| {name} | {mean(acc, 0, 'full'):.3f} / {mean(acc, 0, 'cached'):.3f} | "
              f"{mean(acc, 3, 'full'):.3f} / {mean(acc, 3, 'cached'):.3f} | {per_rel} |")


if __name__ == "__main__":
    main()
