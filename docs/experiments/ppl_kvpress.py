"""Perplexity of a continuation whose context was compressed: the ORIGINAL SmolLM2 under kvpress presses against
the AnLLM under the anchor cache (with and without recall), at about the same KV kept.

Each held-out text (data/heldout/DOMAIN.txt, read by no training run) is cut into blocks of --block tokens (the
first --blocks of each); a block's first (block - --cont) tokens are the context, compressed once (a press, or
the anchor cache with chunked prefill and compaction), and its last --cont tokens the continuation, fed in one
forward over the compressed cache; the perplexity is over the continuation's tokens after its first (each of
them attends to the compressed context). KV kept = cache entries after the context (+ the most a layer recalled,
with recall) / context tokens.

kvpress 0.5.5 needs transformers < 5.3, so this runs in the transformers-5.0.0 overlay venv (docs/evaluation.md):

    .venv-tf-oldest/bin/python docs/experiments/ppl_kvpress.py --domains handbook-tech narrative glossary \
        --runs original-full anllm-full anllm-cached anllm-recall original-snapkv@0.95 original-streaming@0.95 \
        original-tova@0.95 original-expected@0.95 --json docs/results/recall/ppl_kvpress.json

Runs: ``original-full``, ``original-PRESS@RATIO`` (kvpress_common.PRESSES), ``anllm-full`` (the AnLLM's own full
attention), ``anllm-cached``, ``anllm-recentN`` (the anchor cache keeping the N sentences closed last hot,
``AnchorCache(recent=N)``), ``anllm-recall`` (--recall-* flags: RecallConfig's fields); ``anllm-once`` and
``anllm-onceN``: the context as the anchor cache (with N recent sentences) leaves it, the continuation read in full
over it, as a press's continuation is (a dense mask on the unpatched AnLLM; the cache's own runs also compress
the sentences the continuation closes). The AnLLM is patched with the sink its anchor configuration carries (the
bundled one: 1).
"""
import argparse
import math
import os
import platform
import sys
import time
import json
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvpress_common import add_press_args, load_original, make_press  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def blocks_of(tok, path: Path, block: int, count: int):
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return [torch.tensor([ids[i : i + block]]) for i in range(0, len(ids) - block + 1, block)][:count]


def continuation_nll(logits, cont):
    """Summed NLL of cont[1:] from the continuation forward's logits [1, C, V]."""
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return -logp.gather(1, cont[0, 1:, None]).sum().item()


@torch.no_grad()
def score_press(model, ctx, cont, press):
    from transformers import DynamicCache

    cache = DynamicCache()
    if press is None:
        model(input_ids=ctx, past_key_values=cache, use_cache=True)
    else:
        with press(model):
            model(input_ids=ctx, past_key_values=cache, use_cache=True)
    kept = cache.get_seq_length()
    pos = torch.arange(ctx.shape[1], ctx.shape[1] + cont.shape[1])[None]
    logits = model(input_ids=cont, past_key_values=cache, position_ids=pos, use_cache=True).logits
    return continuation_nll(logits, cont), kept / ctx.shape[1]


@torch.no_grad()
def score_anchor(model, ctx, cont, recall, chunk: int, recent: int = 0):
    import anllm_ext

    cache = anllm_ext.AnchorCache(model.config, recall=recall, recent=recent)
    anllm_ext.prefill(model, ctx, cache=cache, prefill_chunk=chunk)
    kept = cache.stats()["kept_slots"][0]
    _, logits = anllm_ext.prefill(model, cont, cache=cache, prefill_chunk=cont.shape[1], return_logits=True)
    recalled = cache.stats().get("recalled_slots") or [0]
    return continuation_nll(logits, cont), (kept + recalled[0]) / ctx.shape[1]


def once_mask(layout, context: int, recent: int):
    """(bool [1, 1, T, T], the share of the context kept): the context's queries under the AnSAN mask (what chunked
    prefill with compaction computes), the continuation's queries read every context key the cache keeps after the
    context (anchors, the open sentence, the ``recent`` sentences closed last) and the continuation up to
    themselves."""
    from anllm_ext.reference import ansan_mask

    mask = ansan_mask(layout, layout, recent)[0]
    seg, anchor = layout.segments[0], layout.is_anchor[0]
    open_segment = int(seg[context - 1]) + int(anchor[context - 1])
    kept = anchor[:context] | (seg[:context] >= open_segment - recent)
    mask[context:, :context] = kept
    mask[context:, context:] = torch.ones(mask.shape[0] - context, mask.shape[0] - context, dtype=torch.bool).tril()
    return mask[None, None], float(kept.float().mean())


@torch.no_grad()
def score_once(model, block, context: int, config, recent: int):
    from anllm_ext.reference import token_layout_ref

    layout = token_layout_ref(block, list(config.anchor_ids), sink=config.sink)
    mask, kept = once_mask(layout, context, recent)
    logits = model(input_ids=block, attention_mask=mask).logits[:, context:]
    return continuation_nll(logits, block[:, context:]), kept


