"""The compiled CPU kernels of nuLSQ's unsigned rule and of LSQ (``kernel.c``): one pass each way.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024. Used by :mod:`lowbit.lsq.quantizers` for contiguous CPU float32 tensors when
a C compiler is available (built and cached by :mod:`lowbit.core.ckernel`); it performs the torch
path's operations in the same precision, so the two are bit-identical (tested). nuLSQ's per-segment
sums are exact fixed-point sums (:mod:`lowbit.lsq.segments`), so the kernel adds them with eight
interleaved accumulators instead of one dependent chain (LSQ's step gradient is summed by torch from
the kernel's per-element products). Each call runs on the calling thread: in a training step torch's
own intra-op threads hold the cores between operators, and splitting our passes over a second pool of
threads made ``bench/qat_step.py``'s nuLSQ step slower (1.26x LSQ against 1.18x on one thread, measured
on our 2 cores). ``$LOWBIT_NO_KERNEL=1`` disables the kernel.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ..core.ckernel import Library, tensor_ptr
from . import segments

SOURCE = Path(__file__).with_name("kernel.c")
# lets gcc vectorise ceilf and the selects; it only assumes no floating-point trap is watched, every
# value stays IEEE-rounded as in torch (the bit-identity tests check it)
EXTRA_FLAGS = ("-fno-trapping-math", "-fno-math-errno")


def _declare(dll):
    fp, u8p, i64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64
    dll.nulsq_forward.argtypes = [fp, i64, fp, fp, i64, fp, u8p]
    dll.nulsq_forward.restype = None
    f32 = ctypes.c_float
    dll.nulsq_backward.argtypes = [fp, fp, fp, u8p, i64, i64, f32, ctypes.c_double, fp, ctypes.POINTER(ctypes.c_double)]
    dll.nulsq_backward.restype = i64
    dll.lsq_forward.argtypes = [fp, i64, f32, f32, f32, fp]
    dll.lsq_forward.restype = None
    dll.lsq_backward.argtypes = [fp, fp, i64, f32, f32, f32, fp, fp]
    dll.lsq_backward.restype = None
    return dll


_LIBRARY = Library(SOURCE, "nulsq_kernel", _declare, EXTRA_FLAGS)


def load():
    """The compiled kernel, or ``None`` (no compiler, or ``$LOWBIT_NO_KERNEL`` set)."""
    if os.environ.get("LOWBIT_NO_KERNEL", "") not in ("", "0"):
        return None
    return _LIBRARY.get()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: CPU float32, and the kernel is available."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and load() is not None


def forward(z: torch.Tensor, thresholds: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, k)``: ``k`` (uint8) the number of ``thresholds`` strictly below each element of ``z``,
    ``y = levels[k]``."""
    lib = load()
    z = z.contiguous()
    thr, lv = thresholds.contiguous(), levels.contiguous()
    y = torch.empty_like(z)
    k = torch.empty(z.shape, dtype=torch.uint8)
    zf, yf, kf = z.reshape(-1), y.reshape(-1), k.reshape(-1)
    lib.nulsq_forward(tensor_ptr(zf), z.numel(), tensor_ptr(thr), tensor_ptr(lv), len(thr), tensor_ptr(yf),
                      tensor_ptr(kf))
    return y, k


def lsq_forward(x: torch.Tensor, step: float, qn: int, qp: int) -> torch.Tensor:
    """LSQ's ``s * round(clamp(x / s, -Qn, Qp))`` (round half toward zero), elementwise."""
    lib = load()
    x = x.contiguous()
    y = torch.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    lib.lsq_forward(tensor_ptr(xf), x.numel(), step, float(qn), float(qp), tensor_ptr(yf))
    return y


def lsq_backward(grad: torch.Tensor, x: torch.Tensor, step: float, qn: int, qp: int):
    """``(dx, prod)``: LSQ's straight-through input gradient and ``grad * dy/ds`` per element (the
    caller sums ``prod`` with torch, so the sum is torch's)."""
    lib = load()
    grad, x = grad.contiguous(), x.contiguous()
    dx, prod = torch.empty_like(x), torch.empty_like(x)
    gf, xf, df, pf = grad.reshape(-1), x.reshape(-1), dx.reshape(-1), prod.reshape(-1)
    lib.lsq_backward(tensor_ptr(gf), tensor_ptr(xf), x.numel(), step, float(qn), float(qp), tensor_ptr(df),
                     tensor_ptr(pf))
    return dx, prod


def backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, c_n: float, n: int):
    """``(dz, sums)``: the input gradient and the ``n + 2`` per-segment sums of
    :func:`lowbit.lsq.segments.segment_terms`, as :func:`~lowbit.lsq.segments.segment_sums` does them
    (one pass; a non-finite gradient or input takes the same float fallback)."""
    lib = load()
    grad, z, y, k = grad.contiguous(), z.contiguous(), y.contiguous(), k.contiguous()
    dz = torch.empty_like(z)
    sums = torch.zeros(n + 2, dtype=torch.float64)
    exponent = segments.sum_exponent(segments.largest(grad), c_n, z.numel())
    bad = lib.nulsq_backward(tensor_ptr(grad), tensor_ptr(z), tensor_ptr(y), tensor_ptr(k), z.numel(), n, float(c_n),
                             2.0 ** exponent, tensor_ptr(dz), tensor_ptr(sums))
    if bad:
        return dz, segments.float_sums(*segments.segment_terms(grad, z, y, k, n), n)
    return dz, segments.from_fixed(sums, exponent, z.dtype)
