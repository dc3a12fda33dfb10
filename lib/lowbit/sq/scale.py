"""Scale factor of a QPS: SQ's fixed-point iteration (eqs. 8-10) and the exact global optimum.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 "Finding Optimal
Scale Factor": with the QPS ``{q_j}`` fixed, each weight goes to its nearest point of
``{+-alpha * q_j}`` (eq. 8), the loss is ``L = sum_i (w_i - alpha q_i)^2`` (eq. 9) and
``alpha* = sum w_i q_i / sum q_i^2`` (eq. 10); (8)-(10) repeat until alpha changes by less than
the tolerance (1e-5 in the paper, "17 iterations on average").

Conventions (shared by every search in :mod:`lowbit.sq.search`):

* Initialisation, as the paper: "alpha = 1" on weights normalized so that ``max|w|`` maps to
  ``max(points)``, i.e. the first scale is ``s0 = max|w| / max(points)``. The tolerance is
  on that normalized alpha: the loop stops when ``|s_new - s| / s0 <= tol``.
* Nearest point and ties: :mod:`lowbit.core.points` (a magnitude half-way between two points goes
  to the smaller one). A zero weight goes to the smallest point ``p_min`` (eq. 3's nearest level
  ``+alpha * p_min``): nothing when 0 is in the QPS; otherwise it adds ``p_min^2`` to eq. 10's
  ``sum q^2`` and ``(alpha * p_min)^2`` to the loss, as the hardware code of a zero weight does.
* If every weight falls on the point 0, eq. 10 is 0/0: the loss is then ``sum w^2`` for every
  larger scale, the loop stops and keeps the current scale.
* An all-zero ``w`` has the exact minimiser ``scale = 0`` (``S_Q(0) = {0}``, loss 0), 0 iterations;
  the QPS ``{0}`` has no defined scale: ``scale = 1.0``, loss ``sum w^2``.

Observation used in notebook 02: the total loss never increases along the iteration.
With the assignment ``A_t`` of step t, ``L(s) <= L_{A_t}(s)`` for every s (nearest points
are optimal) with equality at ``s_t``, and eq. 10 minimises ``L_{A_t}``; so
``L(s_{t+1}) <= L_{A_t}(s_{t+1}) <= L_{A_t}(s_t) = L(s_t)`` (a majorize-minimize step).
Single weights can still move to a worse point (the paper's case 3, Fig. 3).

:func:`global_optimal_scale` goes beyond the paper: ``L`` is piecewise quadratic in ``s``
with breakpoints ``s = |w_i| / m_j`` (``m_j`` the mid-points of the QPS), so sweeping the
breakpoints in order and minimising each piece's quadratic gives the exact global minimiser.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.validation import as_points, as_weights, check_tol


@dataclass
class ScaleResult:
    """A scale factor for one QPS: ``scale``, ``loss`` (eq. 9, sum of squared errors),
    ``iterations`` (eq. 10 updates), ``converged``, ``history`` (scale per iteration, the
    initial one first) and ``losses`` (eq. 9 at each scale of ``history``)."""

    scale: float
    loss: float
    iterations: int
    converged: bool
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)


def nearest_points(a: np.ndarray, p: np.ndarray, scale: float) -> np.ndarray:
    """Unscaled nearest point ``q_i`` of eq. 8/11 for magnitudes ``a``: plain argmin over all
    points (the first minimum, i.e. the smaller point on a tie; ``p_min`` for a zero weight)."""
    dist = np.abs(a[:, None] - scale * p[None, :])  # (n, N)
    return p[dist.argmin(axis=1)]


def loss_at(w, points, scale: float) -> float:
    """Eq. 9 at ``scale``: ``sum (|w| - scale * q(w, scale))^2`` with nearest points."""
    a = np.abs(as_weights(w))
    p = as_points(points)
    q = nearest_points(a, p, float(scale))
    return float(np.sum((a - scale * q) ** 2))


def eq10_update(w, points, scale: float) -> float:
    """One application of eq. 10 at ``scale``: ``sum |w| q / sum q^2`` (``scale`` if 0/0)."""
    a = np.abs(as_weights(w))
    q = nearest_points(a, as_points(points), float(scale))
    den = float(np.sum(q * q))
    return float(scale) if den == 0 else float(np.sum(a * q)) / den


def optimal_scale(w, points, tol: float = 1e-5, max_iter: int = 1000) -> ScaleResult:
    """SQ's iterative scale factor for one QPS (eqs. 8-10), initialised as the paper (API).

    ``w``: any-shaped weights (one scale for all of them); ``points``: the unscaled QPS
    (non-negative; mirrored for negative weights). See the module docstring for the
    initialisation, tolerance and tie conventions.
    """
    a = np.abs(as_weights(w))
    p = as_points(points)
    check_tol(tol, max_iter)
    amax, pmax = float(a.max()), float(p[-1])
    if amax == 0.0:  # all-zero w: scale 0 maps it to 0 exactly
        return ScaleResult(0.0, 0.0, 0, True, [0.0], [0.0])
    if pmax == 0.0:
        loss = float(np.sum(a * a))
        return ScaleResult(1.0, loss, 0, True, [1.0], [loss])
    s0 = amax / pmax
    s = s0
    history, losses = [s], []
    converged, iterations = False, 0
    while True:
        q = nearest_points(a, p, s)  # eq. 8 at the current scale
        losses.append(float(np.sum((a - s * q) ** 2)))  # eq. 9
        if converged or iterations >= max_iter:
            break
        den = float(np.sum(q * q))
        if den == 0.0:  # every weight on the point 0: L is flat, keep s
            converged = True
            break
        s_new = float(np.sum(a * q)) / den  # eq. 10
        iterations += 1
        change = abs(s_new - s) / s0
        s = s_new
        history.append(s)
        converged = change <= tol
    return ScaleResult(float(s), losses[-1], iterations, converged, history, losses)


def global_optimal_scale(w, points) -> ScaleResult:
    """The exact global minimiser over ``scale > 0`` of eq. 9 (API; beyond the paper).

    Sweeps the breakpoints ``s = |w_i| / m_j`` of the piecewise-quadratic loss in increasing
    order, keeping ``S = sum |w| q`` and ``Q = sum q^2`` up to date, and minimises each
    piece's quadratic ``sum w^2 - 2 s S + s^2 Q`` on its interval. Ties between pieces go to
    the smallest scale. ``iterations`` is the number of pieces examined.
    """
    a_all = np.abs(as_weights(w))
    p = as_points(points)
    w2 = float(np.sum(a_all * a_all))
    a = np.sort(a_all[a_all > 0])
    n_zero = a_all.size - a.size  # zero weights sit on p_min at every scale: p_min^2 each in sum q^2
    if a.size == 0:
        return ScaleResult(0.0, 0.0, 0, True, [0.0], [0.0])
    if p[-1] == 0.0:
        return ScaleResult(1.0, w2, 0, True, [1.0], [w2])
    n_pts = p.size
    if n_pts == 1:
        s = float(np.sum(a)) / a_all.size / p[0]
        loss = loss_at(a_all, p, s)
        return ScaleResult(s, loss, 1, True, [s], [loss])
    mids = (p[1:] + p[:-1]) / 2  # (N-1,), all > 0
    # event (i, j): from s = a_i / m_j upwards, weight i moves from p_{j+1} down to p_j
    bp = (a[:, None] / mids[None, :]).ravel()
    d_s = (a[:, None] * (p[None, :-1] - p[None, 1:])).ravel()
    d_q = np.broadcast_to(p[:-1] ** 2 - p[1:] ** 2, (a.size, n_pts - 1)).ravel()
    order = np.argsort(bp, kind="stable")
    bp, d_s, d_q = bp[order], d_s[order], d_q[order]
    s_tot = np.concatenate([[p[-1] * a.sum()], p[-1] * a.sum() + np.cumsum(d_s)])  # per piece
    q_tot = np.concatenate([[p[-1] ** 2 * a.size], p[-1] ** 2 * a.size + np.cumsum(d_q)]) + n_zero * p[0] ** 2
    q_tot = np.maximum(q_tot, 0.0)
    lo = np.concatenate([[0.0], bp])
    hi = np.concatenate([bp, [np.inf]])
    with np.errstate(divide="ignore", invalid="ignore"):
        s_star = np.where(q_tot > 0, s_tot / q_tot, lo)
    s_star = np.clip(s_star, lo, hi)
    s_star = np.where(np.isfinite(s_star), s_star, lo)
    piece_loss = w2 - 2 * s_star * s_tot + s_star ** 2 * q_tot
    piece_loss = np.where(s_star > 0, piece_loss, np.inf)
    best = int(np.argmin(piece_loss))
    s = float(s_star[best])
    loss = loss_at(a_all, p, s)
    return ScaleResult(s, loss, int(piece_loss.size), True, [s], [loss])


def convergence_record(w, points, tol: float = 1e-5, max_iter: int = 1000) -> dict:
    """Diagnostics of one run of the iteration, for the convergence study (notebook 02).

    ``iterations``, ``converged``; ``exact_fixed_point`` (the last update left the scale
    unchanged); ``loss_rises`` (steps where the total loss eq. 9 went up by more than rounding:
    the majorize-minimize argument says never); ``case3_events`` (weight-steps where a weight
    moved to another point and its own error grew: the paper's case 3, Fig. 3);
    ``direction_changes`` (sign changes of the scale updates: oscillation); ``loss`` and
    ``global_loss`` (:func:`global_optimal_scale`) and their relative ``gap``.
    """
    a = np.abs(as_weights(w))
    p = as_points(points)
    res = optimal_scale(a, p, tol=tol, max_iter=max_iter)
    glob = global_optimal_scale(a, p)
    hist = np.asarray(res.history)
    case3 = 0
    prev_q = prev_e = None
    for s in hist:
        q = nearest_points(a, p, s)
        e = np.abs(a - s * q)
        if prev_q is not None:
            case3 += int(np.sum((q != prev_q) & (e > prev_e * (1 + 1e-12) + 1e-300)))
        prev_q, prev_e = q, e
    steps = np.diff(hist)
    signs = np.sign(steps[steps != 0])
    losses = np.asarray(res.losses)
    rises = int(np.sum(np.diff(losses) > 1e-12 * max(losses[0], 1e-300)))
    gap = (res.loss - glob.loss) / glob.loss if glob.loss > 0 else 0.0
    return {"iterations": res.iterations, "converged": res.converged,
            "exact_fixed_point": bool(res.iterations >= 1 and hist[-1] == hist[-2]) or res.iterations == 0,
            "loss_rises": rises, "case3_events": case3,
            "direction_changes": int(np.sum(signs[1:] != signs[:-1])) if signs.size > 1 else 0,
            "loss": res.loss, "global_loss": glob.loss, "gap": float(gap),
            "scale": res.scale, "global_scale": glob.scale}
