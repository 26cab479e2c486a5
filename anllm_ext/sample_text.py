"""Real English text for demos, benchmarks and tests, offline: Python's documentation prose when the Debian package
``python3.11-doc`` is installed, else a bundled paragraph."""
from __future__ import annotations

from pathlib import Path

_DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
_DOC_FILES = ("faq/general.rst.txt", "faq/design.rst.txt", "tutorial/classes.rst.txt", "howto/functional.rst.txt",
              "faq/programming.rst.txt")
BUNDLED_PARAGRAPH = (
    "The lighthouse stood at the end of a long stone pier. Every evening the keeper climbed the narrow stairs, "
    "trimmed the wick and wound the clockwork that turned the great lens. Ships far out at sea saw the beam sweep "
    "across the water once every twelve seconds. Sailors trusted that rhythm more than any chart. In the winter of "
    "the great storm the keeper did not sleep for three nights. He kept the light burning while the waves broke over "
    "the gallery windows. When the weather cleared, the harbour master walked out along the pier to thank him. He "
    "found the keeper asleep in his chair, the lamp still turning above him. The town later put up a small plaque by "
    "the door. It says only that the light never went out. "
)


def sample_text(min_chars: int = 20000) -> str:
    """Real English text for demos and benchmarks, offline.

    Python's documentation sources from the Debian package ``python3.11-doc`` (FAQ and tutorial prose,
    PSF licence) when installed (``apt-get install -y python3.11-doc``); otherwise a bundled paragraph
    repeated. Returns at least ``min_chars`` characters when that much is available.
    """
    parts, n = [], 0
    for rel in _DOC_FILES:
        path = Path(_DOC_SOURCES) / rel
        if n >= min_chars:
            break
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            n += len(text)
    if not parts:
        reps = max(1, -(-min_chars // len(BUNDLED_PARAGRAPH)))
        return BUNDLED_PARAGRAPH * reps
    return "\n\n".join(parts)
