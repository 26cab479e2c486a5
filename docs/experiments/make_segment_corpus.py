"""Training documents made of many short self-contained segments, each closed by a sentence end.

Few-shot prompts are segments that each end with an anchor; an AnLLM must learn to carry "question ->
answer" through the anchor of each one. This builds such documents from offline sources:

- WordNet 3.0 (Debian package ``wordnet-base``, WordNet 3.0 licence: use, copy, modify and distribute
  with the copyright notice): definitions ("What does X mean?"), hypernyms ("What is X a kind of?") and
  antonyms ("What is the opposite of X?"), in question/answer and in plain declarative form;
- the glossary of the Python documentation (Debian ``python3.11-doc``, PSF licence): term -> definition.

Each document holds 8-24 segments separated by blank lines; every segment ends with "." (the EP anchor;
AC mode inserts ``<AC>`` after it). Nothing here comes from the evaluation data (the bsdgames quiz files,
the Debian Administrator's Handbook), and WordNet entries that mention a capital city are dropped, so the
capitals task stays a test of carrying demonstrations, not of facts seen in training. Output: JSONL, one ``{"text": ...}`` document per line.

    python docs/experiments/make_segment_corpus.py --out data/segments.jsonl --documents 4000
"""
import argparse
import json
import random
import re
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
# the capitals multiple-choice task is evaluation data: no capital-city facts in training
CAPITALS = re.compile(r"capital", re.I)
PY_GLOSSARY = Path("/usr/share/doc/python3.11/html/_sources/glossary.rst.txt")


def parse_wordnet(pos: str):
    """{offset: (words, gloss, hypernym offsets, antonym offsets)} of one part of speech."""
    synsets = {}
    for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        head, _, gloss = line.partition("|")
        f = head.split()
        offset, w_cnt = f[0], int(f[3], 16)
        words = [f[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
        k = 4 + 2 * w_cnt
        p_cnt = int(f[k])
        hyper, anto = [], []
        for i in range(p_cnt):
            sym, target = f[k + 1 + 4 * i], f[k + 2 + 4 * i]
            if sym == "@":  # not "@i" (instances: places, people)
                hyper.append(target)
            elif sym == "!":
                anto.append(target)
        definition = gloss.split(";")[0].strip().strip('"').strip()
        synsets[offset] = (words, definition, hyper, anto)
    return synsets


def clean_word(w: str) -> str:
    return re.sub(r"\(.*?\)", "", w).strip()


def wordnet_segments(rng: random.Random):
    out = []
    for pos, noun in (("noun", True), ("adj", False), ("verb", False)):
        synsets = parse_wordnet(pos)
        for words, definition, hyper, anto in synsets.values():
            w = clean_word(words[0])
            if not w or not definition or "." in definition or len(definition) > 160 or CAPITALS.search(definition):
                continue
            art = ("an " if w[0].lower() in "aeiou" else "a ") if noun else ""
            form = rng.random()
            if form < 0.4:
                out.append(f'Question: What does "{w}" mean?\nAnswer: {definition}.')
            elif form < 0.7:
                out.append(f"{w[0].upper() + w[1:]}: {definition}.")
            else:
                subject = f"{art}{w}" if noun else f'"{w}"'
                out.append(f"{subject[0].upper() + subject[1:]} means {definition}.")
            if noun and hyper:
                parent = clean_word(synsets[hyper[0]][0][0]) if hyper[0] in synsets else None
                if parent:
                    if rng.random() < 0.5:
                        out.append(f"Question: What is {art}{w} a kind of?\nAnswer: {parent}.")
                    else:
                        out.append(f"{(art + w)[0].upper() + (art + w)[1:]} is a kind of {parent}.")
            for a in anto[:1]:
                if a in synsets:
                    opposite = clean_word(synsets[a][0][0])
                    out.append(f'Question: What is the opposite of "{w}"?\nAnswer: {opposite}.')
    return out


def glossary_segments():
    """Python glossary entries: a term line, then an indented definition; its first sentence is kept."""
    out = []
    text = PY_GLOSSARY.read_text(encoding="utf-8")
    for m in re.finditer(r"^   (\S[^\n]*)\n((?:      [^\n]*\n|\n)+)", text, flags=re.M):
        term = m.group(1).strip()
        body = " ".join(line.strip() for line in m.group(2).splitlines() if line.strip())
        body = re.sub(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", body).replace("``", "")
        first = re.split(r"(?<=[a-z)])\. ", body)[0].rstrip(".")
        if term and 10 < len(first) < 300 and "." not in first:
            out.append(f"Question: In Python, what is {term}?\nAnswer: {first[0].lower() + first[1:]}.")
    return out


def corpus_args(doc: str, documents: int, more=None):
    """The command line every corpus builder here takes: --out, --documents, --seed (``more(parser)`` adds
    a builder's own options)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--documents", type=int, default=documents)
    ap.add_argument("--seed", type=int, default=0)
    if more:
        more(ap)
    return ap.parse_args()


def write_documents(path, texts) -> Path:
    """One ``{"text": ...}`` JSON object per line."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return out


def documents_of(segments: list, documents: int, rng: random.Random):
    """8-24 consecutive segments per document; reshuffled when they run out."""
    pos = 0
    for _ in range(documents):
        n = rng.randint(8, 24)
        if pos + n > len(segments):
            rng.shuffle(segments)
            pos = 0
        yield "\n\n".join(segments[pos:pos + n])
        pos += n


def main():
    args = corpus_args(__doc__, 4000)
    rng = random.Random(args.seed)
    segments = wordnet_segments(rng) + glossary_segments()
    rng.shuffle(segments)
    out = write_documents(args.out, documents_of(segments, args.documents, rng))
    print(f"{len(segments)} segments -> {args.documents} documents in {out}")


if __name__ == "__main__":
    main()
