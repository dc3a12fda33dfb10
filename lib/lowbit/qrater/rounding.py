"""Q-Rater's rounding (eqs. 3-6) and clipping threshold (sec. 5.2) of a layer-wise uniform quantizer.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868. The integer levels and the step ``Th_c / hi`` are the shared
uniform grid of :mod:`lowbit.core.uniform`; what is Q-Rater's own is the rounding offset ``f_r``
(1st order, eq. 4; 2nd order, eq. 6) and the clipping ``Th_c = gamma_c * max|x|``.

Choices where the paper is silent or ambiguous:

* ``w_r = floor(x/s + 0.5)`` exactly as written, also for negative ``x``; the rounding offset
  uses ``sign(x * ...)``, so the scheme is odd-symmetric up to exact ties.
* ``|gamma_n| ** 0 = 1``: at ``w_r = 0`` the 1st-order offset is ``+-0.5``, so for
  ``gamma_n > 0`` every non-zero value leaves the zero level (it has zero width) and for
  ``gamma_n < 0`` the zero level widens from 1 to ``1 + |gamma_n|`` steps. ``gamma_n = 0`` gives
  ``sign(0) = 0``, so ``0 ** 0`` never matters there: it is exactly RTN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core.uniform import uniform_levels, uniform_step
from ..core.validation import check_bits

ORDERS = (1, 2)


def check_gamma(value, lo: float, hi: float, what: str, open_lo: bool = False) -> float:
    """``value`` as a float in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``), else a ValueError/TypeError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v) or v > hi or (v <= lo if open_lo else v < lo)
    if bad:
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise ValueError(f"{what} must lie in {rng}, got {value}")
    return v


def check_order(order) -> int:
    """The rounding order: 1 (eq. 4) or 2 (eq. 6)."""
    if isinstance(order, bool) or order not in ORDERS:
        raise ValueError(f"order must be 1 (eq. 4) or 2 (eq. 6), got {order!r}")
    return int(order)


def rounding_offset(x, w_r, bits, gamma_n, gamma_s, order, signed) -> torch.Tensor:
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
    """Q-Rater rounding (eqs. 3-6) of ``x`` (already clipped) to the grid ``step * k`` (API).

    ``w_r = floor(x/step + 0.5)`` (RTN integer), then ``step * floor(x/step + 0.5 + f_r)`` with

    * 1st order (eq. 4): ``f_r = 0.5 * sign(x*gamma_n) * |gamma_n| ** |w_r|``;
    * 2nd order (eq. 6): ``f_r = 0.5 * sign(x*gamma_n*(gamma_s*2^(q-1) - |w_r|))
      * |gamma_n| ** | |w_r| - gamma_s*2^(q-1) - beta |``, ``beta = 2^(q-2)``;

    and the integer is kept in the q-bit symmetric range ``|k| <= 2^(q-1) - 1``, or in
    ``0 .. 2^q - 1`` when ``signed=False`` (activations after a ReLU; there eq. 6 uses the
    span ``2^q`` and ``beta = 2^(q-1)`` in place of ``2^(q-1)`` and ``2^(q-2)``).

    ``gamma_n in [-1, 1]``, ``gamma_s in [0, 1]`` (``None`` means 0; ignored by order 1).
    ``gamma_n = 0`` is exactly round-to-nearest (ties up) for both orders. For the 1st order and
    ``k >= 1`` the level ``k`` spans ``1 + 0.5 g^(k-1) (1 - g)`` steps for ``g = gamma_n > 0``
    (shrinking away from zero) and ``1 - 0.5 |g|^k (1 - |g|)`` for ``g < 0`` (growing), as
    Fig. 9 describes (see :func:`range_division`). Returns a tensor of ``x``'s shape and float
    dtype; :func:`round_values_reference` is the plain one-value-at-a-time transcription.
    """
    q = check_bits(bits)
    order = check_order(order)
    gamma_n = check_gamma(gamma_n, -1.0, 1.0, "gamma_n")
    gamma_s = 0.0 if gamma_s is None else check_gamma(gamma_s, 0.0, 1.0, "gamma_s")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    step_t = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if step_t.numel() != 1 or not torch.isfinite(step_t) or step_t.item() <= 0:
        raise ValueError(f"step must be one positive finite number (layer-wise), got {step}")
    lo, hi = uniform_levels(q, signed)
    u = x / step_t
    w_r = torch.floor(u + 0.5)
    if gamma_n == 0.0:
        k = w_r  # f_r = 0: RTN
    else:
        k = torch.floor(u + 0.5 + rounding_offset(x, w_r, q, gamma_n, gamma_s, order, signed))
    return k.clamp(lo, hi) * step_t


