"""The one round-to-nearest uniform grid: integer levels, step and fake quantization.

A ``bits``-bit uniform quantizer with step ``s`` has codes ``lo..hi``:
``-(2^(b-1) - 1) .. 2^(b-1) - 1`` signed (symmetric, as SQ eq. 4 made symmetric and as
Q-Rater sec. 5.1), ``0 .. 2^b - 1`` unsigned (after a ReLU). ``Q(x) = s * clamp(round(x / s), lo, hi)``
with round-half-to-even (``torch.round``). Q-Rater's own rounding family (eqs. 3-6, RTN written
``floor(x/s + 0.5)``) is :mod:`lowbit.qrater.rounding`, built on :func:`uniform_levels`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .validation import check_bits


def uniform_levels(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer codes ``(lo, hi)``: ``(-(2^(b-1)-1), 2^(b-1)-1)`` signed, ``(0, 2^b-1)`` unsigned."""
    b = check_bits(bits)
    if signed:
        return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    return 0, 2 ** b - 1


def uniform_step(threshold: float, bits: int, signed: bool = True) -> float:
    """Step ``s = Th / hi``: ``Th / (2^(b-1) - 1)`` signed, ``Th / (2^b - 1)`` unsigned (Q-Rater sec. 5.1)."""
    threshold = float(threshold)
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive finite number, got {threshold}")
    return threshold / uniform_levels(bits, signed)[1]


def uniform_points(bits: int) -> np.ndarray:
    """The symmetric uniform grid as a QPS (SQ eq. 4): ``i / (N-1)``, ``i = 0..N-1``, ``N = 2^(b-1)``.

    Non-negative, unscaled, maximum 1 (the convention of every QPS in lowbit); the levels are
    ``{+-scale * p}``, so ``scale`` is the clipping threshold.
    """
    n = 2 ** (check_bits(bits) - 1)
    return np.arange(n, dtype=np.float64) / (n - 1)


def round_to_grid(x: torch.Tensor, step, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x / step), lo, hi) * step``, computed in place on one temporary.

    Same values as :func:`round_to_grid_reference`, a quarter of the memory traffic; under
    autograd (``x`` or ``step`` requires grad) it falls back to the reference (no in-place ops).
    """
    if torch.is_grad_enabled() and (x.requires_grad or getattr(step, "requires_grad", False)):
        return round_to_grid_reference(x, step, lo, hi)
    return torch.div(x, step).round_().clamp_(lo, hi).mul_(step)


def round_to_grid_reference(x: torch.Tensor, step, lo: int, hi: int) -> torch.Tensor:
    """Plain reference of :func:`round_to_grid`."""
    return torch.clamp(torch.round(x / step), lo, hi) * step
