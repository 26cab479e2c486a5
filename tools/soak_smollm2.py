"""Soak run on the real model: SmolLM2-135M-Instruct (bundled) generating a long stream through the
AnchorCache, with the checks of python_tests/test_soak.py at every checkpoint:

- the kept slots are exactly the anchors + the open segment of the whole history, at their true
  absolute positions, which keep counting past the prompt;
- the last logits equal a fresh anchor-cache run (chunked prefill) over the same tokens;
- the cache's capacity follows its growth policy, and the process's resident memory grows no more than
  the KV capacity does (plus allocator slack).

EP anchors (the model's tokens ending in "."); an anchor is forced every ``--period`` tokens of a row
(the model was not trained with AnSAN and would otherwise rarely close a sentence), any other token is
greedy. Not part of CI (100k tokens: 37 minutes on 2 CPU cores):

    .venv/bin/python tools/soak_smollm2.py --tokens 100000 --batch 8 --json docs/results/soak/soak_smollm2.json

Prints one line per checkpoint and exits 1 at the first failed check.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000, help="generated tokens in all (batch x steps)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--period", type=int, default=24, help="an anchor every this many generated tokens (row b: + b)")
    p.add_argument("--checkpoints", type=int, default=20)
    p.add_argument("--fresh-checks", type=int, default=4, help="checkpoints that also compare with a fresh run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="local model dir (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LogitsProcessorList

    import anllm_ext
    from anllm_ext.cache import AnchorCache, _round_up
    from anllm_ext.models import load_model
    from anllm_ext.sample_text import sample_text

    model, tok = load_model(args.model)
    anchors = anllm_ext.ep_anchor_ids(tok)
    anllm_ext.patch(model, anchors)
    anchor = anchors[0] if isinstance(anchors, (list, tuple)) else int(torch.as_tensor(anchors).reshape(-1)[0])
    anchor_set = torch.as_tensor(anchors).reshape(-1)
    B, steps = args.batch, math.ceil(args.tokens / args.batch)
    text_ids = tok(sample_text(8 * args.prompt_tokens * B), return_tensors="pt")["input_ids"][0]
    ids = torch.stack([text_ids[b * args.prompt_tokens:(b + 1) * args.prompt_tokens] for b in range(B)])
    mask = torch.ones_like(ids)
    periods = torch.tensor([args.period + b for b in range(B)])
    every = max(steps // args.checkpoints, 1)
    checkpoints = set(range(every, steps, every)) | {steps - 1}
    fresh = set(sorted(checkpoints)[:: max(len(checkpoints) // max(args.fresh_checks, 1), 1)][: args.fresh_checks])
    cache = AnchorCache(model.config)
    log = {"args": vars(args), "checkpoints": []}
    t0 = time.perf_counter()

    def kept_expected(lay):
        open_seg = lay.next_start().segment[:, None]
        return lay.valid & (lay.is_anchor | (lay.segments.to(torch.int64) == open_seg))

    def processor(input_ids, scores):
        step = input_ids.shape[1] - ids.shape[1]
        if step in checkpoints:
            lay = anllm_ext.token_layout(input_ids, anchor_set, torch.ones_like(input_ids))
            want = kept_expected(lay)
            for b in range(B):
                got, idx = cache.kept_layout(b), want[b].nonzero().squeeze(1)
                for name, a, e in zip(("positions", "segments", "is_anchor"), got.as_tuple()[:3],
                                      (lay.positions[b, idx], lay.segments[b, idx], lay.is_anchor[b, idx])):
                    if not torch.equal(a[0], e):
                        raise SystemExit(f"FAIL step {step} row {b}: kept {name} differ from anchors + open segment")
            if cache.next_start().position.tolist() != [ids.shape[1] + step] * B:
                raise SystemExit(f"FAIL step {step}: next positions {cache.next_start().position.tolist()}")
            row = {"step": step, "seconds": time.perf_counter() - t0, "kept_slots": cache.lengths(),
                   "capacity": cache.capacity, "rss_mib": rss_bytes() / 2**20}
            if step in fresh:
                _, logits = anllm_ext.prefill(model, input_ids, prefill_chunk=512)
                err = (logits[:, -1].float() - scores).abs().max().item()
                row["fresh_max_abs_diff"] = err
                if err > 2e-3:
                    raise SystemExit(f"FAIL step {step}: logits differ from a fresh run by {err:.3g}")
            log["checkpoints"].append(row)
            print(json.dumps(row), flush=True)
        force = (step + 1) % periods == 0
        scores[:, anchor_set] = float("-inf")
        scores[force] = float("-inf")
        scores[force, anchor] = 0.0
        return scores

    out = anllm_ext.generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=steps, prefill_chunk=256,
                             logits_processor=LogitsProcessorList([processor]), eos_token_id=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    elapsed = time.perf_counter() - t0
    generated = out.shape[1] - ids.shape[1]
    rows = log["checkpoints"]
    # capacity follows the growth policy from the most slots any forward needed: during decode the
    # kept slots + the new token (a row's segment is at most its period long), during prefill at most
    # the prompt (kept slots + one chunk never exceed the tokens seen so far)
    most = max(max(r["kept_slots"]) for r in rows) + args.period + B
    bound = max(_round_up(math.ceil(most * cache.growth)), _round_up(math.ceil(args.prompt_tokens * cache.growth)))
    first, last = rows[min(2, len(rows) - 1)], rows[-1]
    kv_growth = (last["capacity"] - first["capacity"]) * B * cache._slot_bytes() / 2**20
    summary = {"generated_tokens": generated * B, "seconds": elapsed, "tokens_per_s": generated * B / elapsed,
               "final_capacity": cache.capacity, "capacity_bound": bound, "stats": cache.stats(),
               "rss_growth_mib": last["rss_mib"] - first["rss_mib"], "kv_capacity_growth_mib": kv_growth}
    log["summary"] = summary
    print(json.dumps({k: v for k, v in summary.items() if k != "stats"}))
    ok = cache.capacity <= bound and summary["rss_growth_mib"] <= kv_growth + 64
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(log, f, indent=2, default=str)
    print("PASS" if ok else "FAIL: capacity or resident memory beyond the bound")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
