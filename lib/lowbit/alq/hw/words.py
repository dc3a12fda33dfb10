"""STLQ's fixed-point log words: encoding, decoding and the integer weights.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751). See :mod:`lowbit.alq.hw` for the value set; **our interpretation**.

Fixed-point words (:class:`STLQWords`, :func:`encode_stlq`; *our interpretation*)
    With ``E = N - 2`` (the largest ``i``), ``2^E * p = 2^(E - i)`` is an integer, so each word is a
    sign and a *left shift* ``E - i`` of the activation, in ``0..E``; the constant-zero word
    (``p = 0``, and a missing second word) has shift ``-1`` and sign ``+1``: the MUX's zero input.
    ``has2`` (bool) is the second-word flag, ``has2 == (shift2 >= 0)``. The integer weight is

        w_int = sign1 * 2^shift1 * [shift1 >= 0] + has2 * sign2 * 2^shift2,

    and the float weight is ``scale * w_int * 2^-E`` (:func:`decode_stlq`, :func:`integer_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...core.validation import check_bits
from ..quantizers import MAX_BITS

INT64_LIMIT = 1 << 63


@dataclass
class STLQWords:
    """STLQ weights as hardware words (all int64 tensors of the weight's shape, ``has2`` bool).

    ``sign1``/``sign2``: ``+1`` or ``-1``; ``shift1``/``shift2``: the left shift ``E - i`` of the
    activation for ``p = 2^-i``, or ``-1`` for the zero word (its sign is ``+1``); ``has2``: the
    second-word flag (``shift2 >= 0``). ``scale``: float64, a scalar or one value per output channel
    (``dim 0``); ``E = N - 2 = 2^(bits-1) - 2``. Checked on construction.
    """

    sign1: torch.Tensor
    shift1: torch.Tensor
    sign2: torch.Tensor
    shift2: torch.Tensor
    has2: torch.Tensor
    bits: int
    scale: torch.Tensor
    E: int

    def __post_init__(self):
        self.bits = check_bits(self.bits, hi=MAX_BITS)
        if self.E != 2 ** (self.bits - 1) - 2:
            raise ValueError(f"E must be N - 2 = {2 ** (self.bits - 1) - 2} for {self.bits}-bit words, got {self.E}")
        shape = None
        for name in ("sign1", "shift1", "sign2", "shift2", "has2"):
            t = getattr(self, name)
            want = torch.bool if name == "has2" else torch.int64
            if not isinstance(t, torch.Tensor) or t.dtype != want:
                raise TypeError(f"STLQWords.{name} must be a {want} tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            if shape is not None and t.shape != shape:
                raise ValueError(f"STLQWords.{name} has shape {tuple(t.shape)}, the others {tuple(shape)}")
            shape = t.shape
        if len(shape) < 1 or self.sign1.numel() == 0:
            raise ValueError("STLQWords need a non-empty weight tensor with at least one dimension")
        for k in ("1", "2"):
            sign, shift = getattr(self, "sign" + k), getattr(self, "shift" + k)
            if not ((sign == 1) | (sign == -1)).all():
                raise ValueError(f"STLQWords.sign{k} must hold only +1 and -1")
            if shift.min() < -1 or shift.max() > self.E:
                raise ValueError(f"STLQWords.shift{k} must lie in -1..E = {self.E} (-1: the zero word)")
            if (sign[shift < 0] != 1).any():
                raise ValueError(f"STLQWords: a zero word has sign +1 (sign{k} where shift{k} == -1)")
        if not torch.equal(self.has2, self.shift2 >= 0):
            raise ValueError("STLQWords.has2 must equal shift2 >= 0 (a missing second word has shift -1)")
        self.scale = _check_scale(self.scale, shape, torch.float64)

    @property
    def shape(self) -> torch.Size:
        return self.sign1.shape


def _check_scale(scale, shape, dtype) -> torch.Tensor:
    """``scale`` as a float64 tensor (scalar or one per output channel), rounded through ``dtype``
    first (the dtype the weights were quantized in, so a Python float is read as stlq_quantize read it)."""
    try:
        s = torch.as_tensor(scale, dtype=dtype).detach().cpu().to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"scale must be a number or a 1-D tensor of numbers, got {scale!r}") from err
    if s.ndim > 1 or (s.ndim == 1 and s.numel() != shape[0]):
        raise ValueError(f"scale must be a number or one value per output channel ({shape[0]}), "
                         f"got shape {tuple(s.shape)}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return s


def _scale_view(s: torch.Tensor, ndim: int) -> torch.Tensor:
    return s if s.ndim == 0 else s.reshape(-1, *([1] * (ndim - 1)))


def _pow2_table(e: int) -> torch.Tensor:
    """``[2^-j for j in 0..e]`` in float64, each exact (Python's ``2.0 ** -j``)."""
    return torch.tensor([2.0 ** -j for j in range(e + 1)], dtype=torch.float64)


def _check_word_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (STLQResult.{name}), got {t.dtype}")
    if t.ndim < 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty weight tensor with at least one dimension")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf: it cannot be an STLQ word")
    return t.detach().cpu()


def _encode_word(v: torch.Tensor, s: torch.Tensor, bits: int, name: str):
    """``(sign, shift)`` of the float word ``v`` (float64) on the grid ``{+-s * p}``."""
    n_max = 2 ** (bits - 1) - 2  # E: the largest i of p = 2^-i
    zero = v == 0
    sv = _scale_view(s, v.ndim).expand_as(v)
    mant, exp = torch.frexp(v.abs() / sv)  # |v| / s = mant * 2^exp, mant in [0.5, 1)
    i = 1 - exp.to(torch.int64)  # p = 2^-i when mant == 0.5
    i_ok = i.clamp(0, n_max)
    on_grid = (mant == 0.5) & (i == i_ok) & (sv * _pow2_table(n_max)[i_ok] == v.abs())
    bad = ~(zero | on_grid)
    if bad.any():
        at = int(torch.nonzero(bad.reshape(-1))[0])
        idx = tuple(int(j) for j in np.unravel_index(at, tuple(v.shape)))
        raise ValueError(f"{name}{list(idx)} = {float(v.reshape(-1)[at])!r} is not sgn * scale * p for the "
                         f"scale {float(sv.reshape(-1)[at])!r} and p in log_points({bits}) = "
                         f"{{0}} u {{2^-i : i = 0..{n_max}}}: pass STLQResult.{name} with STLQResult.scale")
    sign = torch.where(v < 0, -1, 1).to(torch.int64)
    shift = torch.where(zero, -1, n_max - i_ok)
    return torch.where(zero, 1, sign), shift


def encode_stlq(first, second, scale, bits: int) -> STLQWords:
    """The hardware words of STLQ weights ``first + second`` (:func:`stlq_quantize`'s ``.first``,
    ``.second``, ``.scale``, ``.bits``).

    Every value must be exactly ``sgn * scale * p`` with ``p`` in ``log_points(bits)`` (``scale``
    per layer or per output channel, read in ``first``'s dtype as :func:`stlq_quantize` read it);
    the first offending value is named in a ``ValueError``. float32 weights at 8 bits can have their
    smallest points ``scale * 2^-126`` in the subnormal range, rounded, hence rejected: quantize in
    float64 there. Zero words (and missing second words) are ``shift = -1``, ``sign = +1``.
    """
    bits = check_bits(bits, hi=MAX_BITS)
    first = _check_word_tensor(first, "first")
    second = _check_word_tensor(second, "second")
    if first.shape != second.shape:
        raise ValueError(f"first and second must have the same shape, got {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    s = _check_scale(scale, first.shape, first.dtype)
    sign1, shift1 = _encode_word(first.to(torch.float64), s, bits, "first")
    sign2, shift2 = _encode_word(second.to(torch.float64), s, bits, "second")
    return STLQWords(sign1, shift1, sign2, shift2, shift2 >= 0, bits, s, 2 ** (bits - 1) - 2)


def word_terms(words: STLQWords):
    """``(coef1, shift1, coef2, shift2)``: ``coef`` in {-1, 0, +1} (0 for a zero word), shifts >= 0."""
    c1 = words.sign1 * (words.shift1 >= 0)
    c2 = words.sign2 * words.has2
    return c1, words.shift1.clamp(min=0), c2, words.shift2.clamp(min=0)


def check_words(words) -> STLQWords:
    if not isinstance(words, STLQWords):
        raise TypeError(f"expected STLQWords (from encode_stlq), got {type(words).__name__}")
    return words


def decode_stlq(words: STLQWords) -> torch.Tensor:
    """The float64 weights ``scale * w_int * 2^-E``, computed as ``scale * t1 + scale * t2`` with
    ``t = sign * 2^(shift - E)``: each term exact, so the sum is the exact value rounded once to
    float64 (exact whenever it is representable), bit-identical to ``first.double() + second.double()``."""
    words = check_words(words)
    c1, s1, c2, s2 = word_terms(words)
    sv = _scale_view(words.scale, c1.ndim)
    pow2 = _pow2_table(words.E)  # 2^(shift - E) = pow2[E - shift]
    t1 = c1.to(torch.float64) * pow2[words.E - s1]
    t2 = c2.to(torch.float64) * pow2[words.E - s2]
    return sv * t1 + sv * t2


def _max_shift(coef: torch.Tensor, shift: torch.Tensor):
    active = coef != 0
    return int(shift[active].max()) if active.any() else None


def weight_bound(words: STLQWords) -> int:
    """Largest possible ``|w_int|`` of these words (Python int)."""
    c1, s1, c2, s2 = word_terms(words)
    return sum(1 << m for m in (_max_shift(c1, s1), _max_shift(c2, s2)) if m is not None)


def integer_weights(words: STLQWords) -> torch.Tensor:
    """``w_int = sign1 * 2^shift1 * [shift1 >= 0] + has2 * sign2 * 2^shift2`` (int64, weight-shaped)."""
    words = check_words(words)
    if weight_bound(words) >= INT64_LIMIT:
        raise ValueError(f"{words.bits}-bit words reach 2^{words.E + 1}: w_int does not fit int64; use "
                         "decode_stlq for the float weights")
    c1, s1, c2, s2 = word_terms(words)
    one = torch.ones_like(s1)
    return c1 * torch.bitwise_left_shift(one, s1) + c2 * torch.bitwise_left_shift(one, s2)
