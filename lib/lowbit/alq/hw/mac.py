"""STLQ's bit-exact shift MAC (linear and conv2d) and its plain references.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751). **Our interpretation** (see :mod:`lowbit.alq.hw`).

Shift MAC (:func:`stlq_mac_linear`, :func:`stlq_mac_conv2d`; *our interpretation*)
    Integer activations ``x`` (int64; signed is allowed, a left shift of a two's-complement value
    is a multiplication by ``2^s``). Each product is ``sign1 * (x << shift1)`` plus, where ``has2``,
    ``sign2 * (x << shift2)``, summed in int64, so ``acc = x_int @ w_int.T`` exactly and the
    layer output is ``acc * act_scale * scale * 2^-E``. A ``ValueError`` is raised up front when
    the bound ``K * max|x| * (2^max shift1 + 2^max shift2)`` does not fit int64 (``bits <= 6``
    always fits small activations; 7 and 8 bits have ``E = 62`` and ``126``). The plain references
    (:func:`stlq_mac_linear_reference`, :func:`stlq_mac_conv2d_reference`) walk every product
    with Python integers through :func:`stlq_product`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .words import INT64_LIMIT, STLQWords, check_words, weight_bound, word_terms

MAX_ELEMENTS = 1 << 22  # int64 entries of one (rows, channels, K) product block of the fast MAC


def _check_x(x_int, ndim: int, what: str) -> torch.Tensor:
    x = torch.as_tensor(x_int)
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"activations must be integers (an integer dtype, e.g. the codes of linear "
                         f"quantization), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{what} needs x with {ndim} dimensions, got shape {tuple(x.shape)}")
    return x.detach().cpu().to(torch.int64)


def _check_range(words: STLQWords, x_max: int, k: int):
    if k * x_max * weight_bound(words) >= INT64_LIMIT:
        raise ValueError(f"the accumulator could overflow int64 ({k} products of |x| <= {x_max} and "
                         f"{words.bits}-bit STLQ words): use fewer activation or weight bits")


def _abs_max(x: torch.Tensor) -> int:
    return int(x.abs().max()) if x.numel() else 0


def _shift_accumulate(cols: torch.Tensor, words: STLQWords, max_elements: int) -> torch.Tensor:
    """cols (R, K) int64 -> (R, O) int64: ``sum_k c1 * (x << s1) + c2 * (x << s2)`` per row and channel,
    in blocks of at most ``max_elements`` products (rows x channels x K)."""
    c1, s1, c2, s2 = (t.reshape(t.shape[0], -1) for t in word_terms(words))
    (r, k), o = cols.shape, c1.shape[0]
    out = torch.zeros(r, o, dtype=torch.int64)
    any2 = bool(words.has2.any())
    rows = max(1, min(r, max_elements // max(k, 1)))
    chans = max(1, min(o, max_elements // max(rows * k, 1)))
    for r0 in range(0, r, rows):
        xr = cols[r0:r0 + rows, None, :]  # (rows, 1, K) against (chans, K)
        for o0 in range(0, o, chans):
            sl = slice(o0, o0 + chans)
            prod = c1[sl] * torch.bitwise_left_shift(xr, s1[sl])
            if any2:
                prod += c2[sl] * torch.bitwise_left_shift(xr, s2[sl])
            out[r0:r0 + rows, sl] = prod.sum(-1)
    return out


def stlq_mac_linear(x_int, words: STLQWords, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Integer accumulators (B, O) of a fully-connected layer on STLQ's shift MAC: ``x_int`` (B, K)
    integers, ``words`` (O, K); equals ``x_int @ integer_weights(words).T`` exactly."""
    words = check_words(words)
    x = _check_x(x_int, 2, "stlq_mac_linear")
    if len(words.shape) != 2 or x.shape[1] != words.shape[1]:
        raise ValueError(f"stlq_mac_linear needs x (B, K) and words (O, K), got {tuple(x.shape)} and "
                         f"{tuple(words.shape)}")
    _check_range(words, _abs_max(x), x.shape[1])
    return _shift_accumulate(x, words, max_elements)


def _pair(v, name: str):
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(vals) != 2 or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in vals):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(vals[0]), int(vals[1])


def _conv_geometry(x: torch.Tensor, words: STLQWords, stride, padding, pad_value):
    if len(words.shape) != 4 or x.shape[1] != words.shape[1]:
        raise ValueError(f"stlq_mac_conv2d needs x (B, C, H, W) and words (O, C, kh, kw) with equal C, "
                         f"got {tuple(x.shape)} and {tuple(words.shape)}")
    (sh, sw), (ph, pw) = _pair(stride, "stride"), _pair(padding, "padding")
    if min(sh, sw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got {(sh, sw)}, {(ph, pw)}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, (int, np.integer)):
        raise ValueError(f"pad_value must be an integer (an activation code), got {pad_value!r}")
    kh, kw = words.shape[2:]
    ho, wo = (x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {kh}x{kw} is larger than the padded input "
                         f"{x.shape[2] + 2 * ph}x{x.shape[3] + 2 * pw}")
    x_max = max(_abs_max(x), abs(int(pad_value)) if ph or pw else 0)
    _check_range(words, x_max, x.shape[1] * kh * kw)
    return (sh, sw), (ph, pw), (ho, wo)


