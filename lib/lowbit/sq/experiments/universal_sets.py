"""What notebook 01 runs: SQ Table 1's universal sets and supplement Table 2 on our models.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Table 1 and supplementary Table 2: for each
universal-set option, |S_U|, the QPS count, the exhaustive search time, the weight error and the
weight-only top-1 (nothing folded, activations FP; first and last layer at 8-bit uniform with the
MSE-fitted scale of :func:`lowbit.sq.quantizers.fit_scale`, the one first/last rule of
:func:`lowbit.sq.ptq.quantize_model`).
"""
from __future__ import annotations

import csv

import numpy as np
import torch

from ... import data, evaluate, models as model_zoo
from ...nn.graph import quantizable_layers
from ...paths import project_root
from ...results import cached
from ..hw import shifter_cost
from ..model_search import search_model
from ..scale import optimal_scale
from ..search import search_qps
from ..ptq import FitCache, quantize_model
from ..universal import CHOSEN_OPTION, PAPER_QPS_COUNT_4BIT, PAPER_SET_SIZE, option_terms, qps_count, set_size

# supplement Table 2 (ResNet-18, ImageNet, 4 bits): search time on the authors' GPU and weight-only top-1
PAPER_SEARCH_TIME = {1: "0.03 h", 2: "1 h", 3: "2 h", 4: "40 h", 5: "0.5 h"}
PAPER_TOP1_WGT_ONLY = {1: 67.14, 2: 68.63, 3: 68.57, 4: 68.69, 5: 68.50}


def format_terms(terms) -> str:
    """A term set as powers of two: ``{2^0, 2^-1, 0}``."""
    return "{" + ", ".join("0" if t == 0 else f"2^{int(np.log2(t))}" for t in terms) + "}"


def universal_set_rows(options) -> list[dict]:
    """SQ Table 1 with supplement Table 2's rows 1-2: terms, |S_U| and QPS counts, ours next to the paper's."""
    rows = []
    for o in options:
        a, b = option_terms(o)
        rows.append({
            "option": f"{o}*" if o == CHOSEN_OPTION else str(o),
            "A": format_terms(a), "B": format_terms(b),
            "|S_U|": set_size(o), "paper |S_U|": PAPER_SET_SIZE[o],
            "pairs a+b": len(a) * len(b),
            "QPS 4-bit": qps_count(o, 4), "paper QPS 4-bit": PAPER_QPS_COUNT_4BIT[o],
            "QPS 3-bit": qps_count(o, 3), "QPS 2-bit": qps_count(o, 2),
        })
    return rows


def weight_only_top1(model, test, bits: int, option, searches_tag: str) -> float:
    """Top-1 % of ``model`` with SQ weights (body layers, the cached searches) and 8-bit uniform
    first/last layers, nothing folded, activations FP."""
    fits = FitCache()
    fits.prime_sq(model, bits, option, tag=searches_tag, fold=False)
    return evaluate.accuracy(quantize_model(model, "sq", bits, universal=option, fold=False, fits=fits), test)


def option_records(models, bits_list, options, test_size: int | None = None) -> list[dict]:
    """One record per (model, bits, option): search cost and weight error (from the cached model-level
    searches) and weight-only top-1 (cached in ``data/derived/sq_supp_wonly_top1-*.json``)."""
    records = []
    for name, dataset in models:
        model = model_zoo.load_pretrained(name, dataset)
        test = data.head(data.load_dataset(dataset, "test"), test_size or None)
        sha = model_zoo.weights_identity(name, dataset)
        fp_top1 = cached("sq_supp_fp_top1", {"model": name, "dataset": dataset, "sha": sha, "n": len(test)},
                         lambda: evaluate.accuracy(model, test))
        tag = f"{name}-{dataset}"
        for bits in bits_list:
            for o in options:
                found = search_model(model, bits, o, tag=tag)
                config = {"model": name, "dataset": dataset, "sha": sha, "bits": bits, "option": o, "n": len(test),
                          "first_last": "uniform-8bit-mse"}
                acc = cached("sq_supp_wonly_top1", config,
                             lambda: weight_only_top1(model, test, bits, o, tag))  # noqa: B023 (called at once)
                records.append({
                    "model": f"{name}/{dataset}", "bits": bits, "option": o, "fp_top1": fp_top1, "top1": acc,
                    "candidates": found[0]["candidates"], "search_s": sum(f["seconds"] for f in found),
                    "search_cpu_s": sum(f["cpu_seconds"] for f in found),
                    "pairs_evaluated": sum(f["pairs_evaluated"] for f in found)
                    / sum(f["candidates"] * f["shape"][0] for f in found),
                    "iterations": float(np.mean([f["mean_iterations"] for f in found])),
                    "rel_error": sum(f["loss"] for f in found) / sum(f["energy"] for f in found),
                    "points": {f["layer"]: f["points"] for f in found},
                })
    return records


