"""Where the anchor-cached perplexity loses to full attention: the excess loss by a token's place in its
sentence (docs/training.md, "Where the GPL-3 gap is").

Scores the same blocks as ``anllm eval --block-size 512 --max-blocks 12`` (``text_blocks``) three ways, one
forward each: the original SmolLM2 with full attention (what the user had), the AnLLM with full attention,
and the AnLLM under the AnSAN mask (the anchor cache's exact logits). Each target token is put in a bucket
by how many tokens of its own sentence precede it (0: the first token after an anchor, which sees only
anchors and itself), and by the length of its sentence. Per bucket: tokens, mean loss of each way, and the
bucket's share of the total excess loss (AnSAN minus original full attention).

``--previous N ...`` adds one way per N: the AnLLM under the AnSAN mask with the tokens of the N sentences before
a query's own also readable to it (non-anchor queries, as recall makes recalled sentences readable), a dense mask
on the unpatched model: what a cache keeping the last N closed sentences hot would give. N = 0 is the AnSAN mask
itself (a check of the dense path: its losses must equal the patched model's). "KV kept": the share of a block's
keys such a cache holds after the block (its anchors, the open segment and the N last closed sentences).

    python docs/experiments/gap_by_position.py --text /usr/share/common-licenses/GPL-3 --json OUT.json
"""
import argparse
import json

import torch

import anllm_ext
from anllm_ext.config import resolve_anchor_config
from anllm_ext.evaluation import text_blocks
from anllm_ext.models import load_model
from anllm_ext.reference import ansan_mask, token_layout_ref

PLACE_BUCKETS = ((0, 0), (1, 3), (4, 15), (16, 63), (64, 10**9))
LENGTH_BUCKETS = ((1, 15), (16, 31), (32, 63), (64, 127), (128, 10**9))


def places(ids, anchors):
    """For each target token ids[t] (t >= 1): (tokens of its sentence before it, its sentence's length)."""
    starts, s = [], 0
    for t, tok in enumerate(ids):
        starts.append(s)
        if tok in anchors:
            s = t + 1
    ends, e = [0] * len(ids), len(ids)
    for t in range(len(ids) - 1, -1, -1):
        if ids[t] in anchors:
            e = t + 1
        ends[t] = e
    return [(t - starts[t], ends[t] - starts[t]) for t in range(1, len(ids))]


def previous_mask(lay, n):
    """bool [1, 1, T, T] for one block's layout ``lay``: the AnSAN mask, plus, for a non-anchor query, every key of
    the ``n`` segments before its own."""
    qs, qa, ks = lay.segments[0, :, None], lay.is_anchor[0, :, None], lay.segments[0, None, :]
    causal = lay.positions[0, None, :] <= lay.positions[0, :, None]
    return (ansan_mask(lay, lay)[0] | (causal & ~qa & (ks < qs) & (ks >= qs - n)))[None, None]


def losses(model, blocks, masks=None):
    """Per-token loss over ``blocks``; ``masks``: a 4-D bool attention mask per block (None: the model's own)."""
    out = []
    with torch.no_grad():
        for i, b in enumerate(blocks):
            ids = torch.tensor([b])
            kw = {} if masks is None else {"attention_mask": masks[i]}
            lp = model(ids, **kw).logits[0, :-1].float().log_softmax(-1)
            out.append(-lp.gather(1, ids[0, 1:, None])[:, 0])
    return torch.cat(out)


def bucket_table(keys, ways, buckets):
    excess = ways["AnLLM, AnSAN mask"] - ways["original, full attention"]
    rows = []
    for lo, hi in buckets:
        m = torch.tensor([lo <= k <= hi for k in keys])
        if not m.any():
            continue
        row = {"bucket": f"{lo}-{hi}" if hi < 10**9 else f"{lo}+", "tokens": int(m.sum())}
        row.update({w: round(float(v[m].mean()), 3) for w, v in ways.items()})
        row["share of excess loss"] = round(float(excess[m].sum() / excess.sum()), 3)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--model", default="smollm2-anllm")
    ap.add_argument("--max-blocks", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--previous", type=int, nargs="*", default=[], metavar="N",
                    help="also score with the N sentences before each query's own readable (a dense mask)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    config = resolve_anchor_config(None, tok, model)
    anchors = list(config.anchor_ids)
    text = open(args.text, encoding="utf-8", errors="replace").read()
    blocks = text_blocks(tok, [text], config, 512, args.max_blocks)
    ways = {}
    with anllm_ext.evaluation.model_mode(model, "full"):
        ways["AnLLM, full attention"] = losses(model, blocks)
    with anllm_ext.patched(model, anchors):
        ways["AnLLM, AnSAN mask"] = losses(model, blocks)

    layouts = [token_layout_ref(torch.tensor([b]), anchors) for b in blocks]

    def kv_at_end(n):  # hot after the block: every anchor, the open segment, the last n closed segments
        share = 0.0
        for lay in layouts:
            next_segment = int(lay.segments[0, -1]) + int(lay.is_anchor[0, -1])
            share += float((lay.is_anchor[0] | (lay.segments[0] >= next_segment - n)).float().mean())
        return round(share / len(blocks), 4)

    kv_end = {"AnLLM, AnSAN mask": kv_at_end(0)}
    for n in args.previous:
        way = f"AnLLM, AnSAN mask + previous {n} sentences"
        with anllm_ext.evaluation.model_mode(model, "full"):
            ways[way] = losses(model, blocks, [previous_mask(lay, n) for lay in layouts])
        kv_end[way] = kv_at_end(n)
    if 0 in args.previous:  # the dense path must be the patched model's mask
        gap = float((ways["AnLLM, AnSAN mask + previous 0 sentences"] - ways["AnLLM, AnSAN mask"]).abs().max())
        if gap > 1e-3:
            raise RuntimeError(f"the dense AnSAN mask scores differ from the patched model's by {gap} nats")
    original, _ = load_model(None)
    ways["original, full attention"] = losses(original, blocks)
    aset = set(anchors)
    where = [p for b in blocks for p in places(b, aset)]
    result = {"text": args.text, "model": args.model, "blocks": len(blocks), "tokens": len(where),
              "perplexity": {w: round(float(v.mean().exp()), 2) for w, v in ways.items()},
              "KV kept": kv_end,
              "by place in sentence": bucket_table([p for p, _ in where], ways, PLACE_BUCKETS),
              "by sentence length": bucket_table([n for _, n in where], ways, LENGTH_BUCKETS)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