def stlq_mac_conv2d(x_int, words: STLQWords, stride=1, padding=0, pad_value: int = 0,
                    max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Integer accumulators (B, O, Ho, Wo) of a conv layer on STLQ's shift MAC: ``x_int``
    (B, C, H, W) integers, ``words`` (O, C, kh, kw); the border is padded with the integer
    ``pad_value`` (the activations' zero point; 0 after ReLU). Equals
    ``F.conv2d(x_int, integer_weights(words), stride, padding)`` exactly (for ``pad_value = 0``).
    Patches are built per batch chunk (``torch.Tensor.unfold``, int64) of about ``max_elements``."""
    words = check_words(words)
    x = _check_x(x_int, 4, "stlq_mac_conv2d")
    (sh, sw), (ph, pw), (ho, wo) = _conv_geometry(x, words, stride, padding, pad_value)
    o, c, kh, kw = words.shape
    k = c * kh * kw
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=int(pad_value))
    chunk = max(1, max_elements // max(ho * wo * k, 1))
    outs = []
    for b0 in range(0, x.shape[0], chunk):
        patches = x[b0:b0 + chunk].unfold(2, kh, sh).unfold(3, kw, sw)  # (b, C, Ho, Wo, kh, kw)
        cols = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, k)  # rows (b, i, j), columns (c, u, v)
        acc = _shift_accumulate(cols, words, max_elements)
        outs.append(acc.view(-1, ho, wo, o).permute(0, 3, 1, 2))
    return torch.cat(outs).contiguous()


# the plain references
def _walk(x: int, sign1: int, shift1: int, sign2: int, shift2: int, has2: bool) -> dict:
    word1 = (x << shift1) if shift1 >= 0 else 0
    word2 = (x << shift2) if has2 else 0
    term1, term2 = sign1 * word1, sign2 * word2
    return {"x": x, "sign1": sign1, "shift1": shift1, "sign2": sign2, "shift2": shift2, "has2": has2,
            "word1": word1, "word2": word2, "term1": term1, "term2": term2, "product": term1 + term2}


def stlq_product(x: int, words: STLQWords, index) -> dict:
    """One product of STLQ's shift MAC, every intermediate named (Python ints): the weight's words
    (``sign1``, ``shift1``, ``sign2``, ``shift2``, ``has2``), the shifter outputs ``word1 = x << shift1``
    (0 for the zero word) and ``word2``, the signed terms and ``product = term1 + term2``; also
    ``w_int`` (so ``product == x * w_int``). ``index``: a flat index or a weight-shaped tuple."""
    words = check_words(words)
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"the activation must be an integer, got {x!r}")
    shape = tuple(words.shape)
    try:
        idx = tuple(int(j) for j in (np.unravel_index(int(index), shape) if np.ndim(index) == 0 else index))
        words.sign1[idx]
    except (IndexError, ValueError, TypeError) as err:
        raise ValueError(f"index {index!r} is not a weight of shape {shape}") from err
    if len(idx) != len(shape):
        raise ValueError(f"index {index!r} must name one weight of shape {shape}")
    out = _walk(int(x), int(words.sign1[idx]), int(words.shift1[idx]), int(words.sign2[idx]),
                int(words.shift2[idx]), bool(words.has2[idx]))
    out["index"] = idx
    out["w_int"] = _walk(1, out["sign1"], out["shift1"], out["sign2"], out["shift2"], out["has2"])["product"]
    return out


def _flat_words(words: STLQWords):
    """Per output channel, per flat input index: ``(sign1, shift1, sign2, shift2, has2)`` Python values."""
    fields = [getattr(words, f).reshape(words.shape[0], -1).tolist()
              for f in ("sign1", "shift1", "sign2", "shift2", "has2")]
    return [list(zip(*(f[o] for f in fields))) for o in range(words.shape[0])]


def stlq_mac_linear_reference(x_int, words: STLQWords) -> torch.Tensor:
    """Plain reference of :func:`stlq_mac_linear`: one :func:`stlq_product` walk at a time, Python ints."""
    words = check_words(words)
    x = _check_x(x_int, 2, "stlq_mac_linear_reference")
    if len(words.shape) != 2 or x.shape[1] != words.shape[1]:
        raise ValueError(f"need x (B, K) and words (O, K), got {tuple(x.shape)} and {tuple(words.shape)}")
    _check_range(words, _abs_max(x), x.shape[1])
    per_channel, xs = _flat_words(words), x.tolist()
    out = [[sum(_walk(xv, *w)["product"] for xv, w in zip(row, ws)) for ws in per_channel] for row in xs]
    return torch.tensor(out, dtype=torch.int64).reshape(x.shape[0], words.shape[0])


def stlq_mac_conv2d_reference(x_int, words: STLQWords, stride=1, padding=0, pad_value: int = 0) -> torch.Tensor:
    """Plain reference of :func:`stlq_mac_conv2d`: explicit loops over outputs and kernel taps."""
    words = check_words(words)
    x = _check_x(x_int, 4, "stlq_mac_conv2d_reference")
    (sh, sw), (ph, pw), (ho, wo) = _conv_geometry(x, words, stride, padding, pad_value)
    b, c, h, w = x.shape
    o, _, kh, kw = words.shape
    per_channel, xs = _flat_words(words), x.tolist()
    taps = [(ci, u, v) for ci in range(c) for u in range(kh) for v in range(kw)]  # the flat order of a kernel
    out = torch.zeros(b, o, ho, wo, dtype=torch.int64)
    for bi in range(b):
        for oc in range(o):
            for i in range(ho):
                for j in range(wo):
                    acc = 0
                    for (ci, u, v), wd in zip(taps, per_channel[oc]):
                        r, q = i * sh + u - ph, j * sw + v - pw
                        xv = xs[bi][ci][r][q] if 0 <= r < h and 0 <= q < w else int(pad_value)
                        acc += _walk(xv, *wd)["product"]
                    out[bi, oc, i, j] = acc
    return out
