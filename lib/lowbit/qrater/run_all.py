"""Q-Rater: layer-by-layer non-convex search of clipping, rounding and selective bias correction.

Paper: Kim, Lee et al., *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization* (``../shared/papers/003_708cfc197c613d1f.txt``).

===========================  ==================================================================
:func:`round_values`         1st-order rounding (eqs. 3-4, ``gamma_n``) and 2nd-order rounding
                             (eqs. 5-6, ``gamma_n``, ``gamma_s``); ``gamma_n = 0`` is RTN.
:func:`range_division`       how the rounding divides the range into levels (Figs. 5, 9, 10).
:func:`clip_threshold`       Q-Rater clipping ``Th_c = gamma_c * max|x|`` (sec. 5.2), step
                             ``s = Th_c / (2^(q-1) - 1)`` (:func:`step_size`).
:func:`baseline_threshold`   the clipping baselines of Table 1: ``"mse"``, ``"aciq"`` (Banner et
                             al., Laplace closed form), ``"kl"`` (TensorRT entropy calibration).
:func:`bayes_search`         grid probes registered in a seeded Bayesian optimiser, then more
                             probes (``bayesian-optimization`` package, as the paper, sec. 6).
:func:`run`                  Algorithm 1 (appendix E): layer by layer in forward order, earlier
                             layers frozen: weight clip, weight round, activation clip,
                             activation round, selective bias correction (eq. 7).
:func:`apply`                rebuild a quantized model from :func:`run`'s per-layer settings
                             (e.g. only the first ``k`` layers, for the incremental curves).
===========================  ==================================================================

Quantization is **layer-wise and symmetric** for weights and activations, as in the paper
(sec. 5). Weights are signed, ``levels = -(2^(q-1)-1) .. 2^(q-1)-1``, step
``Th_c / (2^(q-1)-1)``. The input activations of a layer are quantized by a forward pre-hook;
when they are non-negative on the calibration set (after a ReLU) they use the unsigned range
``0 .. 2^q - 1`` with step ``Th_c / (2^q - 1)`` (``signed=False``), else the signed one.

Choices where the paper is silent or ambiguous (each is documented where it is made):

* ``w_r = floor(x/s + 0.5)`` exactly as written, also for negative ``x``; the rounding offset
  uses ``sign(x * ...)``, so the scheme is odd-symmetric up to exact ties.
* ``|gamma_n| ** 0 = 1``: at ``w_r = 0`` the 1st-order offset is ``+-0.5``, so for
  ``gamma_n > 0`` every non-zero value leaves the zero level (it has zero width) and for
  ``gamma_n < 0`` the zero level widens from 1 to ``1 + |gamma_n|`` steps. ``gamma_n = 0`` gives ``sign(0) = 0``, so
  ``0 ** 0`` never matters there: it is exactly RTN.
* Algorithm 1's ``WeightClip`` evaluates clipped *unrounded* weights; we evaluate clipped and
  RTN-rounded weights, as sec. 5.2 describes ("RTN is followed") and as ``ActClip`` does.
* The objective is top-1 accuracy on the fixed calibration subset, with ties (200 images give
  0.5 % steps) broken by the lower cross-entropy: ``target = acc% - 1e-3 * CE``.
* Bias correction (eq. 7) subtracts the per-channel mean output error against the FP model,
  ``E[W X] - E[W' X']``, where ``X'`` is the input in the partially quantized model; selective
  correction keeps it unless it lowers the objective (Algorithm 1, ``BiasCorr``: ties keep it).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..nn.fold_bn import fold_bn
from ..nn.graph import QUANTIZABLE, module_calls, quantizable_layers

OPS = ("clip", "round", "bias")
SEARCHES = ("grid", "bo")
CLIP_RULES = ("max", "mse", "aciq", "kl")
BIAS_MODES = ("never", "always", "selective")
TARGETS = ("weight", "activation")
OBJECTIVES = ("accuracy", "loss")

# Algorithm 1 / sec. 5.4 resolutions: gamma_c 0.1..1.0 by 0.1, gamma_n -1..1 by 0.1, gamma_s 0..1 by 0.25
PAPER_CLIP_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))
PAPER_GAMMA_N_GRID = tuple(round(-1.0 + 0.1 * i, 10) for i in range(21))
PAPER_GAMMA_S_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_BO_STEPS = 50  # sec. 6: "BO explores additional 50 hyper-parameter sets"
GAMMA_C_BOUNDS = (0.01, 1.0)  # the paper's (0, 1.0]; gamma_c -> 0 would give a zero step


# ----------------------------------------------------------------------------- validation
def _check_bits(bits, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{what} must be an int >= 2 (e.g. 4), got {type(bits).__name__}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"{what} must be between 2 and 16, got {bits}")
    return int(bits)


def _check_gamma(value, lo: float, hi: float, what: str, open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v) or v > hi or (v <= lo if open_lo else v < lo)
    if bad:
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise ValueError(f"{what} must lie in {rng}, got {value}")
    return v


def level_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer levels ``(lo, hi)``: ``(-(2^(q-1)-1), 2^(q-1)-1)`` signed, ``(0, 2^q-1)`` unsigned."""
    q = _check_bits(bits)
    if signed:
        return -(2 ** (q - 1) - 1), 2 ** (q - 1) - 1
    return 0, 2 ** q - 1


def step_size(threshold: float, bits: int, signed: bool = True) -> float:
    """Step ``s = Th_c / (2^(q-1) - 1)`` (sec. 5.1); ``Th_c / (2^q - 1)`` for unsigned ranges."""
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive finite number, got {threshold}")
    return threshold / level_range(bits, signed)[1]


