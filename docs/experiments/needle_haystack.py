"""Haystack prose for the needle trials (needle_recall.py, needle_kvpress.py): held-out text no training run here
read. ``gpl3``: /usr/share/common-licenses/GPL-3 (the legal corpus drops the whole GPL family);
``handbook``: the paragraphs of the Debian Administrator's Handbook pages heldout_text.py reads (Debian package
``debian-handbook``; the project's held-out prose for perplexity)."""
from pathlib import Path

from heldout_text import HANDBOOK, PAGES, Paragraphs

HAYSTACKS = ("gpl3", "handbook")


def haystack_paragraphs(name: str):
    """Prose paragraphs (over 200 characters, whitespace collapsed) of the haystack ``name``."""
    if name == "gpl3":
        text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")
        paras = [" ".join(p.split()) for p in text.split("\n\n")]
    elif name == "handbook":
        paras = []
        for page in PAGES:
            parser = Paragraphs()
            parser.feed((HANDBOOK / page).read_text(encoding="utf-8"))
            paras += parser.paragraphs
    else:
        raise ValueError(f"unknown haystack {name!r}; choose from {HAYSTACKS}")
    return [p for p in paras if len(p) > 200]
