"""Exhaustive QPS search (SQ Algorithm 1 FINDBESTQPS): a plain reference and a fast exact path.

SQ paper (001_ab6a87911af615e3.txt), section 3.3 "Finding the Best Subset" and Algorithm 1:
for every N-subset S of the universal set S_U (N = 2**(bits-1)), find the scale factor by
the iteration of eqs. 8-10 (:func:`lowbit.scale.optimal_scale`), compute the L2 loss
(eq. 9) and keep the subset with the smallest loss.

Granularity: ``"channel"`` (the paper's main setting) is one QPS per layer with one scale
per output channel (dim 0), the loss summed over channels; ``"layer"`` is one QPS and one
scale for the whole tensor.

Two implementations that must agree (``tests/test_search.py``):

* ``method="reference"``: Algorithm 1 written plainly: a Python loop over every subset in
  ``itertools.combinations`` order and every channel, calling ``optimal_scale`` (argmin over
  all points for eq. 8).
* ``method="fast"``: the same iteration with each channel's magnitudes sorted once with
  prefix sums, so eq. 8's assignment is N-1 threshold counts against the scaled mid-points
  and eq. 10's sums are prefix-sum differences. Two backends compute it:
  ``backend="torch"`` vectorizes all (subset, channel) pairs (``searchsorted``; converged
  pairs drop out; CUDA when available) and ``backend="c"`` runs a small compiled C kernel
  that follows each pair on its own, starting each threshold count from a per-channel bucket
  table (the default on CPU: much faster than the torch path there, because the iteration
  takes 18-50 small steps per pair). On the kernel, ``prune=True`` adds an exact branch and
  bound over channels (:func:`_fast_c_pruned`).
  Ties: the threshold counts are corrected with the reference's own float distance test, so
  a magnitude on an exact (or rounding-shifted) tie gets the same point as the argmin.

Ties between subsets: losses within ``1e-12 * sum(w^2)`` of the minimum are treated as equal
(rounding cannot separate them) and the first such subset in combinations order wins, in
both methods.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..core.points import quantize_to_points
from ..core.validation import as_weights, check_tol
from .scale import global_optimal_scale, optimal_scale
from .universal import check_fits, qps_indices, universal_set

GRANULARITIES = ("channel", "layer")
METHODS = ("fast", "reference")
TIE_RTOL = 1e-12  # relative to sum(w^2): losses closer than this are ties


@dataclass
class SearchResult:
    """Result of :func:`search_qps`.

    ``points``: the chosen QPS, sorted, unscaled (N elements of S_U); ``scale``: one per output
    channel (``"channel"``, numpy array) or a float (``"layer"``); ``loss``: total squared
    error over the tensor (eq. 9); ``candidates``: number of QPS evaluated; ``seconds``: wall
    time; ``index``: position of ``points`` in combinations order; ``losses``: total loss of
    every candidate (combinations order); ``iterations``: eq. 10 updates per (candidate,
    channel) pair summed over the evaluated pairs; ``not_converged``: pairs that hit
    ``max_iter``; ``pairs``: (candidate, channel) pairs evaluated (fewer than candidates x
    channels when ``prune=True`` dropped some); ``exact``: ``None`` when every entry of
    ``losses`` is the candidate's total, else a boolean mask: ``False`` entries were pruned and
    hold a lower bound (a partial sum over channels) that exceeds the minimum.
    """

    points: np.ndarray
    scale: object
    loss: float
    candidates: int
    seconds: float
    index: int
    losses: np.ndarray
    bits: int
    granularity: str
    method: str
    backend: str = ""
    iterations: int = 0
    not_converged: int = 0
    pairs: int = 0
    exact: np.ndarray | None = None

    def quantize(self, weight) -> torch.Tensor:
        """The quantized tensor ``sign(w) * scale * p*`` (SQ eq. 3) with this QPS and scale."""
        w = torch.as_tensor(weight)
        dim_scale = self.scale if self.granularity == "layer" else torch.as_tensor(self.scale, dtype=torch.float64)
        return quantize_to_points(w.to(torch.float64), self.points, dim_scale, dim=0).to(w.dtype)


def _rows(weight, granularity: str) -> np.ndarray:
    """(C, n) float64 rows: one per output channel, or one row for the whole layer."""
    if not isinstance(weight, (torch.Tensor, np.ndarray)):
        raise TypeError(f"weight must be a torch tensor or numpy array, got {type(weight).__name__}")
    shape = tuple(weight.shape)
    if len(shape) == 0:
        raise ValueError("weight is a scalar: pass a tensor with output channels on dim 0")
    flat = as_weights(weight, "weight")  # checks empty / NaN / inf
    if granularity == "layer":
        return flat.reshape(1, -1)
    return flat.reshape(shape[0], -1)


def _select(losses: np.ndarray, energy: float) -> int:
    """First candidate whose loss is within ``TIE_RTOL * energy`` of the minimum."""
    best = float(np.min(losses))
    return int(np.flatnonzero(losses <= best + TIE_RTOL * energy)[0])


def _reference(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int):
    """Algorithm 1, plainly: every subset, every channel, ``optimal_scale``."""
    n_cand, n_rows = qps.shape[0], rows.shape[0]
    losses = np.zeros(n_cand)
    scales = np.zeros((n_cand, n_rows))
    iterations = not_converged = 0
    for k in range(n_cand):
        for c in range(n_rows):
            res = optimal_scale(rows[c], qps[k], tol=tol, max_iter=max_iter)
            losses[k] += res.loss
            scales[k, c] = res.scale
            iterations += res.iterations
            not_converged += not res.converged
    return losses, scales, iterations, not_converged


def _argmin_thresholds(s: torch.Tensor, pts: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Per adjacent point pair (j, j+1), the largest float ``t`` that the reference's argmin
    sends to point j: ``|t - s p_j| <= |t - s p_{j+1}|`` evaluated in float64 exactly as
    :func:`lowbit.scale.nearest_points` does. Starts from ``s * m_j`` (exact in real numbers)
    and steps by one ulp until the floating-point predicate flips, so a magnitude on an
    exact tie gets the same point in both searches even when rounding moves the tie."""
    lo, hi = s * pts[..., :-1], s * pts[..., 1:]  # fl(s p_j), fl(s p_{j+1})

    def to_lower(t):
        return (t - lo).abs() <= (hi - t).abs()

    t = s * mids
    inf = torch.full_like(t, float("inf"))
    while True:  # step down while t itself would go up
        bad = ~to_lower(t)
        if not bool(bad.any()):
            break
        t = torch.where(bad, torch.nextafter(t, -inf), t)
    while True:  # step up while the next float would still go down
        nxt = torch.nextafter(t, inf)
        good = to_lower(nxt)
        if not bool(good.any()):
            break
        t = torch.where(good, nxt, t)
    return t


