"""The one figure/table helper: every figure and table goes through here into figures/."""
from __future__ import annotations

import csv
import io


import matplotlib.pyplot as plt  # noqa: E402

from .paths import figures_dir  # noqa: E402
from .results import atomic_write_bytes, atomic_write_text  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}


def setup_style() -> None:
    """Apply the compendium's matplotlib style."""
    plt.rcParams.update(STYLE)


def save_figure(fig, label: str):
    """Save ``fig`` as ``figures/<label>.png`` and ``.pdf`` (atomically); returns the PNG path.

    ``label`` is the paper label it reproduces, e.g. ``"sq_fig3_convergence_cases"``.
    """
    if not label or "/" in label or "." in label:
        raise ValueError(f"label must be a plain name like 'sq_fig3_cases', got {label!r}")
    out = figures_dir()
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        # fixed metadata keeps the PDF byte-identical across reruns
        meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        fig.savefig(buf, format=ext, bbox_inches="tight", metadata=meta)
        atomic_write_bytes(out / f"{label}.{ext}", buf.getvalue())
    return out / f"{label}.png"


def save_table(rows: list[dict], label: str, floatfmt: str = ".2f", note: str = "") -> str:
    """Write ``figures/<label>.md`` and ``.csv`` from a list of dict rows; returns the Markdown."""
    if not rows:
        raise ValueError("save_table needs at least one row")
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    if note:
        text += "\n" + note.strip() + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in cols})
    out = figures_dir()
    atomic_write_text(out / f"{label}.md", text)
    atomic_write_text(out / f"{label}.csv", buf.getvalue())
    return text
