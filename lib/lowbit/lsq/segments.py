"""nuLSQ's per-segment step-gradient terms and their exact, order-free sums.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024: an input ``z`` of the unsigned rule in segment ``n`` gives only step ``s_n``
the gradient ``round(u) - u`` (times the incoming gradient), an input above ``c_N`` gives every step
+1. Per element that is one term ``v`` added to one segment's sum (:func:`segment_terms`).

The sums are computed in fixed point (our implementation choice, not the paper's): every term is
rounded to a multiple of ``2^-S`` and the multiples are added as integers held in float64, every
partial sum below ``2^52``: each addition is exact, so the result does not depend on the order of the
additions. That lets the compiled kernel (:mod:`lowbit.lsq.kernel`) add on several
threads with interleaved accumulators and still equal the torch path bit for bit, and makes the
sums deterministic on a GPU. ``S`` is set from a bound ``B = max|g| * max(1, c_N)`` on the terms so
that no sum can overflow (:func:`sum_exponent`): a term is rounded by at most
``2^-S / 2 <= 2^-49 * count * B`` and a sum is off by at most ``2^-49 * count^2 * B``: that bound is
``2^25`` times below float32's running-sum bound (``2^-24`` of the partial sum per addition).
Float64 terms (the torch path only; the kernel takes float32) keep a second fixed-point word for the
remainder, ``2^-(S + T)`` with ``T = 51 - L``, so their sums are float64-accurate. A non-finite gradient or input
falls back to a float64 sum, so NaN and inf propagate.
"""
from __future__ import annotations

import math

import torch

SUM_BITS = 52  # every partial |sum| < 2^52: integers that float64 adds exactly
MAX_EXPONENT = 960  # keeps 2^S and 2^-S normal doubles


def segment_terms(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, n: int):
    """``(seg, v)``, flattened: segment 0 for ``z <= 0``, ``1..n`` for the segments, ``n + 1`` above
    ``c_N``; the term ``v = grad`` above ``c_N``, else ``grad * (y - max(z, 0))`` (0 in segment 0);
    ``y = c_k`` the forward's level."""
    seg = (k.long() + (z > y)).reshape(-1)
    v = torch.where(seg == n + 1, grad.reshape(-1), (grad * (y - z.clamp(min=0))).reshape(-1))
    return seg, v


def finite(grad: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether every incoming gradient and input is finite (else the float fallback is used)."""
    return bool(torch.isfinite(grad).all()) and bool(torch.isfinite(z).all())


def largest(grad: torch.Tensor) -> float:
    """``max |grad|`` (0 for an empty tensor; NaN or inf when some element is), from one
    ``torch.aminmax`` pass (exact)."""
    if not grad.numel():
        return 0.0
    low, high = (float(t) for t in torch.aminmax(grad))
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def sum_exponent(gmax: float, c_n: float, count: int) -> int:
    """``S`` for which no sum of ``count`` terms can reach ``2^52``: ``|v| <= max|g| * max(1, c_N)``
    (``|y - max(z, 0)| <= c_N``) up to one float rounding, so with ``max|g| * max(1, c_N) < 2^e``
    (``math.frexp``) and ``count < 2^L``, ``S = 51 - e - L`` (at most 960)."""
    bound = float(gmax) * max(1.0, float(c_n))
    if not math.isfinite(bound):  # the sums take the float fallback
        return 0
    return min(SUM_BITS - 1 - math.frexp(bound)[1] - int(count).bit_length(), MAX_EXPONENT)


def from_fixed(sums: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """The float64 integer sums (multiples of ``2^-S``) as ``dtype``."""
    return (sums * 2.0 ** -exponent).to(dtype)


def float_sums(seg: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """The float64 per-segment sums, used when a gradient or input is not finite (NaN and inf
    propagate)."""
    sums = torch.zeros(n + 2, dtype=torch.float64, device=v.device)
    return sums.index_add_(0, seg, v.to(torch.float64)).to(v.dtype)


def segment_sums(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, n: int,
                 c_n: float) -> torch.Tensor:
    """The ``n + 2`` per-segment sums of :func:`segment_terms`, in fixed point (module docstring):
    each term rounded to a multiple of ``2^-S``, the multiples added as integers in float64."""
    seg, v = segment_terms(grad, z, y, k, n)
    if not finite(grad, z):
        return float_sums(seg, v, n)
    exponent = sum_exponent(largest(grad), c_n, v.numel())
    scaled = v.to(torch.float64) * 2.0 ** exponent  # exact: a power-of-two scaling
    hi = scaled.round()  # half to even
    sums = torch.zeros(n + 2, dtype=torch.float64, device=v.device).index_add_(0, seg, hi)
    if v.dtype != torch.float64:
        return from_fixed(sums, exponent, v.dtype)
    # float64 terms keep a second word: the remainder |scaled - hi| <= 1/2 (exact), itself in fixed
    # point with 2^-(S + T), so the sum is as fine as float64 can hold it
    low_exponent = SUM_BITS - 1 - int(v.numel()).bit_length()
    lo = ((scaled - hi) * 2.0 ** low_exponent).round()
    low = torch.zeros(n + 2, dtype=torch.float64, device=v.device).index_add_(0, seg, lo)
    return sums * 2.0 ** -exponent + low * 2.0 ** -(exponent + low_exponent)
