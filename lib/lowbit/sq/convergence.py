"""What notebook 02 runs: does SQ's scale-factor iteration converge, and to what?

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 and Fig. 3: the
scale factor of a QPS is found by iterating eqs. 8-10 from "alpha = 1" until alpha changes by less
than 1e-5; the paper reports convergence "within 17 iterations" on average and argues with Fig. 3
that the loss may rise temporarily but cannot oscillate.

The study, on the SQ layers of our FP models and on synthetic weights (:func:`study_tensors`):

* :func:`census`: every (QPS, channel) pair of an option run by the exact fast search
  (:func:`lowbit.sq.search.search_qps` with ``prune=False``): eq. 10 updates, non-convergence;
* :func:`traced_runs`: a seeded sample of (tensor, channel, QPS) runs traced step by step
  (:func:`lowbit.sq.scale.convergence_record`: loss rises, case-3 events, oscillation, gap to the
  exact global optimum :func:`lowbit.sq.scale.global_optimal_scale`);
* :func:`winner_records`: whether the global-optimal scale changes the QPS Algorithm 1 picks
  (:func:`candidate_losses_global`);
* :func:`fig3_cases` / :func:`fig3_subcases` / :func:`worked_trajectory`: Fig. 3 redrawn and a
  worked trajectory with a case-3 event.

Each study is cached through :func:`lowbit.results.cached` under ``data/derived/sq_convergence_*``;
the config dicts (the cache keys) are the ones the notebook has always used, so the committed
caches are found.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from .. import models as model_zoo
from ..nn.graph import quantizable_layers
from ..results import cached
from .scale import convergence_record, global_optimal_scale, nearest_points, optimal_scale
from .search import search_qps, weight_rows
from .universal import enumerate_qps, qps_indices, universal_set

WINNER_3BIT_MAX_WEIGHTS = 16 * 600  # the global-scale comparison is a plain loop: 3-bit on small tensors only


def tensor_sha(w: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes: the weight's part of every cache key here."""
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


def synthetic_tensors(shape) -> dict[str, torch.Tensor]:
    """Gaussian, Laplace(0, 1) and uniform(-1, 1) float64 weights of ``shape`` (channels first).

    Gaussian and uniform come from one generator seeded 0, Laplace from torch's global generator
    seeded 0 (restored afterwards): the tensors the committed caches were computed on."""
    c, n = shape
    gen = torch.Generator().manual_seed(0)
    gaussian = torch.randn(c, n, generator=gen, dtype=torch.float64)
    uniform = torch.rand(c, n, generator=gen, dtype=torch.float64) * 2 - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        laplace = torch.distributions.Laplace(0.0, 1.0).sample((c, n)).double()
    return {"synthetic gaussian": gaussian, "synthetic laplace": laplace, "synthetic uniform": uniform}


def model_tensors(models) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The SQ layers (every conv/linear but the first and the last) of each ``(name, dataset)``
    FP checkpoint (``"imagenet"``: torchvision's network with the process's ImageNet weights), as
    float64 weights named ``"name/dataset layer"``; and the missing checkpoints."""
    tensors, missing = {}, []
    for name, dataset in models:
        if not model_zoo.available(name, dataset):
            missing.append(f"{name}/{dataset}")
            continue
        model = model_zoo.load_pretrained(name, dataset)
        for layer, m in quantizable_layers(model)[1:-1]:
            tensors[f"{name}/{dataset} {layer}"] = m.weight.detach().double()
    return tensors, missing


def study_tensors(synth_shape, models) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`synthetic_tensors` then :func:`model_tensors` (in this order: the traced sample draws
    tensors by position); and the missing checkpoints."""
    tensors = synthetic_tensors(synth_shape)
    found, missing = model_tensors(models)
    tensors.update(found)
    return tensors, missing


def describe_tensors(tensors) -> str:
    """One line per tensor: name, shape, output channels."""
    return "\n".join(f"{k:40s} {str(tuple(w.shape)):18s} channels {w.shape[0]:4d}" for k, w in tensors.items())


def census(tensors, bits_list, option, tol) -> list[dict]:
    """Every QPS of ``option`` on every output channel of every tensor, per bit width (cached in
    ``sq_convergence_census``): pairs, eq. 10 updates, non-converged pairs, winner and its loss."""
    out = []
    for bits in bits_list:
        for name, w in tensors.items():
            key = {"tensor": name, "bits": bits, "option": option, "tol": tol, "sha": tensor_sha(w)}

            def run(w=w, bits=bits):
                r = search_qps(w, bits, option, tol=tol, prune=False)  # every pair: a census
                return {"pairs": r.candidates * w.shape[0], "iterations": r.iterations,
                        "not_converged": r.not_converged, "index": r.index, "loss": r.loss}

            out.append({"tensor": name, "bits": bits, **cached("sq_convergence_census", key, run)})
    return out


