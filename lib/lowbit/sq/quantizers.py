"""Simulated weight quantizers defined by their quantization point set (QPS).

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 3.2: every quantizer is "nearest point of a QPS
times a scale" (eq. 3); quantizers differ only in the QPS. Each QPS here is the set of
*non-negative, unscaled* points ``p`` with ``max(p) = 1``; the quantizer's levels are
``{+-scale * p}`` and the one shared nearest-point rule is :func:`lowbit.core.points.quantize_to_points`.

=================  =========================================================================
``"uniform"``      eq. 4, symmetric: ``p = i / (N-1), i = 0..N-1`` (2N-1 levels; the extra
                   negative level of eq. 4 is dropped so the set is symmetric). ``scale`` is
                   the clipping threshold, chosen per channel/layer by MSE.
``"log2"``         eq. 5: ``{0} u {2^-i : i = 0..N-2}`` (the positive side of eq. 5).
``"two_word_log"`` eq. 6: ``{a + b : a, b in S_log}`` with ``S_log`` the eq.-5 set at the same
                   ``bits``, normalised to max 1. As eq. 6 says, this needs *two words* of
                   ``bits`` bits, so its QPS has more than ``N`` points (e.g. 30 at 4 bits):
                   it is the "more storage" reference, not a ``bits``-bit quantizer.
``"apot"``         additive powers-of-two (Li, Dong, Wang, ICLR 2020), built exactly as the
                   official ``build_power_value(B)`` with ``B = bits - 1`` (the sign bit is
                   excluded, as APoT does for weights): ``2^B`` points. ``B = 1`` (2-bit) is
                   undefined upstream; we use the only 2-point set ``{0, 1}`` (ternary).
``"sq"``           subset quantization, eq. 7: the QPS (``N`` points of a universal set) and
                   per-channel scales found by :func:`lowbit.sq.search.search_qps` (Algorithm 1,
                   eqs. 8-10); one QPS per layer, one scale per output channel (SQ sec. 4.2).
=================  =========================================================================

``N = 2^(bits-1)`` throughout (SQ eq. 4). For the fixed-QPS methods the scale is fitted by
minimising the weight MSE: a grid over ``r * max|w| / max(p)`` followed by the fixed-point
update ``alpha <- <w, p(w)> / <p(w), p(w)>`` (the optimal-scale iteration of SQ eqs. 8-10),
keeping whichever is best per channel. Plain reference: :func:`fit_scale_reference`
(a dense grid, no iteration), tested to agree up to the grid spacing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.points import quantize_rows, quantize_to_points
from ..core.uniform import uniform_points
from ..core.validation import check_bits
from .search import search_qps

METHODS = ("uniform", "log2", "two_word_log", "apot", "sq")
GRANULARITIES = ("channel", "layer")


# --------------------------------------------------------------------------- QPS builders
def log2_points(bits: int) -> np.ndarray:
    """Log-scale QPS (SQ eq. 5, positive side): ``{0} u {2^-i : i = 0..N-2}`` (N points)."""
    n = 2 ** (check_bits(bits) - 1)
    return np.sort(np.concatenate([[0.0], 2.0 ** -np.arange(n - 1, dtype=np.float64)]))


def two_word_log_points(bits: int) -> np.ndarray:
    """Two-word log QPS (SQ eq. 6): ``{a + b : a, b in S_log(bits)}``, scaled to max 1.

    Needs two words of ``bits`` bits each: more than ``2^(bits-1)`` points.
    """
    s = log2_points(bits)
    sums = np.unique((s[:, None] + s[None, :]).ravel())
    return sums / sums.max()


def apot_terms(bits: int) -> tuple[list, list, list]:
    """The three term lists ``(A, B, C)`` of APoT (Li, Dong, Wang, ICLR 2020) before scaling: every
    point is ``a + b + c`` (C holds only 0 below 6 bits, so two shift-add terms suffice there).

    Transcribes the official ``build_power_value(B, additive=True)`` with ``B = bits - 1``
    (sign bit excluded).
    """
    b = check_bits(bits, hi=7, lo=2, what="APoT bits (2..7)") - 1
    base_a, base_b, base_c = [0.0], [0.0], [0.0]
    if b == 1:
        base_a.append(1.0)
    elif b == 2:
        base_a += [2.0 ** (-i - 1) for i in range(3)]
    elif b == 3:
        for i in range(3):
            if i < 2:
                base_a.append(2.0 ** (-i - 1))
            else:
                base_b.append(2.0 ** (-i - 1))
                base_a.append(2.0 ** (-i - 2))
    elif b == 4:
        for i in range(3):
            base_a.append(2.0 ** (-2 * i - 1))
            base_b.append(2.0 ** (-2 * i - 2))
    elif b == 5:
        for i in range(3):
            if i < 2:
                base_a.append(2.0 ** (-2 * i - 1))
                base_b.append(2.0 ** (-2 * i - 2))
            else:
                base_c.append(2.0 ** (-2 * i - 1))
                base_a.append(2.0 ** (-2 * i - 2))
                base_b.append(2.0 ** (-2 * i - 3))
    else:  # b == 6
        for i in range(3):
            base_a.append(2.0 ** (-3 * i - 1))
            base_b.append(2.0 ** (-3 * i - 2))
            base_c.append(2.0 ** (-3 * i - 3))
    return base_a, base_b, base_c


def apot_points(bits: int) -> np.ndarray:
    """Additive powers-of-two QPS (APoT, Li et al. ICLR 2020), ``2^(bits-1)`` points, max 1: the
    sums of :func:`apot_terms` (``bits = 2`` gives ``{0, 1}``)."""
    base_a, base_b, base_c = apot_terms(bits)
    values = np.unique([a + bb + c for a in base_a for bb in base_b for c in base_c])
    return values / values.max()


def qps(method: str, bits: int) -> np.ndarray:
    """The unscaled QPS (non-negative points, max 1) of a fixed-QPS ``method`` at ``bits``.

    ``"sq"`` has no fixed QPS (it is searched per layer): use :func:`fit_quantizer`.
    """
    builders = {"uniform": uniform_points, "log2": log2_points,
                "two_word_log": two_word_log_points, "apot": apot_points}
    if method == "sq":
        raise ValueError("'sq' has no fixed QPS: it is searched per layer; call fit_quantizer(w, 'sq', bits)")
    if method not in builders:
        raise ValueError(f"unknown quantizer method {method!r}: use one of {METHODS}")
    return builders[method](bits)


# --------------------------------------------------------------------------- scale fitting
def _channel_view(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``(C, K)`` rows, one per output channel (``granularity='channel'``) or ``(1, numel)``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    w = w.detach().to(torch.float64)
    if granularity == "layer" or w.ndim < 2:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def _row_mse(rows: torch.Tensor, points, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared quantization error per row for per-row ``scale`` ``(C,)``."""
    return ((rows - quantize_rows(rows, points, scale)) ** 2).mean(1)