# ----------------------------------------------------------------------------- rounding
def _rounding_offset(x, w_r, bits, gamma_n, gamma_s, order, signed):
    """``f_r`` of eq. 4 (order 1) or eq. 6 (order 2), elementwise; ``|f_r| <= 0.5``."""
    a = w_r.abs()
    g = torch.tensor(abs(gamma_n), dtype=x.dtype, device=x.device)
    if order == 1:
        return 0.5 * torch.sign(x * gamma_n) * torch.pow(g, a)
    # eq. 6: 2^(q-1) is the magnitude span of the signed range; an unsigned q-bit range is the
    # magnitude part of a (q+1)-bit signed one, so there the span is 2^q (and beta = 2^(q-1)).
    span = float(2 ** (bits - 1) if signed else 2 ** bits)
    beta = span / 2.0
    centre = gamma_s * span
    return 0.5 * torch.sign(x * gamma_n * (centre - a)) * torch.pow(g, (a - centre - beta).abs())


def round_values(x, step, bits: int, gamma_n: float, gamma_s: float | None = None, order: int = 2,
                 signed: bool = True) -> torch.Tensor:
    """Q-Rater rounding (eqs. 3-6) of ``x`` (already clipped) to the grid ``step * k``.

    ``w_r = floor(x/step + 0.5)`` (RTN integer), then ``step * floor(x/step + 0.5 + f_r)`` with

    * 1st order (eq. 4): ``f_r = 0.5 * sign(x*gamma_n) * |gamma_n| ** |w_r|``;
    * 2nd order (eq. 6): ``f_r = 0.5 * sign(x*gamma_n*(gamma_s*2^(q-1) - |w_r|))
      * |gamma_n| ** | |w_r| - gamma_s*2^(q-1) - beta |``, ``beta = 2^(q-2)``;

    and the integer is kept in the q-bit symmetric range ``|k| <= 2^(q-1) - 1``, or in
    ``0 .. 2^q - 1`` when ``signed=False`` (activations after a ReLU; there eq. 6 uses the
    span ``2^q`` and ``beta = 2^(q-1)`` in place of ``2^(q-1)`` and ``2^(q-2)``).

    ``gamma_n in [-1, 1]``, ``gamma_s in [0, 1]`` (``None`` means 0; ignored by order 1).
    ``gamma_n = 0`` is exactly round-to-nearest (ties up) for both orders. Formula choices,
    as written in the paper: ``sign`` of negative values makes the scheme odd-symmetric
    (negative values are pushed away from zero when positive ones are); ``|gamma_n| ** 0 = 1``
    so for ``gamma_n > 0`` the zero level is emptied and for ``gamma_n < 0`` it widens to
    ``1 + |gamma_n|`` steps (see :func:`range_division`). For the 1st order and ``k >= 1`` the
    level ``k`` spans ``1 + 0.5 g^(k-1) (1 - g)`` steps for ``g = gamma_n > 0`` (shrinking away
    from zero) and ``1 - 0.5 |g|^k (1 - |g|)`` for ``g < 0`` (growing), as Fig. 9 describes. Returns a tensor of ``x``'s shape and float dtype.
    """
    q = _check_bits(bits)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (eq. 4) or 2 (eq. 6), got {order!r}")
    gamma_n = _check_gamma(gamma_n, -1.0, 1.0, "gamma_n")
    gamma_s = 0.0 if gamma_s is None else _check_gamma(gamma_s, 0.0, 1.0, "gamma_s")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    step_t = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if step_t.numel() != 1 or not torch.isfinite(step_t) or step_t.item() <= 0:
        raise ValueError(f"step must be one positive finite number (layer-wise), got {step}")
    lo, hi = level_range(q, signed)
    u = x / step_t
    w_r = torch.floor(u + 0.5)
    if gamma_n == 0.0:
        k = w_r  # f_r = 0: RTN
    else:
        k = torch.floor(u + 0.5 + _rounding_offset(x, w_r, q, gamma_n, gamma_s, order, signed))
    return k.clamp(lo, hi) * step_t


def round_values_reference(x, step, bits, gamma_n, gamma_s=None, order=2, signed=True) -> list[float]:
    """Plain-Python, one value at a time, transcription of eqs. 3-6 (for tests)."""
    q = _check_bits(bits)
    gs = 0.0 if gamma_s is None else float(gamma_s)
    lo, hi = level_range(q, signed)
    span = 2 ** (q - 1) if signed else 2 ** q
    out = []
    for v in np.asarray(x, dtype=np.float64).ravel().tolist():
        w_r = math.floor(v / step + 0.5)
        sgn = lambda t: (t > 0) - (t < 0)  # noqa: E731
        if order == 1:
            f = 0.5 * sgn(v * gamma_n) * abs(gamma_n) ** abs(w_r)
        else:
            f = 0.5 * sgn(v * gamma_n * (gs * span - abs(w_r))) * abs(gamma_n) ** abs(abs(w_r) - gs * span - span / 2)
        out.append(step * min(max(math.floor(v / step + 0.5 + f), lo), hi))
    return out


