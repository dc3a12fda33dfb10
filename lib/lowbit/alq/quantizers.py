"""Selective two-word log-scale quantization (STLQ): one power-of-two word, plus a second one for
the weights whose first-round error is largest.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751); only its supplementary material is available to us, and the description of STLQ in
Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 2.1, Fig. 1 and eqs. 5-6. What the main
paper's algorithm does exactly is not available; every choice below marked **our interpretation**
is ours, not the authors'.

* **One word** (SQ eq. 5, :func:`log_quantize`): the nearest point of ``{+-scale * p}`` with
  ``p`` in ``{0} u {2^-i : i = 0..N-2}``, ``N = 2^(b-1)``: a sign bit and ``N`` magnitudes, i.e.
  ``b`` bits. *Our interpretation*: the set is symmetric (eq. 5's extra negative point
  ``-2^-(N-1)`` is dropped, as :mod:`lowbit.sq.quantizers` does for ``"log2"``); "nearest" is in the
  linear domain (SQ eq. 3), ties to the smaller magnitude, ``sgn(0) = +1``
  (:func:`lowbit.core.points.quantize_to_points`).
* **Second word** (SQ sec. 2.1): the residual ``e = w - q1`` is quantized by the same one-word rule
  with the same ``scale``: ``q2 = log_quantize(e)``; ``q1 + q2`` lies in SQ eq. 6's two-word set
  ``{a + b : a, b in S_log}``.
* **Selection** (:func:`select_second_words`, *our interpretation* of the select tensor): the
  ``k = round(select_ratio * n)`` weights with the largest *scaled error indication* ``|e| / scale``
  keep their second word (exact top-k: a stable descending sort, so on a tie the lower flat index
  wins); with ``tile=T`` the unit is a tile of ``T`` consecutive weights along the input dimension
  (the weight seen as ``(out, in * kh * kw)`` rows), ranked by its summed scaled error, and
  ``k = round(select_ratio * tiles)`` whole tiles keep their second words (the supplement's
  per-tile quantization).
* **NZR** (the supplement's non-zero ratio of ``r1``): the fraction of weights whose second word is
  non-zero. After top-k selection it is ``k / n`` (``k T / n`` per tile) unless a selected residual
  is below half the smallest log point (its second word rounds to 0).

``scale``: one value per layer or one per output channel (``dim 0``); :func:`fit_stlq_scale` picks
``scale = r * max|w|`` (per channel) with the ``r`` of a grid that minimises the STLQ MSE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..core import ckernel
from ..core.memo import TensorMemo, tensor_digest
from ..core.points import quantize_to_points
from ..core.validation import check_bits
from . import stlq_kernel

MAX_BITS = 8
SCALE_GRID = torch.linspace(0.3, 1.2, 46).tolist()  # r in scale = r * max|w|, for fit_stlq_scale


def log_points(bits: int) -> np.ndarray:
    """The magnitudes of one log word (SQ eq. 5, positive side): ``{0} u {2^-i : i = 0..N-2}``."""
    n = 2 ** (check_bits(bits, hi=MAX_BITS) - 1)
    return np.concatenate([[0.0], 2.0 ** -np.arange(n - 2, -1, -1, dtype=np.float64)])


def two_word_log_points(bits: int) -> np.ndarray:
    """The magnitudes of SQ eq. 6's signed two-word set ``{|a + b| : a, b in +-S_log}``, sorted."""
    p = log_points(bits)
    signed = np.concatenate([-p, p])
    return np.unique(np.abs(signed[:, None] + signed[None, :]).ravel())


def check_weight(w) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"weights must be a torch tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("weights are empty: pass a tensor with at least one value")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or inf: fix the checkpoint or the training run first")
    return w


