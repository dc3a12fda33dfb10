"""The compiled CPU kernels of nuLSQ's unsigned rule and of LSQ (``kernel.c``): one pass each way.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024. Used by :mod:`lowbit.lsq.quantizers` for contiguous CPU float32 tensors when
a C compiler is available (built and cached by :mod:`lowbit.core.ckernel`); it performs the torch
path's operations in the same order and precision, so the two are bit-identical (tested). Elementwise
passes are split over ``torch.get_num_threads()`` threads; nuLSQ's backward runs on one thread,
because its per-segment sums must add the elements in order, as ``torch.bincount`` does (LSQ's step
gradient is summed by torch from the kernel's per-element products). ``$LOWBIT_NO_KERNEL=1`` disables it.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..core.ckernel import load_library

SOURCE = Path(__file__).with_name("kernel.c")
# lets gcc vectorise ceilf and the selects; it only assumes no floating-point trap is watched, every
# value stays IEEE-rounded as in torch (the bit-identity tests check it)
EXTRA_FLAGS = ("-fno-trapping-math",)
MIN_PARALLEL = 1 << 16  # elements per thread below which one thread is faster
_LIB = None  # None: not tried yet; False: unavailable; else the ctypes library
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _declare(dll):
    fp, u8p, i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64
    dll.nulsq_forward.argtypes = [fp, i64, fp, fp, i64, fp, u8p]
    dll.nulsq_forward.restype = None
    dll.nulsq_segment_sums.argtypes = [fp, fp, fp, u8p, i64, i64, fp]
    dll.nulsq_segment_sums.restype = None
    dll.nulsq_input_grad.argtypes = [fp, fp, i64, ctypes.c_float, fp, fp]
    dll.nulsq_input_grad.restype = None
    f32 = ctypes.c_float
    dll.lsq_forward.argtypes = [fp, i64, f32, f32, f32, fp]
    dll.lsq_forward.restype = None
    dll.lsq_backward.argtypes = [fp, fp, i64, f32, f32, f32, fp, fp]
    dll.lsq_backward.restype = None
    return dll


def load():
    """The compiled kernel, or ``None`` (no compiler, or ``$LOWBIT_NO_KERNEL`` set)."""
    global _LIB
    if os.environ.get("LOWBIT_NO_KERNEL", "") not in ("", "0"):
        return None
    with _LOCK:
        if _LIB is None:
            _LIB = load_library(SOURCE, "nulsq_kernel", _declare, EXTRA_FLAGS) or False
    return _LIB or None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: CPU float32, and the kernel is available."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load() is not None


def _f(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def _u8(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_uint8))


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < threads:
        _POOL = ThreadPoolExecutor(max_workers=threads)
    return _POOL


def _split(total: int, run) -> None:
    """``run(a, b)`` over ``[0, total)`` split across ``torch.get_num_threads()`` threads."""
    threads = max(1, min(torch.get_num_threads(), total // MIN_PARALLEL))
    if threads == 1:
        run(0, total)
        return
    bounds = [total * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(lambda i: run(bounds[i], bounds[i + 1]), range(threads)))


def forward(z: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, k)``: ``k`` (uint8) the number of ``thresholds`` strictly below each element of ``z``,
    ``y = levels[k]``."""
    lib = load()
    z = z.contiguous()
    thr, lv = thresholds.contiguous(), levels.contiguous()
    y = torch.empty_like(z)
    k = torch.empty(z.shape, dtype=torch.uint8)
    zf, yf, kf = z.reshape(-1), y.reshape(-1), k.reshape(-1)
    n = len(thr)
    _split(z.numel(), lambda a, b: lib.nulsq_forward(_f(zf[a:b]), b - a, _f(thr), _f(lv), n, _f(yf[a:b]),
                                                     _u8(kf[a:b])))
    return y, k


def lsq_forward(x: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    """LSQ's ``s * round(clamp(x / s, -Qn, Qp))`` (round half toward zero), elementwise."""
    lib = load()
    x = x.contiguous()
    y = torch.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    _split(x.numel(), lambda a, b: lib.lsq_forward(_f(xf[a:b]), b - a, step, float(qn), float(qp), _f(yf[a:b])))
    return y


def lsq_backward(grad: torch.Tensor, x: torch.Tensor, step: float, qn: int, qp: int):
    """``(dx, prod)``: LSQ's straight-through input gradient and ``grad * dy/ds`` per element (the
    caller sums ``prod`` with torch, so the sum is torch's)."""
    lib = load()
    grad, x = grad.contiguous(), x.contiguous()
    dx, prod = torch.empty_like(x), torch.empty_like(x)
    gf, xf, df, pf = grad.reshape(-1), x.reshape(-1), dx.reshape(-1), prod.reshape(-1)
    _split(x.numel(), lambda a, b: lib.lsq_backward(_f(gf[a:b]), _f(xf[a:b]), b - a, step, float(qn), float(qp),
                                                    _f(df[a:b]), _f(pf[a:b])))
    return dx, prod


def backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, c_n: float, n: int):
    """``(dz, sums, g_above)``: the input gradient, the ``n + 2`` per-segment sums of ``grad * (y - z)``
    (added in element order on one thread, as ``torch.bincount`` does) and ``grad * (z > c_N)`` (for torch to sum). With two or
    more threads the sums run beside the elementwise pass."""
    lib = load()
    grad, z, y, k = grad.contiguous(), z.contiguous(), y.contiguous(), k.contiguous()
    dz, g_above = torch.empty_like(z), torch.empty_like(z)
    sums = torch.zeros(n + 2, dtype=torch.float32)
    total = z.numel()

    def segment_sums():
        lib.nulsq_segment_sums(_f(grad), _f(z), _f(y), _u8(k), total, n, _f(sums))

    def input_grad():
        lib.nulsq_input_grad(_f(grad), _f(z), total, float(c_n), _f(dz), _f(g_above))

    if torch.get_num_threads() > 1 and total >= MIN_PARALLEL:
        pending = _pool(2).submit(segment_sums)
        input_grad()
        pending.result()
    else:
        segment_sums()
        input_grad()
    return dz, sums, g_above
