"""Build tasks/state_{capital,postal,flower}.jsonl: three few-shot tasks whose relation only the demonstrations say.

Each question is a bare US state name ("Question: Ohio\\nAnswer:"); its four options are the state's capital,
its postal code, its state flower, and the same-relation answer of another state. Which of the first three is
right depends on the file (capital, postal code or flower), and nothing in the question says which: at 0-shot
the model can only guess the relation, with k demonstrations of the same file it can read it off them. So the
k-shot gain over 0-shot measures what the demonstrations carry, and under anchor inference, what their anchors
carry once every other token of theirs is dropped.

Source: /usr/share/games/bsdgames/quiz/state (``state:capital:postal code:flower`` lines, BSD licence; quiz
syntax reduced as in make_capitals.py). The two states whose flower the file does not know ("gok") are left
out, so each file has the same 48 states. The correct answer's position and the other state are drawn with a
fixed seed. These files, like every bsdgames quiz file, are evaluation data: never train on them.

    python tasks/make_state_facts.py            # writes the three files next to this script
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_capitals import QUIZ_DIR, plain_form

RELATIONS = ("capital", "postal", "flower")


def read_states():
    """(state, {relation: answer}) for each state whose flower is known."""
    states = []
    for line in (QUIZ_DIR / "state").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, capital, postal, flower = line.split(":")
        if flower == "gok":  # "God only knows": the quiz has no flower for this state
            continue
        facts = {"capital": plain_form(capital), "postal": plain_form(postal),
                 "flower": plain_form(flower, leading_optional=True)}
        states.append((plain_form(name), facts))
    return states


def build(relation: str, seed: int = 0):
    rng = random.Random(f"{seed}-{relation}")
    states = read_states()
    rows = []
    for name, facts in states:
        others = [f[relation] for n, f in states if n != name and f[relation] not in facts.values()]
        options = [facts[r] for r in RELATIONS] + [rng.choice(others)]
        rng.shuffle(options)
        rows.append({"id": len(rows), "relation": relation, "question": name, "choices": options,
                     "answer": options.index(facts[relation])})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(Path(__file__).parent))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for relation in RELATIONS:
        out = Path(args.out_dir) / f"state_{relation}.jsonl"
        rows = build(relation, args.seed)
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} questions to {out}")


if __name__ == "__main__":
    main()
