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
  that follows each pair with galloping counts (the default on CPU: ~20-30x faster than the
  torch path there, because the iteration takes 18-50 small steps per pair).
  Ties: the threshold counts are corrected with the reference's own float distance test, so
  a magnitude on an exact (or rounding-shifted) tie gets the same point as the argmin.

Ties between subsets: losses within ``1e-12 * sum(w^2)`` of the minimum are treated as equal
(rounding cannot separate them) and the first such subset in combinations order wins, in
both methods.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from .qps import quantize_to_points
from .scale import _check_tol, as_weights, optimal_scale
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
    channel) pair summed; ``not_converged``: pairs that hit ``max_iter``.
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
# (which releases the GIL, so chunks of subsets run on several threads). Counts move from
# the previous iteration's by galloping search, so a small change of scale costs a few
# comparisons instead of a full search; the elements next to each threshold are then checked
# with the reference's own distance comparison, so floating-point ties resolve identically.
# Without a compiler the torch path is used.
_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

static int64_t upper_in(const double *a, int64_t lo, int64_t hi, double t) {
    /* first index in [lo, hi) with a[i] > t, or hi */
    while (lo < hi) { int64_t mid = lo + (hi - lo) / 2; if (a[mid] <= t) lo = mid + 1; else hi = mid; }
    return lo;
}

static int64_t count_le(const double *a, int64_t n, int64_t c, double t) {
    /* #{a <= t} for sorted a, starting from a previous count c (galloping) */
    if (c < n && a[c] <= t) {
        int64_t i = c, step = 1;
        while (i + step < n && a[i + step] <= t) { i += step; step <<= 1; }
        return upper_in(a, i + 1, (i + step < n) ? i + step : n, t);
    }
    if (c > 0 && a[c - 1] > t) {
        int64_t i = c - 1, step = 1;
        while (i - step >= 0 && a[i - step] > t) { i -= step; step <<= 1; }
        return upper_in(a, (i - step + 1 > 0) ? i - step + 1 : 0, i, t);
    }
    return c;
}

