"""The compiled CPU kernel of the exact fast QPS search: build, load and call ``kernel.c``.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 and Algorithm 1:
the kernel runs the scale iteration (eqs. 8-10) for every (QPS, output channel) pair, one pair at a
time, exactly as :func:`lowbit.sq.search._fast` and the reference do (same sums, same thresholds,
same stopping rule); :func:`search_pruned` adds an exact branch and bound over channels, whose
bound of the channels still to come (:func:`channel_lower_bounds`, beyond the paper) is a lower
bound of each channel's loss over every QPS and every scale: a dynamic program over S_U on a cover
of the scales by intervals, refined where it is lowest.

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
ENGINES = ("dp", "superset")  # search_pruned's rest bounds: the DP bound (default) or the superset one (before)
DP_SAMPLE_ROWS = 2  # with the DP bound, channels every subset is evaluated on before pruning starts
DP_RATIO0, DP_RATIO_MIN, DP_BUDGET = 1.5, 1.0001, 160  # the DP bound's first grid, finest leaf, evaluations
DP_TARGET_GAP = 0.003  # a channel's refinement stops at (1 - gap) * the loss of the best sample QPS there
DP_MARGIN_REL, DP_MARGIN_ENERGY, DP_MARGIN_ABS = 1e-9, 1e-10, 1e-300  # taken off each DP bound for rounding
DP_MIN_CANDIDATES = 400  # below this the DP bound costs more than it saves (engine='dp' then runs as 'superset')
DP_MAX_UNIVERSAL = 64  # the DP's per-block arrays (larger universal sets use the superset bound)



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
    dll.sq_channel_bounds.argtypes = [dp, dp, dp, i32p, dp, i64, i64, i64, i64, dp, i64, i64, f64, f64, i64, dp, dp,
                                      ip, dp]
    dll.sq_channel_bounds.restype = None
    dll.sq_interval_bounds.argtypes = [dp, dp, dp, i32p, f64, i64, i64, dp, i64, i64, f64, dp, dp, i64, i64, dp]
    dll.sq_interval_bounds.restype = None
    dll.sq_row_losses.argtypes = [dp, dp, i32p, dp, i64, dp, i64, i64, dp, i64, f64, i64, dp]
    dll.sq_row_losses.restype = None
    dll.sq_bucket_table.argtypes = [dp, i64, i64, i64, i32p]
    dll.sq_bucket_table.restype = None
    return dll


_LIBRARY = ckernel.Library(SOURCE, "sq_kernel", _declare)  # one build per process, even from several threads


def load():
    """The compiled kernel (a ``ctypes`` library), or ``None`` when no C compiler can build it."""
    return _LIBRARY.get()


def prepare(rows: np.ndarray, threads: int = 1):
    """The kernel's per-row inputs: sorted magnitudes (+inf sentinel), prefix sums, a bucket table
    (``table[r, b]`` = #magnitudes below ``b * amax / nb``, ``inv[r] = nb / amax``: a starting guess
    for each threshold count, corrected exactly in the kernel), ``nb`` and energies. Zero weights
    are ordinary magnitudes here: they sit on the smallest point (eq. 3), as in the quantizer.
    Every row's inputs depend on that row alone (numpy's sort, cumsum and pairwise sum per row),
    so blocks of rows are prepared on ``threads`` threads with the same result."""
    n_rows, n = rows.shape
    nb = 4 * n
    padded = np.empty((n_rows, n + 1))
    prefix = np.empty((n_rows, n + 1))
    table = np.empty((n_rows, nb + 1), dtype=np.int32)
    energy = np.empty(n_rows)
    lib = load()

    def run(bounds):
        r0, r1 = bounds
        pad = padded[r0:r1]
        pad[:, n] = np.inf  # sentinel
        a_sorted = pad[:, :n]
        np.abs(rows[r0:r1], out=a_sorted)
        a_sorted.sort(axis=1)
        prefix[r0:r1, 0] = 0.0
        np.cumsum(a_sorted, axis=1, out=prefix[r0:r1, 1:])
        energy[r0:r1] = (a_sorted * a_sorted).sum(1)
        if lib is not None:  # numpy's searchsorted(side="left") of the bucket edges, in one merge per row
            lib.sq_bucket_table(_ptr(pad), r1 - r0, n, nb, _ptr(table[r0:r1], ctypes.c_int32))
        else:
            edges = np.arange(nb + 1) / nb
            for r in range(r0, r1):
                table[r] = np.searchsorted(padded[r, :n], edges * padded[r, n - 1], side="left")

    blocks = max(1, min(n_rows, threads, n_rows * n // 20_000))  # threads only pay for large layers
    edges_r = np.linspace(0, n_rows, blocks + 1).astype(int)
    run_chunks(run, [(int(edges_r[b]), int(edges_r[b + 1])) for b in range(blocks) if edges_r[b + 1] > edges_r[b]],
               blocks)
    amax = padded[:, n - 1]
    inv = np.ascontiguousarray(np.where(amax > 0, nb / np.where(amax > 0, amax, 1.0), 0.0))
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
    losses, scales, iters, not_conv = search_all(prepare(rows, threads), qps, tol, max_iter, threads)
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


def prefix_squares(a_sorted: np.ndarray) -> np.ndarray:
    """``(C, n + 1)`` prefix sums of the squared magnitudes of :func:`prepare`'s padded rows."""
    out = np.zeros((a_sorted.shape[0], a_sorted.shape[1]))
    np.cumsum(a_sorted[:, :-1] ** 2, axis=1, out=out[:, 1:])
    return out


