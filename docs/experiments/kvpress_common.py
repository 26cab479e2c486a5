"""What the kvpress comparisons share (needle_kvpress.py, ruler_kvpress.py): the presses, their command-line
options and the original SmolLM2 they compress. kvpress 0.5.5 needs transformers < 5.3 (the transformers-5.0.0
overlay venv, docs/evaluation.md)."""
import os

import torch

PRESSES = ("snapkv", "streaming", "tova", "expected")


def make_press(name: str, ratio: float):
    from kvpress import ExpectedAttentionPress, SnapKVPress, StreamingLLMPress, TOVAPress

    presses = dict(zip(PRESSES, (SnapKVPress, StreamingLLMPress, TOVAPress, ExpectedAttentionPress)))
    if name not in presses:
        raise ValueError(f"unknown press {name!r}; choose from {sorted(presses)}")
    return presses[name](compression_ratio=ratio)


def add_press_args(ap, ratio: float, threads: int) -> None:
    """--presses, --ratios, --model, --threads, --json."""
    ap.add_argument("--presses", nargs="+", choices=PRESSES, default=list(PRESSES))
    ap.add_argument("--ratios", type=float, nargs="+", default=[ratio])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/anllm_ext/SmolLM2-135M-Instruct"))
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--json", required=True)


def load_original(args):
    """(model, tokenizer) of ``args.model`` in fp32, eval mode, with ``args.threads`` torch threads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    return model, tok
