"""Bit-exact simulator of SQ's shift-add MAC.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 3.5, Fig. 4.

Datapath of one multiply: the activation ``x`` (unsigned integer from linear quantization)
fans out to constant-shifted copies ``x << s`` (wires); MUX A and MUX B, driven by the
decoder, each pick one copy or zero; an adder sums the two; the sign bit negates; the
accumulator adds. With shifts measured from the smallest exponent ``e_min`` of the term
sets, every value is an integer and

    acc = sum_k (-1)**sign_k * ((x_k << sa_k) + (x_k << sb_k)),
    output = acc * act_scale * weight_scale * 2**e_min .

Two implementations, tested to agree bit for bit:

* :func:`mac_conv2d_reference` / :func:`mac_linear_reference`: the datapath literally, one
  product at a time with Python integers (slow, obviously correct).
* :func:`mac_conv2d` / :func:`mac_linear`: vectorised. For every non-zero MUX case ``j`` the
  decoder output is a matrix ``T_j`` with entries ``(-1)**sign`` where the weight selects case
  ``j`` and 0 elsewhere; ``Y_j = cols @ T_j`` is the signed sum of the selected activations
  (sign flips, gating and additions only: every "product" is by -1, 0 or +1), then
  ``acc = sum_j Y_j << shift_j``. This is the same integer as the per-product datapath because
  a shift distributes over integer addition. The sums are exact: the GEMM runs in float32
  only when every partial sum is an integer below 2**24 (float64 below 2**53, int64 otherwise),
  where floating-point addition of integers is exact in any order; in floating point the
  constant shift ``<< s`` is the scaling by ``2**s`` (an exponent increment, also exact).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...core.validation import check_bits
from .encode import SQDecoder, _check_codes, split_codes

ENGINES = ("auto", "float32", "float64", "int64")


# ----------------------------------------------------------------------------- activations
def activation_qparams(x, bits: int = 8):
    """``(scale, zero_point)`` of unsigned ``bits``-bit linear quantization of ``x`` (min/max).

    Non-negative ``x`` (ReLU outputs) gets ``zero_point = 0`` and ``scale = max / (2**bits - 1)``;
    otherwise the range ``[min, max]`` is mapped to ``[0, 2**bits - 1]`` with an integer zero point.
    """
    bits = _check_act_bits(bits)
    x = torch.as_tensor(x, dtype=torch.float64)
    levels = 2 ** bits - 1
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0:
        return (hi / levels if hi > 0 else 1.0), 0
    hi = max(hi, 0.0)
    scale = (hi - lo) / levels
    return scale, int(round(-lo / scale))


def _check_act_bits(bits) -> int:
    return check_bits(bits, "activation bits", hi=16, lo=1)  # unsigned codes: 1 bit is a valid width


def activation_codes(x, bits: int, scale: float, zero_point: int = 0) -> torch.Tensor:
    """Unsigned linear quantization: ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)`` (int64)."""
    bits = _check_act_bits(bits)
    if not (float(scale) > 0 and math.isfinite(float(scale))):
        raise ValueError(f"activation scale must be positive and finite, got {scale!r}")
    if not 0 <= int(zero_point) <= 2 ** bits - 1:
        raise ValueError(f"zero_point must be in [0, {2 ** bits - 1}], got {zero_point}")
    x = torch.as_tensor(x).to(torch.float64)
    q = torch.round(x / float(scale)) + int(zero_point)
    return q.clamp_(0, 2 ** bits - 1).to(torch.int64)


def dequantize_activation(x_int, scale: float, zero_point: int = 0) -> torch.Tensor:
    """``scale * (x_int - zero_point)`` in float64: the fake-quantized activation."""
    return (torch.as_tensor(x_int).to(torch.float64) - int(zero_point)) * float(scale)


def _check_activation(x_int) -> torch.Tensor:
    x = torch.as_tensor(x_int)
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"activations must be unsigned integers from linear quantization (an integer "
                         f"dtype), got {x.dtype}: use lowbit.sq.hw.activation_codes first")
    x = x.to(torch.int64)
    if x.numel() and x.min() < 0:
        raise ValueError("activations must be unsigned integers (>= 0); shift signed data by a zero "
                         "point (lowbit.hw.activation_qparams) before the MAC")
    return x


# ----------------------------------------------------------------------------- fast path
def _select_matrices(codes: torch.Tensor, decoder: SQDecoder):
    """``T`` (K, J*O) of -1/0/+1 and the J constant shifts; codes are (O, K)."""
    sign, _, sa, sb = split_codes(codes, decoder)
    flip = (1 - 2 * sign)  # (O, K): +1 or -1
    mats, shifts = [], []
    for sel, shift_of in ((sa, decoder.shift_a), (sb, decoder.shift_b)):
        for case, shift in enumerate(shift_of):
            if shift < 0:
                continue  # the constant-zero input of the MUX adds nothing
            mats.append(torch.where(sel == case, flip, torch.zeros_like(flip)).T)  # (K, O)
            shifts.append(int(shift))
    return torch.cat(mats, 1), shifts


def _pick_dtype(engine: str, device, k: int, x_max: int, decoder: SQDecoder):
    """GEMM dtype for the selection sums and whether the shifted sum is exact in it too."""
    bound = k * max(x_max, 1)  # largest |partial sum| of one signed selection sum
    top_a = int(max(decoder.shift_a.max(), 0))
    top_b = int(max(decoder.shift_b.max(), 0))
    total = bound * (2 ** top_a + 2 ** top_b)  # largest |partial sum| of the accumulator
    limits = {torch.float32: 2 ** 24, torch.float64: 2 ** 53, torch.int64: 2 ** 62}
    if engine == "auto":
        cpu_ieee = device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
        if cpu_ieee and bound < 2 ** 24:
            dtype = torch.float32
        else:
            dtype = torch.float64 if bound < 2 ** 53 else torch.int64
    else:
        dtype = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}[engine]
        if bound >= limits[dtype]:
            raise ValueError(f"engine {engine!r} cannot hold sums up to {bound} exactly; use engine='auto'")
    return dtype, total < limits[dtype]


def _check_range(x_max: int, k: int, decoder: SQDecoder):
    top = int(max(decoder.shift_a.max(), decoder.shift_b.max(), 0)) + 1
    if x_max * k * (2 ** top) >= 2 ** 62:
        raise ValueError("accumulator could overflow int64 for these activations; use fewer activation bits")


def _accumulate(cols: torch.Tensor, T: torch.Tensor, shifts, dtype, exact_float_sum: bool) -> torch.Tensor:
    """cols (R, K) -> acc (R, O) int64: signed selection sums, then constant shifts, then add.

    ``Y = cols @ T`` holds one (R, O) block of signed selection sums per non-zero MUX case.
    ``exact_float_sum``: every partial sum of the shifted terms is an integer inside the float
    type's exact range, so the shifts (scaling by 2**s, an exponent increment) and the adds stay
    in ``dtype``; otherwise they run in int64 with ``<<``.
    """
    y = cols.to(dtype) @ T.to(dtype)  # (R, J*O): exact integers
    o = y.shape[1] // len(shifts)
    if dtype != torch.int64 and exact_float_sum:
        acc = y[:, :o] * float(2 ** shifts[0])
        for j in range(1, len(shifts)):
            acc.add_(y[:, j * o:(j + 1) * o], alpha=float(2 ** shifts[j]))
        return acc.to(torch.int64)
    y = y.to(torch.int64)
    acc = y[:, :o] << shifts[0]
    for j in range(1, len(shifts)):
        acc.add_(y[:, j * o:(j + 1) * o] << shifts[j])
    return acc


def _engine(engine):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def selection_matrices(codes, decoder: SQDecoder):
    """The decoder's output for a whole layer, ``(T, shifts)``, to pass as ``selection=`` when
    the same codes are run many times. ``T`` is (K, J*O) of -1/0/+1, one block per non-zero MUX
    case, ``shifts`` the J constant shifts; codes are (O, ...) and K their per-channel size."""
    c = _check_codes(codes, decoder)
    if c.ndim == 4:  # conv: patches are channels-last, (kh, kw, C) per row
        c = c.permute(0, 2, 3, 1)
    return _select_matrices(c.reshape(c.shape[0], -1), decoder)


def mac_linear(x_int, codes, decoder: SQDecoder, engine: str = "auto", selection=None) -> torch.Tensor:
    """Integer accumulators (B, O) of a fully-connected layer on SQ's shift-add MAC (Fig. 4).

    ``x_int`` (B, K) unsigned integers, ``codes`` (O, K) from :func:`lowbit.hw.encode_sq`;
    ``selection``: optional precomputed :func:`selection_matrices` of the same codes.
    """
    _engine(engine)
    x = _check_activation(x_int)
    c = _check_codes(codes, decoder)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"mac_linear needs x (B, K) and codes (O, K), got {tuple(x.shape)} and {tuple(c.shape)}")
    x_max = int(x.max()) if x.numel() else 0
    _check_range(x_max, c.shape[1], decoder)
    T, shifts = selection if selection is not None else _select_matrices(c, decoder)
    if not shifts:
        return torch.zeros(x.shape[0], c.shape[0], dtype=torch.int64)
    dtype, exact = _pick_dtype(engine, x.device, c.shape[1], x_max, decoder)
    return _accumulate(x, T, shifts, dtype, exact)


def _pair(v, name):
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def im2col(x: torch.Tensor, kh: int, kw: int, stride=(1, 1), padding=(0, 0), pad_value: int = 0):
    """(B, C, H, W) -> ``(B*Ho*Wo, kh*kw*C)`` patches, channels-last: row ``(b, i, j)``, column
    ``(u, v, c)`` holds ``x[b, c, i*sh + u - ph, j*sw + v - pw]`` (``pad_value`` outside)."""
    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
    x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
    b, h, w, c = x.shape
    sh, sw = stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {kh}x{kw} is larger than the padded input {h}x{w}")
    sb, shh, sww, sc = x.stride()
    v = x.as_strided((b, ho, wo, kh, kw, c), (sb, shh * sh, sww * sw, shh, sww, sc))
    return v.reshape(b * ho * wo, kh * kw * c), ho, wo


def mac_conv2d(x_int, codes, decoder: SQDecoder, stride=1, padding=0, pad_value: int = 0,
               engine: str = "auto", max_elements: int = 1 << 24, selection=None) -> torch.Tensor:
    """Integer accumulators (B, O, Ho, Wo) of a conv layer on SQ's shift-add MAC (Fig. 4).

    ``x_int`` (B, C, H, W) unsigned integers; ``codes`` (O, C, kh, kw). ``pad_value`` is the
    integer the border is padded with (the zero point of asymmetric activations; 0 after ReLU).
    Work is split over the batch so that at most ``max_elements`` patch entries live at once.
    ``selection``: optional precomputed :func:`selection_matrices` of the same codes.
    """
    _engine(engine)
    x = _check_activation(x_int)
    c = _check_codes(codes, decoder)
    if x.ndim != 4 or c.ndim != 4 or x.shape[1] != c.shape[1]:
        raise ValueError(f"mac_conv2d needs x (B, C, H, W) and codes (O, C, kh, kw) with equal C, "
                         f"got {tuple(x.shape)} and {tuple(c.shape)}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    if int(pad_value) < 0:
        raise ValueError("pad_value must be a non-negative integer (an unsigned activation)")
    o, cin, kh, kw = c.shape
    k = cin * kh * kw
    x_max = max(int(x.max()) if x.numel() else 0, int(pad_value))
    _check_range(x_max, k, decoder)
    T, shifts = selection if selection is not None else selection_matrices(c, decoder)
    dtype, exact = _pick_dtype(engine, x.device, k, x_max, decoder)
    xd = x.to(dtype)
    b = x.shape[0]
    per_image = k * (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    chunk = max(1, max_elements // max(per_image, 1))
    outs = []
    for start in range(0, b, chunk):
        cols, ho, wo = im2col(xd[start:start + chunk], kh, kw, stride, padding, int(pad_value))
        if shifts:
            acc = _accumulate(cols, T, shifts, dtype, exact)  # (R, O)
        else:
            acc = torch.zeros(cols.shape[0], o, dtype=torch.int64)
        outs.append(acc.view(-1, ho, wo, o).permute(0, 3, 1, 2))
    return torch.cat(outs).contiguous()


# ----------------------------------------------------------------------------- reference
def shift_add_product(x: int, code: int, decoder: SQDecoder, group: int = 0) -> dict:
    """One multiply through Fig. 4's datapath, every intermediate value named (Python ints).

    Returns the decoder output (sign, index, select lines), the two MUX outputs, the adder
    output and the signed product.
    """
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"the activation must be an unsigned integer, got {x!r}")
    code = int(code)
    if not 0 <= code < 2 ** decoder.bits:
        raise ValueError(f"code must be in [0, {2 ** decoder.bits}), got {code}")
    sign, idx = code >> decoder.index_bits, code & (decoder.n_points - 1)
    sel_a, sel_b = int(decoder.sel_a[group, idx]), int(decoder.sel_b[group, idx])
    s_a, s_b = int(decoder.shift_a[sel_a]), int(decoder.shift_b[sel_b])
    mux_a = (int(x) << s_a) if s_a >= 0 else 0
    mux_b = (int(x) << s_b) if s_b >= 0 else 0
    total = mux_a + mux_b
    return {"x": int(x), "code": code, "sign": sign, "index": idx, "sel_a": sel_a, "sel_b": sel_b,
            "shift_a": s_a, "shift_b": s_b, "mux_a": mux_a, "mux_b": mux_b, "adder": total,
            "product": -total if sign else total}


def mac_linear_reference(x_int, codes, decoder: SQDecoder) -> torch.Tensor:
    """Plain reference of :func:`mac_linear`: one Fig. 4 product at a time, Python integers."""
    x = _check_activation(x_int)
    c = _check_codes(codes, decoder)
    out = torch.zeros(x.shape[0], c.shape[0], dtype=torch.int64)
    for bi in range(x.shape[0]):
        for o in range(c.shape[0]):
            g = o if decoder.groups > 1 else 0
            acc = 0
            for kk in range(c.shape[1]):
                acc += shift_add_product(int(x[bi, kk]), int(c[o, kk]), decoder, g)["product"]
            out[bi, o] = acc
    return out


def mac_conv2d_reference(x_int, codes, decoder: SQDecoder, stride=1, padding=0,
                         pad_value: int = 0) -> torch.Tensor:
    """Plain reference of :func:`mac_conv2d`: explicit loops over outputs and kernel taps."""
    x = _check_activation(x_int)
    c = _check_codes(codes, decoder)
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    b, cin, h, w = x.shape
    o, _, kh, kw = c.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = torch.zeros(b, o, ho, wo, dtype=torch.int64)
    for bi in range(b):
        for oc in range(o):
            g = oc if decoder.groups > 1 else 0
            for i in range(ho):
                for j in range(wo):
                    acc = 0
                    for ci in range(cin):
                        for u in range(kh):
                            for v in range(kw):
                                r, s = i * sh + u - ph, j * sw + v - pw
                                xv = int(x[bi, ci, r, s]) if 0 <= r < h and 0 <= s < w else int(pad_value)
                                acc += shift_add_product(xv, int(c[oc, ci, u, v]), decoder, g)["product"]
                    out[bi, oc, i, j] = acc
    return out