def check_scale(scale, w: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=w.dtype, device=w.device)
    if s.ndim > 1 or (s.ndim == 1 and s.numel() != w.shape[0]):
        raise ValueError(f"scale must be a number or one value per output channel ({w.shape[0]}), "
                         f"got shape {tuple(s.shape)}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return s


def check_select_ratio(select_ratio) -> float:
    if isinstance(select_ratio, bool) or not isinstance(select_ratio, (int, float)) \
            or not 0.0 <= float(select_ratio) <= 1.0:
        raise ValueError(f"select_ratio must be a number in [0, 1] (the fraction of weights given a second "
                         f"word), got {select_ratio!r}")
    return float(select_ratio)


def check_tile(tile, w: torch.Tensor):
    """``tile`` (``None``: per element) must be a positive int dividing ``w[0].numel()``."""
    if tile is None:
        return None
    k = w[0].numel() if w.ndim > 1 else w.numel()
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or k % tile:
        raise ValueError(f"tile must be a positive int dividing the input dimension ({k} weights per output "
                         f"channel), got {tile!r}: pick a divisor such as {[d for d in (4, 8, 16) if k % d == 0]}")
    return tile


def _scale_view(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return s if s.ndim == 0 else s.reshape(-1, *([1] * (w.ndim - 1)))


def log_quantize(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """One log word (SQ eq. 5): the nearest of ``{+-scale * p : p in log_points(bits)}`` (``scale`` a
    number or one per output channel, ``dim 0``)."""
    x = check_weight(x)
    return _log_word(x, check_scale(scale, x), bits)


def _log_word(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`log_quantize` of checked input (``s`` a 0-d or ``(C,)`` tensor)."""
    return quantize_to_points(x, log_points(bits), s if s.ndim else float(s), dim=0)


def _selection_units(scaled_error: torch.Tensor, select_ratio: float, tile: int | None):
    select_ratio = check_select_ratio(select_ratio)
    tile = check_tile(tile, scaled_error)
    e = scaled_error.detach()
    units = e.reshape(-1) if tile is None else e.reshape(e.shape[0], -1, tile).sum(-1).reshape(-1)
    return e, units, int(round(select_ratio * units.numel())), tile


def _expand_selection(chosen: torch.Tensor, e: torch.Tensor, tile: int | None) -> torch.Tensor:
    if tile is None:
        return chosen.reshape(e.shape)
    return chosen.reshape(e.shape[0], -1, 1).expand(-1, -1, tile).reshape(e.shape)


def select_second_words(scaled_error: torch.Tensor, select_ratio: float, tile: int | None = None) -> torch.Tensor:
    """The select tensor (bool, ``scaled_error``'s shape): exact top-k of ``scaled_error`` (per
    element, or per tile of ``tile`` consecutive weights along the input dimension, ranked by their
    sum), ties to the lower flat index. Fast path of :func:`select_second_words_reference` (the
    same tensor, tested): the k-th largest value (by quickselect in the compiled
    :func:`lowbit.alq.stlq_kernel.top_k_mask` on the CPU, else ``torch.kthvalue``; linear time, no
    sort), every unit above it, then the first units equal to it by index until ``k`` are chosen."""
    e, units, k, tile = _selection_units(scaled_error, select_ratio, tile)
    n = units.numel()
    if k == 0:
        chosen = torch.zeros(n, dtype=torch.bool, device=e.device)
    elif k >= n:
        chosen = torch.ones(n, dtype=torch.bool, device=e.device)
    elif stlq_kernel.usable(units):
        chosen = stlq_kernel.top_k_mask(units, k)
    else:
        threshold = torch.kthvalue(units, n - k + 1).values
        chosen = units > threshold
        missing = k - int(chosen.sum())
        if missing:
            chosen[(units == threshold).nonzero().reshape(-1)[:missing]] = True
    return _expand_selection(chosen, e, tile)


def select_second_words_reference(scaled_error: torch.Tensor, select_ratio: float,
                                  tile: int | None = None) -> torch.Tensor:
    """:func:`select_second_words` by a stable descending sort: the first ``k`` units of the order."""
    e, units, k, tile = _selection_units(scaled_error, select_ratio, tile)
    chosen = torch.zeros(units.numel(), dtype=torch.bool, device=e.device)
    if k:
        chosen[torch.sort(units, descending=True, stable=True).indices[:k]] = True
    return _expand_selection(chosen, e, tile)


@dataclass
class STLQResult:
    """What :func:`stlq_quantize` returns: ``values = first + second`` (``second`` zero where no
    second word), ``mask`` (bool: a non-zero second word), ``selected`` (the select tensor) and
    ``nzr = mask.mean()``."""

    values: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    mask: torch.Tensor
    selected: torch.Tensor
    nzr: float
    scale: torch.Tensor
    bits: int


def stlq_quantize(w: torch.Tensor, scale, bits: int, select_ratio: float, tile: int | None = None) -> STLQResult:
    """STLQ of ``w``: one log word everywhere, a second one (of the residual) on the
    ``select_ratio`` fraction of weights (or tiles) with the largest scaled first-round error."""
    w = check_weight(w)
    bits = check_bits(bits, hi=MAX_BITS)
    select_ratio = check_select_ratio(select_ratio)
    tile = check_tile(tile, w)
    return _stlq(w, check_scale(scale, w), bits, select_ratio, tile)


def _stlq(w: torch.Tensor, s: torch.Tensor, bits: int, select_ratio: float, tile: int | None,
          words=None) -> STLQResult:
    """:func:`stlq_quantize` of checked input: both words of every weight (``words``, default
    :func:`two_words`; :func:`two_words_torch` for the torch path), the second kept where selected
    (``log_quantize`` is elementwise, so this is the same as quantizing only the selected residuals, tested)."""
    first, second_all, scaled = (words or two_words)(w, s, bits)
    selected = select_second_words(scaled, select_ratio, tile)
    second = torch.where(selected, second_all, torch.zeros_like(second_all))
    mask = second != 0
    return STLQResult(first + second, first, second, mask, selected, float(mask.double().mean()), s, bits)


def two_words(w: torch.Tensor, s: torch.Tensor, bits: int):
    """``(q1, q2, scaled)`` of checked ``w`` and ``s`` (0-d, or one per output channel): the first log
    word ``q1 = log_quantize(w)``, the second ``q2 = log_quantize(w - q1)`` of every weight, and the
    scaled error indication ``|w - q1| / s``. On the CPU (float32/float64) one pass of the compiled
    :func:`lowbit.alq.stlq_kernel.stlq_words`, else torch; the same values bit for bit (tested)."""
    if stlq_kernel.usable(w):
        q1, q2, scaled, _, _ = _kernel_words(w, s, bits, words=True, squares=False)
        return q1, q2, scaled
    return two_words_torch(w, s, bits)


def two_words_torch(w: torch.Tensor, s: torch.Tensor, bits: int):
    """:func:`two_words` in torch: :func:`log_quantize` of ``w``, then of its residual."""
    first = _log_word(w, s, bits)
    err = w - first
    return first, _log_word(err, s, bits), err.abs() / _scale_view(s, w)


def _kernel_words(w: torch.Tensor, s: torch.Tensor, bits: int, words: bool, squares: bool):
    """:func:`lowbit.alq.stlq_kernel.stlq_words` of checked ``w`` (any shape) and ``s`` (0-d, one per output
    channel, or one per element of a 1-D ``w``), every output in ``w``'s shape (``None`` where not asked for)."""
    if w.ndim == 1 and s.ndim == 1:
        rows, s_rows = w.reshape(-1, 1), s  # one scale per element
    else:
        rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
        s_rows = s.expand(rows.shape[0]) if s.ndim == 0 else s
    p = torch.as_tensor(log_points(bits), dtype=torch.float64).to(w.dtype)
    out = stlq_kernel.stlq_words(rows, s_rows, p, (p[1:] + p[:-1]) / 2, words=words, squares=squares)
    return tuple(None if t is None else t.reshape(w.shape) for t in out)


def in_two_word_set(result: STLQResult) -> bool:
    """Whether an :func:`stlq_quantize` result lies in SQ eq. 6's set: ``first / scale`` and
    ``second / scale`` are each in eq. 5's (signed) log set, exactly, and ``values = first + second``."""
    s = _scale_view(result.scale, result.values)
    p = torch.as_tensor(log_points(result.bits), dtype=result.values.dtype, device=result.values.device)
    return bool(torch.isin((result.first / s).abs(), p).all() and torch.isin((result.second / s).abs(), p).all()
                and torch.equal(result.values, result.first + result.second))


def stlq_quantize_reference(w: torch.Tensor, scale: float, bits: int, select_ratio: float,
                            tile: int | None = None) -> torch.Tensor:
    """Plain reference of :func:`stlq_quantize` (a per-layer ``scale``): Python loops, float64; the
    nearest point by scanning every level, top-k by sorting ``(-error, index)`` pairs."""
    mags = [float(scale) * p for p in log_points(bits)]  # ascending
    flat = [float(v) for v in w.detach().reshape(-1).tolist()]

    def nearest(v):  # scan every magnitude; the first minimum is the smaller one on a tie
        best = mags[0]
        for m in mags:
            if abs(abs(v) - m) < abs(abs(v) - best):
                best = m
        return -best if v < 0 else best

    first = [nearest(v) for v in flat]
    err = [v - q for v, q in zip(flat, first)]
    t = tile or 1
    units = [sum(abs(err[i]) for i in range(u * t, u * t + t)) / float(scale) for u in range(len(flat) // t)]
    k = int(round(select_ratio * len(units)))
    chosen = {u for _, u in sorted((-e, u) for u, e in enumerate(units))[:k]}
    out = [first[i] + (nearest(err[i]) if i // t in chosen else 0.0) for i in range(len(flat))]
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


def stlq_mse(w: torch.Tensor, scale, bits: int, select_ratio: float, tile: int | None = None) -> float:
    """Mean squared error of :func:`stlq_quantize`."""
    return _mse(stlq_quantize(w, scale, bits, select_ratio, tile), w)


def _mse(result: STLQResult, w: torch.Tensor) -> float:
    return float(((result.values - w) ** 2).mean())


def fit_stlq_scale(w: torch.Tensor, bits: int, select_ratio: float, tile: int | None = None,
                   per_channel: bool = True) -> torch.Tensor:
    """``r * max|w|`` (per output channel, or per layer) with the ``r`` of :data:`SCALE_GRID` that
    minimises the MSE of :func:`stlq_quantize` (first minimum on a tie).

    Memoised per process on the weight's bytes and the settings (:class:`lowbit.core.memo.TensorMemo`):
    the runs of one notebook that start from the same network fit each layer once."""
    w = check_weight(w).detach()
    bits = check_bits(bits, hi=MAX_BITS)
    select_ratio = check_select_ratio(select_ratio)
    tile = check_tile(tile, w)
    key = (*tensor_digest(w), bits, select_ratio, tile, bool(per_channel))
    if key not in _SCALE_FITS:
        _SCALE_FITS.put(key, fit_stlq_scale_uncached(w, bits, select_ratio, tile, per_channel))
    return _SCALE_FITS.get(key).to(w.device)  # the key is the weight's bytes: a fit may come from another device


_SCALE_FITS = TensorMemo(1024)


def fit_stlq_scale_uncached(w: torch.Tensor, bits: int, select_ratio: float, tile: int | None = None,
                            per_channel: bool = True, backend: str = "auto") -> torch.Tensor:
    """:func:`fit_stlq_scale` computed afresh (no memo), on checked input.

    ``backend``: ``"torch"`` evaluates each grid point's MSE with :func:`stlq_quantize`'s torch path;
    ``"kernel"`` with the compiled one-pass kernel of :mod:`lowbit.alq.stlq_kernel` (both words and both
    squared errors of every weight; the selection and the mean in torch): the same MSE bit for bit, so
    the same scale (tested); ``"auto"`` the kernel when it loads (float32/float64 on the CPU), else torch."""
    use_kernel = ckernel.use_kernel(backend, lambda: stlq_kernel.usable(w), f"float32 or float64 weights on the "
                                    f"CPU and a C compiler; got {w.dtype} on {w.device}")
    top = w.abs().reshape(w.shape[0], -1).amax(1) if per_channel and w.ndim > 1 else w.abs().max()
    top = torch.where(top > 0, top, torch.full_like(top, float(w.abs().max()) or 1.0))
    best, best_mse = None, math.inf
    for r in SCALE_GRID:
        s = check_scale(top * r, w)
        mse = _stlq_mse_kernel(w, s, bits, select_ratio, tile) if use_kernel \
            else _mse(_stlq(w, s, bits, select_ratio, tile, words=two_words_torch), w)
        if mse < best_mse:
            best, best_mse = top * r, mse
    return best


def _stlq_mse_kernel(w: torch.Tensor, s: torch.Tensor, bits: int, select_ratio: float, tile: int | None) -> float:
    """:func:`_mse` of :func:`_stlq` (checked input) by :func:`lowbit.alq.stlq_kernel.stlq_words`: the
    kernel gives the scaled error indication and both squared errors of every weight, the same
    elementwise values as the torch path; the selection and the mean are torch's, as there."""
    _, _, scaled, sq0, sq1 = _kernel_words(w, s, bits, words=False, squares=True)
    return float(torch.where(select_second_words(scaled, select_ratio, tile), sq1, sq0).mean())