def range_division(bits: int, gamma_n: float, gamma_s: float | None = None, order: int = 2,
                   signed: bool = True, points: int = 200001) -> dict:
    """Which input range maps to each level (Figs. 5, 9, 10), measured on a dense grid.

    The input is a clipped value in step units, ``u in [lo, hi]`` (the integer level range).
    Returns ``{"levels": k, "width": width of the u-range mapped to k, "low": its lower end,
    "high": its upper end}`` (arrays; ``width = 0`` and NaN ends for an empty level).
    """
    lo, hi = level_range(bits, signed)
    u = torch.linspace(lo, hi, points, dtype=torch.float64)
    k = round_values(u, 1.0, bits, gamma_n, gamma_s, order, signed)
    du = (hi - lo) / (points - 1)
    levels = np.arange(lo, hi + 1)
    width, low, high = [], [], []
    for lv in levels:
        sel = u[k == lv]
        width.append(sel.numel() * du)
        low.append(sel.min().item() if sel.numel() else float("nan"))
        high.append(sel.max().item() if sel.numel() else float("nan"))
    return {"levels": levels, "width": np.array(width), "low": np.array(low), "high": np.array(high)}


# ----------------------------------------------------------------------------- clipping
def clip_threshold(x, gamma_c: float) -> float:
    """Q-Rater clipping threshold ``Th_c = gamma_c * max|x|`` (sec. 5.2), ``gamma_c in (0, 1]``.

    The step is then ``Th_c / (2^(q-1) - 1)`` (:func:`step_size`).
    """
    gamma_c = _check_gamma(gamma_c, 0.0, 1.0, "gamma_c", open_lo=True)
    x = torch.as_tensor(x)
    if x.numel() == 0:
        raise ValueError("cannot clip an empty tensor")
    return gamma_c * float(x.abs().max())


def _rtn(x: torch.Tensor, threshold: float, bits: int, signed: bool) -> torch.Tensor:
    lo = -threshold if signed else 0.0
    return round_values(x.clamp(lo, threshold), step_size(threshold, bits, signed), bits, 0.0,
                        signed=signed)


def _sample(x: torch.Tensor, max_values: int, seed: int = 0) -> torch.Tensor:
    x = torch.as_tensor(x).detach().reshape(-1).to(torch.float32)
    if x.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(x.numel(), generator=g)[:max_values]]
    return x


def _mse_threshold(xs: torch.Tensor, bits: int, signed: bool, grid: int, chunk: int = 16) -> float:
    """The ``Th`` among ``max|x| * k/grid`` minimising the RTN error; batched over candidates."""
    amax = float(xs.abs().max())
    cands = amax * torch.arange(1, grid + 1, dtype=xs.dtype) / grid  # (T,)
    lo, hi = level_range(bits, signed)
    errs = []
    for t in cands.split(chunk):
        t = t[:, None]  # (t, 1)
        step = t / hi
        xc = torch.maximum(torch.minimum(xs[None], t), -t if signed else torch.zeros_like(t))
        qx = torch.floor(xc / step + 0.5).clamp(lo, hi) * step
        errs.append(((xs[None] - qx) ** 2).mean(dim=1))
    return float(cands[int(torch.argmin(torch.cat(errs)))])


def _mse_threshold_reference(xs: torch.Tensor, bits: int, signed: bool, grid: int) -> float:
    """Plain loop over the candidates of :func:`_mse_threshold` with :func:`round_values`."""
    amax = float(xs.abs().max())
    best_t, best_e = amax, float("inf")
    for k in range(1, grid + 1):
        t = float(amax * torch.tensor(k, dtype=xs.dtype) / grid)
        e = float(((xs - _rtn(xs, t, bits, signed)) ** 2).mean())
        if e < best_e:
            best_t, best_e = t, e
    return best_t


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


