"""RULER's needle prompts of ruler_niah.sh (the exact prompts lm-eval built, read from its sample files), answered by
the ORIGINAL SmolLM2 under NVIDIA kvpress presses (training-free KV compression), for the comparison with the
AnLLM's anchor cache at about the same KV fraction.

kvpress 0.5.5 needs transformers < 5.3: run in the transformers-5.0.0 overlay venv (docs/evaluation.md):

    .venv-tf-oldest/bin/python docs/experiments/ruler_kvpress.py docs/results/ruler/original-full-1024 \
        --ratios 0.75 --presses snapkv streaming tova expected --json docs/results/ruler/kvpress-1024.json

Each prompt is cut before its question ("What are all the special magic ..."): the part before (instruction +
haystack with the needle) is prefilled once under the press (kvpress's hooks compress it as it is written), the
question and RULER's answer prefix follow uncompressed, then 32 greedy tokens, as the lm-eval runs. A sample counts
when its target number is in the answer (RULER's string match). Hot fraction = (context kept + question) / prompt.
"""
import argparse
import ast
import glob
import json
import os
import platform
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvpress_common import add_press_args, load_original, make_press  # noqa: E402

QUESTION = re.compile(r"\n(What (are all|is) the special magic)")


@torch.no_grad()
def answer(model, tok, prompt: str, press, max_new: int = 32):
    """(answer text, hot fraction): the context prefilled under ``press``, then the question and greedy decoding."""
    from transformers import DynamicCache

    cut = QUESTION.search(prompt).start()
    context = tok(prompt[:cut], return_tensors="pt")["input_ids"]
    question = tok(prompt[cut:], return_tensors="pt", add_special_tokens=False)["input_ids"]
    cache = DynamicCache()
    with press(model):
        model(input_ids=context, past_key_values=cache, use_cache=True)
    kept = cache.get_seq_length()
    position = context.shape[1]
    ids, new = question, []
    for _ in range(max_new):
        pos = torch.arange(position, position + ids.shape[1])[None]
        logits = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits
        position += ids.shape[1]
        nxt = int(logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        ids = torch.tensor([[nxt]])
    hot = (kept + question.shape[1]) / (context.shape[1] + question.shape[1])
    return tok.decode(new, skip_special_tokens=True), hot


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a ruler_niah.sh output folder (its samples_<task>_*.jsonl hold the prompts)")
    ap.add_argument("--task", default="niah_single_1")
    add_press_args(ap, ratio=0.75, threads=1)
    args = ap.parse_args()
    model, tok = load_original(args)
    samples = [json.loads(line) for line in open(glob.glob(os.path.join(args.run_dir, "*", f"samples_{args.task}_*.jsonl"))[0])]
    out = {"setup": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prompts": args.run_dir,
                     "task": args.task, "machine": f"2-core CPU ({platform.machine()}), torch threads {args.threads}, fp32",
                     "command": ".venv-tf-oldest/bin/python " + " ".join(sys.argv),
                     "transformers": __import__("transformers").__version__}, "runs": {}}
    for name in args.presses:
        for ratio in args.ratios:
            rows = []
            for s in samples:
                start = time.perf_counter()
                text, hot = answer(model, tok, s["arguments"]["gen_args_0"]["arg_0"], make_press(name, ratio))
                targets = ast.literal_eval(s["target"]) if isinstance(s["target"], str) else s["target"]
                found = any(t in text for t in targets)
                rows.append(dict(target=targets, answer=text, found=found, hot_fraction=hot,
                                 seconds=time.perf_counter() - start))
                print(f"[{name}@{ratio}] found={found} hot={hot:.3f} {text[:40]!r}", flush=True)
            out["runs"][f"original-{name}@{ratio}"] = dict(
                score=sum(r["found"] for r in rows) / len(rows),
                hot_fraction=sum(r["hot_fraction"] for r in rows) / len(rows), samples=rows)
            print(f"original-{name}@{ratio}: {out['runs'][f'original-{name}@{ratio}']['score']:.3f}", flush=True)
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
