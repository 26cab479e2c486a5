"""Diagnostic of the anchor-based choice: for a few needle trials, the rank of the needle sentence's anchor among
the recall candidates in every layer, when the question's last QN tokens are the forward's voters (the prompt
before them prefilled first). Prints one line per trial, rule and layer list (rank 0 = chosen first).

    PYTHONPATH=. python docs/experiments/needle_rank_probe.py --length 512 --question-tokens 28
"""
import argparse

import torch

import anllm_ext
from anllm_ext import recall as R
from anllm_ext.evaluation.needle import build_prompt, make_trials, needle_segment
from anllm_ext.models import load_model
from needle_haystack import HAYSTACKS, haystack_paragraphs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=28)
    ap.add_argument("--haystack", choices=HAYSTACKS, default="gpl3")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-anllm")
    anllm_ext.patch(model)
    paragraphs = haystack_paragraphs(args.haystack)
    qn = args.question_tokens
    for trial in make_trials([args.length], [0.2, 0.5, 0.8], 1, len(paragraphs), 0):
        ids = build_prompt(tok, paragraphs, trial)
        segment = needle_segment(tok, model, ids, trial)
        ranks = {}

        class Probe(R.RecallState):
            def _choose(self, layer, query, lse_hot, q_layout, k_layout, scale):
                if not any(self.cold.lengths):
                    return None
                Tk = k_layout.positions.shape[1]
                cand = k_layout.is_anchor & k_layout.valid & self.cold.has_segment(k_layout.segments)
                for rule in R.SCORES:
                    scores = R.anchor_scores(query, layer.keys[:, :, :Tk], lse_hot, q_layout, cand, scale, rule)[0]
                    order = k_layout.segments[0][scores.argsort(descending=True)][: int(cand[0].sum())].tolist()
                    ranks.setdefault(rule, []).append(order.index(segment) if segment in order else -1)
                return None

        cache = anllm_ext.AnchorCache(model.config, recall=R.RecallConfig())
        cache.recall = Probe(cache.recall.config)
        anllm_ext.prefill(model, ids[:, :-qn], cache=cache, prefill_chunk=4096)
        anllm_ext.prefill(model, ids[:, -qn:], cache=cache, prefill_chunk=4096)
        layers = len(model.model.layers)
        for rule in R.SCORES:
            print(f"depth {trial.depth} {rule}: needle rank per layer {ranks[rule][-layers:]}")


if __name__ == "__main__":
    main()
