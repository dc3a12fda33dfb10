"""The compiled CPU kernel of the exact fast QPS search: build, load and call ``kernel.c``.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 and Algorithm 1:
the kernel runs the scale iteration (eqs. 8-10) for every (QPS, output channel) pair, one pair at a
time, exactly as :func:`lowbit.sq.search._fast` and the reference do (same sums, same thresholds,
same stopping rule); :func:`search_pruned` adds an exact branch and bound over channels.

The C source ``kernel.c`` ships beside this module (package data). It is compiled once and cached
by :mod:`lowbit.core.ckernel` (content-hashed, per-user cache folder), so an edited ``kernel.c`` is
rebuilt; it is called through ``ctypes``, which releases the GIL, so chunks of subsets run on
several threads. Plain C99 without fast-math or FMA contraction: every operation rounds as numpy's
does. Without a compiler :func:`load` returns ``None`` and the search uses its torch backend.
"""
from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core import ckernel
from ..core.ckernel import BASE_FLAGS, FLAG_SETS, cache_tag, compiler, kernel_dir  # noqa: F401
from .scale import global_optimal_scale

SOURCE = Path(__file__).with_name("kernel.c")
MAX_POINTS = 65  # the kernel's per-block arrays: N <= 65 points per QPS (bits <= 7)

PRUNE_SAMPLE_ROWS = 8  # channels every subset is evaluated on before pruning starts
PRUNE_INCUMBENTS = 16  # best subsets on that sample, evaluated in full to set the first bound
PRUNE_REL = 1e-9  # bound margin: far above float summation-order effects (~1e-13), far below real gaps
PRUNE_SUPERSET_MIN_CANDIDATES = 100_000  # below this the superset bounds cost more than they save

_LIB = None  # None: not tried yet; False: no compiler / build failed; else the ctypes library
_LOAD_LOCK = threading.Lock()


def build(cc: str, flags, source: bytes | None = None) -> Path:
    """The shared library ``sq_kernel_<tag>.so`` of ``source`` (default: ``kernel.c``'s bytes) built
    with ``cc`` and ``flags`` (:func:`lowbit.core.ckernel.build`)."""
    return ckernel.build(cc, flags, SOURCE.read_bytes() if source is None else source, "sq_kernel")


def _declare(dll):
    dp, ip, i64, f64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_double
    i32p, i8p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int8)
    dll.sq_search.argtypes = [dp, dp, i32p, dp, i64, dp, i64, i64, dp, i64, i64, i64, f64, i64, dp, dp, ip, ip]
    dll.sq_search.restype = None
    dll.sq_search_pruned.argtypes = [dp, dp, i32p, dp, i64, dp, dp, i64, i64, dp, i64, ip, i64, i64, f64, i64,
                                     f64, f64, f64, dp, i8p, ip, ip, ip]
    dll.sq_search_pruned.restype = f64
    return dll


def load():
    """The compiled kernel (a ``ctypes`` library), or ``None`` when no C compiler can build it."""
    global _LIB
    with _LOAD_LOCK:  # one build per process, even when the first searches start on several threads
        if _LIB is None:
            _LIB = ckernel.load_library(SOURCE, "sq_kernel", _declare) or False
    return _LIB or None


def prepare(rows: np.ndarray):
    """The kernel's per-row inputs: sorted magnitudes (+inf sentinel), prefix sums, a bucket table
    (``table[r, b]`` = #magnitudes below ``b * amax / nb``, ``inv[r] = nb / amax``: a starting guess
    for each threshold count, corrected exactly in the kernel), ``nb`` and energies. Zero weights
    are ordinary magnitudes here: they sit on the smallest point (eq. 3), as in the quantizer."""
    a_sorted = np.ascontiguousarray(np.sort(np.abs(rows), axis=1))
    n_rows, n = a_sorted.shape
    prefix = np.ascontiguousarray(np.concatenate([np.zeros((n_rows, 1)), np.cumsum(a_sorted, axis=1)], axis=1))
    nb = 4 * n
    amax = a_sorted[:, -1]
    inv = np.ascontiguousarray(np.where(amax > 0, nb / np.where(amax > 0, amax, 1.0), 0.0))
    edges = np.arange(nb + 1) / nb
    table = np.empty((n_rows, nb + 1), dtype=np.int32)
    for r in range(n_rows):
        table[r] = np.searchsorted(a_sorted[r], edges * amax[r], side="left")
    energy = np.ascontiguousarray((a_sorted * a_sorted).sum(1))
    padded = np.ascontiguousarray(np.concatenate([a_sorted, np.full((n_rows, 1), np.inf)], axis=1))  # sentinel
    return padded, prefix, table, inv, nb, energy


