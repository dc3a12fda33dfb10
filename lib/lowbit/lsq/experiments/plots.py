"""Notebook 06's figures, drawn from cached QAT records (:mod:`.runs`): training curves, learned
level grids (LSQ uniform vs nuLSQ non-uniform) and code entropy per layer.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024 (comparison to LSQ; "Comparison of Shannon Entropy").
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ...plotting import save_figure
from ..quantizers import lsq_levels, nulsq_levels

COLORS = {"LSQ": "tab:gray", "nuLSQ-A": "tab:blue", "nuLSQ-W": "tab:orange", "nuLSQ-WA": "tab:green"}


def _curve(record: dict, key: str) -> list[float]:
    return [record["init_curve"][key]] + [h[key] for h in record["history"]]


def training_curves(runs: dict, variants, bits_list, seeds, title: str, label: str):
    """Test accuracy and loss per epoch (epoch 0: right after the step initialisation) and the
    training loss of every batch, mean over seeds (band: min..max), one column per W/A."""
    fig, axes = plt.subplots(3, len(bits_list), figsize=(3.6 * len(bits_list), 7.5), squeeze=False)
    for j, b in enumerate(bits_list):
        for v in variants:
            recs = [runs[v, b, s] for s in seeds]
            for i, key in enumerate(("test_accuracy", "test_loss")):
                ys = np.array([_curve(r, key) for r in recs])
                x = np.arange(ys.shape[1])
                axes[i, j].plot(x, ys.mean(0), "o-", color=COLORS.get(v), label=v, ms=3)
                axes[i, j].fill_between(x, ys.min(0), ys.max(0), color=COLORS.get(v), alpha=0.15)
                axes[i, j].set_xticks(x)
            bl = np.array([sum((h["batch_losses"] for h in r["history"]), []) for r in recs])
            k = max(1, bl.shape[1] // 20)
            smooth = np.convolve(bl.mean(0), np.ones(k) / k, mode="valid")
            axes[2, j].plot(np.arange(len(smooth)) + k - 1, smooth, color=COLORS.get(v), label=v)
        axes[0, j].set_title(f"W/A {b}/{b}")
        axes[0, j].set_ylabel("test top-1 (%)")
        axes[1, j].set_ylabel("test loss")
        axes[2, j].set_ylabel(f"train loss (moving mean of {k} batches)")
        axes[1, j].set_xlabel("epoch")
        axes[2, j].set_xlabel("batch")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, label)
    return fig


def _levels(q: dict) -> np.ndarray:
    steps = torch.tensor(q["steps"], dtype=torch.float64)
    if q["method"] == "LSQ":
        return lsq_levels(steps[0], q["bits"], q["signed"]).numpy()
    return nulsq_levels(steps, q["bits"], q["signed"]).numpy()


def level_grids(lsq: dict, nulsq: dict, layers, title: str, label: str):
    """The learned output levels of a few layers, weights and inputs: the LSQ record's uniform grid,
    the nuLSQ record's learned non-uniform one and its (uniform) initial grid, on one axis each."""
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 1.3 * len(layers) + 0.8), squeeze=False)
    for i, layer in enumerate(layers):
        for j, part in enumerate(("weight_quantizer", "input_quantizer")):
            ax = axes[i, j]
            name = f"{layer}.{part}"
            rows = [("LSQ learned", lsq["steps"].get(name), "tab:gray"),
                    ("nuLSQ init", nulsq["init_steps"].get(name), "tab:olive"),
                    ("nuLSQ learned", nulsq["steps"].get(name), "tab:green")]
            for y, (what, q, color) in enumerate(rows):
                if q is None:
                    continue
                lv = _levels(q)
                ax.vlines(lv, y - 0.35, y + 0.35, color=color, lw=1.2)
                ax.text(1.01, y, f"{q['method']}", transform=ax.get_yaxis_transform(), fontsize=6, va="center")
            ax.set_yticks(range(3), [r[0] for r in rows], fontsize=7)
            ax.set_ylim(-0.6, 2.6)
            ax.set_title(f"{layer} {'weights' if j == 0 else 'inputs'}", fontsize=8)
            ax.grid(axis="y", visible=False)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, label)
    return fig


def entropy_by_layer(runs: dict, variants, bits: int, seeds, title: str, label: str):
    """Code entropy (bits) per layer of the weights and of the inputs, mean over seeds, per variant."""
    first = runs[variants[0], bits, seeds[0]]
    layers = list(first["entropy"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for j, part in enumerate(("weight", "input")):
        ax = axes[j]
        for v in variants:
            vals = np.array([[runs[v, bits, s]["entropy"][n][part] or np.nan for n in layers] for s in seeds])
            ax.plot(range(len(layers)), vals.mean(0), "o-", ms=3, color=COLORS.get(v), label=v)
        ax.axhline(bits, color="k", lw=0.8, ls=":")
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
        ax.set_ylabel(f"{part} code entropy (bits)")
        ax.set_title(f"{part}s, W/A {bits}/{bits} (dotted: {bits} bits; first/last layer 8-bit)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, label)
    return fig