def round_values_reference(x, step, bits, gamma_n, gamma_s=None, order=2, signed=True) -> list[float]:
    """Plain-Python, one value at a time, transcription of eqs. 3-6 (the reference of :func:`round_values`)."""
    q = check_bits(bits)
    gs = 0.0 if gamma_s is None else float(gamma_s)
    lo, hi = uniform_levels(q, signed)
    span = 2 ** (q - 1) if signed else 2 ** q

    def sgn(t):
        return (t > 0) - (t < 0)

    out = []
    for v in np.asarray(x, dtype=np.float64).ravel().tolist():
        w_r = math.floor(v / step + 0.5)
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
    lo, hi = uniform_levels(bits, signed)
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


def clip_threshold(x, gamma_c: float) -> float:
    """Q-Rater clipping threshold ``Th_c = gamma_c * max|x|`` (sec. 5.2), ``gamma_c in (0, 1]`` (API).

    The step is then ``Th_c / (2^(q-1) - 1)`` (:func:`lowbit.core.uniform.uniform_step`).
    """
    gamma_c = check_gamma(gamma_c, 0.0, 1.0, "gamma_c", open_lo=True)
    x = torch.as_tensor(x)
    if x.numel() == 0:
        raise ValueError("cannot clip an empty tensor")
    return gamma_c * float(x.abs().max())


def clip_round_weight(w: torch.Tensor, threshold: float, bits: int, gamma_n: float = 0.0, gamma_s: float = 0.0,
                      order: int = 2) -> torch.Tensor:
    """Clip ``w`` to ``[-Th_c, Th_c]`` and round it (eqs. 3-6) to the signed grid of step ``Th_c / (2^(q-1)-1)``."""
    return round_values(w.clamp(-threshold, threshold), uniform_step(threshold, bits), bits, gamma_n, gamma_s,
                        order)


@dataclass(frozen=True)
class ActRounding:
    """The input-activation quantizer of one layer: clip to ``[-Th, Th]`` (``[0, Th]`` unsigned),
    then Q-Rater rounding with ``gamma_n``/``gamma_s`` on the grid of ``step``."""

    threshold: float
    step: float
    bits: int
    gamma_n: float
    gamma_s: float
    order: int
    signed: bool

    @classmethod
    def at(cls, threshold: float, bits: int, signed: bool, gamma_n: float = 0.0, gamma_s: float = 0.0,
           order: int = 2) -> "ActRounding":
        """The quantizer with the uniform step ``Th / hi`` of ``bits`` (signed or not)."""
        return cls(threshold, uniform_step(threshold, bits, signed), bits, gamma_n, gamma_s, order, signed)


def clip_round_activation(x: torch.Tensor, setting: ActRounding) -> torch.Tensor:
    """Clip an activation to ``[-Th, Th]`` (``[0, Th]`` unsigned) and round it (eqs. 3-6)."""
    th = setting.threshold
    xc = x.clamp(-th if setting.signed else 0.0, th)
    return round_values(xc, setting.step, setting.bits, setting.gamma_n, setting.gamma_s, setting.order,
                        setting.signed)