def fit_scale(weight, points, granularity: str = "channel", grid: int = 40,
              iters: int = 8, max_cols: int = 1024) -> torch.Tensor:
    """MSE-optimal scale of ``{+-scale * points}`` for ``weight`` per channel or per layer.

    Grid search over ``scale = r * max|w| / max(points)``, ``r in (0.05, 1]`` (``grid``
    values; ``r = 1`` is no clipping), then ``iters`` steps of the fixed-point update
    ``alpha <- sum(|w| p*) / sum(p*^2)`` (SQ eqs. 8-10), each kept only where it lowers the
    MSE. Returns a ``(C,)`` tensor (``"channel"``) or a 0-d tensor (``"layer"``), float64.
    All-zero rows get scale 1. Rows longer than ``max_cols`` are fitted on a fixed random
    subset of ``max_cols`` entries plus each row's largest magnitude (big layers stay fast).
    """
    rows = _channel_view(torch.as_tensor(weight), granularity)  # (C, K)
    if rows.shape[1] > max_cols:
        gen = torch.Generator().manual_seed(0)
        cols = torch.randperm(rows.shape[1], generator=gen)[: max_cols - 1]
        rows = torch.cat([rows[:, cols], rows.abs().amax(1, keepdim=True)], 1)
    p = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if p.ndim != 1 or p.numel() < 2 or (p < 0).any() or p.max() <= 0:
        raise ValueError("points must be a 1-D set of >= 2 non-negative values with a positive maximum")
    amax = rows.abs().amax(1)  # (C,)
    base = torch.where(amax > 0, amax / p.max(), torch.ones_like(amax))
    best_s, best_l = base.clone(), _row_mse(rows, p, base)
    for r in torch.linspace(1.0, 0.05, grid, dtype=torch.float64)[1:]:
        s = base * r
        loss = _row_mse(rows, p, s)
        better = loss < best_l
        best_s, best_l = torch.where(better, s, best_s), torch.where(better, loss, best_l)
    for _ in range(iters):  # fixed-point refinement (eqs. 8-10)
        q = quantize_rows(rows, p, best_s) / best_s[:, None]  # signed unscaled points
        den = (q ** 2).sum(1)
        s = torch.where(den > 0, (rows * q).sum(1) / den.clamp_min(1e-300), best_s)
        s = torch.where(s > 0, s, best_s)
        loss = _row_mse(rows, p, s)
        better = loss < best_l
        if not better.any():
            break
        best_s, best_l = torch.where(better, s, best_s), torch.where(better, loss, best_l)
    return best_s if granularity == "channel" and torch.as_tensor(weight).ndim >= 2 else best_s[0]


