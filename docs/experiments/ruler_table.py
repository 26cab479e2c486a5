"""The table of ruler_niah.sh's runs: per run, task and length, the score (lm-eval's, mean over the samples) and
the KV an anchor cache keeps after the prompt, computed from the prompts' token ids (anchors + open sentence,
over the prompt's tokens: what any cache of the bundled AnLLM's anchors keeps, whatever the model). For
``cached+recall`` runs, the hot KV is at most that plus the recall budget's longest evicted sentences per layer,
plus, with ``recall_question=true``, the sentences the prompt's last prefill chunk closed (the bound is given; a
layer may recall shorter ones).

    python docs/experiments/ruler_table.py docs/results/ruler --json docs/results/ruler/summary.json
"""
import argparse
import glob
import json
import os
import re
from statistics import mean

from transformers import AutoTokenizer

from anllm_ext.config import AnchorConfig
from anllm_ext.models import bundled_anllm_dir, default_model_dir
from anllm_ext.vllm.compaction import KeepRule


def sentence_lengths(ids, anchors):
    """(non-anchor tokens, anchor position) of each closed sentence."""
    out, n = [], 0
    for i, t in enumerate(ids):
        if t in anchors:
            out.append((n, i))
            n = 0
        else:
            n += 1
    return out


def kv_figures(prompts, tok, anchors, budget, question_chunk=0):
    """Mean kept share and mean hot bound; ``question_chunk``: the prefill chunk of a ``recall_question`` run
    (generate prefills all but the prompt's last token, chunks cut from the end; the last chunk's closed
    sentences stay readable)."""
    kept, bound = [], []
    for text in prompts:
        ids = tok(text)["input_ids"]
        k = KeepRule(sorted(anchors)).num_kept(ids)
        sentences = sentence_lengths(ids, anchors)
        longest = sorted((n for n, _ in sentences), reverse=True)[:budget]
        last_chunk = range(len(ids) - 1 - question_chunk, len(ids) - 1) if question_chunk else range(0)
        question = sum(n for n, at in sentences if at in last_chunk)
        kept.append(k / len(ids))
        bound.append(min(1.0, (k + sum(longest) + question) / len(ids)))
    return mean(kept), mean(bound)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--json")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    anchors = set(AnchorConfig.from_pretrained(bundled_anllm_dir()).anchor_ids)
    rows = []
    for results in sorted(glob.glob(os.path.join(args.root, "*", "*", "results_*.json"))):
        run_dir = os.path.dirname(os.path.dirname(results))
        name, length = re.match(r"(.*)-(\d+)$", os.path.basename(run_dir)).groups()
        res = json.load(open(results))
        margs = res["config"]["model_args"]
        margs = margs if isinstance(margs, str) else ",".join(f"{k}={v}" for k, v in margs.items())
        budget = int(re.search(r"recall_budget=(\d+)", margs).group(1)) if "cached+recall" in margs else 0
        question = re.search(r"recall_question=(true|True)", margs) is not None
        chunk = int(re.search(r"prefill_chunk=(\d+)", margs).group(1)) if question else 0
        for task, metrics in sorted(res["results"].items()):
            samples = glob.glob(os.path.join(os.path.dirname(results), f"samples_{task}_*.jsonl"))
            docs = [json.loads(line) for line in open(samples[0])]
            prompts = [d["arguments"]["gen_args_0"]["arg_0"] for d in docs]
            kept, bound = kv_figures(prompts, tok, anchors, budget, chunk)
            rows.append(dict(run=name, length=int(length), task=task, n=len(docs),
                             score=metrics[f"{length},none"], cached="cached" in margs,
                             kv_kept=kept, hot_bound=bound if budget else None, model_args=margs))
    print("| run | task | length | samples | score | KV kept by the anchor cache | hot KV with recall (at most) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["task"], r["length"], r["run"])):
        kv = f"{100 * r['kv_kept']:.1f}%" if r["cached"] else "100%"
        hot = f"{100 * r['hot_bound']:.1f}%" if r["hot_bound"] is not None else ""
        print(f"| {r['run']} | {r['task']} | {r['length']} | {r['n']} | {r['score']:.3f} | {kv} | {hot} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