void sq_search(const double *a_sorted, const double *prefix, const int64_t *zeros, const double *energy,
               int64_t n_rows, int64_t n, const double *pts, int64_t k_begin, int64_t k_end, int64_t n_pts,
               double tol, int64_t max_iter, double *losses, double *scales, int64_t *iters, int64_t *not_conv) {
    int64_t counts[64];
    for (int64_t k = k_begin; k < k_end; k++) { losses[k] = 0.0; iters[k] = 0; not_conv[k] = 0; }
    for (int64_t r = 0; r < n_rows; r++) {  /* channel outer: its magnitudes stay in cache */
        const double *a = a_sorted + r * n, *pre = prefix + r * (n + 1);
        double amax = a[n - 1];
        for (int64_t k = k_begin; k < k_end; k++) {
            const double *p = pts + k * n_pts;
            double pmax = p[n_pts - 1], s, s0, S = 0.0, Q = 0.0;
            if (amax == 0.0 || pmax == 0.0) { scales[k * n_rows + r] = 1.0; losses[k] += energy[r]; continue; }
            s0 = amax / pmax; s = s0;
            int converged = 0; int64_t it = 0;
            for (;;) {
                int64_t prev = 0;
                S = 0.0; Q = 0.0;
                for (int64_t j = 0; j < n_pts; j++) {  /* eq. 8 via thresholds, eq. 10 sums */
                    int64_t c = n;
                    if (j + 1 < n_pts) {
                        double lo = s * p[j], hi = s * p[j + 1], t = s * ((p[j + 1] + p[j]) / 2);
                        c = (it == 0) ? upper_in(a, 0, n, t) : count_le(a, n, counts[j], t);
                        /* the reference's argmin decides at the boundary: |a - s p_j| <= |a - s p_j+1|
                           means point j (ties to the smaller point), whatever rounding did to s m_j */
                        while (c > 0 && !(fabs(a[c - 1] - lo) <= fabs(hi - a[c - 1]))) c--;
                        while (c < n && fabs(a[c] - lo) <= fabs(hi - a[c])) c++;
                        counts[j] = c;
                    }
                    int64_t cnt = c - prev - (j == 0 ? zeros[r] : 0);
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
            double loss = energy[r] - 2.0 * s * S + s * s * Q;
            losses[k] += loss > 0.0 ? loss : 0.0;
            scales[k * n_rows + r] = s;
            iters[k] += it; not_conv[k] += !converged;
        }
    }
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
    tag = hashlib.sha256(_C_SOURCE.encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LOWBIT_KERNEL_DIR", Path(tempfile.gettempdir()) / f"lowbit-kernels-{os.getuid()}"))
    lib = folder / f"sq_search_{tag}.so"
    try:
        if not lib.exists():
            folder.mkdir(parents=True, exist_ok=True)
            src = folder / f"sq_search_{tag}.{os.getpid()}.c"
            src.write_text(_C_SOURCE)
            tmp = folder / f".sq_search_{tag}.{os.getpid()}.so"
            subprocess.run([cc, "-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
                            str(src), "-o", str(tmp), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
            src.unlink(missing_ok=True)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        _C_LIB = False
        return None
    dp, ip, i64, f64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_double
    dll.sq_search.argtypes = [dp, dp, ip, dp, i64, i64, dp, i64, i64, i64, f64, i64, dp, dp, ip, ip]
    dll.sq_search.restype = None
    _C_LIB = dll
    return dll


def _fast_c(rows: np.ndarray, qps: np.ndarray, tol: float, max_iter: int, threads: int):
    """:func:`_fast` in the compiled kernel: same sums, same thresholds, same stopping rule."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    dll = _c_kernel()
    a_sorted = np.ascontiguousarray(np.sort(np.abs(rows), axis=1))
    n_rows, n = a_sorted.shape
    prefix = np.ascontiguousarray(np.concatenate([np.zeros((n_rows, 1)), np.cumsum(a_sorted, axis=1)], axis=1))
    zeros = np.ascontiguousarray((a_sorted == 0).sum(1).astype(np.int64))
    energy = np.ascontiguousarray((a_sorted * a_sorted).sum(1))
    pts = np.ascontiguousarray(qps, dtype=np.float64)
    n_cand, n_pts = pts.shape
    if n_pts > 65:
        raise ValueError("the compiled kernel supports at most 65 points per QPS (bits <= 7): use backend='torch'")
    losses = np.zeros(n_cand)
    scales = np.zeros((n_cand, n_rows))
    iters = np.zeros(n_cand, dtype=np.int64)
    not_conv = np.zeros(n_cand, dtype=np.int64)

    def ptr(x, ctype=ctypes.c_double):
        return x.ctypes.data_as(ctypes.POINTER(ctype))

    def run(bounds):
        dll.sq_search(ptr(a_sorted), ptr(prefix), ptr(zeros, ctypes.c_int64), ptr(energy), n_rows, n, ptr(pts),
                      bounds[0], bounds[1], n_pts, float(tol), int(max_iter), ptr(losses), ptr(scales),
                      ptr(iters, ctypes.c_int64), ptr(not_conv, ctypes.c_int64))

    n_chunks = max(1, min(n_cand, 8 * threads))
    edges = np.linspace(0, n_cand, n_chunks + 1).astype(int)
    chunks = [(int(edges[i]), int(edges[i + 1])) for i in range(n_chunks) if edges[i + 1] > edges[i]]
    if threads <= 1:
        for b in chunks:
            run(b)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, chunks))
    return losses, scales, int(iters.sum()), int(not_conv.sum())


def search_qps(weight, bits: int, universal=5, granularity: str = "channel", method: str = "fast",
               tol: float = 1e-5, max_iter: int = 1000, device=None, backend: str = "auto",
               threads: int | None = None, chunk_queries: int = 1 << 22) -> SearchResult:
    """The QPS (N-subset of S_U) with the smallest L2 weight-quantization error (API).

    SQ Algorithm 1. ``weight``: torch tensor or numpy array, output channels on dim 0;
    ``bits`` includes the sign bit (N = 2**(bits-1) non-negative points); ``universal``: an
    option 1..5 of SQ Table 1 or a user pair ``(A, B)``; ``granularity``: ``"channel"`` (one
    QPS per layer, one scale per output channel) or ``"layer"``; ``method``: ``"fast"`` or
    ``"reference"`` (same QPS, same loss). ``tol``/``max_iter``: the scale iteration's
    (:func:`lowbit.scale.optimal_scale`). Fast only: ``backend`` ``"torch"`` (vectorized,
    on ``device``, default CUDA when available), ``"c"`` (compiled kernel on ``threads`` CPU
    threads, default torch's thread count) or ``"auto"`` (torch on CUDA, else the kernel when
    a C compiler exists, else torch on CPU).
    """
    started = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    check_fits(universal, bits)  # bits >= 1, N <= |S_U|, option known
    _check_tol(tol, max_iter)
    rows = _rows(weight, granularity)
    s_u = universal_set(universal)
    qps = s_u[qps_indices(universal, bits)]  # (K, N)
    energy = float(np.sum(rows * rows))
    if method == "reference":
        losses, scales, iterations, not_converged = _reference(rows, qps, tol, max_iter)
    else:
        if backend not in ("auto", "torch", "c"):
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'torch' or 'c'")
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        if backend == "auto":
            backend = "c" if device.type == "cpu" and _c_kernel() is not None else "torch"
        if backend == "c":
            if _c_kernel() is None:
                raise RuntimeError("backend='c' needs a C compiler (cc/gcc, or $CC): use backend='torch'")
            losses, scales, iterations, not_converged = _fast_c(rows, qps, tol, max_iter,
                                                                threads or torch.get_num_threads())
        else:
            losses, scales, iterations, not_converged = _fast(rows, qps, tol, max_iter, device, chunk_queries)
    best = _select(losses, energy)
    points = qps[best].copy()
    scale = scales[best].copy()
    q = quantize_to_points(torch.as_tensor(rows), points, torch.as_tensor(scale), dim=0)
    loss = float(((torch.as_tensor(rows) - q) ** 2).sum())
    return SearchResult(points=points, scale=float(scale[0]) if granularity == "layer" else scale,
                        loss=loss, candidates=int(qps.shape[0]), seconds=time.perf_counter() - started,
                        index=best, losses=losses, bits=int(bits), granularity=granularity, method=method,
                        backend="" if method == "reference" else backend,
                        iterations=int(iterations), not_converged=int(not_converged))


def uniform_points(bits: int) -> np.ndarray:
    """Symmetric uniform QPS ``{0, 1, ..., N-1}`` (SQ eq. 4 made symmetric), N = 2**(bits-1)."""
    return np.arange(2 ** (bits - 1), dtype=np.float64)


def weight_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every ``Conv2d``/``Linear`` in forward-definition order."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d/Linear layers to quantize")
    return layers


def search_model(model: torch.nn.Module, bits: int, universal=5, tag: str | None = None,
                 skip_first_last: bool = True) -> list[dict]:
    """:func:`search_qps` (channel granularity, fast) on every conv/linear weight of ``model``.

    Returns one dict per layer: ``layer``, ``shape``, ``points``, ``scale`` (per channel),
    ``loss``, ``energy`` (sum w^2), ``candidates``, ``seconds``, ``mean_iterations``,
    ``not_converged``. The first and last layers are skipped by default (the paper keeps them
    at 8 bits). With ``tag`` (e.g. ``"resnet20-fashion-mnist"``) the result is cached in
    ``data/derived/sq_search_model-*.json`` keyed by the tag, bits, option and a hash of the
    weights, so the measured ``seconds`` are those of the run that computed it.
    """
    import hashlib

    from .results import cached

    layers = weight_layers(model)
    if skip_first_last:
        layers = layers[1:-1]
    digest = hashlib.sha256()
    for name, m in layers:
        digest.update(name.encode())
        digest.update(m.weight.detach().to("cpu", torch.float64).numpy().tobytes())
    option = universal if isinstance(universal, int) else [list(map(float, x)) for x in universal]

    def compute():
        out = []
        for name, m in layers:
            w = m.weight.detach().to("cpu", torch.float64)
            res = search_qps(w, bits, universal=universal)
            out.append({"layer": name, "shape": list(w.shape), "points": res.points.tolist(),
                        "scale": np.asarray(res.scale).tolist(), "loss": res.loss, "energy": float((w * w).sum()),
                        "candidates": res.candidates, "seconds": res.seconds, "backend": res.backend,
                        "mean_iterations": res.iterations / (res.candidates * w.shape[0]),
                        "not_converged": res.not_converged})
        return out

    if tag is None:
        return compute()
    config = {"tag": tag, "bits": int(bits), "universal": option, "weights_sha256": digest.hexdigest(),
              "skip_first_last": skip_first_last, "granularity": "channel", "tol": 1e-5, "max_iter": 1000}
    return cached("sq_search_model", config, compute)


def quantize_weights_sq(model: torch.nn.Module, bits: int, universal=5, first_last_bits: int = 8,
                        searches: list[dict] | None = None, tag: str | None = None):
    """Weight-only SQ of a model's conv/linear layers: a copy of the model and a per-layer report.

    Every ``Conv2d``/``Linear`` weight except the first and last is replaced by its SQ
    quantization (Algorithm 1 search via :func:`search_model`, then eq. 3); the first and last
    use a symmetric uniform ``first_last_bits`` QPS with a per-channel max-abs scale, as the
    paper keeps them at 8 bits. Nothing is folded (no BN folding, no activation quantization,
    biases kept): model-level PTQ with folding and calibration is :mod:`lowbit.ptq`.
    ``searches`` reuses a :func:`search_model` result; ``tag`` caches the search.
    """
    layers = weight_layers(model)
    if searches is None:
        searches = search_model(model, bits, universal, tag=tag)
    by_name = {s["layer"]: s for s in searches}
    qmodel = copy.deepcopy(model)
    modules = dict(qmodel.named_modules())
    report = []
    for i, (name, _) in enumerate(layers):
        mod = modules[name]
        w = mod.weight.detach().to(torch.float64)
        if i in (0, len(layers) - 1):
            pts = uniform_points(first_last_bits)
            amax = w.reshape(w.shape[0], -1).abs().amax(1)
            scale = torch.where(amax > 0, amax / pts[-1], torch.ones_like(amax))
            q = quantize_to_points(w, pts, scale, dim=0)
            entry = {"layer": name, "bits": first_last_bits, "quantizer": "uniform", "points": pts.tolist()}
        else:
            found = by_name[name]
            q = quantize_to_points(w, found["points"], torch.as_tensor(found["scale"], dtype=torch.float64), dim=0)
            entry = {"layer": name, "bits": bits, "quantizer": "sq", "points": found["points"]}
        err = float(((w - q) ** 2).sum())
        entry.update(sq_error=err, energy=float((w * w).sum()), numel=int(w.numel()))
        report.append(entry)
        with torch.no_grad():
            mod.weight.copy_(q.to(mod.weight.dtype))
    return qmodel, report


def candidate_losses_global(weight, bits: int, universal=5) -> np.ndarray:
    """Total loss of every candidate QPS (combinations order) when each channel uses the exact
    global-optimal scale (:func:`lowbit.scale.global_optimal_scale`) instead of the paper's
    fixed point: how much Algorithm 1 would change with a better scale (notebook 02). Plain
    loop; meant for small layers and bit widths."""
    from .scale import global_optimal_scale

    rows = _rows(weight, "channel")
    qps = universal_set(universal)[qps_indices(universal, bits)]
    out = np.zeros(qps.shape[0])
    for k in range(qps.shape[0]):
        out[k] = sum(global_optimal_scale(r, qps[k]).loss for r in rows)
    return out
