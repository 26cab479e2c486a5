"""Which windows break few-shot prompts: capitals accuracy for every number of demonstrations (``--shots``)
against every number of sentences kept hot (``--recent``), through the real cache (the ``cached+recent`` mode),
beside the anchor cache and full attention. Each demonstration is one sentence under EP anchors (its ``?`` is no
anchor), so with ``shots`` demonstrations and ``recent`` >= ``shots`` the question reads every demonstration word
for word, and with ``recent`` < ``shots`` the first ``shots - recent`` are their anchors only.

    python docs/experiments/fewshot_window.py --json docs/results/quality/recent/fewshot_window_bundled.json
"""
import argparse
import json
from pathlib import Path

import torch

from anllm_ext import patch
from anllm_ext.config import resolve_anchor_config
from anllm_ext.models import load_model
from recent_sentences import capitals_accuracy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-anllm")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--recent", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sink", type=int, default=0, help="patch(model, sink=S): the first S tokens are anchors")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    anchors = resolve_anchor_config(None, tok, model)
    patch(model, anchors, sink=args.sink)
    out = {"model": args.model, "sink": args.sink, "task": "tasks/capitals.jsonl", "limit": args.limit,
           "accuracy": {}}
    for shots in args.shots:
        acc = capitals_accuracy(model, tok, anchors, shots, args.recent, args.limit)
        out["accuracy"][f"{shots}-shot"] = acc
        print(f"{shots}-shot", json.dumps(acc), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
