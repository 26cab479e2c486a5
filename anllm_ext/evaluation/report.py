"""Results of an evaluation: one :class:`ModeResult` per mode, and how they are shown (a plain-text
table, JSON, a PNG of quality against KV kept)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..console import text_table


@dataclass
class ModeResult:
    """Quality, KV and time of one mode.

    ``kv_kept``: KV slots kept after the work / slots a full cache holds for the same tokens (1.0 for
    ``full`` and ``ansan``); ``kv_peak``: per sequence, the most slots held at once during the prefill
    (kept slots + the chunk in flight, padding excluded), summed / the same full slots; ``c_down = 1 - kv_kept``; ``t_up``: the ``full`` mode's seconds /
    this mode's seconds (None without a ``full`` run).
    """

    mode: str
    seconds: float
    kv_kept: float = 1.0
    kv_peak: float = 1.0
    kv_kept_slots: int = 0
    kv_full_slots: int = 0
    t_up: Optional[float] = None
    # perplexity
    tokens: Optional[int] = None
    nll: Optional[float] = None
    perplexity: Optional[float] = None
    # multiple choice
    questions: Optional[int] = None
    accuracy: Optional[float] = None
    accuracy_norm: Optional[float] = None

    @property
    def c_down(self) -> float:
        return 1.0 - self.kv_kept

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["c_down"] = self.c_down
        return d


def set_t_up(modes: Dict[str, ModeResult]) -> None:
    """Fill every result's ``t_up`` from the ``full`` mode's time (None without a ``full`` run)."""
    full = modes.get("full")
    for r in modes.values():
        r.t_up = (full.seconds / r.seconds) if full is not None and r.seconds > 0 else None


def dump_json(d: dict, path=None) -> str:
    """``d`` as indented JSON; also written to ``path`` (parent folders created) when given."""
    text = json.dumps(d, indent=2)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


def format_table(modes: Dict[str, ModeResult], quality: Sequence[str]) -> str:
    """A plain-text table: one row per mode, quality columns then KV kept, C-down, seconds, T-up."""
    head = ["mode", *quality, "KV kept", "KV peak", "C-down", "seconds", "T-up"]
    rows = []
    for r in modes.values():
        cells = [r.mode]
        for q in quality:
            v = getattr(r, q)
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        cells += [f"{100 * r.kv_kept:.1f}%", f"{100 * r.kv_peak:.1f}%", f"{100 * r.c_down:.1f}%", f"{r.seconds:.2f}",
                  "-" if r.t_up is None else f"{r.t_up:.2f}x"]
        rows.append(cells)
    return text_table(rows, header=head)


def plot_results(records: Sequence[dict], path, title: Optional[str] = None) -> None:
    """PNG of quality vs KV kept, one point per mode (and per shot count): accuracy for multiple
    choice, perplexity for text. ``records``: ``to_dict()`` outputs. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)") from e
    kinds = [k for k in ("multiple_choice", "perplexity") if any(r["task"] == k for r in records)]
    if not kinds:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    markers = {"full": "s", "ansan": "^", "cached": "o"}  # the mode by marker, the run by colour, in a legend
    for ax, kind in zip(axes[0], kinds):
        for i, r in enumerate(r for r in records if r["task"] == kind):
            label = f"{r['config']['shots']}-shot" if kind == "multiple_choice" else "text"
            for mode, m in r["modes"].items():
                y = m["accuracy"] if kind == "multiple_choice" else m["perplexity"]
                ax.scatter(100 * m["kv_kept"], y, marker=markers.get(mode, "x"), s=60, color=f"C{i % 10}",
                           alpha=0.8, label=f"{mode}, {label}")
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("KV kept vs full cache (%)")
        ax.set_ylabel("accuracy" if kind == "multiple_choice" else "perplexity")
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        ax.set_title("multiple choice" if kind == "multiple_choice" else "perplexity")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
