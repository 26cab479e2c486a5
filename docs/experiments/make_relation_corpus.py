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
n squared, parity, last digit), and, with ``--families ... entities``, from named things that each have several
facts (Debian ``iso-codes`` and ``tzdata``, ``/etc/services``): a region's code, kind and country code
(ISO 3166-2, the United States left out), a time-zone city's region and country code, a language's two- and
three-letter codes, a currency's code and number, a script's code and number, a network service's port.
These ask what the state-facts tasks ask (a name -> a code, a kind or a place) without their facts.
Nothing comes from evaluation data: the bsdgames quiz files are read only to
drop every word that is one of their countries, states, capitals or state flowers (decontamination), and
entries mentioning a capital or a state flower are dropped as in make_segment_corpus.py.
Output: JSONL, one ``{"text": ...}`` document per line.

    python docs/experiments/make_relation_corpus.py --out data/relations.jsonl --documents 3000
    python docs/experiments/make_relation_corpus.py --out data/relations2.jsonl --documents 10000 \
        --families wordnet spelling numbers entities
"""
import json
import random
import re
import sys
import unicodedata
from pathlib import Path

from make_segment_corpus import clean_word, corpus_args, parse_wordnet, write_documents

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tasks"))
from make_capitals import CONTINENTS, QUIZ_DIR, plain_form  # noqa: E402

FORMS = ("Question: {x}\nAnswer: {y}.", "{x}: {y}.", "Input: {x}\nOutput: {y}.", "{x} -> {y}.")
BANNED_GLOSS = re.compile(r"capital|state flower", re.IGNORECASE)
ISO_CODES = Path("/usr/share/iso-codes/json")
ZONE_TAB = Path("/usr/share/zoneinfo/zone.tab")
SERVICES = Path("/etc/services")
FAMILY_WEIGHTS = {"wordnet": 2, "spelling": 1, "numbers": 1, "entities": 2}


PLACE_QUIZZES = (*CONTINENTS, "state", "province", "areas")


def evaluation_words(quizzes=(*CONTINENTS, "state")) -> set:
    """Every name the quiz tasks ask or answer with (lower case), so no training pair holds one."""
    words = set()
    for name in quizzes:
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


def _iso(name: str) -> list:
    return json.loads((ISO_CODES / f"iso_{name}.json").read_text(encoding="utf-8"))[name]


def entity_relations(banned: set) -> dict:
    """{relation: [(name, answer)]} over named things with several facts each, so that one name has several
    answers and only the demonstrations say which. ``banned``: the names of every place quiz (countries,
    capitals, states, Canadian provinces, area-code cities). A name in it is never a query; an answer
    is dropped only if it is a quiz name, not if it is a short code (a two-letter region code equal to a
    state's postal code teaches nothing about that state)."""
    rel = {}
    for r in _iso("3166-2"):
        country, code = r["code"].split("-", 1)
        if country in ("US", "UM"):  # the states, and the codes the postal-code task asks for
            continue
        name = re.split(r" [(\[]", r["name"])[0]  # "A Coruña [La Coruña]" -> "A Coruña"
        rel.setdefault("region code", []).append((name, code))
        rel.setdefault("region kind", []).append((name, r["type"].lower()))
        rel.setdefault("region country", []).append((name, country))
    for line in ZONE_TAB.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        country, _, zone = line.split("\t")[:3]
        city = zone.rsplit("/", 1)[-1].replace("_", " ")
        rel.setdefault("city region", []).append((city, zone.split("/")[0]))
        rel.setdefault("city country", []).append((city, country))
    for r in _iso("639-2"):
        if "alpha_2" in r:
            name = r["name"].split(";")[0]
            rel.setdefault("language code", []).append((name, r["alpha_2"]))
            rel.setdefault("language code 3", []).append((name, r.get("bibliographic", r["alpha_3"])))
    for r in _iso("4217"):
        rel.setdefault("currency code", []).append((r["name"], r["alpha_3"]))
        rel.setdefault("currency number", []).append((r["name"], r["numeric"]))
    for r in _iso("15924"):
        name = r["name"].split(" (")[0]
        rel.setdefault("script code", []).append((name, r["alpha_4"]))
        rel.setdefault("script number", []).append((name, r["numeric"]))
    ports = {}
    for line in SERVICES.read_text(encoding="utf-8").splitlines():
        f = line.split("#")[0].split()
        if len(f) >= 2:
            ports.setdefault(f[0], f[1].split("/")[0])
    rel["service port"] = sorted(ports.items())

    def fold(w: str) -> str:  # "Québec" is the quiz's "Quebec"
        return "".join(c for c in unicodedata.normalize("NFKD", w.lower()) if not unicodedata.combining(c))

    banned = {fold(w) for w in banned}

    def allowed(x: str, y: str) -> bool:
        return fold(x) not in banned and not (len(y) > 3 and fold(y) in banned) and "." not in x + y

    return {k: sorted({(x, y) for x, y in v if allowed(x, y)}) for k, v in rel.items()}


def build(documents: int, seed: int, families=("wordnet", "spelling", "numbers")):
    rng = random.Random(seed)
    banned = evaluation_words()
    wordnet = wordnet_relations(banned)
    # half the documents on word meanings (the kind of fact a few-shot prompt asks), a quarter each on the rest
    make = {"wordnet": lambda: wordnet, "numbers": number_relations,
            "spelling": lambda: spelling_relations(sorted({x for x, _ in wordnet["definition"]})),
            "entities": lambda: entity_relations(evaluation_words(PLACE_QUIZZES))}
    relations = [make[f]() for f in families]
    weights = [FAMILY_WEIGHTS[f] for f in families]
    for _ in range(documents):
        family = rng.choices(relations, weights=weights)[0]
        pairs = rng.sample(family[rng.choice(sorted(family))], rng.randint(6, 20))
        form = rng.choice(FORMS)
        yield "\n\n".join(form.format(x=x, y=y) for x, y in pairs)


def main():
    args = corpus_args(__doc__, 3000, lambda ap: ap.add_argument(
        "--families", nargs="+", choices=sorted(FAMILY_WEIGHTS), default=["wordnet", "spelling", "numbers"],
        help="which relation families to draw documents from (default: those of experiment 8)"))
    out = write_documents(args.out, build(args.documents, args.seed, tuple(args.families)))
    print(f"{args.documents} documents in {out}")


if __name__ == "__main__":
    main()
