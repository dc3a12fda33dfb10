"""Notebook 05's figures: the analogues of Q-Rater's Figs. 5-12, 16-20, drawn from run records.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868. Only drawing lives here: the runs come from
:mod:`lowbit.qrater.experiments.runs`; each ``figure*`` function saves the figure through
:func:`lowbit.plotting.save_figure` and returns it (the notebook shows it).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ...plotting import save_figure
from .runs import BASELINES, bias_selection, sweep
from ..rounding import range_division

_TENSOR = {"w": "weights", "a": "activations"}


def draw_division(ax, settings, bits: int = 3, order: int = 1) -> None:
    """Figs. 5, 9, 10: one bar per ``(gamma_n, gamma_s)`` setting, split into the input range of each level."""
    cmap = plt.get_cmap("tab10")
    for row, (gn, gs) in enumerate(settings):
        rd = range_division(bits, gn, gs, order=order, points=6001)
        for k, lo, hi in zip(rd["levels"], rd["low"], rd["high"]):
            if np.isfinite(lo):
                ax.barh(row, hi - lo, left=lo, color=cmap(int(k) % 10), edgecolor="k", linewidth=0.4)
                ax.text((lo + hi) / 2, row, str(int(k)), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(settings)))
    ax.set_yticklabels([f"$\\gamma_n$={gn:+.1f}" + ("" if order == 1 else f", $\\gamma_s$={gs:.1f}")
                        for gn, gs in settings])
    ax.set_xlabel("input x / step (clipped)")
    ax.axvline(0, color="k", lw=0.6)


def curve_axes(ax, named_runs: dict, title: str) -> None:
    """Figs. 6-8: test accuracy against the number of incrementally quantized layers, one line per run."""
    for name, r in named_runs.items():
        ks = r.get("curve_counts", range(len(r["curve"])))
        ax.plot(ks, r["curve"], marker="o", ms=3, label=f"{name} ({r['test_accuracy']:.2f})")
    n = next(iter(named_runs.values())).get("curve_n")
    ax.set_xlabel("number of quantized layers (forward order)")
    ax.set_ylabel("test accuracy (%)" + (f", first {n} test images" if n else ""))
    ax.set_title(title)
    ax.legend(fontsize=7)


def _sweep_axes(ax, tensor: str, last: str, xlabel: str, title_extra: str = "") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training-subset accuracy (%)")
    ax.set_title(f"{_TENSOR[tensor]} of {last}{title_extra}")
    ax.legend(fontsize=7)


def figure6(runs6: dict, c: dict, bits: int, label: str):
    """Fig. 6 / 11 (incremental curves, rounding on W, A, both; 1st vs 2nd order) and Fig. 12
    (the last layer's ``gamma_n`` sweeps) from :func:`~lowbit.qrater.experiments.figure6_runs`."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    curve_axes(axes[0], runs6, f"{c['model']}: incremental W/A {bits}/{bits} quantization, MSE clipping")
    r1 = runs6["W/A Q-Rater (2nd order)"]
    for ax, stage, tensor in [(axes[1], "w_round", "w"), (axes[2], "a_round", "a")]:
        gs = r1["layers"][-1][f"{tensor}_gamma_s"]
        gs = min(c["gamma_s_grid"], key=lambda g: abs(g - gs))
        x, y, last = sweep(r1, stage, "gamma_n", {"gamma_s": gs})
        ax.plot(x, y, marker="o")
        ax.axvline(0, color="gray", ls="--", lw=0.8, label="RTN ($\\gamma_n$=0)")
        _sweep_axes(ax, tensor, last, "$\\gamma_n$", f", $\\gamma_s$={gs}")
    fig.tight_layout()
    save_figure(fig, label)
    return fig


def figure7(runs7: dict, c: dict, bits: int, label: str):
    """Fig. 7 (incremental curves for MSE / ACIQ / KL / Q-Rater clipping) and Figs. 16-17 (the
    last layer's ``gamma_c`` sweeps, with the baselines' thresholds as ``Th / max``)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    curve_axes(axes[0], runs7, f"{c['model']}: incremental W/A {bits}/{bits} quantization, RTN")
    r2 = runs7["Q-Rater clip"]
    for ax, stage, tensor in [(axes[1], "w_clip", "w"), (axes[2], "a_clip", "a")]:
        x, y, last = sweep(r2, stage, "gamma_c")
        ax.plot(x, y, marker="o", color="k", label="Q-Rater sweep")
        for i, base in enumerate(BASELINES):
            rec = runs7[base]["layers"][-1]
            denom = rec["w_max"] if tensor == "w" else rec["a_max"]
            ax.axvline(min(rec[f"{tensor}_threshold"] / denom, 1.0), color=f"C{i}", ls="--", label=base)
        _sweep_axes(ax, tensor, last, "$\\gamma_c$")
    fig.tight_layout()
    save_figure(fig, label)
    return fig


def figure8(runs8: dict, c: dict, bits: int, label: str):
    """Fig. 8 / Figs. 18-19: incremental curves with bias correction never / always / selective."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    curve_axes(ax, runs8, f"{c['model']}: bias correction, W/A {bits}/{bits}, RTN + MSE clipping")
    fig.tight_layout()
    save_figure(fig, label)
    return fig


def figure20(rows: list[tuple[str, dict]], label: str):
    """Fig. 20: which layers kept bias correction, one row per ``(row name, run record)``.
    Returns ``(figure, {row name: number of corrected layers})``."""
    names, onoff, counts = bias_selection(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(names), 0.5 + 0.35 * len(rows)))
    ax.imshow(onoff, cmap="Greens", vmin=0, vmax=1.4, aspect="auto")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n for n, _ in rows])
    ax.grid(False)
    for i in range(len(rows)):
        for j in range(len(names)):
            ax.text(j, i, "on" if onoff[i, j] else "off", ha="center", va="center", fontsize=7)
    ax.set_title("Fig. 20 analogue: layers that kept bias correction")
    fig.tight_layout()
    save_figure(fig, label)
    return fig, counts