def fit_scale_reference(weight, points, granularity: str = "channel", grid: int = 2000) -> torch.Tensor:
    """Plain reference of :func:`fit_scale`: a dense grid only (one scale per row at a time)."""
    rows = _channel_view(torch.as_tensor(weight), granularity)
    p = torch.as_tensor(np.asarray(points, dtype=np.float64))
    out = []
    for row in rows:
        amax = float(row.abs().max())
        if amax == 0:
            out.append(1.0)
            continue
        best = (float("inf"), 1.0)
        for r in np.linspace(0.05, 1.0, grid):
            s = r * amax / float(p.max())
            loss = float(((row - quantize_to_points(row, p, s)) ** 2).mean())
            best = min(best, (loss, s))
        out.append(best[1])
    s = torch.tensor(out, dtype=torch.float64)
    return s if granularity == "channel" and torch.as_tensor(weight).ndim >= 2 else s[0]


# --------------------------------------------------------------------------- fitted quantizer
@dataclass
class FittedQuantizer:
    """A weight quantizer fitted to one tensor: its method, bits, QPS and scale(s).

    ``points``: unscaled non-negative QPS (numpy, sorted); ``scale``: ``(C,)`` per output
    channel or 0-d per layer. Calling it applies SQ eq. 3 (:func:`quantize_to_points`).
    """

    method: str
    bits: int
    points: np.ndarray
    scale: torch.Tensor
    granularity: str = "channel"
    info: dict = field(default_factory=dict)

    def __call__(self, weight) -> torch.Tensor:
        w = torch.as_tensor(weight)
        q = quantize_to_points(w.detach().to(torch.float64), self.points, self.scale, dim=0)
        return q.to(w.dtype if w.is_floating_point() else torch.float64)

    def mse(self, weight) -> float:
        """Mean squared error between ``weight`` and its quantized version."""
        w = torch.as_tensor(weight).detach().to(torch.float64)
        return float(((w - self(w).to(torch.float64)) ** 2).mean())


def check_method(method, bits) -> None:
    """Raise ``ValueError``/``TypeError`` naming the fix for an unknown method or bad bits."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown quantizer method {method!r}: use one of {METHODS}")
    if method == "apot":
        check_bits(bits, hi=7, lo=2, what="APoT bits (2..7)")
    elif method == "sq":
        check_bits(bits, hi=4, lo=2, what="SQ bits (2..4; a 15-16 element universal set holds at most 16 points)")
    elif method in ("log2", "two_word_log"):
        check_bits(bits, hi=8, lo=2, what=f"{method} bits (2..8)")
    else:
        check_bits(bits, hi=16, lo=2, what="uniform bits (2..16)")


def fit_quantizer(weight, method: str, bits: int, granularity: str = "channel",
                  universal=5, search_method: str = "fast") -> FittedQuantizer:
    """Fit ``method`` at ``bits`` to ``weight`` (per output channel or per layer).

    Fixed-QPS methods get their QPS from :func:`qps` and an MSE scale from :func:`fit_scale`;
    ``"sq"`` calls :func:`lowbit.sq.search.search_qps` (SQ Algorithm 1) for one QPS per layer
    and its per-channel (or per-layer) scales.
    """
    check_method(method, bits)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    w = torch.as_tensor(weight).detach()
    if not w.is_floating_point() or w.numel() == 0:
        raise TypeError("weight must be a non-empty floating-point tensor")
    if method == "sq":
        res = search_qps(w.to(torch.float64), bits, universal=universal,
                         granularity=granularity, method=search_method)
        points = np.sort(np.asarray(res.points, dtype=np.float64))
        scale = torch.as_tensor(np.asarray(res.scale, dtype=np.float64))
        if granularity == "channel" and w.ndim >= 2:
            scale = scale.reshape(-1)
        else:
            scale = scale.reshape(-1)[0] if scale.ndim else scale
        info = {"universal": universal, "search_loss": float(np.sum(np.asarray(res.loss)))}
        return FittedQuantizer(method, int(bits), points, scale, granularity, info)
    points = qps(method, bits)
    scale = fit_scale(w, points, granularity)
    return FittedQuantizer(method, int(bits), points, scale, granularity, {})