def final_opt_from_notebook03() -> dict:
    """``{(network, bits, option): top-1 final opt.}`` from notebook 03's committed table
    (``figures/sq_supp_table2_final_opt.csv``); empty when it has not been written."""
    path = project_root() / "figures" / "sq_supp_table2_final_opt.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        return {(r["network"], int(r["bits"]), int(r["option"])): round(float(r["top1_final_opt"]), 2)
                for r in csv.DictReader(f)}


def supplement_table2_rows(records: list[dict]) -> list[dict]:
    """Supplement Table 2 laid out with ours next to the paper's, one row per record."""
    final_opt = final_opt_from_notebook03()
    return [{
        "model": r["model"], "bits": r["bits"], "option": r["option"], "QPS": r["candidates"],
        "search (s, ours)": round(r["search_s"], 1), "search CPU (s, ours)": round(r["search_cpu_s"], 1),
        "pairs evaluated %": round(100 * r["pairs_evaluated"], 1),
        "paper search (4-bit)": PAPER_SEARCH_TIME[r["option"]],
        "mean iterations": round(r["iterations"], 1),
        "weight error (rel. MSE %)": round(100 * r["rel_error"], 3),
        "FP top-1": round(r["fp_top1"], 2), "top-1 wgt. only": round(r["top1"], 2),
        "paper top-1 wgt. only (W4, ImageNet)": PAPER_TOP1_WGT_ONLY[r["option"]],
        "relative HW cost": shifter_cost(r["option"], input_bits=4),
        "top-1 final opt.": final_opt.get((r["model"], r["bits"], r["option"]), "not run"),
    } for r in records]


def per_channel_fit_loss(weight, points) -> float:
    """Eq. 9 summed over output channels when each channel gets its own eqs. 8-10 scale for ``points``."""
    rows = weight.detach().to("cpu").double().reshape(weight.shape[0], -1).numpy()
    return float(sum(optimal_scale(row, points).loss for row in rows if np.any(row)))


def layer_scale_search_rows(model, bits: int, option: int = 5, tag: str | None = None) -> list[dict]:
    """The authors' search vs ours, per body layer of ``model`` (every conv/linear but the first and last).

    The SQ authors' code searches each layer's QPS with **one scale for the whole layer** and fits
    per-channel scales only afterwards; notebook 01 (and :func:`lowbit.sq.ptq.quantize_model`) searches
    with one scale per output channel (Algorithm 1 with channel granularity). Per layer: the QPS each
    search picks (ours from the cached model-level search, ``tag``), whether they agree, and the
    weight error (eq. 9 summed over channels, every channel with its own fitted scale, the same
    :func:`lowbit.sq.scale.optimal_scale` for both QPS) of each, with their ratio.
    """
    ours = {r["layer"]: r for r in search_model(model, bits, option, tag=tag)}
    rows = []
    for name, layer in quantizable_layers(model)[1:-1]:
        w = layer.weight.detach().to("cpu", torch.float64)
        per_layer = search_qps(w, bits, universal=option, granularity="layer")
        ch_points = np.asarray(ours[name]["points"], dtype=np.float64)
        same = bool(np.array_equal(per_layer.points, ch_points))
        loss_ch = per_channel_fit_loss(w, ch_points)
        loss_layer = loss_ch if same else per_channel_fit_loss(w, per_layer.points)
        rows.append({"layer": name, "channels": int(w.shape[0]), "same QPS": same,
                     "error, per-channel search": loss_ch, "error, per-layer search then per-channel scales": loss_layer,
                     "ratio": loss_layer / loss_ch if loss_ch > 0 else 1.0})
    return rows


def layer_scale_study(models, bits_list, option: int = 5) -> list[dict]:
    """:func:`layer_scale_search_rows` of every ``(model, dataset)`` and bit width (the committed FP
    models, the cached searches of :func:`option_records`), one row per layer with ``model`` and ``bits``."""
    rows = []
    for name, dataset in models:
        model = model_zoo.load_pretrained(name, dataset)
        for bits in bits_list:
            rows += [{"model": f"{name}/{dataset}", "bits": bits, **r}
                     for r in layer_scale_search_rows(model, bits, option, tag=f"{name}-{dataset}")]
    return rows


def layer_scale_summary(rows: list[dict]) -> list[str]:
    """Per model and bit width: how many layers keep their QPS under the per-layer search, and the
    weight error that search costs once both get per-channel scales (total and worst layer)."""
    out = []
    for key in dict.fromkeys((r["model"], r["bits"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["bits"]) == key]
        ours = sum(r["error, per-channel search"] for r in rs)
        theirs = sum(r["error, per-layer search then per-channel scales"] for r in rs)
        worst = max(rs, key=lambda r: r["ratio"])
        out.append(f"{key[0]} W{key[1]}: same QPS in {sum(r['same QPS'] for r in rs)} of {len(rs)} layers; weight "
                   f"error {100 * (theirs / ours - 1):+.2f} % in total with the per-layer search (worst layer "
                   f"{worst['layer']}: {worst['ratio']:.3f}x)")
    return out