def _kl_threshold(a: np.ndarray, n_quant: int, bins: int, start_bin: int = 128) -> float:
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

    ``rule``: ``"max"`` (no clipping, ``max|x|``); ``"mse"`` (the ``Th`` among ``grid``
    fractions of ``max|x|`` minimising ``mean((x - Q_RTN(x))^2)``, Shin et al. / Sung et al.);
    ``"aciq"`` (Banner et al. 2019: ``b`` of a Laplace fit times :func:`aciq_coefficient`; for
    unsigned data ``b`` is the mean of the positive values, an exponential fit);
    ``"kl"`` (TensorRT-style entropy calibration as in NVIDIA's pytorch-quantization: the
    histogram cut-off minimising KL divergence between the clipped histogram and its
    ``n``-level quantization, ``bins`` bins, cut-offs from bin 128; ``n = 2^(q-1)`` magnitudes
    signed, ``2^q`` unsigned). ``signed=None`` means ``min(x) < 0``.
    At most ``max_values`` values (a seeded sample) are used. Returns a float ``<= max|x|``.
    """
    q = _check_bits(bits)
    if rule not in CLIP_RULES:
        raise ValueError(f"unknown clipping rule {rule!r}: use one of {CLIP_RULES}")
    xs = _sample(x, max_values, seed)
    if xs.numel() == 0:
        raise ValueError("cannot compute a threshold of an empty tensor")
    if signed is None:
        signed = bool(xs.min() < 0)
    amax = float(xs.abs().max())
    if amax == 0.0:
        raise ValueError("x is all zeros: there is nothing to clip")
    levels = level_range(q, signed)[1]
    if rule == "max":
        return amax
    if rule == "mse":
        return _mse_threshold(xs, q, signed, grid)
    if rule == "aciq":
        if signed:
            b = float((xs - xs.mean()).abs().mean())
        else:
            pos = xs[xs > 0]
            b = float(pos.mean()) if pos.numel() else amax
        return min(amax, aciq_coefficient(levels) * b)
    mags = (xs.abs() if signed else xs.clamp_min(0)).numpy()
    return min(amax, _kl_threshold(mags, levels + 1, bins))


# ----------------------------------------------------------------------------- Bayesian search
def bayes_search(f: Callable[..., float], pbounds: dict, grid: Sequence[dict], n_iter: int,
                 seed: int = 0) -> list[dict]:
    """Grid probes, then ``n_iter`` Bayesian-optimisation probes (Algorithm 1, ``BO.probe``/``BO.run``).

    ``f(**params) -> target`` (maximised). Each grid point is evaluated and registered with
    ``BayesianOptimization.register``; then ``maximize(init_points=0, n_iter=n_iter)`` (GP with
    a Matern kernel, UCB acquisition, as in the ``bayesian-optimization`` package) is seeded
    with ``random_state=seed``, so the same seed gives the same probes. Returns every probe as
    ``{"params": {...}, "target": t, "phase": "grid" | "bo"}`` in order (a BO suggestion that
    repeats a known point is not re-evaluated and not listed).
    """
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    keys = list(pbounds)
    probes: list[dict] = []
    for p in grid:
        if set(p) != set(keys):
            raise ValueError(f"grid point {p} must have exactly the keys {keys}")
        probes.append({"params": {k: float(p[k]) for k in keys}, "target": float(f(**p)), "phase": "grid"})
    if n_iter == 0:
        return probes
    from bayes_opt import BayesianOptimization

    def wrapped(**p):
        t = float(f(**p))
        probes.append({"params": {k: float(p[k]) for k in keys}, "target": t, "phase": "bo"})
        return t

    opt = BayesianOptimization(f=wrapped, pbounds={k: tuple(map(float, v)) for k, v in pbounds.items()},
                               random_state=int(seed), verbose=0)
    for p in probes:
        opt.register(params=p["params"], target=p["target"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn GP convergence chatter
        opt.maximize(init_points=0, n_iter=int(n_iter))
    return probes


def _best(probes: list[dict]) -> dict:
    """The first probe with the highest target (grid order first, then BO order)."""
    return max(probes, key=lambda p: p["target"])  # max keeps the first of equals


# ----------------------------------------------------------------------------- model plumbing
# BN folding and the forward-order layer walk are the shared PTQ ones (lowbit.fold_bn.fold_bn,
# lowbit.ptq.quantizable_layers / module_calls); what is Q-Rater-specific is below.


def quantize_weight(w: torch.Tensor, threshold: float, bits: int, gamma_n: float = 0.0, gamma_s: float = 0.0,
                    order: int = 2) -> torch.Tensor:
    """Clip ``w`` to ``[-Th_c, Th_c]`` and round it to the signed grid of step ``Th_c / (2^(q-1)-1)`` (eqs. 3-6)."""
    return round_values(w.clamp(-threshold, threshold), step_size(threshold, bits), bits, gamma_n, gamma_s, order)


def quantize_activation(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Clip the activation to ``[-Th, Th]`` (``[0, Th]`` unsigned) and round it (eqs. 3-6)."""
    th, signed = cfg["threshold"], cfg["signed"]
    xc = x.clamp(-th if signed else 0.0, th)
    return round_values(xc, cfg["step"], cfg["bits"], cfg["gamma_n"], cfg["gamma_s"], cfg["order"], signed)


