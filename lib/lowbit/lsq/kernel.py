"""The compiled CPU kernel of nuLSQ's unsigned rule (``kernel.c``): one pass forward, one backward.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024. Used by :mod:`lowbit.lsq.quantizers` for contiguous CPU float32 tensors when
a C compiler is available (built and cached by :mod:`lowbit.core.ckernel`); it performs the torch
path's operations in the same order and precision, so the two are bit-identical (tested). The
forward pass is split over ``torch.get_num_threads()`` threads (elements are independent); the
backward pass runs on one thread, because its per-segment sums must add the elements in order,
as ``torch.bincount`` does. ``$LOWBIT_NO_KERNEL=1`` disables it.
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
MIN_PARALLEL = 1 << 16  # elements per thread below which one thread is faster
_LIB = None  # None: not tried yet; False: unavailable; else the ctypes library
_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _declare(dll):
    fp, u8p, i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64
    dll.nulsq_forward.argtypes = [fp, i64, fp, fp, i64, fp, u8p]
    dll.nulsq_forward.restype = None
    dll.nulsq_backward.argtypes = [fp, fp, fp, u8p, i64, ctypes.c_float, fp, fp]
    dll.nulsq_backward.restype = None
    return dll


def load():
    """The compiled kernel, or ``None`` (no compiler, or ``$LOWBIT_NO_KERNEL`` set)."""
    global _LIB
    if os.environ.get("LOWBIT_NO_KERNEL", "") not in ("", "0"):
        return None
    with _LOCK:
        if _LIB is None:
            _LIB = load_library(SOURCE, "nulsq_kernel", _declare) or False
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


def forward(z: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, k)``: ``k`` (uint8) the number of ``thresholds`` strictly below each element of ``z``,
    ``y = levels[k]``."""
    lib = load()
    z = z.contiguous()
    thr, lv = thresholds.contiguous(), levels.contiguous()
    y = torch.empty_like(z)
    k = torch.empty(z.shape, dtype=torch.uint8)
    n, total = len(thr), z.numel()
    threads = max(1, min(torch.get_num_threads(), total // MIN_PARALLEL))
    if threads == 1:
        lib.nulsq_forward(_f(z), total, _f(thr), _f(lv), n, _f(y), _u8(k))
        return y, k
    zf, yf, kf = z.reshape(-1), y.reshape(-1), k.reshape(-1)
    bounds = [total * i // threads for i in range(threads + 1)]

    def run(i):
        a, b = bounds[i], bounds[i + 1]
        lib.nulsq_forward(_f(zf[a:b]), b - a, _f(thr), _f(lv), n, _f(yf[a:b]), _u8(kf[a:b]))

    list(_pool(threads).map(run, range(threads)))
    return y, k


def backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, c_n: float, n: int):
    """``(dz, sums)``: the input gradient and the ``n + 2`` per-segment sums of ``grad * (y - z)``."""
    lib = load()
    grad, z, y, k = grad.contiguous(), z.contiguous(), y.contiguous(), k.contiguous()
    dz = torch.empty_like(z)
    sums = torch.zeros(n + 2, dtype=torch.float32)
    lib.nulsq_backward(_f(grad), _f(z), _f(y), _u8(k), z.numel(), float(c_n), _f(dz), _f(sums))
    return dz, sums
