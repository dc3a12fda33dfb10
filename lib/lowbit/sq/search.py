"""Exhaustive QPS search (SQ Algorithm 1 FINDBESTQPS): a plain reference and a fast exact path.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 "Finding the Best
Subset" and Algorithm 1: for every N-subset S of the universal set S_U (N = 2**(bits-1)), find
the scale factor by the iteration of eqs. 8-10 (:func:`lowbit.sq.scale.optimal_scale`), compute
the L2 loss (eq. 9) and keep the subset with the smallest loss.

Granularity: ``"channel"`` (the paper's main setting) is one QPS per layer with one scale per
output channel (dim 0 of an at least 2-D weight), the loss summed over channels; ``"layer"`` is
one QPS and one scale for the whole tensor.

Two implementations that must agree (``tests/test_search.py``):

* ``method="reference"``: Algorithm 1 written plainly: a Python loop over every subset in
  ``itertools.combinations`` order and every channel, calling ``optimal_scale`` (argmin over
  all points for eq. 8).
* ``method="fast"``: the same iteration with each channel's magnitudes sorted once with
  prefix sums, so eq. 8's assignment is N-1 threshold counts against the scaled mid-points
  and eq. 10's sums are prefix-sum differences. Two backends compute it:
  ``backend="torch"`` (:func:`_fast`) vectorizes all (subset, channel) pairs (``searchsorted``;
  converged pairs drop out; CUDA when available) and ``backend="c"`` runs the compiled kernel
  of :mod:`lowbit.sq.kernel`, which follows each pair on its own (the default on CPU: much
  faster than the torch path there, because the iteration takes 18-50 small steps per pair).
  On the kernel, ``prune=True`` adds an exact branch and bound over channels
  (:func:`lowbit.sq.kernel.search_pruned`; ``engine="dp"`` bounds the channels still to come by
  :func:`lowbit.sq.kernel.channel_lower_bounds`, a lower bound of each channel's loss over every
  QPS and scale: same result as ``engine="superset"``, the earlier bound, with far fewer pairs).
  Ties: the threshold counts are corrected with the reference's own float distance test, so
  a magnitude on an exact (or rounding-shifted) tie gets the same point as the argmin. Eq. 10's
  sums are grouped by point (prefix-sum differences) where the reference adds term by term: when
  the sums are exact (e.g. dyadic weights) both give the same scale bit for bit; otherwise they
  can differ in the last bit, and on the rare exact tie that such a bit decides the iteration can
  then stop at a neighbouring fixed point (seen on a layer mixing 0.7 with multiples of 1/8).

Ties between subsets: losses within ``1e-12 * sum(w^2)`` of the minimum are treated as equal
(rounding cannot separate them) and the first such subset in combinations order wins, in
both methods.

The returned loss: whatever the method, the winner's per-channel losses
(``SearchResult.channel_losses``) are the squared errors of :func:`lowbit.core.points.quantize_to_points`
with the returned points and scales (float64), and ``loss`` is their sum, so the result reproduces
its own loss channel by channel. A zero weight goes to eq. 3's nearest level ``+scale * p_min``
(0 when 0 is in the QPS), in the search's sums as in the quantizer and the MAC encoder; an all-zero
channel gets its exact minimiser ``scale = 0`` (loss 0). Every returned scale is finite and >= 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..core.points import quantize_to_points
from ..core.validation import as_weights, check_bits, check_tol, resolve_device
from . import kernel
from .scale import optimal_scale
from .universal import check_fits, qps_indices, universal_set

GRANULARITIES = ("channel", "layer")
METHODS = ("fast", "reference")
BACKENDS = ("auto", "torch", "c")
TIE_RTOL = 1e-12  # relative to sum(w^2): losses closer than this are ties


@dataclass
class SearchResult:
    """Result of :func:`search_qps`.

    ``points``: the chosen QPS, sorted, unscaled (N elements of S_U); ``scale``: one per output
    channel (``"channel"``, numpy array) or a float (``"layer"``), each finite and > 0;
    ``loss``: total squared error over the tensor (eq. 9), the sum of ``channel_losses``;
    ``channel_losses``: squared error of each output channel (one entry for ``"layer"``) when
    quantized by :func:`lowbit.core.points.quantize_to_points` with ``points`` and its scale;
    ``candidates``: number of QPS evaluated; ``seconds``: wall time; ``index``: position of
    ``points`` in combinations order; ``losses``: total loss of every candidate (combinations
    order, the search's own sums: within float rounding of ``loss`` at ``index``);
    ``iterations``: eq. 10 updates per (candidate, channel) pair summed over the evaluated pairs;
    ``not_converged``: pairs that hit ``max_iter``; ``pairs``: (candidate, channel) pairs
    evaluated (fewer than candidates x channels when ``prune=True`` dropped some); ``exact``:
    ``None`` when every entry of ``losses`` is the candidate's total, else a boolean mask:
    ``False`` entries were pruned and hold a lower bound (a partial sum over channels) that
    exceeds the minimum.
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
    channel_losses: np.ndarray | None = None

    def quantize(self, weight) -> torch.Tensor:
        """The quantized tensor ``sign(w) * scale * p*`` (SQ eq. 3) with this QPS and scale."""
        w = torch.as_tensor(weight)
        dim_scale = self.scale if self.granularity == "layer" else torch.as_tensor(self.scale, dtype=torch.float64)
        return quantize_to_points(w.to(torch.float64), self.points, dim_scale, dim=0).to(w.dtype)


def weight_rows(weight, granularity: str) -> np.ndarray:
    """(C, n) float64 rows: one per output channel, or one row for the whole layer."""
    if not isinstance(weight, (torch.Tensor, np.ndarray)):
        raise TypeError(f"weight must be a torch tensor or numpy array, got {type(weight).__name__}")
    shape = tuple(weight.shape)
    if len(shape) == 0:
        raise ValueError("weight is a scalar: pass a tensor with output channels on dim 0")
    flat = as_weights(weight, "weight")  # checks empty / NaN / inf
    if granularity == "layer":
        return flat.reshape(1, -1)
    if len(shape) == 1:
        raise ValueError(f"granularity='channel' needs a weight of at least 2 dimensions with the output "
                         f"channels on dim 0, e.g. (out, in) or (out, in, kh, kw); got a 1-D tensor of shape "
                         f"{shape}: reshape it to (channels, weights per channel), or pass granularity='layer' "
                         "for one scale over the whole tensor")
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
    :func:`lowbit.sq.scale.nearest_points` does. Starts from ``s * m_j`` (exact in real numbers)
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
        s = torch.where(s > 0, s, torch.ones_like(s))  # scale 0 (all-zero rows): any scale, their loss is 0
        thr = _argmin_thresholds(s.unsqueeze(-1), pts, mids).reshape(n_rows, -1)
        counts = torch.searchsorted(a_sorted, thr, right=True).reshape(n_rows, width, n_pts - 1)
        edge = torch.zeros(n_rows, width, 1, dtype=counts.dtype, device=device)
        bounds = torch.cat([edge, counts, edge + n], -1)  # (C, W, N+1)
        seg_sum = prefix.gather(1, bounds.reshape(n_rows, -1)).reshape(n_rows, width, n_pts + 1).diff(dim=-1)
        seg_cnt = bounds.diff(dim=-1)  # zero weights sit in the first segment, on p_min
        s_sum = (pts * seg_sum).sum(-1)  # sum |w| q
        q_sum = (pts * pts * seg_cnt.to(dt)).sum(-1)  # sum q^2
        return s_sum, q_sum

    for k0 in range(0, n_cand, chunk):
        k1 = min(n_cand, k0 + chunk)
        kc = k1 - k0
        pmax = pts_all[k0:k1, -1]
        live = (amax > 0).unsqueeze(0) & (pmax > 0).unsqueeze(1)  # (Kc, C)
        dead = (amax == 0).unsqueeze(0).expand_as(live)  # all-zero channel: scale 0, loss 0
        s0 = torch.where(live, amax.unsqueeze(0) / pmax.unsqueeze(1).clamp_min(1e-300),
                         torch.where(dead, torch.zeros((), dtype=dt, device=device), torch.ones((), dtype=dt, device=device)))
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



def _check_threads(threads):
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be None (torch's thread count) or an int >= 1, got {threads!r}")
    return int(threads)


def _winner_losses(rows: np.ndarray, points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Squared error of each row quantized by :func:`quantize_to_points` at its scale (float64)."""
    w = torch.as_tensor(rows, dtype=torch.float64)
    q = quantize_to_points(w, points, torch.as_tensor(scale, dtype=torch.float64), dim=0)
    return ((w - q) ** 2).sum(1).numpy()


def search_qps(weight, bits: int, universal=5, granularity: str = "channel", method: str = "fast",
               tol: float = 1e-5, max_iter: int = 1000, device=None, backend: str = "auto",
               threads: int | None = None, chunk_queries: int = 1 << 22, prune: bool = True,
               engine: str = "dp") -> SearchResult:
    """The QPS (N-subset of S_U) with the smallest L2 weight-quantization error (API).

    SQ Algorithm 1. ``weight``: torch tensor or numpy array; for ``granularity="channel"``
    (one QPS per layer, one scale per output channel) at least 2-D with the output channels on
    dim 0, for ``"layer"`` (one scale) any shape. ``bits`` includes the sign bit (N =
    2**(bits-1) non-negative points; at least 2: :func:`lowbit.core.validation.check_bits`);
    ``universal``: an option 1..5 of SQ Table 1 or a user pair ``(A, B)``; ``method``:
    ``"fast"`` or ``"reference"`` (same QPS, same loss). ``tol``/``max_iter``: the scale
    iteration's (:func:`lowbit.sq.scale.optimal_scale`). Fast only: ``backend`` ``"torch"``
    (vectorized, on ``device``, default CUDA when available), ``"c"`` (compiled kernel,
    :mod:`lowbit.sq.kernel`, on ``threads`` CPU threads, default torch's thread count) or
    ``"auto"`` (torch on CUDA, else the kernel when a C compiler exists, else torch on CPU).
    ``prune`` (kernel only): exact branch and bound over channels
    (:func:`lowbit.sq.kernel.search_pruned`): same QPS, scale and loss, but ``losses`` of dropped
    candidates are lower bounds (see ``exact``) and ``iterations`` count evaluated pairs only;
    pass ``prune=False`` for every candidate's total (e.g. a census of the iteration).
    ``engine`` (pruned kernel only): ``"dp"`` (default) bounds the channels still to come by
    :func:`lowbit.sq.kernel.dp_lower_bounds`, ``"superset"`` by the earlier, looser bound (kept
    for ``bench/qps_search.py`` and the tests); both return the same points, scales and loss bit
    for bit.
    ``loss`` is the sum of ``channel_losses``, the squared errors of the returned points and
    scales through :func:`lowbit.core.points.quantize_to_points`.
    """
    started = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    check_bits(bits, "SQ bits", hi=64)  # the one bits rule (>= 2); check_fits names the real upper bound
    check_fits(universal, bits)  # N <= |S_U|, option known
    check_tol(tol, max_iter)
    if method == "fast":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        if not isinstance(prune, bool):
            raise TypeError(f"prune must be True or False, got {prune!r}")
        if engine not in kernel.ENGINES:
            raise ValueError(f"unknown engine {engine!r}: use one of {kernel.ENGINES}")
        n_threads = _check_threads(threads)
    rows = weight_rows(weight, granularity)
    s_u = universal_set(universal)
    qps = s_u[qps_indices(universal, bits)]  # (K, N)
    energy = float(np.sum(rows * rows))
    exact = None
    pairs = qps.shape[0] * rows.shape[0]
    if method == "reference":
        losses, scales, iterations, not_converged = _reference(rows, qps, tol, max_iter)
    else:
        device = resolve_device(device, default="cuda" if torch.cuda.is_available() else "cpu")
        if backend == "auto":
            backend = "c" if device.type == "cpu" and kernel.load() is not None else "torch"
        if backend == "c":
            if kernel.load() is None:
                raise RuntimeError("backend='c' needs a C compiler (cc/gcc, or $CC): use backend='torch'")
            if prune:
                out = kernel.search_pruned(rows, qps, tol, max_iter, n_threads, TIE_RTOL, universal_points=s_u,
                                           engine=engine)
            else:
                out = kernel.search(rows, qps, tol, max_iter, n_threads)
            losses, scales, iterations, not_converged, pairs, exact = out
        else:
            losses, scales, iterations, not_converged = _fast(rows, qps, tol, max_iter, device, chunk_queries)
    best = _select(losses, energy)
    points = qps[best].copy()
    scale = np.asarray(scales[best], dtype=np.float64).copy()
    channel_losses = _winner_losses(rows, points, scale)
    return SearchResult(points=points, scale=float(scale[0]) if granularity == "layer" else scale,
                        loss=float(channel_losses.sum()), candidates=int(qps.shape[0]),
                        seconds=time.perf_counter() - started, index=best, losses=losses, bits=int(bits),
                        granularity=granularity, method=method, backend="" if method == "reference" else backend,
                        iterations=int(iterations), not_converged=int(not_converged), pairs=int(pairs),
                        exact=exact, channel_losses=channel_losses)
