"""Held-out English prose for judging AnLLMs: paragraphs of the Debian Administrator's Handbook (Debian
package ``debian-handbook``, GPL-2+ / CC-BY-SA 3.0), which no training run of this project reads.

    python docs/experiments/heldout_text.py --out data/heldout/handbook.txt --pages 6
"""
import argparse
import html.parser
import re
from pathlib import Path

HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
PAGES = ("foreword.html", "preface.html", "sect.why-debian.html", "sect.foundation-documents.html",
         "sect.role-of-distributions.html", "sect.release-lifecycle.html", "sect.why-gnu-linux.html",
         "sect.debian-internals.html")


class Paragraphs(html.parser.HTMLParser):
    """The text of every ``<div class="para">`` (the book's paragraphs; no code listings, menus, tables)."""

    def __init__(self):
        super().__init__()
        self.depth, self.current, self.paragraphs = 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "div" and (self.depth or ("class", "para") in attrs):
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "div" and self.depth:
            self.depth -= 1
            if self.depth == 0:
                text = re.sub(r"\s+", " ", "".join(self.current)).strip()
                if len(text) > 80:
                    self.paragraphs.append(text)
                self.current = []

    def handle_data(self, data):
        if self.depth:
            self.current.append(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pages", type=int, default=len(PAGES))
    args = ap.parse_args()
    paragraphs = []
    for page in PAGES[: args.pages]:
        parser = Paragraphs()
        parser.feed((HANDBOOK / page).read_text(encoding="utf-8"))
        paragraphs += parser.paragraphs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"{len(paragraphs)} paragraphs, {sum(map(len, paragraphs))} characters -> {out}")


if __name__ == "__main__":
    main()
