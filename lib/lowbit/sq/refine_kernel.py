"""The compiled CPU kernel of SQ's rounding refinement: build, load and call ``refine.c``.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 4.1 "final optimization": one block of the
exact coordinate descent of :func:`lowbit.sq.refine.refine_rounding` (every row, the block's inputs in
order), the same operations and rounding as that function's torch loop (tested equal). Built and cached
by :mod:`lowbit.core.ckernel`; without a C compiler :func:`load` returns ``None`` and the torch loop runs.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from ..core import ckernel

SOURCE = Path(__file__).with_name("refine.c")
_LIB = None  # None: not tried yet; False: no compiler / build failed; else the ctypes library
_LOCK = threading.Lock()


def _declare(dll):
    i64, dp = ctypes.c_int64, ctypes.POINTER(ctypes.c_double)
    dll.sq_round_block.argtypes = [i64, i64, i64, i64, dp, dp, dp, dp, dp, dp, dp, dp, dp]
    dll.sq_round_block.restype = i64
    return dll


def load():
    """The ctypes library of ``refine.c``, or ``None`` without a compiler."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            _LIB = ckernel.load_library(SOURCE, "sq_refine", _declare) or False
    return _LIB or None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors as they are: float64, CPU, contiguous, and it loads."""
    return all(t.dtype == torch.float64 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) \
        and load() is not None


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_double))


def round_block(q, lo, hi, cw, diag, s2, g_blk, gq_blk, d_blk, k0: int) -> int:
    """One block (inputs ``k0 .. k0 + width``) of the rounding descent, in place on ``q``, ``gq_blk``
    and ``d_blk``; returns how many weights moved. Every tensor float64, CPU, contiguous
    (:func:`usable`): ``q, lo, hi, cw`` (C, K), ``diag`` (K,), ``s2`` (C,), ``g_blk`` (width, width),
    ``gq_blk`` and ``d_blk`` (C, width)."""
    n_rows, n_in = q.shape
    width = g_blk.shape[0]
    return int(load().sq_round_block(n_rows, n_in, k0, width, _ptr(q), _ptr(lo), _ptr(hi), _ptr(cw), _ptr(diag),
                                     _ptr(s2), _ptr(g_blk), _ptr(gq_blk), _ptr(d_blk)))