def _ptr(x, ctype=ctypes.c_double):
    return x.ctypes.data_as(ctypes.POINTER(ctype))


def check_points(qps: np.ndarray) -> np.ndarray:
    """``qps`` as a C-contiguous float64 ``(K, N)`` array; ``ValueError`` when N > ``MAX_POINTS``."""
    pts = np.ascontiguousarray(qps, dtype=np.float64)
    if pts.shape[1] > MAX_POINTS:
        raise ValueError(f"the compiled kernel supports at most {MAX_POINTS} points per QPS (bits <= 7): "
                         "use backend='torch'")
    return pts


def run_chunks(run, chunks, threads: int) -> None:
    """``run(chunk)`` for every chunk, on ``threads`` threads (ctypes calls release the GIL)."""
    if threads <= 1:
        for c in chunks:
            run(c)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, chunks))


def search_all(prep, qps: np.ndarray, tol: float, max_iter: int, threads: int):
    """Every (subset, channel) pair of :func:`prepare`'s rows: per-subset losses (summed in row
    order), scales ``(K, C)``, eq. 10 updates and non-converged pairs per subset."""
    dll = load()
    a_sorted, prefix, table, inv, nb, energy = prep
    n_rows, n = a_sorted.shape[0], a_sorted.shape[1] - 1
    pts = check_points(qps)
    n_cand, n_pts = pts.shape
    losses = np.zeros(n_cand)
    scales = np.zeros((n_cand, n_rows))
    iters = np.zeros(n_cand, dtype=np.int64)
    not_conv = np.zeros(n_cand, dtype=np.int64)
    i64 = ctypes.c_int64

    def run(bounds):
        dll.sq_search(_ptr(a_sorted), _ptr(prefix), _ptr(table, ctypes.c_int32), _ptr(inv), nb,
                      _ptr(energy), n_rows, n, _ptr(pts), bounds[0], bounds[1], n_pts, float(tol), int(max_iter),
                      _ptr(losses), _ptr(scales), _ptr(iters, i64), _ptr(not_conv, i64))

    n_chunks = max(1, min(n_cand, 8 * threads))
    edges = np.linspace(0, n_cand, n_chunks + 1).astype(int)
    run_chunks(run, [(int(edges[i]), int(edges[i + 1])) for i in range(n_chunks) if edges[i + 1] > edges[i]],
               threads)
    return losses, scales, iters, not_conv


def search(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int):
    """Every pair in the kernel: ``(losses, scales, iterations, not_converged, pairs, exact=None)``."""
    losses, scales, iters, not_conv = search_all(prepare(rows), qps, tol, max_iter, threads)
    return losses, scales, int(iters.sum()), int(not_conv.sum()), qps.shape[0] * rows.shape[0], None


def rest_lower_bounds(a_sorted: np.ndarray, energy: np.ndarray, universal_points, n_cand: int) -> np.ndarray:
    """``out[r]`` = a lower bound, valid for every subset, of the summed loss of rows ``r..C-1``.

    Every QPS is a subset of S_U, so for any scale a weight's distance to ``scale * QPS`` is at
    least its distance to ``scale * S_U``: the fixed-point loss of any subset on a channel is
    >= the global minimum over scales of the loss with all of S_U
    (:func:`lowbit.sq.scale.global_optimal_scale`). A relative 1e-9 and an absolute 1e-12 of the
    channel's energy are taken off for rounding. Zeros when there are too few candidates for
    the bound to pay for itself (``PRUNE_SUPERSET_MIN_CANDIDATES``)."""
    n_rows = a_sorted.shape[0]
    out = np.zeros(n_rows + 1)
    if n_cand < PRUNE_SUPERSET_MIN_CANDIDATES:
        return out
    lb = np.array([global_optimal_scale(a_sorted[r], universal_points).loss for r in range(n_rows)])
    lb = np.maximum(lb * (1 - 1e-9) - 1e-12 * energy, 0.0)
    out[:-1] = np.cumsum(lb[::-1])[::-1]
    return out


