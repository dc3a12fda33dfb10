"""The compiled CPU kernel of STLQ's scale fit: build, load and call ``stlq.c``.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(supplement), with STLQ as SQ (Oh, Sim, Kim, Lee, ECCV 2022) sec. 2.1 and eqs. 5-6 describe it: for one
scale, both log words of every weight, its scaled error indication and its squared error without and with
the second word, in one pass and with the same rounding as :func:`lowbit.alq.quantizers.stlq_quantize`'s
torch path (tested equal); and the select tensor's exact top-k by quickselect (:func:`top_k_mask`).
Built and cached by :mod:`lowbit.core.ckernel`; without a C compiler :func:`load` returns
``None`` and :func:`lowbit.alq.fit_stlq_scale` uses the torch path.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..core import ckernel

SOURCE = Path(__file__).with_name("stlq.c")
FLOAT_TYPES = (torch.float32, torch.float64)  # the kernel's two element types


def _declare(dll):
    i64 = ctypes.c_int64
    for name, ct in (("stlq_words_f32", ctypes.c_float), ("stlq_words_f64", ctypes.c_double)):
        fn = getattr(dll, name)
        fn.argtypes = [i64, i64, ctypes.POINTER(ct), ctypes.POINTER(ct), i64] + [ctypes.POINTER(ct)] * 8
        fn.restype = i64
    for name, ct in (("stlq_top_k_f32", ctypes.c_float), ("stlq_top_k_f64", ctypes.c_double)):
        fn = getattr(dll, name)
        fn.argtypes = [i64, ctypes.POINTER(ct), i64, ctypes.POINTER(ct), ctypes.POINTER(ctypes.c_uint8)]
        fn.restype = i64
    return dll


_LIBRARY = ckernel.Library(SOURCE, "alq_stlq", _declare)


def load():
    """The ctypes library of ``stlq.c``, or ``None`` without a compiler."""
    return _LIBRARY.get()


def usable(w: torch.Tensor) -> bool:
    """Whether the kernel can take ``w`` as it is: float32 or float64 on the CPU, and the kernel loads."""
    return w.dtype in FLOAT_TYPES and w.device.type == "cpu" and load() is not None


def stlq_words(rows: torch.Tensor, scale: torch.Tensor, points: torch.Tensor, mids: torch.Tensor, *,
               words: bool = True, squares: bool = False):
    """``(q1, q2, scaled, sq0, sq1)`` (each ``rows``' shape, ``None`` where not asked for) of ``rows`` (C, K)
    with one scale per row (C,): the two log words (``words``: ``q1`` of ``w``, ``q2`` of ``w - q1``, every
    weight), the scaled first-word error ``|w - q1| / s`` (always) and the squared errors ``(q1 - w)^2``
    and ``(q1 + q2 - w)^2`` (``squares``). ``points`` are the sorted log magnitudes and ``mids`` their
    mid-points, all in ``rows``' dtype (:func:`usable`)."""
    rows = rows.contiguous()
    dtype = rows.dtype
    scale, points, mids = (t.to(dtype).contiguous() for t in (scale, points, mids))
    q1, q2 = (torch.empty_like(rows) if words else None for _ in range(2))
    sq0, sq1 = (torch.empty_like(rows) if squares else None for _ in range(2))
    scaled = torch.empty_like(rows)
    thr = torch.empty(max(mids.numel(), 1), dtype=dtype)
    fn = load().stlq_words_f32 if dtype == torch.float32 else load().stlq_words_f64

    def ptr(t):  # None: a NULL output, not written
        return None if t is None else ckernel.tensor_ptr(t)

    fn(rows.shape[0], rows.shape[1], ptr(rows), ptr(scale), points.numel(), ptr(points), ptr(mids), ptr(thr), ptr(q1),
       ptr(q2), ptr(scaled), ptr(sq0), ptr(sq1))
    return q1, q2, scaled, sq0, sq1


def top_k_mask(units: torch.Tensor, k: int) -> torch.Tensor:
    """The bool mask of the exact top-``k`` of the 1-D ``units`` (``0 < k < n``), ties to the lower index:
    the k-th largest value by quickselect, every unit above it, then the first equal ones by index
    (:func:`usable` input)."""
    units = units.contiguous()
    n = units.numel()
    if not 0 < k < n:
        raise ValueError(f"top_k_mask needs 0 < k < {n}, got k={k}")
    chosen = torch.zeros(n, dtype=torch.uint8)
    work = torch.empty_like(units)
    fn = load().stlq_top_k_f32 if units.dtype == torch.float32 else load().stlq_top_k_f64
    ptr = ckernel.tensor_ptr
    taken = fn(n, ptr(units), int(k), ptr(work), ptr(chosen))
    if taken != k:
        raise RuntimeError(f"stlq_top_k chose {taken} units, not {k}: non-finite values?")
    return chosen.bool()
