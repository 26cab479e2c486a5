"""Needle recall of the original SmolLM2 and the bundled AnLLM under full attention, the anchor cache and the
anchor cache with recall (anllm_ext/evaluation/needle.py; results in docs/results/recall/).

Haystack (--haystack, needle_haystack.py): held-out prose no training run here read, the Debian Administrator's
Handbook pages of heldout_text.py (default) or the GPL-3.

    PYTHONPATH=. nice -n 5 python docs/experiments/needle_recall.py --lengths 256 1024 --depths 0.1 0.5 0.9 \
        --per-cell 2 --runs original-full anllm-full anllm-cached anllm-recall:4:token:mass \
        anllm-recall:4:token:peak anllm-recall:8:token:peak --json docs/results/recall/needle.json

A run is ``MODEL-POLICY`` with MODEL ``original`` or ``anllm`` (``--anllm``: the bundled smollm2-anllm unless
another adapter or model directory is named) and POLICY ``full``,
``cached``, ``oracle`` (the needle sentence recalled in every layer) or ``recall:BUDGET:EVERY:SCORE[:POOL]``
(RecallConfig's fields), then optionally ``:POOL`` or ``:FIELD=VALUE`` items, e.g.
``recall:4:prompt:peak:index=tokens:pool=layers:layers=7/8/15`` (``question=1``: RecallConfig.question).
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import anllm_ext
from anllm_ext.evaluation.needle import make_trials, run_needle
from anllm_ext.models import load_model
from anllm_ext.recall import RecallConfig
from needle_haystack import HAYSTACKS, haystack_paragraphs



def parse_run(run: str):
    model, _, policy = run.partition("-")
    if model not in ("original", "anllm") or not policy:
        raise ValueError(f"a run is MODEL-POLICY with MODEL original|anllm, got {run!r}")
    if policy.startswith("recall:"):
        _, budget, every, score, *rest = policy.split(":")
        extra = dict(kv.split("=", 1) if "=" in kv else ("pool", kv) for kv in rest)
        if "layers" in extra:
            extra["layers"] = tuple(int(l) for l in extra["layers"].split("/"))
        if "question" in extra:
            extra["question"] = extra["question"] in ("1", "true", "True")
        return model, "recall", RecallConfig(budget=int(budget), every=every, score=score, **extra)
    return model, policy, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--per-cell", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", choices=HAYSTACKS, default="handbook")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=64, help="prompt tokens per forward (cache policies)")
    ap.add_argument("--anllm", default="smollm2-anllm", help="the AnLLM of the anllm-* runs")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = [parse_run(r) for r in args.runs]
    paragraphs = haystack_paragraphs(args.haystack)
    trials = make_trials(args.lengths, args.depths, args.per_cell, len(paragraphs), args.seed)
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", {})
    models = {}
    for run, (which, policy, recall) in zip(args.runs, runs):
        if which not in models:
            models[which] = load_model(None if which == "original" else args.anllm)
        model, tok = models[which]
        if policy == "full" and anllm_ext.is_patched(model):
            anllm_ext.unpatch(model)
        elif policy != "full" and not anllm_ext.is_patched(model):
            anllm_ext.patch(model, None if which == "anllm" else anllm_ext.resolve_anchors("ep", tok))
        res = run_needle(model, tok, paragraphs, trials, policy, recall, prefill_chunk=args.prefill_chunk,
                         log=lambda s: print(f"[{run}] {s}", flush=True))
        results["runs"][run] = res.as_dict()
        print(f"{run}: {res.score:.3f}", flush=True)
        results["setup"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "haystack": args.haystack, "anllm": args.anllm,
                            "machine": f"2-core CPU ({platform.machine()}), torch threads {args.threads}, fp32",
                            "command": "PYTHONPATH=. python " + " ".join(sys.argv), "torch": torch.__version__,
                            "lengths": args.lengths, "depths": args.depths, "per_cell": args.per_cell,
                            "prefill_chunk": args.prefill_chunk}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