def census_rows(records, bits_list) -> list[dict]:
    """The census table: per bit width and weight group (synthetic / model) the tensors, runs,
    mean eq. 10 updates per run and non-converged runs."""
    rows = []
    for bits in bits_list:
        for group in ("synthetic", "model"):
            cs = [r for r in records
                  if r["bits"] == bits and r["tensor"].startswith("synthetic") == (group == "synthetic")]
            if not cs:
                continue
            pairs = sum(r["pairs"] for r in cs)
            rows.append({"bits": bits, "weights": group, "tensors": len(cs), "QPS x channel runs": pairs,
                         "mean iterations": sum(r["iterations"] for r in cs) / pairs,
                         "not converged": sum(r["not_converged"] for r in cs)})
    return rows


def traced_runs(tensors, bits_list, option, tol, sample: int) -> list[dict]:
    """Per bit width, ``sample`` (tensor, channel, QPS) triples drawn with ``default_rng(bits)``,
    each traced by :func:`convergence_record` (cached in ``sq_convergence_traced``)."""
    names = list(tensors)
    out = []
    for bits in bits_list:
        qps = enumerate_qps(option, bits)

        def trace(bits=bits, qps=qps):
            rng = np.random.default_rng(bits)
            runs = []
            for _ in range(sample):
                name = names[rng.integers(len(names))]
                w = tensors[name]
                ch, k = int(rng.integers(w.shape[0])), int(rng.integers(len(qps)))
                rec = convergence_record(w[ch].reshape(-1).numpy(), qps[k], tol=tol)
                runs.append({"tensor": name, "channel": ch, "qps": k, **rec})
            return runs

        key = {"bits": bits, "option": option, "tol": tol, "sample": sample, "tensors": names,
               "shas": [tensor_sha(tensors[n])[:12] for n in names]}
        out += [{"bits": bits, **r} for r in cached("sq_convergence_traced", key, trace)]
    return out


def traced_rows(traced, bits_list) -> list[dict]:
    """The traced-runs table: convergence, exact fixed points, iterations, loss rises, case-3
    events, oscillation and the relative gap ``(L_fixed - L_global) / L_global`` per bit width."""
    rows = []
    for bits in bits_list:
        t = [r for r in traced if r["bits"] == bits]
        if not t:
            continue
        gaps = np.array([r["gap"] for r in t])
        rows.append({"bits": bits, "runs": len(t),
                     "converged %": 100 * np.mean([r["converged"] for r in t]),
                     "exact fixed point %": 100 * np.mean([r["exact_fixed_point"] for r in t]),
                     "mean iterations": np.mean([r["iterations"] for r in t]),
                     "max iterations": int(np.max([r["iterations"] for r in t])),
                     "runs with a loss rise": int(np.sum([r["loss_rises"] > 0 for r in t])),
                     "runs with case-3 events %": 100 * np.mean([r["case3_events"] > 0 for r in t]),
                     "runs with oscillation": int(np.sum([r["direction_changes"] > 0 for r in t])),
                     "gap > 1e-9 %": 100 * np.mean(gaps > 1e-9),
                     "median gap %": 100 * np.median(gaps), "max gap %": 100 * np.max(gaps)})
    return rows


def candidate_losses_global(weight, bits: int, universal=5) -> np.ndarray:
    """Total loss of every candidate QPS (combinations order) when each channel uses the exact
    global-optimal scale (:func:`lowbit.sq.scale.global_optimal_scale`) instead of the paper's
    fixed point: how much Algorithm 1 would change with a better scale. Plain loop; meant for
    small layers and bit widths. ``weight``: output channels on dim 0, at least 2-D."""
    rows = weight_rows(weight, "channel")
    qps = universal_set(universal)[qps_indices(universal, bits)]
    out = np.zeros(qps.shape[0])
    for k in range(qps.shape[0]):
        out[k] = sum(global_optimal_scale(r, qps[k]).loss for r in rows)
    return out


