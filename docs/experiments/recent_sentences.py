"""What keeping the last sentences hot buys, through the real cache (``AnchorCache(recent=N)``, the ``cached+recent``
evaluation mode): per held-out domain the original's full attention, the AnLLM's anchor cache and the anchor cache
keeping N = 1, 2, 4 closed sentences hot (perplexity, ratio to the original, KV kept after each block and at the
peak); then the capitals task 0- and 3-shot in the same modes. Same blocks as eval_conversion.sh
(``--max-blocks 8 --block-size 512 --prefill-chunk 64``), cut once with the AnLLM's anchors for every model.

    python docs/experiments/recent_sentences.py --json docs/results/quality/recent/bundled.json
    python docs/experiments/recent_sentences.py --sink 1 --json docs/results/quality/recent/bundled_sink1.json
"""
import argparse
import json
from pathlib import Path

import torch

from anllm_ext import patch
from anllm_ext.config import resolve_anchor_config
from anllm_ext.evaluation import (MultipleChoiceConfig, demo_end_for, load_multiple_choice, multiple_choice,
                                  perplexity, text_blocks)
from anllm_ext.models import load_model

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("handbook-tech", "reference", "faq", "glossary", "narrative", "quotations")


def figures(mode_result):
    return {"perplexity": round(mode_result.perplexity, 3), "kv_kept": round(mode_result.kv_kept, 4),
            "kv_peak": round(mode_result.kv_peak, 4) if mode_result.kv_peak is not None else None}


def capitals_accuracy(model, tok, anchors, shots, recents, limit=40):
    """Capitals accuracy with ``shots`` demonstrations: full attention, the anchor cache, and the anchor cache
    keeping each of ``recents`` sentences hot (keys "full", "cached", "recent N")."""
    questions = load_multiple_choice(str(REPO / "tasks" / "capitals.jsonl"))
    acc = {}
    for n in recents:
        cfg = MultipleChoiceConfig(shots=shots, limit=limit, recent=n, progress=False,
                                   modes=("cached+recent",) if acc else ("full", "cached", "cached+recent"),
                                   demo_end=demo_end_for(anchors))
        for mode, r in multiple_choice(model, tok, questions, cfg, anchor_ids=anchors).modes.items():
            acc[f"recent {n}" if mode == "cached+recent" else mode] = r.accuracy
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-anllm")
    ap.add_argument("--heldout", default=str(REPO / "data" / "heldout"))
    ap.add_argument("--recent", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-blocks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sink", type=int, default=0, help="patch(model, sink=S): the first S tokens are anchors")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    original, _ = load_model(None)
    anchors = resolve_anchor_config(None, tok, model)
    patch(model, anchors, sink=args.sink)
    out = {"model": args.model, "sink": args.sink, "recent": args.recent, "max_blocks": args.max_blocks,
           "block_size": 512, "prefill_chunk": 64, "domains": {}}
    for domain in DOMAINS:
        text = (Path(args.heldout) / f"{domain}.txt").read_text(encoding="utf-8")
        blocks = text_blocks(tok, [text], anchors, 512, args.max_blocks)
        row = {"original full": figures(perplexity(original, blocks, ("full",), 64, progress=False)["full"])}
        res = perplexity(model, blocks, ("full", "cached"), 64, progress=False, anchor_ids=anchors)
        row["AnLLM full"], row["anchor cache"] = figures(res["full"]), figures(res["cached"])
        for n in args.recent:
            res = perplexity(model, blocks, ("cached+recent",), 64, progress=False, anchor_ids=anchors, recent=n)
            row[f"recent {n}"] = figures(res["cached+recent"])
        out["domains"][domain] = row
        print(domain, json.dumps(row), flush=True)
    out["capitals"] = {}
    for shots in (0, 3):
        acc = capitals_accuracy(model, tok, anchors, shots, args.recent)
        out["capitals"][f"{shots}-shot"] = acc
        print(f"capitals {shots}-shot", json.dumps(acc), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