BOUND_MODES = ("interval", "tangent", "leaf")


def interval_bounds(prep, row: int, universal_points, n_pts: int, s1, s2, mode: str = "leaf") -> np.ndarray:
    """One row's bound (of :func:`prepare`'s inputs) on each scale interval ``[s1[i], s2[i]]``: a lower
    bound of ``min`` over N-subsets ``P`` of S_U and ``s`` in the interval of the loss
    ``sum_i min_{p in P} (|w_i| - s p)^2``. ``mode``: ``"interval"`` (first order in the width, any
    interval), ``"tangent"`` (second order; needs ``0 < s1 < s2 < 3 s1``) or ``"leaf"`` (the one
    :func:`channel_lower_bounds` uses: tangent below a width ratio of 1.5). For tests and studies."""
    if mode not in BOUND_MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {BOUND_MODES}")
    dll = load()
    a_sorted, prefix, table, inv, nb, _ = prep
    n = a_sorted.shape[1] - 1
    u = np.ascontiguousarray(np.unique(np.asarray(universal_points, dtype=np.float64)))
    if not n_pts <= u.size <= DP_MAX_UNIVERSAL:
        raise ValueError(f"the DP bound needs N <= |S_U| <= {DP_MAX_UNIVERSAL}, got N = {n_pts}, |S_U| = {u.size}")
    s1, s2 = (np.ascontiguousarray(np.atleast_1d(np.asarray(x, dtype=np.float64))) for x in (s1, s2))
    if s1.shape != s2.shape or not np.all((s1 >= 0) & (s1 <= s2)):
        raise ValueError("s1 and s2 must be arrays of the same length with 0 <= s1 <= s2")
    if mode == "tangent" and not np.all((s1 > 0) & (s2 < 3 * s1)):
        raise ValueError("the tangent bound needs 0 < s1 <= s2 < 3 * s1: use mode='interval' or 'leaf'")
    out = np.zeros(s1.size)
    a, p1 = np.ascontiguousarray(a_sorted[row]), np.ascontiguousarray(prefix[row])
    p2 = np.ascontiguousarray(prefix_squares(a_sorted[row:row + 1])[0])
    dll.sq_interval_bounds(_ptr(a), _ptr(p1), _ptr(p2), _ptr(np.ascontiguousarray(table[row]), ctypes.c_int32),
                           float(inv[row]), nb, n, _ptr(u), u.size, int(n_pts), float(p2[-1]), _ptr(s1), _ptr(s2),
                           s1.size, BOUND_MODES.index(mode), _ptr(out))
    return out