def search_pruned(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int, tie_rtol: float,
                  universal_points: np.ndarray | None = None):
    """:func:`search` with an exact branch and bound over channels (``search_qps(prune=True)``).

    Every per-channel loss (eq. 9 at the fixed point) is >= 0, so the partial sum of a subset's
    loss over some channels is a lower bound of its total. Channels are visited in decreasing
    energy; every subset is first evaluated on the ``PRUNE_SAMPLE_ROWS`` largest channels, the
    ``PRUNE_INCUMBENTS`` best of them in full, and then every other subset (best sample first,
    chunks on ``threads`` threads) is dropped as soon as its partial sum exceeds
    ``best_total * (1 + PRUNE_REL) + tie_rtol * sum(w^2)`` (plus, with ``universal_points`` and
    many candidates, a lower bound of the channels still to come: :func:`rest_lower_bounds`).
    No subset within the tie tolerance of the minimum can be dropped, so the survivors contain
    the argmin and its ties; they are re-evaluated in plain channel order (exactly what
    :func:`search` computes). Dropped subsets keep a lower bound of their loss in ``losses``
    (partial sum plus the bound of the channels not visited), which exceeds the minimum;
    ``exact`` marks the survivors and ``scales`` maps each survivor's index to its scales.
    """
    n_rows, n_cand = rows.shape[0], qps.shape[0]
    if n_rows <= PRUNE_SAMPLE_ROWS or n_cand <= PRUNE_INCUMBENTS:
        return search(rows, qps, tol, max_iter, threads)
    dll = load()
    pts = check_points(qps)
    n_pts = pts.shape[1]
    order_rows = np.argsort(-(rows * rows).sum(1), kind="stable")
    prep = prepare(rows[order_rows])  # rows by decreasing energy; each row's inputs are its own

    def take(index):  # the kernel inputs of some rows, in the given order
        return tuple(x if isinstance(x, int) else np.ascontiguousarray(x[index]) for x in prep)

    a_sorted, prefix, table, inv, nb, energy = prep
    n = a_sorted.shape[1] - 1
    slack = tie_rtol * float(np.sum(rows * rows))
    # 1. every subset on the largest channels
    m = PRUNE_SAMPLE_ROWS
    partial, _, iters, not_conv = search_all(take(slice(0, m)), pts, tol, max_iter, threads)
    pairs = np.full(n_cand, m, dtype=np.int64)
    done = np.zeros(n_cand, dtype=np.int8)
    i64, i8 = ctypes.c_int64, ctypes.c_int8
    rest_lb = np.zeros(n_rows + 1) if universal_points is None else \
        rest_lower_bounds(a_sorted[:, :-1], energy, universal_points, n_cand)
    order = np.argsort(partial, kind="stable").astype(np.int64)
    lock = threading.Lock()
    state = {"limit": float("inf")}

    def run(ks):
        ks = np.ascontiguousarray(ks)
        with lock:
            limit = state["limit"]
        limit = dll.sq_search_pruned(_ptr(a_sorted), _ptr(prefix), _ptr(table, ctypes.c_int32), _ptr(inv), nb,
                                     _ptr(energy), _ptr(rest_lb), n_rows, n,
                                     _ptr(pts), n_pts, _ptr(ks, i64), len(ks), m, float(tol), int(max_iter),
                                     limit, PRUNE_REL, slack, _ptr(partial), _ptr(done, i8), _ptr(iters, i64),
                                     _ptr(not_conv, i64), _ptr(pairs, i64))
        with lock:
            state["limit"] = min(state["limit"], limit)

    # 2. the incumbents in full, 3. every other subset against the bound
    run(order[:PRUNE_INCUMBENTS])
    rest = order[PRUNE_INCUMBENTS:]
    run_chunks(run, [c for c in np.array_split(rest, max(1, min(len(rest), 32 * threads))) if len(c)], threads)
    # 4. survivors (the argmin and anything that might tie with it), in plain channel order
    survivors = np.flatnonzero((done == 1) & (partial <= state["limit"]))
    plain_order = take(np.argsort(order_rows))  # == prepare(rows), without sorting again
    surv_losses, surv_scales, _, _ = search_all(plain_order, pts[survivors], tol, max_iter, threads)
    losses = partial.copy()
    losses[survivors] = surv_losses
    exact = np.zeros(n_cand, dtype=bool)
    exact[survivors] = True
    scales = {int(k): surv_scales[i] for i, k in enumerate(survivors)}
    return losses, scales, int(iters.sum()), int(not_conv.sum()), int(pairs.sum()), exact
