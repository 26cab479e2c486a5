"""Chat conversations for self-distillation: passages of training-allowed text with an instruction in the
chat template, every answer written by the teacher itself (the original SmolLM2-135M-Instruct, full
attention, greedy), so the AnLLM student learns the work it will do from the model it replaces.

Passages (1 to ~12 paragraphs, 80 to ~1,400 tokens) come from text this project may train on: the Python 3.11
documentation (PSF licence, reST markup removed), the prose of the installed manual pages and the non-GPL
licence prose (JSONL files of ``man_page_prose.py`` / ``make_legal_corpus.py``). Never read: the Debian
Administrator's Handbook, Debian's FAQ and Reference, dictionaries, Bible text, bsdgames, fortunes (those
are the held-out judges).

Compositions (``--compose N``): instructions with no passage, the teacher writing the text itself (stories,
letters, dialogues, fables, diary entries, news reports, advice, short essays, descriptions) on topics drawn
from the lists below, a third with a follow-up turn ("Continue the story."): narrative and everyday prose in the
model's own voice, which the passages above (technical and legal text) do not hold.

Tasks (one or two user turns per conversation): summarise, say what the text is about, explain a part,
list what it mentions, and find a stated fact: a short invented sentence ("The train to Leeds leaves from
platform 7.") inserted at a sentence start, asked for after the passage. The fact templates are not the
needle evaluation's ("secret code of the NAME archive"), whose wording no training row uses (tested by
``--check``-free construction: see FACTS). A teacher answer that does not end within ``--max-new-tokens``
is cut at its last sentence end; a conversation with a looping answer (:func:`repetitive`) is dropped.

    python docs/experiments/make_chat_corpus.py --out data/chat.jsonl --conversations 500 \
        --man data/man_prose.jsonl --legal data/legal.jsonl
    python docs/experiments/make_chat_corpus.py --out data/compose.jsonl --conversations 0 --prose 0 \
        --compose 240 --max-new-tokens 256 --batch 16 --temperature 0.7 --repetition-penalty 1.15

Output: JSONL, one ``{"text": <the whole conversation in the chat template>, "task": ..., "source": ...}``
per line, plus ``{"text": <plain passage>}`` prose rows when ``--prose`` > 0.
"""
import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

PY_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
FORBIDDEN = re.compile(r"secret code|archive", re.I)  # the needle evaluation's wording stays out of training

PEOPLE = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
          "Marta", "Nils", "Olga", "Priya", "Quentin", "Rosa", "Sven", "Tamar"]
