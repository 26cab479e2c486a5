"""Training documents whose segments only make sense together: one unnamed relation per document.

A few-shot prompt often does not say what it asks ("Ohio: Columbus. Texas: Austin. Iowa:"); the model must
read the relation off the demonstrations. Under anchor inference each demonstration survives only as its
anchor, so the anchor has to carry the pair's relation, not only its words. The segment corpus
(make_segment_corpus.py) never asks for that: each of its segments names its own question. Here every document
picks one relation and lists 6-20 pairs "query -> answer" without naming it, in one surface form per document
("Question: x\\nAnswer: y.", "x: y.", "Input: x\\nOutput: y.", "x -> y."), every segment closed by "." (the
EP anchor). The queries are words or numbers that several relations could map, so the earlier pairs decide.

Relations: from WordNet 3.0 (Debian ``wordnet-base``; definition, hypernym, synonym, antonym), from the word's
spelling (upper case, first letter, letter count, reversed, last letter) and from numbers (n+1, n-1, 2n, 10n,
n squared, parity, last digit). Nothing comes from evaluation data: the bsdgames quiz files are read only to
drop every word that is one of their countries, states, capitals or state flowers (decontamination), and
entries mentioning a capital or a state flower are dropped as in make_segment_corpus.py.
Output: JSONL, one ``{"text": ...}`` document per line.

    python docs/experiments/make_relation_corpus.py --out data/relations.jsonl --documents 3000
"""
import random
import re
import sys
from pathlib import Path

from make_segment_corpus import clean_word, corpus_args, parse_wordnet, write_documents

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tasks"))
from make_capitals import CONTINENTS, QUIZ_DIR, plain_form  # noqa: E402

FORMS = ("Question: {x}\nAnswer: {y}.", "{x}: {y}.", "Input: {x}\nOutput: {y}.", "{x} -> {y}.")
BANNED_GLOSS = re.compile(r"capital|state flower", re.IGNORECASE)


def evaluation_words() -> set:
    """Every name the quiz tasks ask or answer with (lower case), so no training pair holds one."""
    words = set()
    for name in (*CONTINENTS, "state"):
        path = QUIZ_DIR / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            for i, field in enumerate(line.split(":")):
                if field.strip():
                    words.add(plain_form(field, leading_optional=i > 0).lower())
    return words


def wordnet_relations(banned: set) -> dict:
    """{relation: [(word, answer)]} from WordNet nouns and adjectives."""
    rel = {"definition": [], "hypernym": [], "synonym": [], "antonym": []}
    for pos in ("noun", "adj"):
        synsets = parse_wordnet(pos)
        for words, definition, hyper, anto in synsets.values():
            names = [clean_word(w) for w in words]
            w = names[0]
            if not w or w.lower() in banned or " " in w or BANNED_GLOSS.search(definition):
                continue
            if definition and "." not in definition and len(definition) <= 80:
                rel["definition"].append((w, definition))
            if pos == "noun" and hyper and hyper[0] in synsets:
                rel["hypernym"].append((w, clean_word(synsets[hyper[0]][0][0])))
            others = [n for n in names[1:] if n and n.lower() != w.lower()]
            if others:
                rel["synonym"].append((w, others[0]))
            if anto and anto[0] in synsets:
                rel["antonym"].append((w, clean_word(synsets[anto[0]][0][0])))
    return {k: [(x, y) for x, y in v if y and y.lower() not in banned] for k, v in rel.items()}


def spelling_relations(words: list) -> dict:
    plain = [w for w in words if w.isalpha() and 3 <= len(w) <= 12]
    return {"upper case": [(w, w.upper()) for w in plain], "first letter": [(w, w[0]) for w in plain],
            "letter count": [(w, str(len(w))) for w in plain], "reversed": [(w, w[::-1]) for w in plain],
            "last letter": [(w, w[-1]) for w in plain]}


def number_relations() -> dict:
    ns = range(2, 1000)
    return {"plus one": [(str(n), str(n + 1)) for n in ns], "minus one": [(str(n), str(n - 1)) for n in ns],
            "double": [(str(n), str(2 * n)) for n in ns], "times ten": [(str(n), str(10 * n)) for n in ns],
            "square": [(str(n), str(n * n)) for n in range(2, 100)],
            "parity": [(str(n), "even" if n % 2 == 0 else "odd") for n in ns],
            "last digit": [(str(n), str(n % 10)) for n in range(10, 1000)]}


def build(documents: int, seed: int):
    rng = random.Random(seed)
    wordnet = wordnet_relations(evaluation_words())
    # half the documents on word meanings (the kind of fact a few-shot prompt asks), a quarter each on the rest
    families = (wordnet, spelling_relations(sorted({x for x, _ in wordnet["definition"]})), number_relations())
    for _ in range(documents):
        family = rng.choices(families, weights=(2, 1, 1))[0]
        pairs = rng.sample(family[rng.choice(sorted(family))], rng.randint(6, 20))
        form = rng.choice(FORMS)
        yield "\n\n".join(form.format(x=x, y=y) for x, y in pairs)


def main():
    args = corpus_args(__doc__, 3000)
    out = write_documents(args.out, build(args.documents, args.seed))
    print(f"{args.documents} documents in {out}")


if __name__ == "__main__":
    main()