@torch.no_grad()
def check_dense_path(model, block, context: int, config, recent: int, chunk: int):
    """The dense path must be the cache's: the whole block under the (widened) AnSAN mask on the unpatched model
    scores the continuation as the real cache does (``score_anchor``), else this experiment measures nothing."""
    import anllm_ext
    from anllm_ext.reference import ansan_mask, token_layout_ref

    layout = token_layout_ref(block, list(config.anchor_ids), sink=config.sink)
    dense = model(input_ids=block, attention_mask=ansan_mask(layout, layout, recent)[:, None]).logits[:, context:]
    with anllm_ext.patched(model):
        cached, _ = score_anchor(model, block[:, :context], block[:, context:], None, chunk, recent)
    gap = abs(continuation_nll(dense, block[:, context:]) - cached)
    if gap > 1e-2:
        raise RuntimeError(f"the dense AnSAN mask scores the continuation {gap} nats away from the anchor cache")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["handbook-tech", "narrative", "glossary"])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--cont", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=8, help="blocks per domain")
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--anllm", default="smollm2-anllm")
    ap.add_argument("--recall-budget", type=int, default=4)
    ap.add_argument("--recall-every", default="prompt")
    ap.add_argument("--recall-score", default="peak")
    ap.add_argument("--recall-index", default="anchor")
    ap.add_argument("--recall-pool", default="layer")
    ap.add_argument("--recall-layers", type=int, nargs="+", default=None)
    ap.add_argument("--tag", default="", help="appended to the anllm-recall run's name in the JSON")
    add_press_args(ap, ratio=0.95, threads=1)
    args = ap.parse_args()
    import anllm_ext
    from anllm_ext.config import AnchorConfig
    from anllm_ext.models import load_model

    original, tok = load_original(args)
    anllm = None
    recall = anllm_ext.RecallConfig(budget=args.recall_budget, every=args.recall_every, score=args.recall_score,
                                    index=args.recall_index, pool=args.recall_pool,
                                    layers=None if args.recall_layers is None else tuple(args.recall_layers))
    data = {d: blocks_of(tok, ROOT / "data" / "heldout" / f"{d}.txt", args.block, args.blocks) for d in args.domains}
    out_path = Path(args.json)
    out = json.loads(out_path.read_text()) if out_path.exists() else {"runs": {}}
    for run in args.runs:
        which, _, policy = run.partition("-")
        if which == "anllm" and anllm is None:
            anllm = load_model(args.anllm)[0]
        res = {}
        for domain, blocks in data.items():
            nll = kept = 0.0
            start = time.perf_counter()
            for b in blocks:
                ctx, cont = b[:, : -args.cont], b[:, -args.cont :]
                if which == "original":
                    press = None if policy == "full" else make_press(*_press(policy))
                    n, k = score_press(original, ctx, cont, press)
                elif policy == "full":
                    anllm_ext.unpatch(anllm) if anllm_ext.is_patched(anllm) else None
                    n, k = score_press(anllm, ctx, cont, None)
                elif policy.startswith("once"):
                    anllm_ext.unpatch(anllm) if anllm_ext.is_patched(anllm) else None
                    config, recent = AnchorConfig.from_model(anllm), int(policy[4:] or 0)
                    if b is blocks[0]:
                        check_dense_path(anllm, b, ctx.shape[1], config, recent, args.prefill_chunk)
                    n, k = score_once(anllm, b, ctx.shape[1], config, recent)
                else:
                    anllm_ext.patch(anllm) if not anllm_ext.is_patched(anllm) else None
                    n, k = score_anchor(anllm, ctx, cont, recall if policy == "recall" else None, args.prefill_chunk,
                                        _recent(policy))
                nll += n
                kept += k
            tokens = len(blocks) * (args.cont - 1)
            res[domain] = dict(perplexity=math.exp(nll / tokens), kv_kept=kept / len(blocks), blocks=len(blocks),
                               tokens=tokens, seconds=time.perf_counter() - start)
            print(f"{run} {domain}: ppl {res[domain]['perplexity']:.2f} kept {res[domain]['kv_kept']:.3f}", flush=True)
        out["runs"][run + (args.tag if policy == "recall" else "")] = dict(domains=res, recall=vars(recall) if policy == "recall" else None)
        out["setup"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "anllm": args.anllm,
                        "sink": None if anllm is None else AnchorConfig.from_model(anllm).sink,
                        "machine": f"2-core CPU ({platform.machine()}), torch threads {args.threads}, fp32",
                        "command": ".venv-tf-oldest/bin/python " + " ".join(sys.argv), "block": args.block,
                        "cont": args.cont, "blocks": args.blocks, "prefill_chunk": args.prefill_chunk,
                        "transformers": __import__("transformers").__version__}
        out_path.write_text(json.dumps(out, indent=1))


def _recent(policy: str) -> int:
    """N for ``recentN``; 0 for ``cached`` and ``recall``."""
    if policy.startswith("recent"):
        return int(policy[len("recent"):])
    if policy not in ("cached", "recall"):
        raise ValueError(f"unknown anllm run 'anllm-{policy}': full, cached, recentN, onceN or recall")
    return 0


def _press(policy: str):
    name, _, ratio = policy.partition("@")
    return name, float(ratio)


if __name__ == "__main__":
    main()
