"""General technical prose for AnSAN training: the prose paragraphs of the installed English manual pages.

The Python documentation is reStructuredText about one language; the held-out judges are prose (the Debian
Administrator's Handbook, the GPL-3). Manual pages (sections 1, 5, 7 and 8 of ``/usr/share/man``, each
under its package's own free licence) give explanatory English of another kind. Each page is rendered by
``man`` without line wrapping (one paragraph per line); only paragraphs that read as prose are kept (at
least eight words, ending with a period), so option tables and synopses are dropped. Paragraphs that
quote a licence are dropped too (the GPL-3 is evaluation text), and section 6 (games, with the bsdgames
quiz) is not read, nor the ~16,600 near-identical ``gcloud`` command pages. Output: JSONL, one ``{"text": ...}`` document per page, paragraphs separated by a
blank line.

    python docs/experiments/man_page_prose.py --out data/man_prose.jsonl --pages 4000
"""
import argparse
import json
import os
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SECTIONS = ("man1", "man5", "man7", "man8")
LICENCE = re.compile(r"General Public License|\bGPL|warranty|WITHOUT ANY", re.I)


def render(page: Path) -> str:
    env = dict(os.environ, MANWIDTH="100000", MAN_KEEP_FORMATTING="0")
    out = subprocess.run(["man", "-P", "cat", "-l", str(page)], capture_output=True, text=True, env=env,
                         timeout=60).stdout
    return re.sub(r".\x08", "", out)  # overstrike bold/underline


def prose_paragraphs(text: str) -> list[str]:
    kept = []
    for line in text.splitlines():
        para = " ".join(line.split())
        if len(para.split()) >= 8 and para.endswith(".") and not LICENCE.search(para):
            kept.append(para)
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pages", type=int, default=4000)
    ap.add_argument("--min-paragraphs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pages = sorted(p for s in SECTIONS for p in (Path("/usr/share/man") / s).glob("*") 
             if p.is_file() and not p.name.startswith("gcloud"))
    random.Random(args.seed).shuffle(pages)
    documents, seen = 0, set()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f, ThreadPoolExecutor(2) as pool:
        for start in range(0, len(pages), 100):  # in slices: map() renders every page it is given
            for text in pool.map(render, pages[start:start + 100]):
                paragraphs = prose_paragraphs(text)
                text = "\n\n".join(paragraphs)
                if len(paragraphs) >= args.min_paragraphs and documents < args.pages and text not in seen:
                    seen.add(text)  # aliases (one page under several names) are read once
                    f.write(json.dumps({"text": text}) + "\n")
                    documents += 1
            if documents == args.pages:
                break
    print(f"{documents} documents from {len(pages)} pages -> {args.out}")


if __name__ == "__main__":
    main()