class _QuantState:
    """The FP (BN-folded) model, its quantized working copy and per-layer activation configs."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.fp = fold_bn(model)
        self.model = copy.deepcopy(self.fp)
        self.modules = dict(self.model.named_modules())
        self.order = [name for name, _ in quantizable_layers(self.model, example)]
        self.act: dict[str, dict | None] = {n: None for n in self.order}
        for n in self.order:
            layer = self.modules[n]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            layer.register_forward_pre_hook(self._hook(n))

    def _hook(self, name):
        def pre(mod, inp):
            cfg = self.act[name]
            if cfg is None:
                return None
            return (quantize_activation(inp[0], cfg),) + tuple(inp[1:])
        return pre

    def fp_weight(self, name) -> torch.Tensor:
        return dict(self.fp.named_modules())[name].weight.detach()

    def fp_bias(self, name) -> torch.Tensor:
        b = dict(self.fp.named_modules())[name].bias
        return torch.zeros(self.fp_weight(name).shape[0]) if b is None else b.detach()

    def set_weight(self, name, w):
        with torch.no_grad():
            self.modules[name].weight.copy_(w)

    def set_bias(self, name, b):
        with torch.no_grad():
            self.modules[name].bias.copy_(b)


class _Runner:
    """Evaluates a model on fixed batches; can replay a frozen prefix from a cache.

    :meth:`freeze_before` caches the outputs of the largest modules that finish before the
    target layer starts (they cannot depend on it) and makes them return the cache, so each
    probe only recomputes the rest of the network. :meth:`evaluate` with ``use_cache=False``
    is the plain reference (a full forward pass); tests check that both agree.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.model = model
        self.batches = [(images[i:i + batch_size], labels[i:i + batch_size])
                        for i in range(0, len(labels), batch_size)]
        self.frozen: dict[str, list] = {}
        self.batch_idx = 0
        events = module_calls(model, images[:2])
        calls: dict[str, int] = {}
        for ev in events:
            calls[ev[0]] = calls.get(ev[0], 0) + 1
        self.spans = {ev[0]: (ev[2], ev[3]) for ev in events if calls[ev[0]] == 1}
        self.modules = dict(model.named_modules())

    def release(self):
        for name in self.frozen:
            self.modules[name].__dict__.pop("forward", None)
        self.frozen = {}

    def freeze_before(self, layer: str):
        self.release()
        start = self.spans[layer][0]
        cands = {n for n, (s, e) in self.spans.items() if e < start}
        maximal = [n for n in cands if not any(n.startswith(c + ".") for c in cands)]
        outs: dict[str, list] = {n: [] for n in maximal}
        handles = [self.modules[n].register_forward_hook(
            lambda mod, inp, out, n=n: outs[n].append(out)) for n in maximal]
        try:
            with torch.inference_mode():
                for x, _ in self.batches:
                    self.model(x)
        finally:
            for h in handles:
                h.remove()
        for n in maximal:
            self.modules[n].forward = (lambda *a, n=n, **k: outs[n][self.batch_idx])
        self.frozen = outs

    def forward_all(self, use_cache: bool = True):
        """Yield ``(logits, labels)`` per batch."""
        saved = None
        if not use_cache and self.frozen:
            saved = {n: self.modules[n].__dict__.pop("forward") for n in self.frozen}
        try:
            with torch.inference_mode():
                for i, (x, y) in enumerate(self.batches):
                    self.batch_idx = i
                    yield self.model(x), y
        finally:
            if saved:
                for n, fwd in saved.items():
                    self.modules[n].forward = fwd

    def evaluate(self, use_cache: bool = True) -> tuple[float, float]:
        """``(top-1 accuracy %, mean cross-entropy)`` on the fixed batches."""
        correct, loss, n = 0, 0.0, 0
        for logits, y in self.forward_all(use_cache):
            correct += int((logits.argmax(1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return 100.0 * correct / n, loss / n

    def capture(self, layer: str, output: bool = False) -> list[torch.Tensor]:
        """The (unquantized) inputs, or the outputs, of ``layer`` per batch."""
        got: list = []
        mod = self.modules[layer]
        if output:
            h = mod.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
        else:
            h = mod.register_forward_pre_hook(lambda m, i: got.append(i[0].detach().clone()), prepend=True)
        try:
            for _ in self.forward_all():
                pass
        finally:
            h.remove()
        return got


def balanced_subset(dataset, per_class: int = 20, seed: int = 0):
    """``per_class`` seeded random images of every class (the paper's 20 per class, appendix D)."""
    from ..data import TensorImageDataset, as_tensors

    if not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    images, labels = as_tensors(dataset)
    rng = np.random.default_rng(seed)
    idx = []
    for c in sorted(set(labels.tolist())):
        where = np.flatnonzero(labels.numpy() == c)
        if len(where) < per_class:
            raise ValueError(f"class {c} has only {len(where)} images, fewer than per_class={per_class}")
        idx += sorted(rng.choice(where, size=per_class, replace=False).tolist())
    idx = torch.as_tensor(sorted(idx))
    return TensorImageDataset(images[idx], labels[idx], getattr(dataset, "name", ""),
                              f"{getattr(dataset, 'split', '')}[{per_class}/class s{seed}]")


# ----------------------------------------------------------------------------- Algorithm 1
@dataclass
class QRaterResult:
    """What :func:`run` returns: the quantized model, per-layer settings and every probe.

    Unpacks as ``model, probes = run(...)``.
    """

    model: nn.Module
    layers: list[dict]
    probes: list[dict]
    config: dict
    fp_objective: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.probes))


def _as_calib(calib):
    from ..data import as_tensors

    if isinstance(calib, (tuple, list)) and len(calib) == 2:
        images, labels = calib
    else:
        images, labels = as_tensors(calib)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.ndim < 2 or len(images) != len(labels) or len(labels) == 0:
        raise ValueError("calib must be a non-empty data set or an (images, labels) pair of equal length")
    return images.float(), labels.long()


def _select_layers(order: list[str], layers) -> list[str]:
    if layers is None:
        return list(order)
    chosen = []
    for item in layers:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(order) <= item < len(order):
                raise ValueError(f"layer index {item} out of range for {len(order)} quantizable layers")
            chosen.append(order[item])
        elif isinstance(item, str) and item in order:
            chosen.append(item)
        else:
            raise ValueError(f"unknown layer {item!r}: use indices or names from {order}")
    return [n for n in order if n in chosen]  # forward order


def run(model: nn.Module, w_bits: int | None, a_bits: int | None, calib, search: str = "bo",
        ops: Sequence[str] = OPS, seed: int = 0, *, order: int = 2, clip_rule: str = "mse",
        bias_mode: str | None = None, targets: Sequence[str] = TARGETS, layers=None,
        clip_grid: Sequence[float] = PAPER_CLIP_GRID, gamma_n_grid: Sequence[float] = PAPER_GAMMA_N_GRID,
        gamma_s_grid: Sequence[float] = PAPER_GAMMA_S_GRID, bo_steps: int = PAPER_BO_STEPS,
        objective: str = "accuracy", batch_size: int = 200, stat_batch: int = 50,
        progress: bool = False) -> QRaterResult:
    """Q-Rater, Algorithm 1 of appendix E: quantize ``model`` layer by layer (API).

    For each quantizable layer in forward order (earlier layers frozen with their settings):

    1. weight clipping: ``gamma_c`` over ``clip_grid`` (0.1..1.0), then BO on ``(0, 1]``, each
       probe evaluated with RTN at ``Th_c = gamma_c * max|W|`` (``"clip"`` in ``ops``; else
       ``baseline_threshold(W, w_bits, clip_rule)``);
    2. weight rounding: ``gamma_n x gamma_s`` grid, then BO (``"round"``; else RTN);
    3. the same two steps for the layer's input activations, ``Th_c = gamma_c * mean_j max|x_j|``
       over calibration batches of ``stat_batch`` images;
    4. bias correction (eq. 7), kept only if it does not lower the objective (``"bias"``;
       ``bias_mode`` ``"always"``/``"never"`` overrides, for Figs. 8, 18, 19).

    ``search="grid"`` stops after the grids; ``"bo"`` adds ``bo_steps`` BO probes per search.
    ``targets`` limits the clip/round search to weights and/or activations (the other gets
    ``clip_rule`` + RTN; Fig. 6's W(Q-Rater)/A(RTN) etc.). ``w_bits``/``a_bits`` ``None`` keeps
    that tensor FP. ``layers`` (indices or names) restricts which layers are quantized (the
    paper skips the first layer of ResNet-32). ``order`` is the rounding order (1: eq. 4,
    2: eq. 6). The objective is top-1 accuracy on ``calib`` (ties broken by lower
    cross-entropy) or, with ``objective="loss"``, minus the cross-entropy.

    Returns a :class:`QRaterResult` (``model, probes = run(...)`` works): the quantized copy
    (BN folded), ``layers`` (JSON-able per-layer settings for :func:`apply`) and ``probes``
    (every evaluation: layer, stage, phase, params, accuracy, loss, target).
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    ops = tuple(ops)
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"unknown ops {bad}: use a subset of {OPS}")
    if not set(targets) <= set(TARGETS):
        raise ValueError(f"targets must be a subset of {TARGETS}, got {targets!r}")
    if clip_rule not in CLIP_RULES:
        raise ValueError(f"clip_rule must be one of {CLIP_RULES}, got {clip_rule!r}")
    if bias_mode is None:
        bias_mode = "selective" if "bias" in ops else "never"
    if bias_mode not in BIAS_MODES:
        raise ValueError(f"bias_mode must be one of {BIAS_MODES}, got {bias_mode!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    w_bits = None if w_bits is None else _check_bits(w_bits, "w_bits")
    a_bits = None if a_bits is None else _check_bits(a_bits, "a_bits")
    for g in clip_grid:
        _check_gamma(g, 0.0, 1.0, "clip_grid value", open_lo=True)
    for g in gamma_n_grid:
        _check_gamma(g, -1.0, 1.0, "gamma_n_grid value")
    for g in gamma_s_grid:
        _check_gamma(g, 0.0, 1.0, "gamma_s_grid value")
    n_bo = int(bo_steps) if search == "bo" else 0
    images, labels = _as_calib(calib)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    images, labels = images.to(device), labels.to(device)

    state = _QuantState(model, images)
    qmodel = state.model
    runner = _Runner(qmodel, images, labels, batch_size)
    selected = _select_layers(state.order, layers)
    probes: list[dict] = []
    records: list[dict] = []

    def target_of(acc, loss):
        return acc - 1e-3 * loss if objective == "accuracy" else -loss

    phase = {"now": "grid"}  # set by _search: "grid" probes first, then "bo"

    def measure(layer, stage, params, tag=None):
        acc, loss = runner.evaluate()
        t = target_of(acc, loss)
        probes.append({"layer": layer, "stage": stage, "phase": tag or phase["now"], "params": dict(params),
                       "accuracy": acc, "loss": loss, "target": t})
        return t

    def clip_and_round(name, tag, x_max, baseline, quantize_at, searched, seed0):
        """WeightQuant(i) / ActQuant(i) of Algorithm 1 for one tensor of layer ``name``.

        Clipping: ``gamma_c`` searched (grid + BO) with RTN at ``Th_c = gamma_c * x_max``, or the
        ``baseline()`` threshold; then rounding: ``gamma_n`` (x ``gamma_s``) searched at that
        threshold, or RTN. ``quantize_at(th, gamma_n, gamma_s)`` installs the quantizer; the
        chosen one is left installed. Returns ``(gamma_c or None, Th_c, gamma_n, gamma_s)``.
        """
        if "clip" in ops and searched:
            def f_clip(gamma_c):
                quantize_at(min(max(gamma_c, GAMMA_C_BOUNDS[0]), 1.0) * x_max)
                return measure(name, f"{tag}_clip", {"gamma_c": gamma_c})
            found = _search(f_clip, {"gamma_c": GAMMA_C_BOUNDS}, [{"gamma_c": g} for g in clip_grid], n_bo,
                            seed0 + 1, phase)
            gamma_c = found["params"]["gamma_c"]
            threshold = gamma_c * x_max
        else:
            gamma_c, threshold = None, baseline()
        gamma_n, gamma_s = 0.0, 0.0
        if "round" in ops and searched:
            def f_round(gamma_n, gamma_s=0.0):
                quantize_at(threshold, gamma_n, gamma_s)
                return measure(name, f"{tag}_round", {"gamma_n": gamma_n, "gamma_s": gamma_s})
            bounds, grid_pts = _round_space(order, gamma_n_grid, gamma_s_grid)
            found = _search(f_round, bounds, grid_pts, n_bo, seed0 + 2, phase)
            gamma_n = found["params"]["gamma_n"]
            gamma_s = found["params"].get("gamma_s", 0.0)
        quantize_at(threshold, gamma_n, gamma_s)
        return gamma_c, threshold, gamma_n, gamma_s

    fp_acc, fp_loss = runner.evaluate(use_cache=False)
    fp_obj = {"accuracy": fp_acc, "loss": fp_loss}

    # FP per-channel output means E[W X] for bias correction (eq. 7)
    fp_runner = _Runner(state.fp, images, labels, batch_size)
    fp_means = {}
    for name in selected:
        outs = fp_runner.capture(name, output=True)
        fp_means[name] = _channel_mean(outs)

    it = list(enumerate(selected))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="Q-Rater layers")
    for i, name in it:
        runner.freeze_before(name)
        layer_idx = state.order.index(name)
        rec: dict = {"name": name, "index": layer_idx, "order": order}
        layer_seed = int(seed) * 100003 + 17 * layer_idx

        # ---- weights: WeightQuant(i)
        if w_bits is not None:
            w_org = state.fp_weight(name).clone()
            wmax = float(w_org.abs().max())
            if wmax == 0.0:
                raise ValueError(f"layer {name} has all-zero weights; it cannot be quantized")

            def set_weight(th, gn=0.0, gs=0.0):
                state.set_weight(name, quantize_weight(w_org, th, w_bits, gn, gs, order))

            w_gc, w_th, w_gn, w_gs = clip_and_round(
                name, "w", wmax, lambda: baseline_threshold(w_org, w_bits, clip_rule, signed=True, seed=seed),
                set_weight, "weight" in targets, layer_seed)
            rec.update(w_bits=w_bits, w_gamma_c=w_gc, w_max=wmax, w_threshold=w_th, w_step=step_size(w_th, w_bits),
                       w_gamma_n=w_gn, w_gamma_s=w_gs)

        # ---- input activations: ActQuant(i)
        if a_bits is not None:
            xs = runner.capture(name)
            signed = bool(min(float(x.min()) for x in xs) < 0)
            flat = torch.cat([x.reshape(-1) for x in xs])
            chunks = torch.cat([x for x in xs]).split(stat_batch)
            a_max = float(np.mean([float(c.abs().max()) for c in chunks]))  # mean_j max|x_j|
            if a_max == 0.0:
                a_max = 1e-8

            def set_act(th, gn=0.0, gs=0.0):
                state.act[name] = {"threshold": th, "step": step_size(th, a_bits, signed), "bits": a_bits,
                                   "gamma_n": gn, "gamma_s": gs, "order": order, "signed": signed}

            a_gc, a_th, a_gn, a_gs = clip_and_round(
                name, "a", a_max, lambda: baseline_threshold(flat, a_bits, clip_rule, signed=signed, seed=seed),
                set_act, "activation" in targets, layer_seed + 2)
            rec.update(a_bits=a_bits, a_gamma_c=a_gc, a_threshold=a_th, a_max=a_max, a_signed=signed,
                       a_step=step_size(a_th, a_bits, signed), a_gamma_n=a_gn, a_gamma_s=a_gs)

        # ---- BiasCorr(i), eq. 7
        base_bias = state.fp_bias(name).clone()
        state.set_bias(name, base_bias)
        t_off = measure(name, "bias", {"bias": 0}, "off")
        delta = torch.zeros_like(base_bias)
        use_bias = False
        if bias_mode != "never":
            delta = fp_means[name] - _channel_mean(runner.capture(name, output=True))
            state.set_bias(name, base_bias + delta)
            t_on = measure(name, "bias", {"bias": 1}, "on")
            use_bias = bias_mode == "always" or not (t_off > t_on)
            if not use_bias:
                state.set_bias(name, base_bias)
        rec.update(bias_corrected=use_bias, bias_delta=(delta if use_bias else torch.zeros_like(delta)).tolist())
        last = probes[-1] if use_bias or bias_mode == "never" else probes[-2]  # the kept state
        rec.update(calib_accuracy=last["accuracy"], calib_loss=last["loss"])
        records.append(rec)
    runner.release()

    config = {"w_bits": w_bits, "a_bits": a_bits, "search": search, "ops": list(ops), "seed": seed,
              "order": order, "clip_rule": clip_rule, "bias_mode": bias_mode, "targets": list(targets),
              "layers": selected, "clip_grid": list(clip_grid), "gamma_n_grid": list(gamma_n_grid),
              "gamma_s_grid": list(gamma_s_grid), "bo_steps": n_bo, "objective": objective,
              "n_calib": len(labels)}
    return QRaterResult(qmodel.eval(), records, probes, config, fp_obj)


def _channel_mean(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-output-channel mean over batch (and space) of a list of ``(B, C, ...)`` outputs."""
    y = torch.cat(outs)
    dims = [d for d in range(y.ndim) if d != 1]
    return y.mean(dim=dims)


def _round_space(order, gamma_n_grid, gamma_s_grid):
    if order == 1:
        return {"gamma_n": (-1.0, 1.0)}, [{"gamma_n": g} for g in gamma_n_grid]
    return ({"gamma_n": (-1.0, 1.0), "gamma_s": (0.0, 1.0)},
            [{"gamma_n": gn, "gamma_s": gs} for gn in gamma_n_grid for gs in gamma_s_grid])


def _search(f, bounds, grid_pts, n_bo, seed, phase: dict) -> dict:
    """Grid then BO through :func:`bayes_search`, keeping ``phase["now"]`` up to date for the
    probe log; returns the best probe."""
    count = [0]

    def g(**p):
        phase["now"] = "grid" if count[0] < len(grid_pts) else "bo"
        count[0] += 1
        return f(**p)

    return _best(bayes_search(g, bounds, grid_pts, n_bo, seed))


# ----------------------------------------------------------------------------- replay
def apply(model: nn.Module, layers: list[dict], upto: int | None = None, example: torch.Tensor | None = None
          ) -> nn.Module:
    """A BN-folded copy of ``model`` with the settings of ``layers[:upto]`` (from :func:`run`).

    Weights are re-quantized from the FP weights with the recorded threshold and
    ``gamma_n``/``gamma_s``; input-activation quantizers are attached as forward pre-hooks;
    recorded bias corrections are added. The result equals :func:`run`'s model for
    ``upto=None`` (tested).
    """
    if example is None:
        example = torch.zeros(2, *_input_shape(model))
    state = _QuantState(model, example)
    for rec in layers[:upto]:
        name = rec["name"]
        if name not in state.modules:
            raise ValueError(f"layer {name!r} of the settings is not in this model")
        if rec.get("w_bits"):
            state.set_weight(name, quantize_weight(state.fp_weight(name), rec["w_threshold"], rec["w_bits"],
                                                   rec["w_gamma_n"], rec["w_gamma_s"], rec["order"]))
        if rec.get("a_bits"):
            state.act[name] = {"threshold": rec["a_threshold"], "step": rec["a_step"], "bits": rec["a_bits"],
                               "gamma_n": rec["a_gamma_n"], "gamma_s": rec["a_gamma_s"],
                               "order": rec["order"], "signed": rec["a_signed"]}
        if rec.get("bias_corrected"):
            state.set_bias(name, state.fp_bias(name) + torch.as_tensor(rec["bias_delta"]))
    return state.model.eval()


def _input_shape(model: nn.Module) -> tuple:
    first = next(m for m in model.modules() if isinstance(m, QUANTIZABLE))
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, 28, 28)
    return (first.in_features,)


