"""Held-out judges of different kinds, none of which any training run or recipe decision of this project reads:

| domain | kind | source (Debian package, licence) |
|---|---|---|
| handbook-tech | technical manual | Debian Administrator's Handbook, chapters 5-9 (debian-handbook; GPL-2+ / CC-BY-SA 3.0) |
| reference | technical reference with lists | Debian Reference (debian-reference-en; GPL-2+) |
| faq | questions and answers | The Debian FAQ (debian-faq; GPL-2+) |
| glossary | definitions, 1911 | Ambrose Bierce, The Devil's Dictionary (dict-devil; public domain) |
| narrative | narrative of another century | King James Bible, Genesis 37-45 (bible-kjv-text; public domain) |
| quotations | quotations and short dialogue | the English fortune files ``fortunes``, ``literature``, ``people`` (fortunes; BSD/public domain) |

    apt-get install debian-handbook debian-reference-en debian-faq dict-devil bible-kjv fortunes
    python docs/experiments/heldout_domains.py --out data/heldout

Writes ``<domain>.txt`` per domain (paragraphs separated by blank lines, ~``--chars`` characters each).
"""
import argparse
import gzip
import html.parser
import re
import subprocess
from pathlib import Path

HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
HANDBOOK_CHAPTERS = ("packaging-system", "apt", "solving-problems", "basic-configuration", "unix-services")


class Paragraphs(html.parser.HTMLParser):
    """The text of every ``<p>`` and ``<div class="para">`` (no code listings, menus, tables)."""

    def __init__(self):
        super().__init__()
        self.depth, self.current, self.paragraphs = 0, [], []

    def handle_starttag(self, tag, attrs):
        if self.depth and tag in ("p", "div"):
            self.depth += 1
        elif tag == "p" or (tag == "div" and ("class", "para") in attrs):
            self.depth = 1
        elif self.depth and tag in ("pre", "table"):
            self.current.append("\0")  # a paragraph holding code or a table is dropped

    def handle_endtag(self, tag):
        if self.depth and tag in ("p", "div"):
            self.depth -= 1
            if self.depth == 0:
                text = re.sub(r"\s+", " ", "".join(self.current)).strip()
                if len(text) > 80 and "\0" not in text:
                    self.paragraphs.append(text)
                self.current = []

    def handle_data(self, data):
        if self.depth:
            self.current.append(data)


def html_paragraphs(files) -> list:
    out = []
    for f in files:
        parser = Paragraphs()
        parser.feed(Path(f).read_text(encoding="utf-8", errors="replace"))
        out += parser.paragraphs
    return out


def handbook_tech() -> list:
    pages = sorted(p for p in HANDBOOK.glob("sect.*.html") if any(c in p.name for c in HANDBOOK_CHAPTERS))
    return html_paragraphs(pages)


def reference() -> list:
    return html_paragraphs(sorted(Path("/usr/share/debian-reference").glob("ch0[1-4].en.html")))


def faq() -> list:
    return html_paragraphs(sorted(Path("/usr/share/doc/debian/FAQ").glob("*.en.html")))


def glossary() -> list:
    text = gzip.open("/usr/share/dictd/devil.dict.dz", "rt", encoding="utf-8", errors="replace").read()
    entries = []
    for block in re.split(r"\n(?=[A-Z][A-Z'\- ]+, [a-z]+\.)", text):
        body = re.sub(r"\s+", " ", block).strip()
        if len(body) > 80 and not body.startswith("00-database"):
            entries.append(body)
    return entries


def narrative() -> list:
    out = subprocess.run(["bible", "-f", "Gen37:1-45:28"], capture_output=True, text=True, check=True).stdout
    verses = [re.sub(r"^\S+\d+:\d+\s*", "", line).strip() for line in out.splitlines() if line.strip()]
    return [" ".join(verses[i: i + 6]) for i in range(0, len(verses), 6)]  # paragraphs of six verses


def quotations() -> list:
    out = []
    for name in ("fortunes", "literature", "people"):
        text = Path("/usr/share/games/fortunes", name).read_text(encoding="utf-8", errors="replace")
        out += [re.sub(r"[ \t]+", " ", q).strip() for q in text.split("\n%\n") if len(q.strip()) > 60]
    return out


DOMAINS = {"handbook-tech": handbook_tech, "reference": reference, "faq": faq, "glossary": glossary,
           "narrative": narrative, "quotations": quotations}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--chars", type=int, default=40000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, read in DOMAINS.items():
        kept, total = [], 0
        for p in read():
            if total >= args.chars:
                break
            kept.append(p)
            total += len(p)
        (out / f"{name}.txt").write_text("\n\n".join(kept) + "\n", encoding="utf-8")
        print(f"{name}: {len(kept)} paragraphs, {total} characters")


if __name__ == "__main__":
    main()
