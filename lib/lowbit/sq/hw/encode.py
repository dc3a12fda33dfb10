"""Weight encoding for SQ's MAC: integer codes plus the per-layer decoder table.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 3.5 and Fig. 4: a b-bit weight is a sign bit
and a (b-1)-bit index into the quantization point set (QPS, N = 2**(b-1) points). Every point is
``a + b`` with ``a`` in term set A and ``b`` in term set B (Table 1), so the decoder turns an
index into the select lines of MUX A and MUX B. The decoder is a register of
``N x (select bits of A + select bits of B)`` bits shared by the layer (16 bits = 4 x 4 bits
for the paper's 3-bit, option-5 case) plus an N-to-1 MUX.

Code layout: ``code = (sign << index_bits) | index``, ``index`` into the sorted distinct
points, ``sign = 1`` for a negative weight (a weight that maps to the point 0 gets sign 0).
The index is the nearest point of ``{+-scale * p}`` (SQ eq. 3) from the shared quantizer
:func:`lowbit.core.points.point_index`, ties to the smaller point.

Bit-exact integers: with ``e_min`` the smallest exponent in A and B, each non-zero term
``2**e`` is the left shift ``e - e_min`` of ``x`` and each point is
``p = (2**sa + 2**sb) * 2**e_min``; the accumulator is an integer and the layer output is
``acc * act_scale * weight_scale * 2**e_min``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ...core.points import points_tensor, point_index
from .terms import TermSet, universal_terms


@dataclass
class SQDecoder:
    """Per-layer (``groups = 1``) or per-channel decoder of SQ codes (Sec. 3.5, Fig. 4).

    ``points``/``sel_a``/``sel_b`` have shape ``(groups, N)``; ``scale`` is a scalar or one value
    per output channel; ``shift_a[j]``/``shift_b[j]`` are the constant left shifts of MUX case
    ``j`` (``-1`` for the zero input).
    """

    option: object
    A: TermSet
    B: TermSet
    points: np.ndarray          # (G, N) float64, sorted per row
    sel_a: np.ndarray           # (G, N) int64: MUX A select line of each index
    sel_b: np.ndarray           # (G, N) int64
    scale: torch.Tensor         # () or (O,) float64
    index_bits: int
    e_min: int
    shift_a: np.ndarray = field(init=False)
    shift_b: np.ndarray = field(init=False)

    def __post_init__(self):
        self.shift_a = np.array([-1 if e is None else e - self.e_min for e in self.A.exponents])
        self.shift_b = np.array([-1 if e is None else e - self.e_min for e in self.B.exponents])

    @property
    def bits(self) -> int:
        """Weight bits: sign + index bits."""
        return 1 + self.index_bits

    @property
    def n_points(self) -> int:
        return self.points.shape[1]

    @property
    def groups(self) -> int:
        return self.points.shape[0]

    @property
    def unit(self) -> float:
        """``2**e_min``: the value of one accumulator LSB per unit of act and weight scale."""
        return 2.0 ** self.e_min

    @property
    def int_points(self) -> np.ndarray:
        """``p * 2**-e_min`` as integers (G, N): ``(1 << sa) + (1 << sb)`` (0 for a zero case)."""
        va = np.where(self.shift_a >= 0, np.left_shift(1, np.maximum(self.shift_a, 0)), 0)
        vb = np.where(self.shift_b >= 0, np.left_shift(1, np.maximum(self.shift_b, 0)), 0)
        return (va[self.sel_a] + vb[self.sel_b]).astype(np.int64)

    @property
    def register_bits(self) -> int:
        """Width of the QPS register: N x (select bits of A + select bits of B)."""
        return self.n_points * (self.A.select_bits + self.B.select_bits)

    def register(self, group: int = 0) -> int:
        """The register's content for one group: index i holds ``sel_a << sb_bits | sel_b``
        at bit offset ``i * (sa_bits + sb_bits)``."""
        sa_bits, sb_bits = self.A.select_bits, self.B.select_bits
        value = 0
        for i in range(self.n_points):
            word = (int(self.sel_a[group, i]) << sb_bits) | int(self.sel_b[group, i])
            value |= word << (i * (sa_bits + sb_bits))
        return value

    def table(self, group: int = 0) -> list[dict]:
        """One row per code: sign, index, point, its (a, b) split and the select lines."""
        rows = []
        a_vals, b_vals = self.A.values, self.B.values
        for code in range(2 ** self.bits):
            sign, idx = code >> self.index_bits, code & (self.n_points - 1)
            sa, sb = int(self.sel_a[group, idx]), int(self.sel_b[group, idx])
            p = float(self.points[group, idx])
            rows.append({
                "code": format(code, f"0{self.bits}b"), "sign": sign, "index": idx,
                "point": -p if sign else p, "a": float(a_vals[sa]), "b": float(b_vals[sb]),
                "sel_a": sa, "sel_b": sb,
                "shift_a": int(self.shift_a[sa]), "shift_b": int(self.shift_b[sb]),
            })
        return rows


def decompose(point: float, A: TermSet, B: TermSet) -> tuple[int, int]:
    """The MUX select pair ``(i, j)`` with ``A[i] + B[j] == point`` (first in (i, j) order)."""
    a_vals, b_vals = A.values, B.values
    for i, a in enumerate(a_vals):
        for j, b in enumerate(b_vals):
            if a + b == point:
                return i, j
    raise ValueError(f"point {point!r} is not a + b for any a in A, b in B: the QPS must be a subset "
                     "of the universal set of the same option (SQ Table 1); points are unscaled, the "
                     "scale factor is passed separately")


def _check_weight(weight) -> torch.Tensor:
    w = torch.as_tensor(weight)
    if not w.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {w.dtype}")
    if w.ndim < 1:
        raise ValueError("weight must have at least one dimension (output channels first)")
    if not torch.isfinite(w).all():
        raise ValueError("weight has NaN or infinite entries")
    return w.to(torch.float64)


def encode_sq(weight, points, scale, option=5):
    """Encode ``weight`` for SQ's MAC: ``(codes, decoder)`` (SQ Sec. 3.5, Fig. 4; eq. 3).

    ``points``: the QPS, ``N = 2**(bits-1)`` distinct non-negative values from the universal
    set of ``option`` (1..5 or an ``(A, B)`` pair), shape ``(N,)`` for one QPS per layer or
    ``(O, N)`` for one per output channel. ``scale``: a scalar ``>= 0`` or one per output channel
    (0 for an all-zero channel, as the SQ search returns it: every code then decodes to 0).
    Returns int64 ``codes`` of ``weight``'s shape and an :class:`SQDecoder`.

    A weight exactly 0 is coded as the smallest point with sign 0 (eq. 3's nearest level
    ``+scale * p_min``; the hardware has no zero code when 0 is not in the QPS), so
    ``decode_sq(codes)`` equals ``lowbit.core.points.quantize_to_points(weight, points, scale)``
    everywhere, zero weights included.
    """
    w = _check_weight(weight)
    A, B = universal_terms(option)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[None, :]
    if pts.ndim != 2 or pts.shape[1] == 0:
        raise ValueError(f"points must have shape (N,) or (out_channels, N), got {np.shape(points)}")
    if pts.shape[0] not in (1, w.shape[0]):
        raise ValueError(f"per-channel points need one row per output channel ({w.shape[0]}), "
                         f"got {pts.shape[0]} rows")
    n = pts.shape[1]
    if n < 2 or n & (n - 1):
        raise ValueError(f"the QPS must hold N = 2**(bits-1) points (2, 4, 8, ...) so that a code is a "
                         f"sign bit plus log2(N) index bits; got N = {n}")
    rows = []
    for r in pts:
        u = points_tensor(r, torch.float64, "cpu").numpy()
        if u.size != n:
            raise ValueError("points must be distinct: a repeated point wastes a code")
        rows.append(u)
    pts = np.stack(rows)
    index_bits = int(math.log2(n))

    s = torch.as_tensor(scale, dtype=torch.float64)
    if s.ndim > 1 or (s.ndim == 1 and s.numel() != w.shape[0]):
        raise ValueError(f"scale must be a scalar or one value per output channel ({w.shape[0]}), "
                         f"got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("scale must be finite and >= 0")

    sel = np.array([[decompose(float(p), A, B) for p in r] for r in pts], dtype=np.int64)  # (G, N, 2)
    exps = A.nonzero_exponents + B.nonzero_exponents
    e_min = min(exps) if exps else 0

    if pts.shape[0] == 1:
        idx = point_index(w, pts[0], s, dim=0)
    else:
        idx = torch.stack([point_index(w[o], pts[o], s[o] if s.ndim else s, dim=0)
                           for o in range(w.shape[0])])
    idx = idx.to(torch.int64)
    pts_t = torch.as_tensor(pts)
    point_of = pts_t[0][idx] if pts.shape[0] == 1 else torch.gather(
        pts_t, 1, idx.reshape(w.shape[0], -1)).reshape(w.shape)
    sign = ((w < 0) & (point_of != 0)).to(torch.int64)
    codes = (sign << index_bits) | idx
    decoder = SQDecoder(option=option, A=A, B=B, points=pts, sel_a=sel[..., 0].copy(),
                        sel_b=sel[..., 1].copy(), scale=s.clone(), index_bits=index_bits, e_min=e_min)
    return codes, decoder


def _check_codes(codes, decoder: SQDecoder) -> torch.Tensor:
    c = torch.as_tensor(codes)
    if c.dtype.is_floating_point or c.dtype == torch.bool or c.is_complex():
        raise TypeError(f"codes must be an integer tensor, got dtype {c.dtype}")
    c = c.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2 ** decoder.bits):
        raise ValueError(f"codes must be in [0, {2 ** decoder.bits}) for {decoder.bits}-bit weights")
    if c.ndim < 1 or decoder.groups not in (1, c.shape[0]):
        raise ValueError(f"decoder has {decoder.groups} groups but codes have {c.shape[0] if c.ndim else 0} "
                         "output channels")
    return c


def split_codes(codes, decoder: SQDecoder):
    """``(sign, index, sel_a, sel_b)`` tensors of ``codes``' shape (the decoder's output)."""
    c = _check_codes(codes, decoder)
    sign = c >> decoder.index_bits
    idx = c & (decoder.n_points - 1)
    sa = torch.as_tensor(decoder.sel_a)
    sb = torch.as_tensor(decoder.sel_b)
    if decoder.groups == 1:
        return sign, idx, sa[0][idx], sb[0][idx]
    flat = idx.reshape(c.shape[0], -1)
    return (sign, idx, torch.gather(sa, 1, flat).reshape(c.shape),
            torch.gather(sb, 1, flat).reshape(c.shape))


def decode_sq(codes, decoder: SQDecoder) -> torch.Tensor:
    """Float64 weights ``(-1)**sign * scale * point[index]`` of ``codes`` (inverse of encode)."""
    sign, idx, _, _ = split_codes(codes, decoder)
    pts = torch.as_tensor(decoder.points)
    if decoder.groups == 1:
        p = pts[0][idx]
    else:
        p = torch.gather(pts, 1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)
    s = decoder.scale
    if s.ndim == 1:
        s = s.reshape([-1] + [1] * (idx.ndim - 1))
    return (1 - 2 * sign).to(torch.float64) * s * p
