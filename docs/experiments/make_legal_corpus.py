"""Long-sentence legal prose for AnSAN training that is not the GPL family: licence texts and the licence
paragraphs of Debian copyright files.

Legal text packs one long sentence into each anchor (the GPL-3 averages 37 tokens per kept slot, the handbook
23), so an AnLLM that only ever compressed shorter sentences does worst there. This corpus gives it such
sentences from other licences: the non-GPL texts of ``/usr/share/common-licenses`` (Apache-2.0, Artistic, BSD,
CC0-1.0, GFDL-1.2/1.3, MPL-1.1/2.0) and the prose paragraphs of every ``/usr/share/doc/*/copyright`` file
(each package's own licence terms: Expat, BSD variants, zlib, PSF, ...).

The GPL-3 is evaluation text and the GPL-2 the demo's prompt, so the whole GPL family is held out: a paragraph
is dropped when it names the GPL or LGPL, or when it shares any run of eight words with one of GPL-1/2/3,
LGPL-2/2.1/3 (copyright files often quote them) or with the held-out handbook text. The copyright files of the
evaluation packages (``debian-handbook``, ``bsdgames``) are not read. Paragraphs are deduplicated (the same
Expat or BSD text appears in hundreds of files); a document holds one source file's remaining paragraphs, or
several short files' until it has 200 words. Output: JSONL, one ``{"text": ...}`` document per line.

    python docs/experiments/make_legal_corpus.py --out data/legal.jsonl --documents 2000 \
        --heldout data/heldout/handbook.txt
"""
import random
import re
from pathlib import Path

from make_segment_corpus import corpus_args, write_documents

LICENCES = Path("/usr/share/common-licenses")
TRAIN_LICENCES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "MPL-1.1", "MPL-2.0")
HELD_OUT_LICENCES = ("GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3")
EVALUATION_PACKAGES = ("debian-handbook", "bsdgames")
NAMES_GPL = re.compile(r"General Public License|\bL?GPL", re.IGNORECASE)
FIELD = re.compile(r"^[A-Za-z][A-Za-z-]*:(\s|$)")  # a DEP-5 field line ("Files: *", "License: MIT")
SHINGLE = 8


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def shingles(w: list[str]) -> set:
    """The runs of SHINGLE consecutive words of a word list."""
    return {tuple(w[i:i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


def paragraphs(text: str) -> list[str]:
    """Paragraphs of a licence file or a (DEP-5 or free-form) copyright file, each on one line.

    DEP-5 continuation lines are indented and mark blank lines with " ."; field lines are dropped, so a
    ``License:`` stanza leaves only its text."""
    lines = []
    for line in text.splitlines():
        lines.append("" if FIELD.match(line) or line.strip() == "." else line.strip())
    return [" ".join(p.split()) for p in "\n".join(lines).split("\n\n") if p.strip()]


def reads_as_prose(para: str) -> bool:
    """A sentence or more of text: no holder lists, addresses or URLs-only lines."""
    w = para.split()
    return (len(w) >= 12 and para.endswith((".", ";", ":")) and para.count("@") <= 1
            and not para.lower().startswith("copyright") and sum(c.isalpha() for c in para) > 0.7 * len(para))


def sources() -> list[Path]:
    docs = sorted(p for p in Path("/usr/share/doc").glob("*/copyright")
                  if p.parent.name not in EVALUATION_PACKAGES)
    return [LICENCES / name for name in TRAIN_LICENCES] + docs


def held_out_shingles(extra: list[str]) -> set:
    held = set()
    for path in [LICENCES / n for n in HELD_OUT_LICENCES] + [Path(p) for p in extra]:
        held |= shingles(words(path.read_text(errors="replace")))
    return held


def legal_documents(held: set) -> tuple[list[str], dict]:
    seen, documents, pending = set(), [], []
    counts = {"paragraphs": 0, "kept": 0, "names_gpl": 0, "overlaps_held_out": 0, "duplicate": 0}
    for path in sources():
        kept = []
        for para in paragraphs(path.read_text(errors="replace")):
            if not reads_as_prose(para):
                continue
            counts["paragraphs"] += 1
            w = words(para)
            key = " ".join(w)
            if NAMES_GPL.search(para):
                counts["names_gpl"] += 1
            elif shingles(w) & held:
                counts["overlaps_held_out"] += 1
            elif key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                kept.append(para)
        counts["kept"] += len(kept)
        pending += kept  # short files' paragraphs share a document
        if sum(len(p.split()) for p in pending) >= 200:
            documents.append("\n\n".join(pending))
            pending = []
    if pending:
        documents.append("\n\n".join(pending))
    return documents, counts


def main():
    args = corpus_args(__doc__, 2000, lambda ap: ap.add_argument(
        "--heldout", nargs="*", default=[], help="more held-out text files (no shared 8-word run)"))
    documents, counts = legal_documents(held_out_shingles(args.heldout))
    random.Random(args.seed).shuffle(documents)
    documents = documents[:args.documents]
    out = write_documents(args.out, documents)
    print(f"{len(documents)} documents, {sum(len(d.split()) for d in documents)} words -> {out}; "
          f"prose paragraphs {counts['paragraphs']}: kept {counts['kept']}, naming the GPL {counts['names_gpl']}, "
          f"sharing 8 words with held-out text {counts['overlaps_held_out']}, duplicates {counts['duplicate']}")


if __name__ == "__main__":
    main()
