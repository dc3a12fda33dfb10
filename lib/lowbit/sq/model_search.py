"""SQ's QPS search on every layer of a model: the one model-level driver of Algorithm 1.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Algorithm 1 per layer; supplement Table 2 times it over a whole network. The
first and last layers are skipped (they stay at 8-bit uniform, SQ sec. 4.1). Results are cached
in ``data/derived/sq_search_model-*.json`` keyed by a hash of the weights, so the searches of
notebook 01 serve notebook 03 (:meth:`lowbit.sq.ptq.FitCache.prime_sq`).
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from tqdm import tqdm  # plain bars: tqdm.auto warns in notebooks without ipywidgets

from ..nn.graph import quantizable_layers
from ..results import cached
from .search import search_qps


def search_model(model: torch.nn.Module, bits: int, universal=5, tag: str | None = None,
                 skip_first_last: bool = True, progress: bool = False) -> list[dict]:
    """:func:`search_qps` (channel granularity, fast) on every conv/linear weight of ``model``.

    Returns one dict per layer: ``layer``, ``shape``, ``points``, ``scale`` (per channel),
    ``loss``, ``energy`` (sum w^2), ``candidates``, ``seconds`` (wall), ``cpu_seconds`` (this
    process, all threads: comparable on a shared machine), ``threads``, ``pairs_evaluated``
    (after pruning), ``mean_iterations`` (per evaluated pair), ``not_converged``. The first
    and last layers are skipped by default (the paper keeps them at 8 bits). With ``tag``
    (e.g. ``"resnet20-fashion-mnist"``) the result is cached in
    ``data/derived/sq_search_model-*.json`` keyed by the tag, bits, option and a hash of the
    weights, so the measured ``seconds`` are those of the run that computed it.
    """
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no Conv2d/Linear layers to search")
    if skip_first_last:
        layers = layers[1:-1]
    digest = hashlib.sha256()
    for name, m in layers:
        digest.update(name.encode())
        digest.update(m.weight.detach().to("cpu", torch.float64).numpy().tobytes())
    option = universal if isinstance(universal, int) else [list(map(float, x)) for x in universal]

    def compute():
        out = []
        for name, m in tqdm(layers, desc=f"QPS search ({bits}-bit, option {option})", disable=not progress):
            w = m.weight.detach().to("cpu", torch.float64)
            cpu0 = time.process_time()
            res = search_qps(w, bits, universal=universal)
            out.append({"layer": name, "shape": list(w.shape), "points": res.points.tolist(),
                        "scale": np.asarray(res.scale).tolist(), "loss": res.loss, "energy": float((w * w).sum()),
                        "candidates": res.candidates, "seconds": res.seconds,
                        "cpu_seconds": time.process_time() - cpu0, "threads": torch.get_num_threads(),
                        "backend": res.backend, "pairs_evaluated": res.pairs,
                        "mean_iterations": res.iterations / res.pairs, "not_converged": res.not_converged})
        return out

    if tag is None:
        return compute()
    config = {"record": 2, "tag": tag, "bits": int(bits), "universal": option, "weights_sha256": digest.hexdigest(),
              "skip_first_last": skip_first_last, "granularity": "channel", "tol": 1e-5, "max_iter": 1000}
    return cached("sq_search_model", config, compute)