def _fast(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, device, chunk_queries: int):
    """All (subset, channel) pairs of eqs. 8-10 at once with sorted magnitudes + prefix sums."""
    dt = torch.float64
    mag = torch.as_tensor(np.abs(rows), dtype=dt, device=device)
    n_rows, n = mag.shape
    a_sorted = mag.sort(dim=1).values.contiguous()  # (C, n)
    prefix = torch.cat([torch.zeros(n_rows, 1, dtype=dt, device=device), a_sorted.cumsum(1)], 1)  # (C, n+1)
    zeros = (a_sorted == 0).sum(1)  # (C,) zero weights: quantized to 0, excluded from eq. 10
    amax = a_sorted[:, -1]
    energy = (a_sorted * a_sorted).sum(1)  # (C,)
    pts_all = torch.as_tensor(qps, dtype=dt, device=device)  # (K, N)
    n_cand, n_pts = pts_all.shape
    mids_all = (pts_all[:, 1:] + pts_all[:, :-1]) / 2  # (K, N-1)
    per_subset = max(1, n_rows * max(n_pts - 1, 1))
    chunk = max(1, min(n_cand, chunk_queries // per_subset))
    losses = torch.empty(n_cand, dtype=dt, device=device)
    scales = torch.empty(n_cand, n_rows, dtype=dt, device=device)
    iterations = not_converged = 0
    row_ids = torch.arange(n_rows, device=device)

    def sums(s, sel):
        """eq. 8 assignment at scales ``s`` (C, W) for subsets ``sel`` (C, W) -> S, Q."""
        pts, mids = pts_all[sel], mids_all[sel]  # (C, W, N), (C, W, N-1)
        width = s.shape[1]
        thr = _argmin_thresholds(s.unsqueeze(-1), pts, mids).reshape(n_rows, -1)
        counts = torch.searchsorted(a_sorted, thr, right=True).reshape(n_rows, width, n_pts - 1)
        edge = torch.zeros(n_rows, width, 1, dtype=counts.dtype, device=device)
        bounds = torch.cat([edge, counts, edge + n], -1)  # (C, W, N+1)
        seg_sum = prefix.gather(1, bounds.reshape(n_rows, -1)).reshape(n_rows, width, n_pts + 1).diff(dim=-1)
        seg_cnt = bounds.diff(dim=-1)
        seg_cnt[..., 0] -= zeros.unsqueeze(1)  # zero weights sit in the first segment
        s_sum = (pts * seg_sum).sum(-1)  # sum |w| q
        q_sum = (pts * pts * seg_cnt.to(dt)).sum(-1)  # sum q^2
        return s_sum, q_sum

    for k0 in range(0, n_cand, chunk):
        k1 = min(n_cand, k0 + chunk)
        kc = k1 - k0
        pmax = pts_all[k0:k1, -1]
        live = (amax > 0).unsqueeze(0) & (pmax > 0).unsqueeze(1)  # (Kc, C)
        s0 = torch.where(live, amax.unsqueeze(0) / pmax.unsqueeze(1).clamp_min(1e-300), torch.ones((), dtype=dt, device=device))
        s = s0.clone()
        active = live.clone()
        local = torch.arange(k0, k1, device=device)
        for _ in range(max_iter):
            act_t = active.T  # (C, Kc)
            n_act = act_t.sum(1)
            width = int(n_act.max())
            if width == 0:
                break
            if width == kc:
                sel_local = torch.arange(kc, device=device).expand(n_rows, kc)
                valid = act_t
            else:  # per channel, the still-active subsets first (padded to the widest channel)
                order = torch.argsort((~act_t).to(torch.int8), dim=1, stable=True)[:, :width]
                sel_local = order
                valid = act_t.gather(1, order)
            s_cur = s.T.gather(1, sel_local)  # (C, W)
            s_sum, q_sum = sums(s_cur, local[sel_local])
            flat = q_sum == 0
            s_new = torch.where(flat, s_cur, s_sum / torch.where(flat, torch.ones_like(q_sum), q_sum))
            s0_cur = s0.T.gather(1, sel_local)
            done = flat | ((s_new - s_cur).abs() / s0_cur <= tol)
            rows_v = row_ids.unsqueeze(1).expand_as(sel_local)[valid]
            cols_v = sel_local[valid]
            iterations += int((~flat & valid).sum())
            s[cols_v, rows_v] = s_new[valid]
            active[cols_v, rows_v] = ~done[valid]
        not_converged += int(active.sum())
        # eq. 9 at the final scales, every pair of the chunk
        sel_all = torch.arange(kc, device=device).expand(n_rows, kc)
        s_fin = s.T.contiguous()
        s_sum, q_sum = sums(s_fin, local[sel_all])
        loss = energy.unsqueeze(1) - 2 * s_fin * s_sum + s_fin * s_fin * q_sum  # (C, Kc)
        loss = torch.where(live.T, loss, energy.unsqueeze(1)).clamp_min(0)
        losses[k0:k1] = loss.sum(0)
        scales[k0:k1] = s
    return losses.cpu().numpy(), scales.cpu().numpy(), iterations, not_converged


# --- compiled kernel: the same iteration, one (subset, channel) pair at a time --------------
# Plain C99 (no fast-math, no FMA contraction, so every operation rounds as numpy's does),
# compiled once with the system C compiler into a per-user cache and called through ctypes
# (which releases the GIL, so chunks of subsets run on several threads). Each threshold count
# starts from a per-channel bucket table and steps to the exact count in a few comparisons;
# the elements next to each threshold are then checked with the reference's own distance
# comparison, so floating-point ties resolve identically.
# Without a compiler the torch path is used.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

static double pair_loss(const double *a, const double *pre, const int32_t *tab, double inv, int64_t nb,
                        int64_t zr, double er, int64_t n, const double *p, int64_t n_pts, double tol,
                        int64_t max_iter, double *scale_out, int64_t *it_out, int *conv_out) {
    /* eqs. 8-10 for one (subset, channel) pair; returns the eq. 9 loss at the final scale */
    double amax = a[n - 1], pmax = p[n_pts - 1], s, s0, S = 0.0, Q = 0.0;
    if (amax == 0.0 || pmax == 0.0) { *scale_out = 1.0; *it_out = 0; *conv_out = 1; return er; }
    s0 = amax / pmax; s = s0;
    int converged = 0; int64_t it = 0;
    for (;;) {
        int64_t prev = 0;
        S = 0.0; Q = 0.0;
        for (int64_t j = 0; j < n_pts; j++) {  /* eq. 8 via thresholds, eq. 10 sums */
            int64_t c = n;
            if (j + 1 < n_pts) {
                double lo = s * p[j], hi = s * p[j + 1], t = s * ((p[j + 1] + p[j]) / 2);
                double eps = 1e-13 * hi;  /* >> the rounding of t, lo, hi and the distances */
                /* #{a <= t}: start from the bucket table (a guess: every bucket holds ~1/2
                   magnitude on average), then step to the exact count */
                double tb = t * inv;
                c = tab[(tb >= (double)nb) ? nb : (int64_t)tb];
                while (c > 0 && a[c - 1] > t) c--;  /* only if rounding put t a bucket too high */
                c += a[c] <= t;  /* a[n] = +inf is a sentinel: no bound checks, no branches */
                c += a[c] <= t;
                while (a[c] <= t) c++;
                /* the reference's argmin decides at the boundary: |a - s p_j| <= |a - s p_j+1|
                   means point j (ties to the smaller point), whatever rounding did to s m_j.
                   Magnitudes farther than eps from t cannot be affected by rounding: only
                   the near ones get the exact test. */
                if ((c > 0 && a[c - 1] >= t - eps) || a[c] <= t + eps) {
                    while (c > 0 && !(fabs(a[c - 1] - lo) <= fabs(hi - a[c - 1]))) c--;
                    while (c < n && fabs(a[c] - lo) <= fabs(hi - a[c])) c++;
                }
            }
            int64_t cnt = c - prev - (j == 0 ? zr : 0);
            S += p[j] * (pre[c] - pre[prev]);
            Q += p[j] * p[j] * (double)cnt;
            prev = c;
        }
        if (converged || it >= max_iter) break;
        if (Q == 0.0) { converged = 1; break; }
        double s_new = S / Q;
        it++;
        double change = fabs(s_new - s) / s0;
        s = s_new;
        converged = change <= tol;
    }
    double loss = er - 2.0 * s * S + s * s * Q;
    *scale_out = s; *it_out = it; *conv_out = converged;
    return loss > 0.0 ? loss : 0.0;
}

void sq_search(const double *a_sorted, const double *prefix, const int32_t *table, const double *inv,
               int64_t nb, const int64_t *zeros, const double *energy, int64_t n_rows, int64_t n, const double *pts, int64_t k_begin, int64_t k_end, int64_t n_pts,
               double tol, int64_t max_iter, double *losses, double *scales, int64_t *iters, int64_t *not_conv) {
    /* every pair of subsets [k_begin, k_end) x all channels; losses summed in channel order */
    for (int64_t k = k_begin; k < k_end; k++) { losses[k] = 0.0; iters[k] = 0; not_conv[k] = 0; }
    for (int64_t r = 0; r < n_rows; r++) {  /* channel outer: its magnitudes stay in cache */
        const double *a = a_sorted + r * (n + 1), *pre = prefix + r * (n + 1);
        for (int64_t k = k_begin; k < k_end; k++) {
            int64_t it; int conv;
            losses[k] += pair_loss(a, pre, table + r * (nb + 1), inv[r], nb, zeros[r], energy[r], n, pts + k * n_pts, n_pts, tol, max_iter,
                                   &scales[k * n_rows + r], &it, &conv);
            iters[k] += it; not_conv[k] += !conv;
        }
    }
}

#define SQ_BLOCK 64
double sq_search_pruned(const double *a_sorted, const double *prefix, const int32_t *table, const double *inv,
                        int64_t nb, const int64_t *zeros, const double *energy, const double *rest_lb, int64_t n_rows, int64_t n, const double *pts, int64_t n_pts, const int64_t *ks, int64_t n_ks,
                        int64_t row_begin, double tol, int64_t max_iter, double limit, double rel, double slack,
                        double *partial, int8_t *done, int64_t *iters, int64_t *not_conv, int64_t *pairs) {
    /* Branch and bound over channels: partial[k] (in: the loss over rows [0, row_begin)) grows by
       one channel's eq. 9 loss at a time; rest_lb[r] is a lower bound of the loss of rows [r, n_rows)
       that holds for every subset (0, or superset bounds), so once partial[k] + rest_lb[r] > limit
       the subset cannot be the argmin (nor tie with it) and is dropped. A subset that completes all rows
       lowers limit to total * (1 + rel) + slack. Subsets go in blocks so each channel's
       magnitudes are reused from cache across the block. Returns the final limit. */
    double scale;
    for (int64_t b = 0; b < n_ks; b += SQ_BLOCK) {
        int64_t m = (n_ks - b < SQ_BLOCK) ? n_ks - b : SQ_BLOCK, n_alive = 0;
        int alive[SQ_BLOCK];
        for (int64_t i = 0; i < m; i++) {
            alive[i] = partial[ks[b + i]] + rest_lb[row_begin] <= limit; n_alive += alive[i];
            if (!alive[i]) partial[ks[b + i]] += rest_lb[row_begin];  /* keep a lower bound of the total */
        }
        for (int64_t r = row_begin; r < n_rows && n_alive > 0; r++) {
            const double *a = a_sorted + r * (n + 1), *pre = prefix + r * (n + 1);
            for (int64_t i = 0; i < m; i++) {
                if (!alive[i]) continue;
                int64_t k = ks[b + i], it; int conv;
                partial[k] += pair_loss(a, pre, table + r * (nb + 1), inv[r], nb, zeros[r], energy[r], n, pts + k * n_pts, n_pts, tol, max_iter,
                                        &scale, &it, &conv);
                iters[k] += it; not_conv[k] += !conv; pairs[k] += 1;
                if (partial[k] + rest_lb[r + 1] > limit) { alive[i] = 0; n_alive--; partial[k] += rest_lb[r + 1]; }
            }
        }
        for (int64_t i = 0; i < m; i++) {
            if (!alive[i]) continue;
            int64_t k = ks[b + i];
            double bound = partial[k] * (1.0 + rel) + slack;
            done[k] = 1;
            if (bound < limit) limit = bound;
        }
    }
    return limit;
}
"""
_C_LIB = None


def _c_kernel():
    """The compiled kernel (ctypes), or None when no C compiler is available."""
    global _C_LIB
    if _C_LIB is not None:
        return _C_LIB or None
    import ctypes
    import hashlib
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        _C_LIB = False
        return None
    tag = hashlib.sha256((_C_SOURCE + "|O3 march=native fp-contract=off").encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LOWBIT_KERNEL_DIR", Path(tempfile.gettempdir()) / f"lowbit-kernels-{os.getuid()}"))
    lib = folder / f"sq_search_{tag}.so"
    try:
        if not lib.exists():
            folder.mkdir(parents=True, exist_ok=True)
            src = folder / f"sq_search_{tag}.{os.getpid()}.c"
            src.write_text(_C_SOURCE)
            tmp = folder / f".sq_search_{tag}.{os.getpid()}.so"
            base = [cc, "-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"]
            try:  # this CPU's instruction set (no FMA contraction: -ffp-contract=off), else portable
                subprocess.run(base + ["-march=native", str(src), "-o", str(tmp), "-lm"], check=True,
                               capture_output=True, timeout=120)
            except subprocess.SubprocessError:
                subprocess.run(base + [str(src), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
            src.unlink(missing_ok=True)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        _C_LIB = False
        return None
    dp, ip, i64, f64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_double
    i32p = ctypes.POINTER(ctypes.c_int32)
    dll.sq_search.argtypes = [dp, dp, i32p, dp, i64, ip, dp, i64, i64, dp, i64, i64, i64, f64, i64, dp, dp, ip, ip]
    dll.sq_search.restype = None
    i8p = ctypes.POINTER(ctypes.c_int8)
    dll.sq_search_pruned.argtypes = [dp, dp, i32p, dp, i64, ip, dp, dp, i64, i64, dp, i64, ip, i64, i64, f64, i64,
                                     f64, f64, f64, dp, i8p, ip, ip, ip]
    dll.sq_search_pruned.restype = f64
    _C_LIB = dll
    return dll


def _c_prepare(rows: np.ndarray):
    """The kernel's per-row inputs: sorted magnitudes, prefix sums, a bucket table (``table[r, b]``
    = #magnitudes below ``b * amax / nb``, ``inv[r] = nb / amax``: a starting guess for each
    threshold count, corrected exactly in the kernel), zero counts and energies."""
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
    zeros = np.ascontiguousarray((a_sorted == 0).sum(1).astype(np.int64))
    energy = np.ascontiguousarray((a_sorted * a_sorted).sum(1))
    padded = np.ascontiguousarray(np.concatenate([a_sorted, np.full((n_rows, 1), np.inf)], axis=1))  # sentinel
    return padded, prefix, table, inv, nb, zeros, energy


def _ptr(x, ctype=None):
    import ctypes

    return x.ctypes.data_as(ctypes.POINTER(ctype or ctypes.c_double))


def _check_kernel_points(qps: np.ndarray) -> np.ndarray:
    pts = np.ascontiguousarray(qps, dtype=np.float64)
    if pts.shape[1] > 65:
        raise ValueError("the compiled kernel supports at most 65 points per QPS (bits <= 7): use backend='torch'")
    return pts


def _run_chunks(run, chunks, threads: int) -> None:
    """``run(chunk)`` for every chunk, on ``threads`` threads (ctypes calls release the GIL)."""
    if threads <= 1:
        for c in chunks:
            run(c)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, chunks))


def _c_all(prep, qps: np.ndarray, tol: float, max_iter: int, threads: int):
    """Every (subset, channel) pair in the kernel: per-subset losses (summed in row order),
    scales (K, C), eq. 10 updates and non-converged pairs per subset."""
    import ctypes

    dll = _c_kernel()
    a_sorted, prefix, table, inv, nb, zeros, energy = prep
    n_rows, n = a_sorted.shape[0], a_sorted.shape[1] - 1
    pts = _check_kernel_points(qps)
    n_cand, n_pts = pts.shape
    losses = np.zeros(n_cand)
    scales = np.zeros((n_cand, n_rows))
    iters = np.zeros(n_cand, dtype=np.int64)
    not_conv = np.zeros(n_cand, dtype=np.int64)
    i64 = ctypes.c_int64

    def run(bounds):
        dll.sq_search(_ptr(a_sorted), _ptr(prefix), _ptr(table, ctypes.c_int32), _ptr(inv), nb, _ptr(zeros, i64),
                      _ptr(energy), n_rows, n, _ptr(pts),
                      bounds[0], bounds[1], n_pts, float(tol), int(max_iter), _ptr(losses), _ptr(scales),
                      _ptr(iters, i64), _ptr(not_conv, i64))

    n_chunks = max(1, min(n_cand, 8 * threads))
    edges = np.linspace(0, n_cand, n_chunks + 1).astype(int)
    chunks = [(int(edges[i]), int(edges[i + 1])) for i in range(n_chunks) if edges[i + 1] > edges[i]]
    _run_chunks(run, chunks, threads)
    return losses, scales, iters, not_conv


def _fast_c(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int):
    """:func:`_fast` in the compiled kernel: same sums, same thresholds, same stopping rule."""
    losses, scales, iters, not_conv = _c_all(_c_prepare(rows), qps, tol, max_iter, threads)
    return losses, scales, int(iters.sum()), int(not_conv.sum()), qps.shape[0] * rows.shape[0], None


PRUNE_SAMPLE_ROWS = 8  # channels every subset is evaluated on before pruning starts
PRUNE_INCUMBENTS = 16  # best subsets on that sample, evaluated in full to set the first bound
PRUNE_REL = 1e-9  # bound margin: far above float summation-order effects (~1e-13), far below real gaps
PRUNE_SUPERSET_MIN_CANDIDATES = 100_000  # below this the superset bounds cost more than they save


def _rest_lower_bounds(a_sorted: np.ndarray, energy: np.ndarray, universal_points, n_cand: int) -> np.ndarray:
    """``out[r]`` = a lower bound, valid for every subset, of the summed loss of rows ``r..C-1``.

    Every QPS is a subset of S_U, so for any scale a weight's distance to ``scale * QPS`` is at
    least its distance to ``scale * S_U``: the fixed-point loss of any subset on a channel is
    >= the global minimum over scales of the loss with all of S_U
    (:func:`lowbit.scale.global_optimal_scale`). A relative 1e-9 and an absolute 1e-12 of the
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


def _fast_c_pruned(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int,
                   universal_points: np.ndarray | None = None):
    """:func:`_fast_c` with exact branch and bound over channels (``prune=True``).

    Every per-channel loss (eq. 9 at the fixed point) is >= 0, so the partial sum of a subset's
    loss over some channels is a lower bound of its total. Channels are visited in decreasing
    energy; every subset is first evaluated on the ``PRUNE_SAMPLE_ROWS`` largest channels, the
    ``PRUNE_INCUMBENTS`` best of them in full, and then every other subset (best sample first,
    chunks on ``threads`` threads) is dropped as soon as its partial sum exceeds
    ``best_total * (1 + PRUNE_REL) + TIE_RTOL * energy`` (plus, with ``universal_points`` and
    many candidates, a lower bound of the channels still to come: :func:`_rest_lower_bounds`).
    No subset within the tie tolerance of
    the minimum can be dropped, so the survivors contain the argmin and its ties; they are
    re-evaluated in plain channel order (exactly what :func:`_fast_c` computes) and selected with
    the same rule. Dropped subsets keep a lower bound of their loss in ``losses`` (partial sum
    plus the bound of the channels not visited), which exceeds the minimum.
    """
    import ctypes
    import threading

    n_rows = rows.shape[0]
    n_cand = qps.shape[0]
    if n_rows <= PRUNE_SAMPLE_ROWS or n_cand <= PRUNE_INCUMBENTS:
        return _fast_c(rows, qps, tol, max_iter, threads)
    dll = _c_kernel()
    pts = _check_kernel_points(qps)
    n_pts = pts.shape[1]
    order_rows = np.argsort(-(rows * rows).sum(1), kind="stable")
    prep = _c_prepare(rows[order_rows])  # rows by decreasing energy; each row's inputs are its own

    def take(index):  # the kernel inputs of some rows, in the given order
        return tuple(x if isinstance(x, int) else np.ascontiguousarray(x[index]) for x in prep)

    a_sorted, prefix, table, inv, nb, zeros, energy = prep
    n = a_sorted.shape[1] - 1
    energy_total = float(np.sum(rows * rows))
    slack = TIE_RTOL * energy_total
    # 1. every subset on the largest channels
    m = PRUNE_SAMPLE_ROWS
    partial, _, iters, not_conv = _c_all(take(slice(0, m)), pts, tol, max_iter, threads)
    pairs = np.full(n_cand, m, dtype=np.int64)
    done = np.zeros(n_cand, dtype=np.int8)
    i64, i8 = ctypes.c_int64, ctypes.c_int8
    rest_lb = _rest_lower_bounds(a_sorted[:, :-1], energy, universal_points, len(pts)) if universal_points is not None \
        else np.zeros(n_rows + 1)
    order = np.argsort(partial, kind="stable").astype(np.int64)
    lock = threading.Lock()
    state = {"limit": float("inf")}

    def run(ks):
        ks = np.ascontiguousarray(ks)
        with lock:
            limit = state["limit"]
        limit = dll.sq_search_pruned(_ptr(a_sorted), _ptr(prefix), _ptr(table, ctypes.c_int32), _ptr(inv), nb,
                                     _ptr(zeros, i64), _ptr(energy), _ptr(rest_lb), n_rows, n,
                                     _ptr(pts), n_pts, _ptr(ks, i64), len(ks), m, float(tol), int(max_iter),
                                     limit, PRUNE_REL, slack, _ptr(partial), _ptr(done, i8), _ptr(iters, i64),
                                     _ptr(not_conv, i64), _ptr(pairs, i64))
        with lock:
            state["limit"] = min(state["limit"], limit)

    # 2. the incumbents in full, 3. every other subset against the bound
    run(order[:PRUNE_INCUMBENTS])
    rest = order[PRUNE_INCUMBENTS:]
    chunks = [c for c in np.array_split(rest, max(1, min(len(rest), 32 * threads))) if len(c)]
    _run_chunks(run, chunks, threads)
    # 4. survivors (the argmin and anything that might tie with it), in plain channel order
    survivors = np.flatnonzero((done == 1) & (partial <= state["limit"]))
    plain_order = take(np.argsort(order_rows))  # == _c_prepare(rows), without sorting again
    surv_losses, surv_scales, _, _ = _c_all(plain_order, pts[survivors], tol, max_iter, threads)
    losses = partial.copy()
    losses[survivors] = surv_losses
    exact = np.zeros(n_cand, dtype=bool)
    exact[survivors] = True
    scales = {int(k): surv_scales[i] for i, k in enumerate(survivors)}
    return losses, scales, int(iters.sum()), int(not_conv.sum()), int(pairs.sum()), exact


def search_qps(weight, bits: int, universal=5, granularity: str = "channel", method: str = "fast",
               tol: float = 1e-5, max_iter: int = 1000, device=None, backend: str = "auto",
               threads: int | None = None, chunk_queries: int = 1 << 22, prune: bool = True) -> SearchResult:
    """The QPS (N-subset of S_U) with the smallest L2 weight-quantization error (API).

    SQ Algorithm 1. ``weight``: torch tensor or numpy array, output channels on dim 0;
    ``bits`` includes the sign bit (N = 2**(bits-1) non-negative points); ``universal``: an
    option 1..5 of SQ Table 1 or a user pair ``(A, B)``; ``granularity``: ``"channel"`` (one
    QPS per layer, one scale per output channel) or ``"layer"``; ``method``: ``"fast"`` or
    ``"reference"`` (same QPS, same loss). ``tol``/``max_iter``: the scale iteration's
    (:func:`lowbit.scale.optimal_scale`). Fast only: ``backend`` ``"torch"`` (vectorized,
    on ``device``, default CUDA when available), ``"c"`` (compiled kernel on ``threads`` CPU
    threads, default torch's thread count) or ``"auto"`` (torch on CUDA, else the kernel when
    a C compiler exists, else torch on CPU). ``prune`` (kernel only): exact branch and bound
    over channels (:func:`_fast_c_pruned`): same QPS, scale and loss, but ``losses`` of dropped
    candidates are lower bounds (see ``exact``) and ``iterations`` count evaluated pairs only;
    pass ``prune=False`` for every candidate's total (e.g. a census of the iteration).
    """
    started = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    check_fits(universal, bits)  # bits >= 1, N <= |S_U|, option known
    check_tol(tol, max_iter)
    rows = _rows(weight, granularity)
    s_u = universal_set(universal)
    qps = s_u[qps_indices(universal, bits)]  # (K, N)
    energy = float(np.sum(rows * rows))
    exact = None
    if method == "reference":
        losses, scales, iterations, not_converged = _reference(rows, qps, tol, max_iter)
        pairs = qps.shape[0] * rows.shape[0]
    else:
        if backend not in ("auto", "torch", "c"):
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'torch' or 'c'")
        if not isinstance(prune, bool):
            raise TypeError(f"prune must be True or False, got {prune!r}")
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        if backend == "auto":
            backend = "c" if device.type == "cpu" and _c_kernel() is not None else "torch"
        if backend == "c":
            if _c_kernel() is None:
                raise RuntimeError("backend='c' needs a C compiler (cc/gcc, or $CC): use backend='torch'")
            n_threads = threads or torch.get_num_threads()
            if prune:
                out = _fast_c_pruned(rows, qps, tol, max_iter, n_threads, universal_points=s_u)
            else:
                out = _fast_c(rows, qps, tol, max_iter, n_threads)
            losses, scales, iterations, not_converged, pairs, exact = out
        else:
            losses, scales, iterations, not_converged = _fast(rows, qps, tol, max_iter, device, chunk_queries)
            pairs = qps.shape[0] * rows.shape[0]
    best = _select(losses, energy)
    points = qps[best].copy()
    scale = scales[best].copy()
    q = quantize_to_points(torch.as_tensor(rows), points, torch.as_tensor(scale), dim=0)
    loss = float(((torch.as_tensor(rows) - q) ** 2).sum())
    return SearchResult(points=points, scale=float(scale[0]) if granularity == "layer" else scale,
                        loss=loss, candidates=int(qps.shape[0]), seconds=time.perf_counter() - started,
                        index=best, losses=losses, bits=int(bits), granularity=granularity, method=method,
                        backend="" if method == "reference" else backend,
                        iterations=int(iterations), not_converged=int(not_converged), pairs=int(pairs),
                        exact=exact)


def candidate_losses_global(weight, bits: int, universal=5) -> np.ndarray:
    """Total loss of every candidate QPS (combinations order) when each channel uses the exact
    global-optimal scale (:func:`lowbit.scale.global_optimal_scale`) instead of the paper's
    fixed point: how much Algorithm 1 would change with a better scale (notebook 02). Plain
    loop; meant for small layers and bit widths."""
    rows = _rows(weight, "channel")
    qps = universal_set(universal)[qps_indices(universal, bits)]
    out = np.zeros(qps.shape[0])
    for k in range(qps.shape[0]):
        out[k] = sum(global_optimal_scale(r, qps[k]).loss for r in rows)
    return out
