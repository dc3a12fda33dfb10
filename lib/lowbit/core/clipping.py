"""Clipping thresholds of a layer-wise uniform quantizer: MSE, ACIQ and KL (entropy) calibration.

The conventional baselines that Q-Rater (Kim, Lee et al., *Q-Rater: Non-Convex Optimization for
Post-Training Uniform Quantization*, arXiv:2105.01868, Table 1) compares with, and the MSE step
calibration of SQ's activation quantizer (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization
for Accurate Post-Training Quantization*, ECCV 2022, doi:10.1007/978-3-031-20083-0_39, sec. 4.2):

* ``"max"``: no clipping, ``max|x|``;
* ``"mse"``: the threshold among a grid of fractions of ``max|x|`` minimising
  ``mean((x - Q(x))^2)`` (Shin et al. 2016; Sung et al. 2015) -- :func:`mse_threshold`;
* ``"aciq"``: Banner, Nahshan, Soudry, *Post training 4-bit quantization of convolutional
  networks for rapid-deployment* (NeurIPS 2019): Laplace closed form -- :func:`aciq_coefficient`;
* ``"kl"``: TensorRT entropy calibration (Migacz 2017), as NVIDIA's ``pytorch_quantization`` --
  :func:`kl_threshold`.
"""
from __future__ import annotations

import numpy as np
import torch

from .uniform import uniform_levels
from .validation import check_bits, check_choice

CLIP_RULES = ("max", "mse", "aciq", "kl")
TIES = ("up", "even")


def sample_values(x, max_values: int, seed: int = 0) -> torch.Tensor:
    """``x`` flattened to float32; a seeded random ``max_values`` of them when there are more."""
    x = torch.as_tensor(x).detach().reshape(-1).to(torch.float32)
    if x.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.numel(), generator=g)[:max_values]]
    return x


def _grid_error(xs: torch.Tensor, steps: torch.Tensor, lo: int, hi: int, tie: str) -> torch.Tensor:
    """Mean squared error of ``xs`` on the grid of each step (one row per step)."""
    s = steps[:, None]  # (T, 1)
    u = xs[None] / s
    codes = torch.floor(u + 0.5) if tie == "up" else torch.round(u)
    return ((xs[None] - codes.clamp(lo, hi) * s) ** 2).mean(dim=1)


def mse_step_index(xs: torch.Tensor, lo: int, hi: int, steps, tie: str = "up", chunk: int = 16) -> int:
    """Index of the step (in ``steps``, first minimum wins) with the smallest grid MSE of ``xs``.

    ``Q(x) = step * clamp(rnd(x / step), lo, hi)``, i.e. clipping at ``step * lo`` and
    ``step * hi``; ``tie="up"`` rounds with ``floor(u + 0.5)`` (Q-Rater's RTN), ``"even"`` with
    round-half-to-even (:func:`lowbit.core.uniform.round_to_grid`). ``steps`` are computed in
    ``xs``'s dtype. Batched over ``chunk`` candidates; :func:`mse_step_index_reference` is the plain loop.
    """
    check_choice(tie, TIES, "tie rule")
    steps = torch.as_tensor(steps).to(device=xs.device, dtype=xs.dtype).reshape(-1)
    errs = torch.cat([_grid_error(xs, s, lo, hi, tie) for s in steps.split(chunk)])
    return int(torch.argmin(errs))


def mse_step_index_reference(xs: torch.Tensor, lo: int, hi: int, steps, tie: str = "up") -> int:
    """Plain reference of :func:`mse_step_index`: one candidate at a time, strict improvement."""
    steps = torch.as_tensor(steps).to(device=xs.device, dtype=xs.dtype).reshape(-1)
    best_i, best_e = 0, float("inf")
    for i, s in enumerate(steps):
        codes = torch.floor(xs / s + 0.5) if tie == "up" else torch.round(xs / s)
        e = float(((xs - codes.clamp(lo, hi) * s) ** 2).mean())
        if e < best_e:
            best_i, best_e = i, e
    return best_i


def mse_threshold(xs: torch.Tensor, bits: int, signed: bool, grid: int = 200) -> float:
    """The ``Th`` among ``max|x| * k / grid``, ``k = 1..grid``, minimising the RTN error (ties up)."""
    lo, hi = uniform_levels(bits, signed)
    cands = float(xs.abs().max()) * torch.arange(1, grid + 1, dtype=xs.dtype) / grid  # (T,)
    return float(cands[mse_step_index(xs, lo, hi, cands / hi, tie="up")])


