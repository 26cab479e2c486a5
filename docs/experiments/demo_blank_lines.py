"""Why earlier AnLLM adapters wrote blank lines under the anchor cache in the earlier `make demo`
(docs/results/training/README.md, "The earlier `make demo`").

1. Generates greedily from the demo prompt with the full cache and with the anchor cache and prints the
   generated token ids and tokens of both; then scores the anchor cache's own text (prompt + its tokens)
   under full attention and under the AnSAN mask, and prints the top predictions at the first anchor it
   generated and the three tokens after it.
2. Scores the GPL-2 text of the prompt in one forward under full attention and one under the AnSAN mask
   (what the anchor cache computes), for the bundled AnLLM and the untrained SmolLM2: at every place where
   an EP anchor is followed by one or by two single-newline tokens ('\\n', id 198), the mean probability
   that the next token is '\\n' again, the top predictions and the tokens the text actually has there.

    python docs/experiments/demo_blank_lines.py [--model smollm2-anllm] [--prompt-file docs/experiments/demo_prompt_gpl2.txt]
"""
import argparse
import collections

import torch

import anllm_ext
from anllm_ext.config import resolve_anchor_config
from anllm_ext.models import load_model

NL = 198  # '\n' (SmolLM2's tokenizer; '\n\n' before a word is two of these)


def tokens(tok, ids):
    return [(int(i), tok.convert_ids_to_tokens(int(i))) for i in ids]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-file", default="docs/experiments/demo_prompt_gpl2.txt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default="smollm2-anllm", help="the AnLLM to examine (a directory or smollm2-anllm)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = open(args.prompt_file, encoding="utf-8").read()
    licence = text.split("\nQuestion:", 1)[0]

    for name, spec in ((args.model, None), (None, "ep")):
        model, tok = load_model(name)
        anchors = list(resolve_anchor_config(spec, tok, model).anchor_ids)
        label = name or "untrained SmolLM2-135M"
        if name is not None:  # 1. the demo's two runs, token by token
            ids = tok(text, return_tensors="pt").input_ids
            kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
            with torch.no_grad():
                full = model.generate(ids, attention_mask=torch.ones_like(ids), cache_implementation="dynamic", **kw)
            anc = anllm_ext.generate(model, ids, anchor_ids=anchors, **kw)
            for run, out in (("full cache", full), ("anchor cache", anc)):
                print(f"{label}, {run}: {tokens(tok, out[0, ids.shape[1]:])}")
            # the anchor cache's own text, scored under both masks: what each predicts after its anchors
            n, new = ids.shape[1], anc[0, ids.shape[1]:].tolist()
            with torch.no_grad():
                lf = model(anc).logits[0].log_softmax(-1)
                with anllm_ext.patched(model, anchors):
                    la = model(anc).logits[0].log_softmax(-1)
            first = next((j for j, t in enumerate(new) if t in set(anchors)), None)
            for j in range(first, min(first + 4, len(new) - 1)) if first is not None else ():
                for mask, lp in (("full attention", lf), ("AnSAN mask", la)):
                    v, i = lp[n + j].exp().topk(3)
                    print(f"{label}, anchor cache's text after generated token {j + 1} {tokens(tok, [new[j]])}, "
                          f"{mask}: next {[(t, round(float(p), 2)) for t, p in zip(tokens(tok, i), v)]}")
        # 2. the licence text in one forward, full attention vs the AnSAN mask
        ids = tok(licence, return_tensors="pt").input_ids
        with torch.no_grad():
            scores = {"full attention": model(ids).logits[0].log_softmax(-1)}
            with anllm_ext.patched(model, anchors):
                scores["AnSAN mask"] = model(ids).logits[0].log_softmax(-1)
        x, aset = ids[0].tolist(), set(anchors)
        for k in (1, 2):
            # i: the k-th '\n' right after an anchor; the logits there predict token i + 1
            pos = [i for i in range(k, len(x) - 1) if x[i - k] in aset and all(t == NL for t in x[i - k + 1: i + 1])]
            actual = collections.Counter(tok.convert_ids_to_tokens(x[i + 1]) for i in pos).most_common(3)
            for mask, lp in scores.items():
                p_nl = float(torch.stack([lp[i, NL].exp() for i in pos]).mean())
                top = collections.Counter(tok.convert_ids_to_tokens(int(lp[i].argmax())) for i in pos).most_common(3)
                print(f"{label}, {mask}: anchor + {k} x '\\n' ({len(pos)} places): mean P(next '\\n') {p_nl:.2f}, "
                      f"top-1 {top}; the text has {actual}")
        del model


if __name__ == "__main__":
    main()
