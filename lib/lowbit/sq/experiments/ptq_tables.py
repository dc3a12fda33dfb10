"""What notebook 03 runs: SQ Tables 2-3 cells on our CPU-scale models, cached.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Tables 2-3 and supplement Table 2: one cell is "quantize the committed FP model
with one method and bit width, calibrate on ``calib_size`` training images drawn with ``seed``,
test top-1". Results go through :func:`lowbit.results.cached` (``data/derived/sq_*-*.json``).
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from ... import data, evaluate, models as model_zoo
from ...core.validation import device_key
from ...nn.fold_bn import fold_bn
from ...nn.layers import quantized_layers
from ...results import cached
from ..model_search import search_model
from ..ptq import FitCache, PTQConfig, quantize_model


def run_ptq(model: str, dataset: str, method: str, w_bits: int, a_bits: int | None = None,
            refine=False, seed: int = 0, calib_size: int = 1024, test_size: int | None = None,
            first_last_bits: int = 8, universal=5, max_rows: int = 16384, refine_size: int | None = None,
            device=None) -> dict:
    """One cell of SQ Tables 2-3: quantize the committed FP ``model``/``dataset`` and test it.

    ``dataset="imagenet"``: torchvision's ``model`` with this process's ImageNet weights and data
    (:func:`lowbit.imagenet.use`), the paper's setting. The calibration set is ``calib_size``
    training images drawn with ``seed`` (:func:`lowbit.data.calibration_subset`); accuracy is top-1 %
    on the first ``test_size`` test (ImageNet: validation) images, all by default. ``device``: where
    the quantized model runs and is evaluated (``PTQConfig.device``). Returns ``{"accuracy", "fp_accuracy", "seconds", "threads",
    "weight_mse"}`` (compute wall time and torch threads; mean weight MSE over the body layers)
    -- JSON-able, for
    :func:`lowbit.results.cached`.
    """
    started = time.time()
    fp = model_zoo.load_pretrained(model, dataset)
    test = data.head(data.load_dataset(dataset, "test"), test_size)
    needs_calib = a_bits is not None or bool(refine)
    calib = (data.calibration_subset(data.load_dataset(dataset, "train"), calib_size, seed)
             if needs_calib else None)
    fits = _FITS  # one memo per process: the cells of a notebook that quantize the same network fit each layer once
    if method == "sq":  # reuse (or store) the per-layer searches in data/derived/sq_search_model-*.json
        fits.prime_sq(fp, w_bits, universal, tag=f"{model}-{dataset}")
    config = PTQConfig(method, w_bits, a_bits=a_bits, first_last_bits=first_last_bits, refine=refine, seed=seed,
                       max_rows=max_rows, universal=universal, refine_size=refine_size, device=device)
    qmodel = quantize_model(fp, config=config, calib=calib, fits=fits)
    body = [layer.weight_mse() for _, layer in quantized_layers(qmodel) if layer.role == "body"]
    return {"accuracy": evaluate.accuracy(qmodel, test, device=device),
            "fp_accuracy": evaluate.checkpoint_accuracy(fp, model, dataset, test),  # once per process
            "seconds": time.time() - started, "threads": torch.get_num_threads(),
            "weight_mse": float(np.mean(body)) if body else 0.0}


_FITS = FitCache(max_size=2048)  # run_ptq's fits: deterministic in the weights and settings, returned as copies


def degradation_cell(fp_accuracy: float, accuracies) -> str:
    """SQ's table format: accuracy drop from FP with the accuracy in parentheses,
    ``"drop +- std (acc)"`` over seeds (``+-`` omitted for a single value)."""
    acc = np.asarray(list(accuracies), dtype=np.float64)
    if acc.size == 0:
        return "-"
    drop = fp_accuracy - acc
    if acc.size == 1:
        return f"{drop[0]:.2f} ({acc[0]:.2f})"
    return f"{drop.mean():.2f} \u00b1 {drop.std(ddof=1):.2f} ({acc.mean():.2f})"


def cached_run(model: str, dataset: str, method: str, w_bits: int, a_bits: int | None = None, refine=False,
               seed: int = 0, calib_size: int = 1024, test_size: int | None = None, universal=5,
               refine_size: int | None = None, device=None) -> dict:
    """:func:`run_ptq` through :func:`lowbit.results.cached` (``data/derived/sq_ptq_run-*.json``).

    Weight-only PTQ without refinement uses no calibration data, so its result does not depend
    on ``seed``/``calib_size``: they are left out of its cache key (one run serves every seed).
    A ``device`` other than the CPU, and an ImageNet network's weights and folder, are part of the key.
    """
    uses_calib = a_bits is not None or bool(refine)
    config = dict(model=model, dataset=dataset, method=method, w_bits=w_bits, a_bits=a_bits,
                  refine=refine, seed=seed if uses_calib else None, calib_size=calib_size if uses_calib else None,
                  test_size=test_size, first_last_bits=8, universal=universal if method == "sq" else None,
                  version=1)
    if refine and refine_size is not None and refine_size < calib_size:
        config["refine_size"] = refine_size
    else:
        refine_size = None
    config.update(device_key(device), **model_zoo.imagenet_key(model, dataset))
    return cached("sq_ptq_run", config, lambda: run_ptq(
        model, dataset, method, w_bits, a_bits=a_bits, refine=refine, seed=seed, calib_size=calib_size,
        test_size=test_size, universal=universal, refine_size=refine_size, device=device))


# ----------------------------------------------------------------------------- notebook 03's tables
ROWS = (  # (table row label, method, refine)
    ("uniform", "uniform", False),
    ("log2", "log2", False),
    ("two-word log (2 words)", "two_word_log", False),
    ("APoT", "apot", False),
    ("SQ weight-only", "sq", False),
    ("uniform + refine", "uniform", True),
    ("SQ + refine", "sq", True),
)


class PTQStudy:
    """Notebook 03's cached table cells for one profile, recording what each cell cost when computed.

    ``cfg``: the profile's settings (``models`` as ``"model/dataset"`` keys, ``seeds``, ``test_size``,
    ``refine_size`` per key, ``calib_size``, optionally ``device``); ``universal``: SQ's universal set for
    the SQ rows. A ``"<model>/imagenet"`` key is torchvision's network with the process's ImageNet inputs.
    ``cost`` lists ``(cell, network, part, seconds, threads)`` of every cached run read, the cold cost.
    """

    def __init__(self, cfg: dict, universal=5):
        self.cfg, self.universal = cfg, universal
        self.cost: list[dict] = []
        self.fp_accuracy: dict[str, float] = {}

    def available(self) -> tuple[list[str], list[str]]:
        """``(models with a committed FP checkpoint or given ImageNet weights, models without)`` of
        ``cfg["models"]``."""
        have = [k for k in self.cfg["models"] if model_zoo.available(*k.split("/"))]
        return have, [k for k in self.cfg["models"] if k not in have]

    def seeds_for(self, key: str, a_bits, refine) -> list[int]:
        """Calibration seeds of a cell: every seed when it uses calibration data, else ``[0]``."""
        return self.cfg["seeds"][key] if (a_bits is not None or refine) else [0]

    def run(self, key: str, method: str, w_bits: int, a_bits=None, refine=False, seed: int = 0, universal=None) -> dict:
        """One table cell (:func:`cached_run`); weight-only cells without refinement run once."""
        universal = self.universal if universal is None else universal
        model, dataset = key.split("/")
        r = cached_run(model, dataset, method, w_bits, a_bits, refine, seed, self.cfg["calib_size"],
                       self.cfg["test_size"].get(key), universal, self.cfg["refine_size"].get(key),
                       self.cfg.get("device"))
        self.fp_accuracy[key] = r["fp_accuracy"]
        part = ("refine" if refine else "no refine") + (", activations" if a_bits else ", weight-only")
        self.cost.append(dict(cell=(key, method, w_bits, a_bits, refine, seed, repr(universal)), network=key,
                              part=part, seconds=r["seconds"], threads=r.get("threads")))
        return r

    def search_seconds(self, key: str, bits: int, option) -> list[dict]:
        """SQ's per-layer searches behind a cell (cached model-level search), counted in the cold cost."""
        model, dataset = key.split("/")
        found = search_model(fold_bn(model_zoo.load_pretrained(model, dataset)), bits, option,
                             tag=f"{model}-{dataset}")
        self.cost.append(dict(cell=("search", key, bits, repr(option)), network=key, part="SQ searches",
                              seconds=sum(r["seconds"] for r in found), threads=None))
        return found

    def cells(self, models: list[str], configs, table: int):
        """Every cell of Table 2 (``configs``: weight bits) or 3 (``configs``: ``(w_bits, a_bits)``), as a DataFrame."""
        raw = []
        for key in models:
            for label, method, refine in ROWS:
                for c in configs:
                    w_bits, a_bits = (c, None) if table == 2 else c
                    for seed in self.seeds_for(key, a_bits, refine):
                        r = self.run(key, method, w_bits, a_bits, refine, seed)
                        raw.append(dict(table=table, network=key, row=label, method=method, refine=refine,
                                        w_bits=w_bits, a_bits=a_bits, seed=seed, accuracy=r["accuracy"],
                                        seconds=r["seconds"]))
        return pd.DataFrame(raw)

    def table_rows(self, df, models: list[str], configs) -> list[dict]:
        """SQ's table layout: one row per (network, method), one ``drop +- std (acc)`` column per config."""
        out = []
        for key in models:
            fp = self.fp_accuracy[key]
            for label, _, _ in ROWS:
                row = {"network": key, "method": label, "FP": f"{fp:.2f}"}
                for c in configs:
                    sel = cell_accuracies(df, key, label, *((c, None) if isinstance(c, int) else c))
                    row[f"{c}/32" if isinstance(c, int) else "/".join(map(str, c))] = degradation_cell(fp, sel)
                out.append(row)
        return out

    def supplement_rows(self, key: str, bits: int, options) -> list[dict]:
        """Supplement Table 2's 'wgt. only' and 'final opt.' rows for each universal-set option."""
        rows = []
        for option in options:
            accs = [self.run(key, "sq", bits, None, True, seed, universal=option)["accuracy"]
                    for seed in self.cfg["seeds"][key]]
            r = self.run(key, "sq", bits, None, False, 0, universal=option)
            rows.append({"option": option, "network": key, "bits": bits, "FP": r["fp_accuracy"],
                         "top1_wgt_only": r["accuracy"], "top1_final_opt": float(np.mean(accs)),
                         "top1_final_opt_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                         "seeds": len(accs)})
        return rows

    def cost_table(self):
        """Compute minutes, runs and threads per network and part (a cell read twice counts once)."""
        cost = pd.DataFrame(self.cost).drop_duplicates("cell")
        by = cost.groupby(["network", "part"]).agg(
            runs=("seconds", "size"), minutes=("seconds", lambda s: s.sum() / 60),
            threads=("threads", lambda t: ",".join(sorted({str(int(v)) for v in t.dropna()})) or "-"))
        return by, float(cost.seconds.sum()), len(cost)


def cell_accuracies(df, key: str, row: str, w_bits: int, a_bits=None):
    """The accuracies (one per seed) of one cell of a :meth:`PTQStudy.cells` frame."""
    sel = df[(df.network == key) & (df.row == row) & (df.w_bits == w_bits)]
    sel = sel[sel.a_bits.isna()] if a_bits is None else sel[sel.a_bits == a_bits]
    return sel.accuracy


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (0 for a single value) of a cell's accuracies."""
    v = np.asarray(list(values), dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def format_mean_std(m_s: tuple[float, float]) -> str:
    """``"93.10 ± 0.05"`` (``"93.10"`` when the std is 0)."""
    return f"{m_s[0]:.2f}" + (f" \u00b1 {m_s[1]:.2f}" if m_s[1] else "")


def sq_vs_baselines(t2, t3, models: list[str]) -> list[str]:
    """The notebook's claim check: SQ weight-only against uniform and APoT, SQ + refine against
    uniform + refine, at W3, W2, W3A3 and W2A4 where those cells exist; one line per check."""
    lines = []
    for key in models:
        for df, w_bits, a_bits in [(t2, 3, None), (t2, 2, None), (t3, 3, 3), (t3, 2, 4)]:
            if w_bits not in set(df[df.network == key].w_bits) or (a_bits and a_bits not in set(df.a_bits.dropna())):
                continue
            name = f"W{w_bits}" + (f"A{a_bits}" if a_bits else "")
            sq, un, ap, sqr, unr = (mean_std(cell_accuracies(df, key, r, w_bits, a_bits)) for r in
                                    ("SQ weight-only", "uniform", "APoT", "SQ + refine", "uniform + refine"))
            lines.append(f"{key} {name}: SQ {format_mean_std(sq)} vs uniform {format_mean_std(un)} / APoT "
                         f"{format_mean_std(ap)} -> SQ >= both: {sq[0] >= max(un[0], ap[0])}; SQ+refine "
                         f"{format_mean_std(sqr)} vs uniform+refine {format_mean_std(unr)} -> {sqr[0] >= unr[0]}")
    return lines