def aciq_coefficient(levels: int, tails: int = 2) -> float:
    """ACIQ (Banner et al. 2019) Laplace closed form: ``alpha / b`` minimising
    ``tails * b^2 * exp(-alpha/b) + Delta^2/12`` with ``Delta = alpha / levels``.

    ``levels`` is the number of steps between 0 and ``alpha``. With Banner's ``2^M``-bin
    quantizer (``levels = 2^(M-1)``) this gives their 2.83 b, 3.89 b, 5.03 b, ... 9.89 b
    for ``M = 2..8``.
    """
    if int(levels) < 1:
        raise ValueError(f"levels must be a positive integer, got {levels}")
    c = np.linspace(0.01, 60.0, 600000)
    err = tails * np.exp(-c) + c ** 2 / (12.0 * int(levels) ** 2)
    return float(c[int(np.argmin(err))])


def kl_threshold(a: np.ndarray, n_quant: int, bins: int, start_bin: int = 128) -> float:
    """TensorRT entropy calibration (Migacz 2017) on the histogram of magnitudes ``a >= 0``.

    As NVIDIA's ``pytorch_quantization`` (``calib/histogram.py``, ``_compute_amax_entropy``):
    ``bins`` bins over ``[0, max]``, the first bin replaced by the second (the spike of exact
    zeros after a ReLU would otherwise dominate), candidate cut-offs ``i = start_bin .. bins``;
    the reference ``p`` is ``hist[:i]`` with the outliers added to its last bin, the candidate
    ``q`` merges ``hist[:i]`` into ``n_quant`` bins and spreads each merged count evenly over
    its non-empty bins; the threshold is ``edges[i]`` of the last ``i`` minimising ``KL(p||q)``.
    """
    amax = float(a.max())
    hist, edges = np.histogram(a, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    start = min(start_bin, bins)
    divergences = []
    for i in range(start, bins + 1):
        h = hist[:i]
        dig = np.digitize(np.arange(i), np.linspace(0, i, n_quant + 1)) - 1  # merged bin of each bin
        nz = h != 0
        sums = np.bincount(dig[nz], weights=h[nz], minlength=n_quant)
        counts = np.bincount(dig[nz], minlength=n_quant)
        q = np.where(nz, sums[dig] / np.maximum(counts[dig], 1), 0.0)
        p = h.copy()
        p[-1] += hist[i:].sum()
        if q.sum() == 0 or p.sum() == 0:
            divergences.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        with np.errstate(divide="ignore"):
            divergences.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    divergences = np.asarray(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return float(edges[start + last_argmin])


def baseline_threshold(x, bits: int, rule: str, signed: bool | None = None, *, grid: int = 200,
                       bins: int = 2048, max_values: int = 1 << 16, seed: int = 0) -> float:
    """A conventional clipping threshold of ``x`` for a ``bits``-bit layer-wise quantizer.

    ``rule``: ``"max"`` (no clipping, ``max|x|``); ``"mse"`` (the ``Th`` among ``max|x| * k/grid``,
    ``k = 1..grid``, minimising ``mean((x - Q_RTN(x))^2)``, :func:`mse_threshold`);
    ``"aciq"`` (Banner et al. 2019: ``b`` of a Laplace fit times :func:`aciq_coefficient`; for
    unsigned data ``b`` is the mean of the positive values, an exponential fit);
    ``"kl"`` (:func:`kl_threshold`, ``bins`` bins, cut-offs from bin 128; ``n = 2^(q-1)``
    magnitudes signed, ``2^q`` unsigned). ``signed=None`` means ``min(x) < 0``.
    At most ``max_values`` values (a seeded sample) are used. Returns a float ``<= max|x|``.
    """
    q = check_bits(bits)
    check_choice(rule, CLIP_RULES, "clipping rule")
    xs = sample_values(x, max_values, seed)
    if xs.numel() == 0:
        raise ValueError("cannot compute a threshold of an empty tensor")
    if signed is None:
        signed = bool(xs.min() < 0)
    amax = float(xs.abs().max())
    if amax == 0.0:
        raise ValueError("x is all zeros: there is nothing to clip")
    levels = uniform_levels(q, signed)[1]
    if rule == "max":
        return amax
    if rule == "mse":
        return mse_threshold(xs, q, signed, grid)
    if rule == "aciq":
        if signed:
            b = float((xs - xs.mean()).abs().mean())
        else:
            pos = xs[xs > 0]
            b = float(pos.mean()) if pos.numel() else amax
        return min(amax, aciq_coefficient(levels) * b)
    mags = (xs.abs() if signed else xs.clamp_min(0)).cpu().numpy()
    return min(amax, kl_threshold(mags, levels + 1, bins))