def winner_records(tensors, bits_list, option, tol, max_channels: int) -> list[dict]:
    """Per tensor (its first ``max_channels`` channels) and bit width: the QPS Algorithm 1 picks
    with the paper's fixed-point scales and with global-optimal scales, and their losses (cached
    in ``sq_convergence_winner``). At 3 bits and more only tensors of at most
    ``WINNER_3BIT_MAX_WEIGHTS`` weights (the global loop is plain Python)."""
    out = []
    for bits in bits_list:
        for name, w in tensors.items():
            w_small = w[:max_channels]
            if bits >= 3 and w_small.shape[0] * w_small[0].numel() > WINNER_3BIT_MAX_WEIGHTS:
                continue

            def compare(w_small=w_small, bits=bits):
                fixed = search_qps(w_small, bits, option, tol=tol)
                glob = candidate_losses_global(w_small, bits, option)
                return {"fixed_index": fixed.index, "fixed_loss": fixed.loss,
                        "global_index": int(np.argmin(glob)), "global_loss": float(np.min(glob)),
                        "global_loss_of_fixed_winner": float(glob[fixed.index])}

            key = {"tensor": name, "bits": bits, "option": option, "channels": int(w_small.shape[0]),
                   "sha": tensor_sha(w_small)}
            out.append({"tensor": name, "bits": bits, **cached("sq_convergence_winner", key, compare)})
    return out


def winner_rows(records) -> list[dict]:
    """The winner table: same QPS or not, the winning loss with each scale rule, improvement %."""
    return [{"tensor": r["tensor"], "bits": r["bits"], "same QPS wins": r["fixed_index"] == r["global_index"],
             "loss, paper scale": r["fixed_loss"], "loss, global scale": r["global_loss"],
             "improvement %": 100 * (r["fixed_loss"] - r["global_loss"]) / r["fixed_loss"]} for r in records]


def fig3_cases(alpha: float = 1.0, alpha2: float = 1.2, w=None, points=(1.0, 2.0)) -> dict:
    """SQ Fig. 3 for one weight ``w`` (default a grid on [0.9, 2.5]) and the QPS ``points``: the
    error ``min |w - alpha q|`` before (``e1``) and after (``e2``) the update alpha -> alpha2, and
    the marks ``A = 1.5 alpha``, ``C = 1.5 alpha2``, ``B = A + 0.5 (alpha2 - alpha)``."""
    w = np.linspace(0.9, 2.5, 1601) if w is None else np.asarray(w, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    e1 = np.min(np.abs(w[..., None] - alpha * p), axis=-1)
    e2 = np.min(np.abs(w[..., None] - alpha2 * p), axis=-1)
    a_mark, c_mark = 1.5 * alpha, 1.5 * alpha2
    return {"w": w, "e1": e1, "e2": e2, "alpha": alpha, "alpha2": alpha2,
            "A": a_mark, "B": a_mark + 0.5 * (alpha2 - alpha), "C": c_mark}


def fig3_subcases(weights=(1.55, 1.7), alpha: float = 1.0, alpha2: float = 1.2) -> list[str]:
    """For each weight of case 3 (A < w < C), whether its error falls or rises, as text lines."""
    lines = []
    for x in weights:
        f = fig3_cases(alpha, alpha2, w=[x])
        t1, t2 = float(f["e1"][0]), float(f["e2"][0])
        lines.append(f"w = {x}: error {t1:.2f} at t=1 -> {t2:.2f} at t=2 "
                     f"({'falls' if t2 < t1 else 'rises'}; B = {f['B']:.1f})")
    return lines


def worked_trajectory(w, points, tol: float = 1e-5) -> list[str]:
    """The iteration on ``w`` step by step (scale, points, loss; weights whose point changed and
    whose own error grew: case 3), then the counts and the global optimum, as text lines."""
    w = np.asarray(w, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    rec = convergence_record(w, p, tol=tol)
    res = optimal_scale(w, p, tol=tol)
    lines, prev = [], None
    for t, (s, loss) in enumerate(zip(res.history, res.losses)):
        q = nearest_points(np.abs(w), p, s)
        err = np.abs(np.abs(w) - s * q)
        note = ""
        if prev is not None:
            moved = np.flatnonzero((q != prev[0]) & (err > prev[1]))
            note = f"  case 3: weights {w[moved].tolist()} moved and their error grew" if moved.size else ""
        lines.append(f"t={t} alpha={s:.6f} q={q.astype(int).tolist()} loss={loss:.6f}{note}")
        prev = (q, err)
    lines.append(f"loss rises: {rec['loss_rises']} | case-3 events: {rec['case3_events']} | global optimum: "
                 f"alpha={rec['global_scale']:.6f} loss={rec['global_loss']:.6f}")
    return lines