CITIES = ["Leeds", "Lyon", "Porto", "Graz", "Turku", "Bergen", "Cork", "Ghent", "Malmo", "Split", "Bari", "Brno"]
PLACES = ["blue drawer", "garden shed", "kitchen cupboard", "red toolbox", "top shelf", "glovebox", "attic"]
FRUITS = ["mango", "pear", "apricot", "plum", "fig", "cherry", "lychee", "quince", "melon", "kiwi"]
TOPICS = ["library", "bridge", "harbour", "school", "museum", "bakery", "railway", "orchard", "theatre"]
COLOURS = ["green", "yellow", "violet", "orange", "grey", "white", "crimson", "teal"]
FACTS = [  # (statement, question)
    ("The train to {city} leaves from platform {n}.", "From which platform does the train to {city} leave?"),
    ("{person} keeps the spare key in the {place}.", "Where does {person} keep the spare key?"),
    ("{person}'s favourite fruit is the {fruit}.", "What is {person}'s favourite fruit?"),
    ("The meeting about the {topic} budget starts at {h} o'clock.",
     "At what time does the meeting about the {topic} budget start?"),
    ("The box labelled {person} weighs {n} kilograms.", "How much does the box labelled {person} weigh?"),
    ("The {topic} in {city} was painted {colour} last spring.", "What colour was the {topic} in {city} painted?"),
    ("{person} was born in {city} in {year}.", "In which year was {person} born?"),
    ("The invoice for the {topic} project is number {n4}.", "What is the number of the invoice for the {topic} project?"),
]
TASKS = {
    "summary": "Summarize the text above in two or three sentences.",
    "topic": "What is the text above about? Answer in one sentence.",
    "explain_first": "Explain the first paragraph of the text above in simple words.",
    "list": "List three things the text above mentions.",
    "question": "Write two questions that the text above answers, and answer them.",
}
COMPOSE = {  # kind -> instruction templates
    "story": ["Write a short story about {person}, who {event}.", "Write a short story that begins in {city} on a "
              "{season} morning and ends with a surprise."],
    "letter": ["Write a letter from {person} to {person2} about {thing}.", "Write a polite letter complaining about "
               "{complaint}."],
    "dialogue": ["Write a dialogue between {person} and {person2}, who meet at the {topic} in {city}.",
                 "Write a conversation between a {job} and a customer who {problem}."],
    "fable": ["Write a short fable about a {animal} and a {animal2}, with a moral at the end."],
    "diary": ["Write a diary entry by {person} after a day when {person} {event}."],
    "news": ["Write a short news report about {news} in {city}."],
    "advice": ["Give advice to someone who {problem}.", "What should a new {job} know in the first week?"],
    "essay": ["Write a short essay on {abstract}.", "Explain to a child why {phenomenon}."],
    "description": ["Describe {season} in {city} as a travel writer would.", "Describe a day in the life of a {job}."],
}
EVENTS = ["lost a key on the way to work", "found an old map in a second-hand book", "missed the last train home",
          "learned to play the violin at sixty", "opened a small bakery", "got lost in a forest",
          "won a prize for the largest pumpkin", "moved to a new country", "rescued a cat from a roof",
          "forgot a friend's birthday", "built a boat in the garden", "met a famous painter on a bus"]
JOBS = ["nurse", "baker", "lighthouse keeper", "teacher", "bus driver", "gardener", "carpenter", "librarian",
        "fisherman", "firefighter", "chef", "farmer"]
ANIMALS = ["fox", "tortoise", "crow", "lion", "mouse", "goat", "owl", "rabbit", "bear", "ant", "heron", "wolf"]
PHENOMENA = ["the sky is blue", "leaves fall in autumn", "we need to sleep", "the moon changes shape",
             "bread rises", "ice floats on water", "it rains", "we have seasons"]
NEWS = ["a festival that drew record crowds", "a bridge that reopened after repairs", "a storm that closed the port",
        "a school that planted a thousand trees", "a lost dog that found its way home", "a new cycling path"]
PROBLEMS = ["cannot sleep before an exam", "wants to learn to cook", "has a noisy neighbour", "is afraid of speaking "
            "in public", "keeps losing things", "wants to save money", "received a broken parcel"]
ABSTRACT = ["friendship", "patience", "honesty", "learning from mistakes", "curiosity", "kindness to strangers",
            "the value of hard work", "why people travel", "growing old"]
COMPLAINTS = ["a parcel that arrived broken", "a train that was two hours late", "a noisy building site",
              "a hotel room without hot water", "a library book that was never returned"]
SEASONS = ["spring", "summer", "autumn", "winter"]
THINGS = ["a trip they took together", "a borrowed bicycle", "a new job", "a family recipe", "a concert",
          "a garden they share"]
COMPOSE_FOLLOW_UPS = ["Continue the story.", "Now make it shorter.", "Give it a title and say what it is about in "
                      "one sentence.", "Tell it again from another point of view."]
FOLLOW_UPS = ["Thank you. Can you say that more briefly?", "Which sentence of the text supports your answer?",
              "Now give the text a short title.", "What else does the text say?"]


