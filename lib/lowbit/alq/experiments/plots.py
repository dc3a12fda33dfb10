"""Notebook 07's figures, drawn from cached STLQ records (:mod:`.runs`): the analogues of the ALQ
supplement's Fig. 1 (effect of the select tensor) and Fig. 2 (effect of per-tile quantization),
STLQ without training against the fraction of two-shift MACs, and the relative MAC cost vs NZR.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021,
supplementary material.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .runs import curve


def _finish(ax, xlabel: str, ylabel: str, title: str):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


def _band(ax, recs, field, color, style, label, scale=1.0):
    its = curve(recs[0], field)[0]
    ys = np.array([curve(r, field)[1] for r in recs]) * scale
    ax.plot(its, ys.mean(0), style, color=color, label=label, lw=1.5)
    ax.fill_between(its, ys.min(0), ys.max(0), color=color, alpha=0.15)


def select_curves(runs: dict, bits_list, c: dict, seeds, fp_accuracy: float | None = None):
    """Fig. 1 analogue: accuracy and NZR (as trained) vs iteration, with the select tensor at each
    ratio (solid) and without (dashed), mean over seeds (band: min..max), one column per W/A."""
    fig, axes = plt.subplots(2, len(bits_list), figsize=(4.6 * len(bits_list), 6.4), squeeze=False)
    colors = dict(zip(c["ratios"], ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    r_max = max(c["ratios"])
    for j, b in enumerate(bits_list):
        for r in c["ratios"]:
            recs = [runs[b, r, True, None, s] for s in seeds]
            _band(axes[0, j], recs, "accuracy", colors[r], "-", f"with select {r:.0%}")
            _band(axes[1, j], recs, "nzr", colors[r], "-", f"with select {r:.0%}", 100)
        recs = [runs[b, r_max, False, None, s] for s in seeds]
        _band(axes[0, j], recs, "accuracy", "k", "--", "without select")
        _band(axes[1, j], recs, "nzr", "k", "--", "without select", 100)
        if fp_accuracy is not None:
            axes[0, j].axhline(fp_accuracy, color="gray", lw=0.8, ls=":", label="FP (curve images)")
        axes[0, j].set_title(f"W/A {b}/{b}")
        axes[0, j].set_ylabel("top-1 (%), curve images")
        axes[1, j].set_ylabel("NZR (%)")
        axes[1, j].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def tile_curves(runs: dict, bits_list, c: dict, seeds):
    """Fig. 2 analogue: per element vs per tile (``c["tile"]``) at the largest select ratio, both with
    the select tensor, and (gray) without select, accuracy and NZR vs iteration."""
    fig, axes = plt.subplots(2, len(bits_list), figsize=(4.6 * len(bits_list), 6.4), squeeze=False)
    r = max(c["ratios"])
    for j, b in enumerate(bits_list):
        for key, color, style, label in (((b, r, True, None), "tab:green", "-", f"per element, select {r:.0%}"),
                                         ((b, r, True, c["tile"]), "tab:purple", "--",
                                          f"per tile ({c['tile']}), select {r:.0%}"),
                                         ((b, r, False, None), "tab:gray", ":", "without select (reference)")):
            recs = [runs[(*key, s)] for s in seeds]
            _band(axes[0, j], recs, "accuracy", color, style, label)
            _band(axes[1, j], recs, "nzr", color, style, label, 100)
        axes[0, j].set_title(f"W/A {b}/{b}")
        axes[0, j].set_ylabel("top-1 (%), curve images")
        axes[1, j].set_ylabel("NZR (%)")
        axes[1, j].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def ptq_vs_two_shift(ptq_rows: list[dict], nb03_rows: list[dict], title: str):
    """STLQ without training: top-1 against the MAC-weighted fraction of two-shift MACs (per element
    and per tile), beside notebook 03's log2 / two-word log / APoT / SQ cells at the same W/A."""
    _, ax = plt.subplots(figsize=(6.4, 4.2))
    for sel, color in (("per element", "tab:blue"), *[(s, "tab:purple") for s in
                                                      sorted({r["selection"] for r in ptq_rows} - {"per element"})]):
        rows = sorted((r for r in ptq_rows if r["selection"] == sel), key=lambda r: r["two-shift MACs"])
        if rows:
            ax.plot([r["two-shift MACs"] for r in rows], [r["top-1"] for r in rows], "o-", color=color,
                    label=f"STLQ PTQ, {sel}", ms=4)
    markers = iter("s^Dvp*hX")
    for r in nb03_rows:
        if r["two-shift MACs"] is not None:
            ax.errorbar([r["two-shift MACs"]], [r["top-1"]], yerr=[r["std"]], fmt=next(markers), capsize=3,
                        label=f"notebook 03: {r['method']} ({r['test images']} images)")
    return _finish(ax, "fraction of MACs with two shifts (MAC-weighted)", "top-1 (%)", title)


def mac_cost_vs_nzr(cost_rows: list[dict], references: dict, title: str):
    """Relative MAC cost (gate-cycles per MAC, unit-gate model) against NZR: STLQ's one-shifter design
    per element (random placement, and the measured points) and per tile, its two-shifter design,
    and horizontal references (``{label: gates}``, e.g. SQ option 5 and a same-storage multiplier)."""
    _, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, style, label in (("per element", "-", "one shifter + 2nd cycle, per element (random placement)"),
                              ("per tile", "--", "one shifter + 2nd cycle, per tile")):
        rows = [r for r in cost_rows if r["kind"] == key]
        ax.plot([100 * r["nzr"] for r in rows], [r["b_gate_cycles_per_mac"] for r in rows], style, label=label)
    meas = [r for r in cost_rows if r["kind"] == "measured"]
    if meas:
        ax.plot([100 * r["nzr"] for r in meas], [r["b_gate_cycles_per_mac"] for r in meas], "k^",
                label="one shifter, measured masks of our runs")
    a = [r for r in cost_rows if r["kind"] == "per element"]
    ax.plot([100 * r["nzr"] for r in a], [r["a_gate_cycles_per_mac"] for r in a], ":", label="two shifters (1 cycle)")
    for (label, gates), color in zip(references.items(), ("tab:red", "tab:brown", "tab:olive")):
        ax.axhline(gates, color=color, lw=1, label=label)
    return _finish(ax, "NZR (%)", "gate-cycles per MAC (unit gates)", title)
