"""The peer libraries' baselines of notebook 08, run on the same models, calibration images and test
images as notebook 03's PTQ, cached.

AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort, *Up or Down? Adaptive Rounding for
Post-Training Quantization*, ICML 2020) by AIMET and GPTQ (Frantar, Ashkboos, Hoefler, Alistarh,
*GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers*, ICLR 2023) by
Brevitas, through the thin adapters of :mod:`lowbit.peers` (no re-implementation here). One run is
"quantize the committed FP model weight-only at ``w_bits`` (first/last layer 8 bits), calibrating on
``calib_size`` training images drawn with ``seed`` (:func:`lowbit.data.calibration_subset`, the draw
of notebook 03's :func:`lowbit.sq.experiments.ptq_tables.run_ptq`), test top-1 on the first
``test_size`` test images". Results go through :func:`lowbit.results.cached`
(``data/derived/peer_run-*.json``); :func:`peer_rows` reads them back as notebook 08's rows.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm  # plain bars: tqdm.auto warns in notebooks without ipywidgets

from .. import data, evaluate, models as model_zoo
from ..lsq.experiments.runs import _std
from ..peers import METHODS, aimet, brevitas, quantize_with_peer
from ..peers.common import check_count, version
from ..results import cached, records

NAME = "peer_run"
LABELS = {"aimet-adaround": "AIMET AdaRound", "brevitas-gptq": "Brevitas GPTQ",
          "brevitas-learned-round": "Brevitas learned round"}
ITERATED = ("aimet-adaround", "brevitas-learned-round")  # the methods with an iteration count per layer
# the PyPI distribution of each method's library (its version is part of a run's cache key)
DISTRIBUTIONS = {"aimet-adaround": aimet.LIBRARY, "brevitas-gptq": brevitas.LIBRARY,
                 "brevitas-learned-round": brevitas.LIBRARY}


def _config(model: str, dataset: str, method: str, w_bits: int, iterations, seed: int, calib_size: int,
            test_size) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown peer method {method!r}: use one of {METHODS}")
    if method in ITERATED:
        iterations = check_count(iterations, "iterations", 500)
    elif iterations is not None:
        raise ValueError(f"{method} has no iteration count: pass iterations=None")
    return dict(model=model, dataset=dataset, method=method, w_bits=int(w_bits), a_bits=None, iterations=iterations,
                seed=int(seed), calib_size=check_count(calib_size, "calib_size", 1024), test_size=test_size,
                first_last_bits=8, library=DISTRIBUTIONS[method], library_version=version(DISTRIBUTIONS[method]),
                **model_zoo.imagenet_key(model, dataset))


def run_peer(model: str, dataset: str, method: str, w_bits: int, iterations=None, seed: int = 0,
             calib_size: int = 1024, test_size: int | None = None) -> dict:
    """One peer run (module docstring): ``{"accuracy", "fp_accuracy", "seconds", "library_seconds",
    "threads", "iterations"}``; ``seconds`` is the whole run's wall time (as notebook 03's), ``library_seconds``
    the library call alone."""
    _config(model, dataset, method, w_bits, iterations, seed, calib_size, test_size)  # checks up front
    started = time.time()
    fp = model_zoo.load_pretrained(model, dataset)
    test = data.head(data.load_dataset(dataset, "test"), test_size)
    calib = data.calibration_subset(data.load_dataset(dataset, "train"), calib_size, seed)
    options = {"iterations": iterations} if method in ITERATED else {}
    qmodel, info = quantize_with_peer(fp, method, calib, w_bits, seed=seed, **options)
    return {"accuracy": evaluate.accuracy(qmodel, test),
            "fp_accuracy": evaluate.checkpoint_accuracy(fp, model, dataset, test),
            "seconds": time.time() - started, "library_seconds": info["seconds"], "threads": torch.get_num_threads(),
            "iterations": info["iterations"]}


def cached_peer(model: str, dataset: str, method: str, w_bits: int, iterations=None, seed: int = 0,
                calib_size: int = 1024, test_size: int | None = None) -> dict:
    """:func:`run_peer` through :func:`lowbit.results.cached`; the library's version is part of the key."""
    config = _config(model, dataset, method, w_bits, iterations, seed, calib_size, test_size)
    return cached(NAME, config, lambda: run_peer(model, dataset, method, w_bits, iterations, seed, calib_size,
                                                 test_size))


def run_grid(runs, seeds, calib_size: int, progress: bool = True) -> list[dict]:
    """Every ``(model, dataset, method, w_bits, iterations, test_size)`` of ``runs`` at every seed of
    ``seeds``, cached (a tqdm bar over the runs): ``[{**result, **run, "seed"}]``."""
    todo = [(r, s) for r in runs for s in seeds]
    out = []
    for (model, dataset, method, w_bits, iterations, test_size), seed in tqdm(todo, desc="peer runs",
                                                                                disable=not progress):
        res = cached_peer(model, dataset, method, w_bits, iterations, seed, calib_size, test_size)
        out.append(dict(res, model=model, dataset=dataset, method=method, w_bits=w_bits, iterations=iterations,
                        test_size=test_size, seed=seed))
    return out


def peer_label(method: str, iterations) -> str:
    """The row name: ``"AIMET AdaRound (500 it)"``, ``"Brevitas GPTQ"``."""
    return LABELS[method] + (f" ({iterations} it)" if iterations is not None else "")


def peer_groups(model: str, dataset: str, w_bits: int, calib_size: int | None = None) -> dict:
    """``{(method, iterations, test_size): [payload, ...]}`` of the cached peer runs of one setting
    (this process's ImageNet weights and folder for an ImageNet network; ``calib_size`` when given)."""
    identity = model_zoo.imagenet_key(model, dataset).items()
    out: dict = {}
    for rec in records(NAME):
        c = rec["config"]
        if ((c.get("model"), c.get("dataset"), c.get("w_bits")) == (model, dataset, w_bits)
                and (calib_size is None or c.get("calib_size") == calib_size) and all(c.get(k) == v for k, v in identity)):
            out.setdefault((c["method"], c["iterations"], c["test_size"]), []).append(rec["payload"])
    return out


def group_order(item) -> tuple:
    """Sort key of a :func:`peer_groups` item: by method, then iteration count as a number."""
    (method, iterations, test_n), _ = item
    return method, iterations or 0, str(test_n)


def iteration_rows(model: str, dataset: str, w_bits: int, calib_size: int | None = None) -> list[dict]:
    """How a peer's accuracy and time move with its iterations per layer: one row per cached
    ``(method, iterations)`` of the setting, mean +- sample std over its seeds."""
    rows = []
    groups = peer_groups(model, dataset, w_bits, calib_size)
    for (method, iterations, test_n), ps in sorted(groups.items(), key=group_order):
        acc = np.array([p["accuracy"] for p in ps], dtype=np.float64)
        rows.append({"network": f"{model}/{dataset}", "W": w_bits, "method": LABELS[method], "iterations": iterations,
                     "top-1": float(acc.mean()), "std": _std(acc),
                     "seeds": int(acc.size), "test images": test_n or "all",
                     "seconds": float(np.mean([p["seconds"] for p in ps]))})
    return rows