def strip_rst(text: str) -> list:
    """The prose paragraphs of a reST file: no directives, code, tables, headings; inline roles to words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if not para.strip() or para[0] in " \t.:=-*#+|" or para.lstrip().startswith(("..", ">>>", "::")):
            continue
        para = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", para)
        para = re.sub(r"``([^`]*)``", r"\1", para)
        para = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_*", r"\1", para)
        para = re.sub(r"\s+", " ", para).replace("::", ":").strip()
        if len(para.split()) >= 25 and para.count(". ") + para.endswith(".") >= 2:
            out.append(para)
    return out


def load_documents(man: str, legal: str) -> list:
    docs = []
    for f in sorted(PY_DOCS.rglob("*.rst.txt")):
        paras = strip_rst(f.read_text(encoding="utf-8", errors="replace"))
        if len(paras) >= 2:
            docs.append(("python-docs", paras))
    for source, path in (("man-pages", man), ("licences", legal)):
        if path:
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                paras = [p for p in json.loads(line)["text"].split("\n\n") if len(p.split()) >= 12]
                if len(paras) >= 2:
                    docs.append((source, paras))
    return [(s, p) for s, p in docs if not any(FORBIDDEN.search(x) for x in p)]


def passage(rng, tok, paras, target: int) -> str:
    start = rng.randrange(len(paras))
    chosen, count = [], 0
    for p in paras[start:] + paras[:start]:
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        if chosen and count + n > target:
            break
        chosen.append(p)
        count += n
    return "\n\n".join(chosen)


def insert_fact(rng, text: str):
    statement, question = rng.choice(FACTS)
    values = dict(city=rng.choice(CITIES), person=rng.choice(PEOPLE), place=rng.choice(PLACES),
                  fruit=rng.choice(FRUITS), topic=rng.choice(TOPICS), colour=rng.choice(COLOURS),
                  n=rng.randint(2, 19), h=rng.randint(7, 18), year=rng.randint(1900, 2015), n4=rng.randint(1000, 9999))
    fact = statement.format(**values)
    starts = [0] + [m.end() for m in re.finditer(r"\.\s+", text)]
    at = rng.choice(starts)
    return text[:at] + fact + " " + text[at:], question.format(**values) + " Answer in one sentence."


def make_specs(rng, tok, docs, n: int, min_tokens: int, max_tokens: int) -> list:
    specs = []
    for _ in range(n):
        source, paras = rng.choice(docs)
        target = int(min_tokens * (max_tokens / min_tokens) ** rng.random())  # log-uniform lengths
        text = passage(rng, tok, paras, target)
        if rng.random() < 0.4:
            text, instruction = insert_fact(rng, text)
            task = "fact"
        else:
            task = rng.choice(sorted(TASKS))
            instruction = TASKS[task]
        content = (f"{instruction}\n\n{text}".replace("above", "below") if rng.random() < 0.2
                   else f"{text}\n\n{instruction}")
        follow = rng.choice(FOLLOW_UPS) if rng.random() < 0.3 else None
        specs.append(dict(source=source, task=task, messages=[{"role": "user", "content": content}], follow=follow))
    return specs


def make_compose_specs(rng, n: int) -> list:
    """``n`` composition instructions (COMPOSE), the kinds in turn, the topics drawn."""
    specs = []
    kinds = sorted(COMPOSE)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        person, person2 = rng.sample(PEOPLE, 2)
        animal, animal2 = rng.sample(ANIMALS, 2)
        content = rng.choice(COMPOSE[kind]).format(
            person=person, person2=person2, animal=animal, animal2=animal2, city=rng.choice(CITIES),
            topic=rng.choice(TOPICS), event=rng.choice(EVENTS), job=rng.choice(JOBS), season=rng.choice(SEASONS),
            phenomenon=rng.choice(PHENOMENA), news=rng.choice(NEWS), problem=rng.choice(PROBLEMS),
            abstract=rng.choice(ABSTRACT), thing=rng.choice(THINGS), complaint=rng.choice(COMPLAINTS))
        follow = rng.choice(COMPOSE_FOLLOW_UPS) if rng.random() < 0.3 else None
        specs.append(dict(source="teacher", task=f"compose-{kind}", messages=[{"role": "user", "content": content}],
                          follow=follow))
    return specs


def cut_answer(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) or "." not in text else text[: text.rfind(".") + 1]


def repetitive(text: str) -> bool:
    """Whether an answer loops (a 135M model's greedy text often does): under 70% of its sentences and lines
    distinct."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]
    return len(parts) >= 4 and len(set(parts)) < 0.7 * len(parts)


@torch.no_grad()
def answer(model, tok, specs, max_new: int, sampling: dict) -> None:
    """The teacher's answer to each spec's last user turn (one left-padded batch; greedy unless ``sampling``
    holds generate()'s sampling settings), appended as an assistant turn."""
    prompts = [tok.apply_chat_template(s["messages"], add_generation_prompt=True, tokenize=False) for s in specs]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new, do_sample=bool(sampling), pad_token_id=tok.pad_token_id,
                         **sampling)
    for spec, row in zip(specs, out[:, enc["input_ids"].shape[1]:]):
        spec["messages"].append({"role": "assistant", "content": cut_answer(tok.decode(row, skip_special_tokens=True))})


