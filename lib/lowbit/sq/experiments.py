"""What notebooks 01-03 run: SQ table cells on our CPU-scale models, cached.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022), Tables 2-3 and supplement Table 2: one cell is "quantize the committed FP model
with one method and bit width, calibrate on ``calib_size`` training images drawn with ``seed``,
test top-1". Results go through :func:`lowbit.results.cached` (``data/derived/sq_*-*.json``).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import data, evaluate, models as model_zoo
from ..nn.layers import quantized_layers
from ..results import cached
from .ptq import FitCache, PTQConfig, quantize_model


def run_ptq(model: str, dataset: str, method: str, w_bits: int, a_bits: int | None = None,
            refine=False, seed: int = 0, calib_size: int = 1024, test_size: int | None = None,
            first_last_bits: int = 8, universal=5, max_rows: int = 16384, refine_size: int | None = None) -> dict:
    """One cell of SQ Tables 2-3: quantize the committed FP ``model``/``dataset`` and test it.

    The calibration set is ``calib_size`` training images drawn with ``seed``
    (:func:`lowbit.data.calibration_subset`); accuracy is top-1 % on the first ``test_size``
    test images (all by default). Returns ``{"accuracy", "fp_accuracy", "seconds", "threads",
    "weight_mse"}`` (compute wall time and torch threads; mean weight MSE over the body layers)
    -- JSON-able, for
    :func:`lowbit.results.cached`.
    """
    started = time.time()
    fp = model_zoo.load_pretrained(model, dataset)
    test = data.load_dataset(dataset, "test")
    if test_size is not None and test_size < len(test):
        test = data.TensorImageDataset(test.images[:test_size], test.labels[:test_size], test.name, test.split)
    needs_calib = a_bits is not None or bool(refine)
    calib = (data.calibration_subset(data.load_dataset(dataset, "train"), calib_size, seed)
             if needs_calib else None)
    fits = FitCache()
    if method == "sq":  # reuse (or store) the per-layer searches in data/derived/sq_search_model-*.json
        fits.prime_sq(fp, w_bits, universal, tag=f"{model}-{dataset}")
    config = PTQConfig(method, w_bits, a_bits=a_bits, first_last_bits=first_last_bits, refine=refine, seed=seed,
                       max_rows=max_rows, universal=universal, refine_size=refine_size)
    qmodel = quantize_model(fp, config=config, calib=calib, fits=fits)
    body = [layer.weight_mse() for _, layer in quantized_layers(qmodel) if layer.role == "body"]
    return {"accuracy": evaluate.accuracy(qmodel, test),
            "fp_accuracy": evaluate.checkpoint_accuracy(fp, model, dataset, test),  # once per process
            "seconds": time.time() - started, "threads": torch.get_num_threads(),
            "weight_mse": float(np.mean(body)) if body else 0.0}


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
               refine_size: int | None = None) -> dict:
    """:func:`run_ptq` through :func:`lowbit.results.cached` (``data/derived/sq_ptq_run-*.json``).

    Weight-only PTQ without refinement uses no calibration data, so its result does not depend
    on ``seed``/``calib_size``: they are left out of its cache key (one run serves every seed).
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
    return cached("sq_ptq_run", config, lambda: run_ptq(
        model, dataset, method, w_bits, a_bits=a_bits, refine=refine, seed=seed, calib_size=calib_size,
        test_size=test_size, universal=universal, refine_size=refine_size))