def incremental_accuracy(model: nn.Module, layers: list[dict], dataset, batch_size: int = 1000,
                         example: torch.Tensor | None = None, counts=None) -> list[float]:
    """Test accuracy after quantizing layers ``1..k`` for ``k = 0..len(layers)`` (Figs. 6-8),
    or only for the layer counts ``k`` in ``counts`` (a coarser curve for a deep model)."""
    from ..evaluate import accuracy

    counts = range(len(layers) + 1) if counts is None else counts
    for k in counts:
        if not isinstance(k, (int, np.integer)) or not 0 <= k <= len(layers):
            raise ValueError(f"layer counts must be ints in [0, {len(layers)}], got {k!r}")
    return [accuracy(apply(model, layers, int(k), example), dataset, batch_size) for k in counts]


def _test_set(dataset: str, test_n: int | None):
    """The test split of ``dataset``, cut to its first ``test_n`` images (all if ``None``)."""
    from ..data import load_dataset

    test = load_dataset(dataset, "test")
    if test_n is not None:
        test = type(test)(test.images[:test_n], test.labels[:test_n], test.name, f"test[:{test_n}]")
    return test


def experiment_curve(model_name: str, dataset: str, layers: list[dict], *, test_n: int | None = None,
                     counts=None) -> dict:
    """The Figs. 6-8 curve of a finished :func:`experiment` from its ``layers`` records alone.

    Replays the recorded settings with :func:`apply` (no search is re-run), so a cached run
    recorded without ``curve=True`` gets its curve later, on the first ``test_n`` test images
    and at the layer counts ``counts`` (all of ``0..len(layers)`` if ``None``). Returns
    ``{"counts": [...], "accuracy": [...], "test_n": n, "seconds": s}``.
    """
    import time

    from ..models import load_pretrained

    t0 = time.time()
    model = load_pretrained(model_name, dataset)
    test = _test_set(dataset, test_n)
    counts = list(range(len(layers) + 1)) if counts is None else [int(k) for k in counts]
    acc = incremental_accuracy(model, layers, test, example=test.images[:2], counts=counts)
    return {"counts": counts, "accuracy": acc, "test_n": len(test), "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- experiments (notebook 05)
# Table 1 columns: clipping baselines with RTN, and Q-Rater operations (1) round, (2) clip, (3) bias
TABLE1_VARIANTS = {
    "MSE": {"ops": (), "clip_rule": "mse"},
    "ACIQ": {"ops": (), "clip_rule": "aciq"},
    "KL": {"ops": (), "clip_rule": "kl"},
    "(1) round": {"ops": ("round",)},
    "(2) clip": {"ops": ("clip",)},
    "(3) bias": {"ops": ("bias",)},
    "(1)+(2)": {"ops": ("clip", "round")},
    "(1)+(2)+(3)": {"ops": ("clip", "round", "bias")},
}


def experiment(model_name: str, dataset: str, w_bits: int | None, a_bits: int | None, *, per_class: int = 20,
               test_n: int | None = None, curve: bool = False, seed: int = 0, **run_kwargs) -> dict:
    """One Q-Rater (or baseline) run on a committed FP checkpoint, as a JSON-able record.

    Loads ``models.load_pretrained(model_name, dataset)``, draws ``per_class`` training images
    per class as the fixed objective subset (:func:`balanced_subset`), calls :func:`run` with
    ``run_kwargs`` and measures test accuracy (on the first ``test_n`` test images, all if
    ``None``) of the FP and the quantized model; ``curve=True`` adds the test accuracy after
    each incrementally quantized layer (:func:`incremental_accuracy`, Figs. 6-8).
    """
    import time

    from ..data import load_dataset
    from ..evaluate import accuracy, checkpoint_accuracy
    from ..models import load_pretrained

    t0 = time.time()
    model = load_pretrained(model_name, dataset)
    calib = balanced_subset(load_dataset(dataset, "train"), per_class, seed)
    test = _test_set(dataset, test_n)
    res = run(model, w_bits, a_bits, calib, seed=seed, **run_kwargs)
    out = {
        "model": model_name, "dataset": dataset, "config": res.config, "layers": res.layers,
        "probes": res.probes, "fp_calib": res.fp_objective, "test_n": len(test),
        "fp_test_accuracy": checkpoint_accuracy(model, model_name, dataset, test),
        "test_accuracy": accuracy(res.model, test),
        "calib_accuracy": res.layers[-1]["calib_accuracy"] if res.layers else res.fp_objective["accuracy"],
    }
    if curve:
        out["curve"] = incremental_accuracy(model, res.layers, test, example=calib.images[:2])
    out["seconds"] = time.time() - t0
    return out