def conversations(model, tok, specs, batch: int, max_new: int, sampling: dict):
    """Finished conversations, a batch at a time (batches of similar lengths within windows of 4 batches, so
    that a run stopped early keeps a sample of every length): the first answer, then any follow-up's."""
    t0, done = time.time(), 0
    for w in range(0, len(specs), 4 * batch):
        window = sorted(specs[w: w + 4 * batch], key=lambda s: len(s["messages"][0]["content"]))
        for k in range(0, len(window), batch):
            group = window[k: k + batch]
            answer(model, tok, group, max_new, sampling)
            follow = [s for s in group if s["follow"]]
            for s in follow:
                s["messages"].append({"role": "user", "content": s["follow"]})
            if follow:
                answer(model, tok, follow, max_new, sampling)
            done += len(group)
            print(f"  {done}/{len(specs)} conversations, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            yield from group


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conversations", type=int, default=500)
    ap.add_argument("--prose", type=int, default=150, help="plain passages added as prose rows")
    ap.add_argument("--compose", type=int, default=0, help="composition conversations (no passage) added")
    ap.add_argument("--man", default="")
    ap.add_argument("--legal", default="")
    ap.add_argument("--min-tokens", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=1400)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers; else sampled, with --top-p")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from anllm_ext.models import load_model

    model, tok = load_model(None)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rng = random.Random(args.seed)
    docs = load_documents(args.man, args.legal)
    print(f"{len(docs)} documents: " + ", ".join(f"{s} {sum(1 for d in docs if d[0] == s)}"
                                                 for s in sorted({d[0] for d in docs})), file=sys.stderr)
    specs = make_specs(rng, tok, docs, args.conversations, args.min_tokens, args.max_tokens)
    specs += make_compose_specs(rng, args.compose)
    prose = [rng.choice(docs) for _ in range(args.prose)]
    prose = [(source, passage(rng, tok, paras, rng.randint(300, args.max_tokens))) for source, paras in prose]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dropped = 0
    with out.open("w", encoding="utf-8") as f:  # written as it goes: a run stopped early keeps what it finished
        for source, text in prose:
            f.write(json.dumps({"text": text, "task": "prose", "source": source}) + "\n")
        sampling = {} if args.temperature == 0 else dict(temperature=args.temperature, top_p=args.top_p,
                                                         repetition_penalty=args.repetition_penalty)
        torch.manual_seed(args.seed)
        for s in conversations(model, tok, specs, args.batch, args.max_new_tokens, sampling):
            if any(repetitive(m["content"]) for m in s["messages"] if m["role"] == "assistant"):
                dropped += 1
                continue
            text = tok.apply_chat_template(s["messages"], tokenize=False)
            f.write(json.dumps({"text": text, "task": s["task"], "source": s["source"]}) + "\n")
            f.flush()
    print(f"{len(specs) - dropped} conversations ({args.compose} compositions asked, {dropped} looping answers dropped) + "
          f"{args.prose} prose rows -> {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
