"""Hardware model of STLQ: fixed-point log words, a bit-exact shift MAC and a unit-gate cost model.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751), selective two-word log-scale quantization (STLQ). The weights come from
:func:`lowbit.alq.quantizers.stlq_quantize`: ``w_q = first + second`` with
``first = sgn1 * scale * p1``, ``second = sgn2 * scale * p2`` (zero where the weight has no second
word) and ``p`` in ``log_points(bits) = {0} u {2^-i : i = 0..N-2}``, ``N = 2^(bits-1)``. That a log
word multiplies by a shift, so that a second word costs a second shift and an add, is the premise
of log-scale quantization; the main paper is not available to us (see :mod:`lowbit.alq.quantizers`),
so **everything below is our interpretation** unless it restates the STLQ value set above.

Fixed-point words (:class:`STLQWords`, :func:`encode_stlq`; *our interpretation*)
    With ``E = N - 2`` (the largest ``i``), ``2^E * p = 2^(E - i)`` is an integer, so each word is a
    sign and a *left shift* ``E - i`` of the activation, in ``0..E``; the constant-zero word
    (``p = 0``, and a missing second word) has shift ``-1`` and sign ``+1``: the MUX's zero input.
    ``has2`` (bool) is the second-word flag, ``has2 == (shift2 >= 0)``. The integer weight is

        w_int = sign1 * 2^shift1 * [shift1 >= 0] + has2 * sign2 * 2^shift2,

    and the float weight is ``scale * w_int * 2^-E`` (:func:`decode_stlq`, :func:`integer_weights`).

Shift MAC (:func:`stlq_mac_linear`, :func:`stlq_mac_conv2d`; *our interpretation*)
    Integer activations ``x`` (int64; signed is allowed, a left shift of a two's-complement value
    is a multiplication by ``2^s``). Each product is ``sign1 * (x << shift1)`` plus, where ``has2``,
    ``sign2 * (x << shift2)``, summed in int64, so ``acc = x_int @ w_int.T`` exactly and the
    layer output is ``acc * act_scale * scale * 2^-E``. A ``ValueError`` is raised up front when
    the bound ``K * max|x| * (2^max shift1 + 2^max shift2)`` does not fit int64 (``bits <= 6``
    always fits small activations; 7 and 8 bits have ``E = 62`` and ``126``). The plain references
    (:func:`stlq_mac_linear_reference`, :func:`stlq_mac_conv2d_reference`) walk every product
    with Python integers through :func:`stlq_product`.

Cost model (:func:`stlq_mac_cost`, :data:`COST_ASSUMPTIONS`; *our interpretation*)
    Unit gates of :mod:`lowbit.core.gates` and the MUX model ``k (M - 1)`` of SQ's supplement (the
    same model as :mod:`lowbit.sq.hw.cost`, so the two papers' numbers compare). One log word needs
    one *shifter*: a MUX over the ``M = N`` cases (the shifts ``E - 0 .. E - (N-2)`` and the zero
    input) of width ``k = a_bits + E`` (``x << E`` is ``a_bits + E`` bits wide). Two designs:

    (a) *two shifters*: every PE has two shifters, an adder/subtractor of their outputs, the sign and
        the accumulator adder: one cycle per MAC whatever the NZR.
    (b) *one shifter, second cycle*: every PE has one shifter (and a ``w_bits``-wide 2:1 MUX that
        feeds it word 1 or word 2); ``lanes`` PEs run in lockstep on ``lanes`` consecutive weights
        along the input dimension, and the group takes a second cycle when any of its weights has a
        second word. Cycles per MAC ``1 + f``, ``f`` the fraction of two-cycle groups:
        ``f = 1 - (1 - NZR)^lanes`` per element with the second words placed at random,
        ``f = NZR`` per tile with ``tile == lanes`` (a tile is a lane group), or ``f`` measured
        from a real mask with :func:`two_cycle_fraction`.

    Storage per weight: ``b`` bits for the first word, ``NZR * b`` for the stored second words, and
    the flag: one bit per weight per element, ``1 / lanes`` per tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.gates import mux2_count, mux_gates, ripple_adder_gates, xor_gates
from ..core.validation import check_bits
from .quantizers import MAX_BITS, log_points

INT64_LIMIT = 1 << 63
MAX_ELEMENTS = 1 << 22  # int64 entries of one (rows, channels, K) product block of the fast MAC


# ----------------------------------------------------------------------------- fixed-point words
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


def _terms(words: STLQWords):
    """``(coef1, shift1, coef2, shift2)``: ``coef`` in {-1, 0, +1} (0 for a zero word), shifts >= 0."""
    c1 = words.sign1 * (words.shift1 >= 0)
    c2 = words.sign2 * words.has2
    return c1, words.shift1.clamp(min=0), c2, words.shift2.clamp(min=0)


def _check_words(words) -> STLQWords:
    if not isinstance(words, STLQWords):
        raise TypeError(f"expected STLQWords (from encode_stlq), got {type(words).__name__}")
    return words


def decode_stlq(words: STLQWords) -> torch.Tensor:
    """The float64 weights ``scale * w_int * 2^-E``, computed as ``scale * t1 + scale * t2`` with
    ``t = sign * 2^(shift - E)``: each term exact, so the sum is the exact value rounded once to
    float64 (exact whenever it is representable), bit-identical to ``first.double() + second.double()``."""
    words = _check_words(words)
    c1, s1, c2, s2 = _terms(words)
    sv = _scale_view(words.scale, c1.ndim)
    pow2 = _pow2_table(words.E)  # 2^(shift - E) = pow2[E - shift]
    t1 = c1.to(torch.float64) * pow2[words.E - s1]
    t2 = c2.to(torch.float64) * pow2[words.E - s2]
    return sv * t1 + sv * t2


def _max_shift(coef: torch.Tensor, shift: torch.Tensor):
    active = coef != 0
    return int(shift[active].max()) if active.any() else None


def _weight_bound(words: STLQWords) -> int:
    """Largest possible ``|w_int|`` of these words (Python int)."""
    c1, s1, c2, s2 = _terms(words)
    return sum(1 << m for m in (_max_shift(c1, s1), _max_shift(c2, s2)) if m is not None)


def integer_weights(words: STLQWords) -> torch.Tensor:
    """``w_int = sign1 * 2^shift1 * [shift1 >= 0] + has2 * sign2 * 2^shift2`` (int64, weight-shaped)."""
    words = _check_words(words)
    if _weight_bound(words) >= INT64_LIMIT:
        raise ValueError(f"{words.bits}-bit words reach 2^{words.E + 1}: w_int does not fit int64; use "
                         "decode_stlq for the float weights")
    c1, s1, c2, s2 = _terms(words)
    one = torch.ones_like(s1)
    return c1 * torch.bitwise_left_shift(one, s1) + c2 * torch.bitwise_left_shift(one, s2)


# ----------------------------------------------------------------------------- shift MAC
def _check_x(x_int, ndim: int, what: str) -> torch.Tensor:
    x = torch.as_tensor(x_int)
    if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"activations must be integers (an integer dtype, e.g. the codes of linear "
                         f"quantization), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{what} needs x with {ndim} dimensions, got shape {tuple(x.shape)}")
    return x.detach().cpu().to(torch.int64)


def _check_range(words: STLQWords, x_max: int, k: int):
    if k * x_max * _weight_bound(words) >= INT64_LIMIT:
        raise ValueError(f"the accumulator could overflow int64 ({k} products of |x| <= {x_max} and "
                         f"{words.bits}-bit STLQ words): use fewer activation or weight bits")


def _abs_max(x: torch.Tensor) -> int:
    return int(x.abs().max()) if x.numel() else 0


def _shift_accumulate(cols: torch.Tensor, words: STLQWords, max_elements: int) -> torch.Tensor:
    """cols (R, K) int64 -> (R, O) int64: ``sum_k c1 * (x << s1) + c2 * (x << s2)`` per row and channel,
    in blocks of at most ``max_elements`` products (rows x channels x K)."""
    c1, s1, c2, s2 = (t.reshape(t.shape[0], -1) for t in _terms(words))
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
    words = _check_words(words)
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
    words = _check_words(words)
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


# ----------------------------------------------------------------------------- references
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
    words = _check_words(words)
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
    words = _check_words(words)
    x = _check_x(x_int, 2, "stlq_mac_linear_reference")
    if len(words.shape) != 2 or x.shape[1] != words.shape[1]:
        raise ValueError(f"need x (B, K) and words (O, K), got {tuple(x.shape)} and {tuple(words.shape)}")
    _check_range(words, _abs_max(x), x.shape[1])
    per_channel, xs = _flat_words(words), x.tolist()
    out = [[sum(_walk(xv, *w)["product"] for xv, w in zip(row, ws)) for ws in per_channel] for row in xs]
    return torch.tensor(out, dtype=torch.int64).reshape(x.shape[0], words.shape[0])


def stlq_mac_conv2d_reference(x_int, words: STLQWords, stride=1, padding=0, pad_value: int = 0) -> torch.Tensor:
    """Plain reference of :func:`stlq_mac_conv2d`: explicit loops over outputs and kernel taps."""
    words = _check_words(words)
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


# ----------------------------------------------------------------------------- cost model
COST_ASSUMPTIONS = {
    "shifter": "one log word = one shifter: a k-bit N-to-1 MUX (shifts E..0 of x plus the zero input), "
               "k = a_bits + E, k (N - 1) 2:1 MUXes of 3 unit gates (SQ supplement's model); constant "
               "shifts are wires",
    "a_adder_gates": "design (a): adder/subtractor of the two k-bit shifter outputs: k full adders (carry-out "
                     "is the (k+1)-th product bit), plus k XORs inverting word 2 when its sign differs from "
                     "word 1's (carry-in = that relative sign; stored relative, 0 without a second word)",
    "a_sign_gates": "design (a): conditional negation of the (k+1)-bit sum by sign1, one XOR per bit, the +1 as "
                    "the accumulator's carry-in (as SQ's MAC)",
    "b_word_select_gates": "design (b): a w_bits-wide 2:1 MUX feeding the shifter word 1 (cycle 1) or word 2 "
                           "(cycle 2)",
    "b_sign_gates": "design (b): conditional negation of the k-bit shifter output by the current word's sign",
    "acc_gates": "accumulator adder, ripple-carry over (k + 1 + guard_bits) bits in both designs: (a) adds "
                 "(k+1)-bit products, (b) adds up to two k-bit terms per weight; guard_bits = ceil(log2 "
                 "fan-in) as in lowbit.sq.hw.cost; the register is excluded",
    "cycles": "(a) 1 per MAC; (b) 1 + f, f = fraction of lane groups (lanes consecutive weights along the "
              "input dimension, in lockstep) holding a second word: 1 - (1 - NZR)^lanes per element with "
              "random placement, NZR per tile with tile == lanes, or given (two_cycle_fraction)",
    "gate_cycles_per_mac": "MAC gates x cycles per MAC: area-time of one MAC",
    "storage_bits_per_weight": "w_bits (first word) + NZR * w_bits (stored second words) + the flag: 1 bit "
                               "per weight per element, 1 / lanes per weight per tile",
}


def two_cycle_fraction(mask, lanes: int) -> float:
    """Measured ``f`` of design (b): the fraction of lane groups (``lanes`` consecutive weights along
    the input dimension of the mask seen as ``(O, K)``) holding at least one second word.

    ``mask``: a bool (or 0/1) tensor, e.g. ``STLQResult.mask``, or :class:`STLQWords` (its ``has2``);
    a 1-D mask is one row. ``K % lanes`` must be 0.
    """
    if isinstance(mask, STLQWords):
        mask = mask.has2
    if not isinstance(mask, torch.Tensor) or mask.ndim < 1 or mask.numel() == 0:
        raise ValueError("mask must be a non-empty tensor of second-word flags (STLQResult.mask)")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask must be bool or 0/1 integers, got {mask.dtype}")
        mask = mask != 0
    lanes = _check_lanes(lanes)
    m = mask.reshape(mask.shape[0] if mask.ndim > 1 else 1, -1)
    if m.shape[1] % lanes:
        raise ValueError(f"lanes={lanes} must divide the input dimension ({m.shape[1]} weights per output "
                         f"channel): lane groups do not cross output channels")
    return float(m.reshape(m.shape[0], -1, lanes).any(-1).double().mean())


def _check_lanes(lanes) -> int:
    if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or lanes < 1:
        raise ValueError(f"lanes must be a positive int (PEs per lockstep group), got {lanes!r}")
    return int(lanes)


def _check_fraction(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def stlq_mac_cost(w_bits: int = 4, a_bits: int = 4, nzr: float = 0.15, lanes: int = 8,
                  two_cycle_fraction: float | None = None, guard_bits: int = 10, per_tile: bool = False) -> dict:
    """Unit-gate cost, cycles and storage of one STLQ MAC, designs (a) two shifters and (b) one shifter
    with a second cycle (module docstring; each term in :data:`COST_ASSUMPTIONS`; our interpretation).

    ``nzr``: fraction of weights with a second word; ``lanes``: PEs per lockstep group of design (b);
    ``two_cycle_fraction``: a measured ``f`` (:func:`two_cycle_fraction`), else ``f`` follows from
    ``nzr`` (``1 - (1 - nzr)^lanes`` per element, ``nzr`` with ``per_tile`` and tile == lanes);
    ``per_tile`` also sets the flag storage (``1 / lanes`` bit per weight instead of 1).
    """
    w_bits = check_bits(w_bits, "w_bits", hi=MAX_BITS)
    a_bits = check_bits(a_bits, "a_bits", hi=32, lo=1)
    guard_bits = check_bits(guard_bits, "guard_bits", hi=64, lo=0)
    nzr = _check_fraction(nzr, "nzr")
    lanes = _check_lanes(lanes)
    if not isinstance(per_tile, (bool, np.bool_)):
        raise ValueError(f"per_tile must be True or False, got {per_tile!r}")
    if two_cycle_fraction is not None:
        f, source = _check_fraction(two_cycle_fraction, "two_cycle_fraction"), "given"
    elif per_tile:
        f, source = nzr, "per tile (tile == lanes): f = NZR"
    else:
        f, source = 1.0 - (1.0 - nzr) ** lanes, "per element, random placement: f = 1 - (1 - NZR)^lanes"
    n = len(log_points(w_bits))  # N cases: N - 1 shifts and the zero input
    e = n - 2
    k = a_bits + e
    acc = ripple_adder_gates(k + 1 + guard_bits)
    out = {"w_bits": w_bits, "a_bits": a_bits, "nzr": nzr, "lanes": lanes, "per_tile": bool(per_tile),
           "E": e, "shifter_cases": n, "shifter_width": k, "shifter_mux2": mux2_count(k, n),
           "shifter_gates": mux_gates(k, n), "acc_bits": k + 1 + guard_bits, "acc_gates": acc}
    # design (a): two shifters, adder/subtractor, sign, accumulator
    out["a_shifters_gates"] = 2 * out["shifter_gates"]
    out["a_adder_gates"] = ripple_adder_gates(k) + xor_gates(k)
    out["a_product_bits"] = k + 1
    out["a_sign_gates"] = xor_gates(k + 1)
    out["a_mac_gates"] = out["a_shifters_gates"] + out["a_adder_gates"] + out["a_sign_gates"] + acc
    out["a_cycles_per_mac"] = 1.0
    out["a_gate_cycles_per_mac"] = out["a_mac_gates"] * out["a_cycles_per_mac"]
    # design (b): one shifter fed word 1 then word 2, sign, accumulator
    out["b_word_select_gates"] = mux_gates(w_bits, 2)
    out["b_sign_gates"] = xor_gates(k)
    out["b_mac_gates"] = out["shifter_gates"] + out["b_word_select_gates"] + out["b_sign_gates"] + acc
    out["b_two_cycle_fraction"] = f
    out["b_two_cycle_fraction_source"] = source
    out["b_cycles_per_mac"] = 1.0 + f
    out["b_gate_cycles_per_mac"] = out["b_mac_gates"] * out["b_cycles_per_mac"]
    out["flag_bits_per_weight"] = 1.0 / lanes if per_tile else 1.0
    out["storage_bits_per_weight"] = w_bits + nzr * w_bits + out["flag_bits_per_weight"]
    return out
