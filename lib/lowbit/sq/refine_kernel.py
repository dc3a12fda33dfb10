"""The compiled CPU kernels of SQ's scale and rounding refinement: build, load and call ``refine.c``.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 4.1 "final optimization": one block of the
exact coordinate descent of :func:`lowbit.sq.refine.refine_rounding` (every row, the block's inputs in
order), the same operations and rounding as that function's torch loop (tested equal); and the walk of
:func:`lowbit.sq.refine.refine_scales` over the scale multipliers (:func:`scale_walk`, rows split over
threads), the same point indices and code changes as its torch loop (tested to choose the same scales).
Built and cached by :mod:`lowbit.core.ckernel`; without a C compiler :func:`load` returns ``None`` and the
torch loop runs.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..core import ckernel

SOURCE = Path(__file__).with_name("refine.c")


def _declare(dll):
    i64, dp, ip = ctypes.c_int64, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int32)
    dll.sq_round_block.argtypes = [i64, i64, i64, i64, dp, dp, dp, dp, dp, dp, dp, dp, dp]
    dll.sq_round_block.restype = i64
    dll.sq_scale_walk.argtypes = [i64, i64, i64, i64, i64, dp, dp, dp, dp, dp, dp, dp, dp, ip, dp, dp, i64]
    dll.sq_scale_walk.restype = i64
    return dll


_LIBRARY = ckernel.Library(SOURCE, "sq_refine", _declare)


def load():
    """The ctypes library of ``refine.c``, or ``None`` without a compiler."""
    return _LIBRARY.get()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors as they are: float64, CPU, contiguous, and it loads."""
    return all(t.dtype == torch.float64 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) \
        and load() is not None


def round_block(q, lo, hi, cw, diag, s2, g_blk, gq_blk, d_blk, k0: int) -> int:
    """One block (inputs ``k0 .. k0 + width``) of the rounding descent, in place on ``q``, ``gq_blk``
    and ``d_blk``; returns how many weights moved. Every tensor float64, CPU, contiguous
    (:func:`usable`): ``q, lo, hi, cw`` (C, K), ``diag`` (K,), ``s2`` (C,), ``g_blk`` (width, width),
    ``gq_blk`` and ``d_blk`` (C, width)."""
    n_rows, n_in = q.shape
    width = g_blk.shape[0]
    ptr = ckernel.tensor_ptr
    return int(load().sq_round_block(n_rows, n_in, k0, width, ptr(q), ptr(lo), ptr(hi), ptr(cw), ptr(diag), ptr(s2),
                                     ptr(g_blk), ptr(gq_blk), ptr(d_blk)))


def scale_walk(absw, sign, points, mids, scale, mults, g, cw, idx, gz, threads: int = 1, block: int = 2048):
    """The losses ``(len(mults), C)`` of every row at every multiplier of ``mults`` (ascending; ``idx`` (C, K)
    int32 and ``gz`` (C, K) are the point indices and ``z @ G`` at ``mults[0]``, both updated in place): the
    kernel ``sq_scale_walk`` on ``threads`` chunks of rows at once (ctypes releases the GIL). Every float
    tensor float64, CPU, contiguous (:func:`usable`)."""
    n_rows, n_in = absw.shape
    losses = torch.empty(len(mults), n_rows, dtype=torch.float64)
    mults = mults.to(torch.float64).contiguous()
    bounds = [n_rows * i // max(1, threads) for i in range(max(1, threads) + 1)]
    chunks = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    ptr = ckernel.tensor_ptr

    def run(chunk):
        a, b = chunk
        at = a * n_in
        return load().sq_scale_walk(b - a, n_in, points.numel(), len(mults), block, ptr(absw, at), ptr(sign, at),
                                    ptr(points), ptr(mids), ptr(scale, a), ptr(mults), ptr(g), ptr(cw, at),
                                    ptr(idx, at), ptr(gz, at), ptr(losses, a), n_rows)

    if len(chunks) == 1:
        codes = [run(chunks[0])]
    else:
        with ThreadPoolExecutor(len(chunks)) as pool:
            codes = list(pool.map(run, chunks))
    if any(c != 0 for c in codes):
        raise RuntimeError(f"sq_scale_walk returned {codes}: -1, the point indices at the first multiplier "
                           f"differ from torch's; -2, out of memory")
    return losses
