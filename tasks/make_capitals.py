"""Build tasks/capitals.jsonl: 4-option "capital of" questions from Debian bsdgames quiz files, offline.

Source: /usr/share/games/bsdgames/quiz/{africa,america,asia,europe} (``country:capital`` lines, BSD
licence). The quiz syntax marks alternatives (``a|b``), optional text (``{...}``) and spellings
(``[x|y]``); each name is reduced to one plain form (first alternative; optional text kept, except a
leading optional article/title; in ``[...]`` the first plain-letter spelling). Distractors: three other
capitals of the same continent, drawn with a fixed seed; the correct answer's position is drawn too.

    python tasks/make_capitals.py            # writes tasks/capitals.jsonl next to this script

Each line follows anllm_ext.evaluation's multiple-choice schema (question, choices, answer) plus id
and continent.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

QUIZ_DIR = Path("/usr/share/games/bsdgames/quiz")
CONTINENTS = ("africa", "america", "asia", "europe")
PLAIN = re.compile(r"^[A-Za-z \-]+$")


def _split_top(s: str, sep: str = "|"):
    """Split on ``sep`` outside brackets and braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def plain_form(s: str, leading_optional: bool = False, top: bool = True) -> str:
    """One plain spelling of a quiz answer pattern (see the module docstring)."""
    s = _split_top(s)[0]
    out, i = "", 0
    while i < len(s):
        ch = s[i]
        if ch in "{[":
            close = "}" if ch == "{" else "]"
            depth, j = 1, i + 1
            while depth:
                depth += s[j] in "{[" and 1 or 0
                depth -= s[j] in "}]" and 1 or 0
                j += 1
            inner = s[i + 1 : j - 1]
            if ch == "{":
                if i > 0 or leading_optional:
                    out += plain_form(inner, True, top=False)
            else:
                options = _split_top(inner)
                out += next((o for o in options if PLAIN.match(o)), options[-1])
            assert s[j - 1] == close
            i = j
        else:
            out += ch
            i += 1
    return re.sub(r"\s+", " ", out).strip() if top else out


def read_pairs(name: str):
    pairs = []
    for line in (QUIZ_DIR / name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or ":" not in line:
            continue
        country, capital = line.split(":", 1)
        pairs.append((plain_form(country), plain_form(capital, leading_optional=True)))
    return pairs


def build(seed: int = 0):
    rng = random.Random(seed)
    rows, seen = [], set()
    for continent in CONTINENTS:
        pairs = read_pairs(continent)
        capitals = sorted({c for _, c in pairs})
        for country, capital in pairs:
            if country in seen:  # e.g. Armenia is listed under Asia and Europe
                continue
            seen.add(country)
            distractors = rng.sample([c for c in capitals if c != capital], 3)
            answer = rng.randrange(4)
            choices = distractors[:answer] + [capital] + distractors[answer:]
            rows.append({"id": len(rows), "continent": continent, "question": f"What is the capital of {country}?",
                         "choices": choices, "answer": answer})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("capitals.jsonl")))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = build(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    main()
