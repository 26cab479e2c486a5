"""What the library prints while it works: progress bars (tqdm, optional) and plain-text tables."""
from __future__ import annotations

from typing import Optional, Sequence


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tok"):
    """A tqdm bar of ``total`` steps, or None when ``enabled`` is False or tqdm is not installed (it is
    optional). Callers update and close it only when it is not None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def text_table(rows: Sequence[Sequence[str]], header: Optional[Sequence[str]] = None) -> str:
    """Rows of cells as aligned plain text: the first column left-aligned, the others right-aligned,
    two spaces between columns (``header``, when given, is the first row)."""
    rows = ([list(header)] if header is not None else []) + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
