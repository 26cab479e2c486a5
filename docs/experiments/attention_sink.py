"""What the first token does for the anchor cache: the same scores under a dense mask with and without the
row's first token readable to every query (an attention sink, as StreamingLLM keeps one), on the plain AnSAN
mask and with the N sentences before a query's own readable (what ``AnchorCache(recent=N)`` serves; the dense
mask of gap_by_position.py, which equals the cache's). Per held-out domain (8 blocks of 512 tokens) the
perplexity ratio to the original's full attention, then the capitals task (40 questions) for the shots and
windows where a window cuts the demonstrations (fewshot_window.py).

    python docs/experiments/attention_sink.py --json docs/results/quality/recent/sink_bundled.json
"""
import argparse
import json
from pathlib import Path

import torch

import anllm_ext
from anllm_ext.config import resolve_anchor_config
from anllm_ext.evaluation import MultipleChoiceConfig, load_multiple_choice, text_blocks
from anllm_ext.evaluation.multiple_choice import build_context
from anllm_ext.models import load_model
from anllm_ext.reference import token_layout_ref
from gap_by_position import losses, previous_mask

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("handbook-tech", "reference", "faq", "glossary", "narrative", "quotations")


def mask(ids, anchors, recent, sink):
    m = previous_mask(token_layout_ref(ids, anchors), recent).clone()
    if sink:
        m[0, 0, :, 0] = True  # every query reads the row's first token
    return m


def choice_accuracy(model, tok, anchors, shots, recent, sink, limit):
    questions = load_multiple_choice(str(REPO / "tasks" / "capitals.jsonl"))
    cfg = MultipleChoiceConfig(shots=shots, demo_end="period")
    right = 0
    for i in range(limit):
        ctx = tok(build_context(questions, i, cfg))["input_ids"]
        scores = []
        for choice in questions[i].choices:
            ids = torch.tensor([ctx + tok(" " + choice, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                lp = model(ids, attention_mask=mask(ids, anchors, recent, sink)).logits[0, :-1].float().log_softmax(-1)
            scores.append(float(lp[len(ctx) - 1:].gather(1, ids[0, len(ctx):, None]).sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == questions[i].answer)
    return right / limit


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-anllm")
    ap.add_argument("--heldout", default=str(REPO / "data" / "heldout"))
    ap.add_argument("--recent", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--max-blocks", type=int, default=8)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    original, _ = load_model(None)
    config = resolve_anchor_config(None, tok, model)
    anchors = list(config.anchor_ids)
    out = {"model": args.model, "block_size": 512, "max_blocks": args.max_blocks, "domains": {}, "capitals": {}}
    ways = [(n, s) for n in args.recent for s in (0, 1)]
    for domain in DOMAINS:
        text = (Path(args.heldout) / f"{domain}.txt").read_text(encoding="utf-8")
        blocks = text_blocks(tok, [text], config, 512, args.max_blocks)
        base = float(losses(original, blocks).mean().exp())
        row = {"original full": round(base, 3)}
        with anllm_ext.evaluation.model_mode(model, "full"):
            for n, s in ways:
                masks = [mask(torch.tensor([b]), anchors, n, s) for b in blocks]
                row[f"recent {n}, sink {s}"] = round(float(losses(model, blocks, masks).mean().exp()) / base, 3)
        out["domains"][domain] = row
        print(domain, json.dumps(row), flush=True)
    with anllm_ext.evaluation.model_mode(model, "full"):
        for shots, n in ((2, 1), (3, 2)):
            acc = {f"sink {s}": choice_accuracy(model, tok, anchors, shots, n, s, args.limit) for s in (0, 1)}
            out["capitals"][f"{shots}-shot, recent {n}"] = acc
            print(f"capitals {shots}-shot recent {n}", json.dumps(acc), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
