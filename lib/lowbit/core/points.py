"""The one shared simulated quantizer: nearest point of a symmetric QPS times a scale.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), eq. 3:
``Q(w) = argmin_{q in S_Q(alpha)} |w - q|`` with ``S_Q(alpha) = {+-alpha * p : p in QPS}``.
Because the set is symmetric, ``Q(w) = sgn(w) * alpha * p*`` where ``p*`` is the point nearest to
``|w| / alpha``. Every quantizer in lowbit (uniform eq. 4, log eq. 5, two-word log eq. 6, APoT,
subset eq. 7) is this function with a different ``points`` set.

Tie rules (used by every implementation, fast or reference, and by the MAC encoder
:func:`lowbit.sq.hw.encode_sq`):

* a magnitude exactly half-way between two points goes to the *smaller* point;
* ``sgn(0) = +1``: a zero weight goes to ``+alpha * p_min``, its nearest level. That is 0 when
  0 is in the QPS (every fixed QPS has it); when it is not (an SQ subset may drop 0), eq. 3 has
  no zero level, so a zero weight costs ``(alpha * p_min)^2``, exactly what the hardware's code
  (sign 0, smallest point) computes;
* ``alpha = 0`` is allowed and maps everything to 0 (``S_Q(0) = {0}``): the exact minimiser for an
  all-zero channel, which is what the SQ search returns for one.
"""
from __future__ import annotations

import numpy as np
import torch


def points_tensor(points, dtype, device) -> torch.Tensor:
    """A QPS (array, list or tensor on any device) as a sorted, distinct 1-D tensor of ``dtype`` on
    ``device``; a ``ValueError`` for an empty, non-finite or negative set."""
    if isinstance(points, torch.Tensor):  # any device (np.asarray of a CUDA tensor is an error)
        p = points.detach().to(device=device, dtype=torch.float64).to(dtype)
    else:
        p = torch.as_tensor(np.asarray(points, dtype=np.float64), device=device).to(dtype)
    if p.ndim != 1 or p.numel() == 0:
        raise ValueError("points must be a non-empty 1-D set of non-negative values")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("points must be finite and non-negative (the QPS is mirrored for negatives)")
    p = torch.unique(p)  # sorted ascending, distinct
    return p


def sgn(w: torch.Tensor) -> torch.Tensor:
    """``-1`` for negative entries, ``+1`` otherwise (zeros included): the sign of eq. 3's level."""
    one = torch.ones((), dtype=w.dtype, device=w.device)
    return torch.where(w < 0, -one, one)


def _scale_view(scale, w: torch.Tensor, dim: int) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=w.dtype, device=w.device)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.numel() != w.shape[dim]:
        raise ValueError(f"scale must be a scalar or have one entry per slice of dim {dim} "
                         f"({w.shape[dim]}), got shape {tuple(s.shape)}")
    shape = [1] * w.ndim
    shape[dim] = -1
    return s.reshape(shape)


def point_index(w, points, scale, dim: int = 0) -> torch.Tensor:
    """Index (into the sorted, distinct ``points``) of the point nearest to ``|w| / scale``.

    Implemented by comparing ``|w|`` with the scaled mid-points (half-way ties go down).
    """
    w = torch.as_tensor(w)
    p = points_tensor(points, w.dtype if w.is_floating_point() else torch.float64, w.device)
    w = w.to(p.dtype)
    s = _scale_view(scale, w, dim)
    if (torch.as_tensor(s) < 0).any() or not torch.isfinite(torch.as_tensor(s)).all():
        raise ValueError("scale must be finite and >= 0 (0 maps a whole slice to 0)")
    mids = (p[1:] + p[:-1]) / 2  # (N-1,)
    a = w.abs()
    if s.ndim == 0:
        return torch.searchsorted(mids * s, a.contiguous(), right=False)
    # per-slice thresholds: move dim to front, batch searchsorted over it
    a_t = a.movedim(dim, 0)
    thr = s.reshape(-1, 1) * mids.reshape(1, -1)  # (C, N-1)
    flat = a_t.reshape(a_t.shape[0], -1).contiguous()
    idx = torch.searchsorted(thr.contiguous(), flat, right=False)
    return idx.reshape(a_t.shape).movedim(0, dim)


def quantize_to_points(w, points, scale, dim: int = 0) -> torch.Tensor:
    """``sgn(w) * scale * p*``: the nearest point of ``{+-scale * p}`` (SQ eq. 3; ties: module docstring).

    ``w`` is a tensor (or array); ``scale`` a scalar ``>= 0`` or one value per slice along
    ``dim`` (per output channel for ``dim=0``). Returns a tensor of ``w``'s shape.
    """
    w = torch.as_tensor(w)
    if not w.is_floating_point():
        w = w.to(torch.float64)
    p = points_tensor(points, w.dtype, w.device)
    idx = point_index(w, p, scale, dim)
    s = _scale_view(scale, w, dim)
    return sgn(w) * s * p[idx]


def quantize_to_points_reference(w, points, scale, dim: int = 0) -> torch.Tensor:
    """Plain reference of :func:`quantize_to_points`: argmin of |w - q| over every q."""
    w = torch.as_tensor(w)
    if not w.is_floating_point():
        w = w.to(torch.float64)
    p = points_tensor(points, torch.float64, w.device)
    w64 = w.to(torch.float64)
    s = _scale_view(scale, w64, dim)
    a = w64.abs().unsqueeze(-1)  # (..., 1)
    cand = (s.unsqueeze(-1) if s.ndim else s) * p  # (..., N) or (N,)
    dist = (a - cand).abs()
    # argmin returns the first minimum: the smaller point on an exact tie
    idx = dist.argmin(-1)
    return (sgn(w64) * s * p[idx]).to(w.dtype)


def quantize_rows(rows: torch.Tensor, points, scale: torch.Tensor) -> torch.Tensor:
    """Fast path of :func:`quantize_to_points` for ``(C, K)`` rows and a ``(C,)`` scale.

    Divides by the scale and looks ``|w| / scale`` up in the *one* sorted list of mid-points
    (``torch.bucketize``) instead of per-row thresholds; identical except possibly for
    magnitudes within float rounding of a tie. Used inside the scale searches (hundreds of
    calls); final weights always go through :func:`quantize_to_points`.
    """
    p = points_tensor(points, rows.dtype, rows.device)
    s = torch.as_tensor(scale, dtype=rows.dtype, device=rows.device).reshape(-1, 1)
    mids = (p[1:] + p[:-1]) / 2
    u = torch.where(s > 0, rows.abs() / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(rows))
    idx = torch.bucketize(u, mids, right=False)
    return sgn(rows) * p[idx] * s
