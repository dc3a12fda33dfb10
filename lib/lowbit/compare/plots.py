"""Notebook 08's figures: top-1 vs relative MAC cost with the Pareto front per W/A, and top-1 vs
compute (the rows of :func:`lowbit.compare.cross_paper_rows`)."""
from __future__ import annotations

import matplotlib.pyplot as plt


def _panels(rows: list[dict], title: str):
    """A figure with one panel per ``W/A`` of ``rows``: ``(fig, [(ax, W/A, its rows), ...])``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["W/A"], []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.0), squeeze=False)
    fig.suptitle(title)
    return fig, [(ax, wa, rs) for ax, (wa, rs) in zip(axes[0], groups.items())]


def _points(ax, rows, x: str):
    for r in rows:
        ax.errorbar(r[x], r["top-1"], yerr=r["std"], fmt="o" if r["pareto"] else "x", ms=6, capsize=2,
                    color="tab:red" if r["pareto"] else "tab:gray")
        ax.annotate(r["method"].replace(" (best: ", "\n(").replace("_", " "), (r[x], r["top-1"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")


def accuracy_vs_cost(rows: list[dict], title: str):
    """One panel per ``W/A``: top-1 (mean +- std) against relative MAC cost, the Pareto front in red."""
    fig, panels = _panels(rows, title)
    for ax, wa, rs in panels:
        _points(ax, rs, "relative MAC cost")
        front = sorted((r["relative MAC cost"], r["top-1"]) for r in rs if r["pareto"])
        if front:
            ax.step(*zip(*front), where="post", color="tab:red", lw=1, alpha=0.6)
        ax.set(xlabel="MAC cost / uniform MAC at the same W/A (unit gates)", ylabel="top-1 (%)", title=f"W/A {wa}")
    fig.tight_layout()
    return fig


def accuracy_vs_compute(rows: list[dict], title: str):
    """One panel per ``W/A``: top-1 against the seconds one run cost (log scale)."""
    fig, panels = _panels(rows, title)
    for ax, wa, rs in panels:
        _points(ax, rs, "seconds")
        ax.set_xscale("log")
        ax.set_xlim(0.5 * min(r["seconds"] for r in rs), 3 * max(r["seconds"] for r in rs))
        ax.set(xlabel="seconds per run (PTQ, or QAT with its evaluation; 1-2 CPU threads)", ylabel="top-1 (%)",
               title=f"W/A {wa}")
    fig.tight_layout()
    return fig