def row_losses(prep, points: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """The fixed-point loss (eq. 9 at the end of eqs. 8-10) of one QPS on each row of :func:`prepare`'s inputs."""
    dll = load()
    a_sorted, prefix, table, inv, nb, energy = prep
    pts = check_points(np.asarray(points, dtype=np.float64).reshape(1, -1))
    out = np.zeros(a_sorted.shape[0])
    dll.sq_row_losses(_ptr(a_sorted), _ptr(prefix), _ptr(table, ctypes.c_int32), _ptr(inv), nb, _ptr(energy),
                      a_sorted.shape[0], a_sorted.shape[1] - 1, _ptr(pts), pts.shape[1], float(tol), int(max_iter),
                      _ptr(out))
    return out


def channel_lower_bounds(prep, universal_points, n_pts: int, threads: int, target=None,
                         budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(lb, evals)``: per row of :func:`prepare`'s inputs, a lower bound, valid for every N-subset
    of S_U and every scale, of the row's loss (so of every fixed-point loss the search computes on
    it: that is the loss at some scale with some assignment, never below the nearest-point loss
    there), and the number of interval bounds evaluated.

    ``sq_channel_bounds`` (``kernel.c``) covers the scales ``s >= 0`` by intervals and bounds
    ``min_P min_{s in [s1, s2]} L_P(s)`` on each: *interval* bound: ``s u`` lies in ``[s1 u, s2 u]``,
    so a weight's distance to ``s P`` is at least its distance to the nearest interval of ``P``, and
    the least sum over N-subsets is a dynamic program over the sorted intervals (a 1-D
    facility-location DP; first order in the width); *tangent* bound (narrow intervals): each
    ``(|w| - s p)^2`` is above its tangent at the interval's centre, a sum of minima of lines is
    concave in ``s``, so it is least at an end, where it equals ``g M(e') - (g - 1) sum w^2`` with
    ``M`` the exact point DP at a slightly smaller scale ``e'`` (second order in the width). The
    lowest leaf is split (geometric mid-point) until it reaches ``target[r]`` (default: never; the
    search passes ``1 - DP_TARGET_GAP`` of its best sample QPS's loss there, which no bound can
    exceed), ``budget`` evaluations (default ``DP_BUDGET``) or a width ratio of ``DP_RATIO_MIN``; the
    row's bound is the lowest leaf, less ``DP_MARGIN_REL`` of itself, ``DP_MARGIN_ENERGY + 8 n eps``
    of the row's energy and ``DP_MARGIN_ABS`` for rounding (the kernel's ``er - 2 s S + s^2 Q`` and
    the bound's prefix-sum costs each err by at most about ``n eps`` of the energy). Zeros when S_U
    has more than ``DP_MAX_UNIVERSAL`` points. :func:`interval_bounds` exposes one leaf's bound."""
    dll = load()
    a_sorted, prefix, table, inv, nb, energy = prep
    n_rows, n = a_sorted.shape[0], a_sorted.shape[1] - 1
    u = np.ascontiguousarray(np.unique(np.asarray(universal_points, dtype=np.float64)))
    lb, evals = np.zeros(n_rows), np.zeros(n_rows, dtype=np.int64)
    if not n_pts <= u.size <= DP_MAX_UNIVERSAL:
        return lb, evals
    budget = DP_BUDGET if budget is None else int(budget)
    target = np.full(n_rows, np.inf) if target is None else np.ascontiguousarray(target, dtype=np.float64)
    prefix2 = prefix_squares(a_sorted)

    def run(bounds):
        heap = np.empty(3 * (budget + 2))
        dll.sq_channel_bounds(_ptr(a_sorted), _ptr(prefix), _ptr(prefix2), _ptr(table, ctypes.c_int32), _ptr(inv), nb,
                              bounds[0], bounds[1], n, _ptr(u), u.size, int(n_pts), DP_RATIO0, DP_RATIO_MIN, budget,
                              _ptr(target), _ptr(lb), _ptr(evals, ctypes.c_int64), _ptr(heap))

    edges = np.linspace(0, n_rows, max(1, min(n_rows, 4 * threads)) + 1).astype(int)
    run_chunks(run, [(int(edges[i]), int(edges[i + 1])) for i in range(len(edges) - 1) if edges[i + 1] > edges[i]],
               threads)
    # rounding: relative to the energy, recursive sums of n terms err by at most about n * 2**-53
    margin = (DP_MARGIN_ENERGY + 8 * n * np.finfo(np.float64).eps) * energy + DP_MARGIN_ABS
    lb = np.maximum(lb * (1 - DP_MARGIN_REL) - margin, 0.0)
    return lb, evals


def dp_lower_bounds(prep, universal_points, n_pts: int, threads: int, target=None) -> np.ndarray:
    """``out[r]`` = a lower bound, valid for every N-subset of S_U, of the summed loss of rows ``r..C-1``
    (:func:`channel_lower_bounds`, summed from the last row)."""
    lb, _ = channel_lower_bounds(prep, universal_points, n_pts, threads, target)
    out = np.zeros(lb.size + 1)
    out[:-1] = np.cumsum(lb[::-1])[::-1]
    return out


def search_pruned(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int, tie_rtol: float,
                  universal_points: np.ndarray | None = None, engine: str = "dp"):
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

    ``engine="dp"`` (with ``universal_points`` and at least ``DP_MIN_CANDIDATES`` subsets; the
    default): the bound of the channels still to
    come is :func:`dp_lower_bounds` (per channel close to the least loss any QPS reaches there), and
    the sample is ``min(DP_SAMPLE_ROWS, PRUNE_SAMPLE_ROWS)`` channels; ``engine="superset"``: the
    bounds of :func:`rest_lower_bounds` and ``PRUNE_SAMPLE_ROWS`` (the path before the DP bound, kept
    for the benchmark and the tests). Both return the same survivors' losses and scales bit for
    bit (the same :func:`search_all` call per survivor), so the same winner: only which losers are
    dropped, and when, differs.
    """
    n_rows, n_cand = rows.shape[0], qps.shape[0]
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: use one of {ENGINES}")
    dp = engine == "dp" and universal_points is not None and n_cand >= DP_MIN_CANDIDATES
    if n_rows <= PRUNE_SAMPLE_ROWS or n_cand <= PRUNE_INCUMBENTS:
        return search(rows, qps, tol, max_iter, threads)
    dll = load()
    pts = check_points(qps)
    n_pts = pts.shape[1]
    order_rows = np.argsort(-(rows * rows).sum(1), kind="stable")
    prep = prepare(rows[order_rows], threads)  # rows by decreasing energy; each row's inputs are its own

    def take(index):  # the kernel inputs of some rows, in the given order
        return tuple(x if isinstance(x, int) else np.ascontiguousarray(x[index]) for x in prep)

    a_sorted, prefix, table, inv, nb, energy = prep
    n = a_sorted.shape[1] - 1
    slack = tie_rtol * float(np.sum(rows * rows))
    # 1. every subset on the largest channels
    m = min(DP_SAMPLE_ROWS, PRUNE_SAMPLE_ROWS) if dp else PRUNE_SAMPLE_ROWS
    partial, _, iters, not_conv = search_all(take(slice(0, m)), pts, tol, max_iter, threads)
    pairs = np.full(n_cand, m, dtype=np.int64)
    done = np.zeros(n_cand, dtype=np.int8)
    i64, i8 = ctypes.c_int64, ctypes.c_int8
    order = np.argsort(partial, kind="stable").astype(np.int64)
    if dp:  # refine each channel's bound up to (1 - gap) of the best sample QPS's loss there
        target = row_losses(prep, pts[order[0]], tol, max_iter) * (1 - DP_TARGET_GAP)
        target[:m] = 0.0  # the sample rows' bounds are never used
        rest_lb = dp_lower_bounds(prep, universal_points, n_pts, threads, target)
    elif universal_points is None:
        rest_lb = np.zeros(n_rows + 1)
    else:
        rest_lb = rest_lower_bounds(a_sorted[:, :-1], energy, universal_points, n_cand)
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
