"""The needle trials of needle_recall.py (same seed, names, codes, depths, haystack) with the ORIGINAL SmolLM2 under
NVIDIA kvpress presses (training-free KV compression), for the comparison at the same KV fraction.

kvpress 0.5.5 needs transformers < 5.3: run in the transformers-5.0.0 overlay venv (docs/evaluation.md):

    .venv-tf-oldest/bin/python docs/experiments/needle_kvpress.py --lengths 256 1024 --depths 0.1 0.5 0.9 \
        --per-cell 2 --presses snapkv streaming tova expected --ratios 0.9 --json docs/results/recall/kvpress.json

kvpress compresses the context (the haystack with the needle, after the chat template's prefix) once, before
the question; the question and the answer stay uncompressed. Hot fraction = (context tokens kept + question
tokens) / prompt tokens.
"""
import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _load(name, path):
    """A module by file path (the package's __init__ needs a newer transformers than this venv's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


needle = _load("needle", ROOT / "anllm_ext" / "evaluation" / "needle.py")
sys.path.insert(0, str(HERE))
from kvpress_common import add_press_args, load_original, make_press  # noqa: E402
from needle_haystack import HAYSTACKS, haystack_paragraphs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--per-cell", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystack", choices=HAYSTACKS, default="handbook")
    add_press_args(ap, ratio=0.9, threads=2)
    args = ap.parse_args()
    from transformers import pipeline
    import kvpress  # noqa: F401  (registers the pipeline)

    model, tok = load_original(args)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    paragraphs = haystack_paragraphs(args.haystack)
    trials = needle.make_trials(args.lengths, args.depths, args.per_cell, len(paragraphs), args.seed)
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    for name in args.presses:
        for ratio in args.ratios:
            run = f"original-{name}@{ratio}"
            rows = []
            for trial in trials:
                context = needle.haystack_text(tok, paragraphs, trial)
                question = needle.question_text(trial)
                prompt_ids = needle.build_prompt(tok, paragraphs, trial)
                q_tokens = len(tok(question, add_special_tokens=False)["input_ids"])
                c_tokens = prompt_ids.shape[1] - q_tokens
                start = time.perf_counter()
                answer = pipe(context, question=question, press=make_press(name, ratio), max_new_tokens=16)["answer"]
                seconds = time.perf_counter() - start
                found = trial.code in answer.replace(",", "").replace(" ", "")
                hot = (round((1 - ratio) * c_tokens) + q_tokens) / prompt_ids.shape[1]
                rows.append({"name": trial.name, "code": trial.code, "depth": trial.depth, "length": trial.length,
                             "offset": trial.offset, "prompt_tokens": int(prompt_ids.shape[1]), "answer": answer,
                             "found": found, "hot_fraction": hot, "seconds": seconds})
                print(f"[{run}] len={trial.length} depth={trial.depth} found={found} hot={hot:.3f} "
                      f"{seconds:.1f}s {answer!r}", flush=True)
            by_length = {}
            for r in rows:
                by_length.setdefault(r["length"], []).append(r)
            results["runs"][run] = {
                "policy": f"kvpress {name}", "compression_ratio": ratio,
                "score": sum(r["found"] for r in rows) / len(rows),
                "by_length": {n: {"score": sum(r["found"] for r in rs) / len(rs),
                                  "hot_fraction": sum(r["hot_fraction"] for r in rs) / len(rs),
                                  "seconds": sum(r["seconds"] for r in rs) / len(rs), "trials": len(rs)}
                              for n, rs in sorted(by_length.items())},
                "trials": rows}
            results["setup"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "haystack": args.haystack,
                                "machine": f"2-core CPU ({platform.machine()}), torch threads {args.threads}, fp32",
                                "command": ".venv-tf-oldest/bin/python " + " ".join(sys.argv),
                                "kvpress": "0.5.5", "transformers": __import__("transformers").__version__}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            print(f"{run}: {results['runs'][run]['score']:.3f}", flush=True)


if __name__ == "__main__":
    main()
