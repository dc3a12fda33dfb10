"""Scale-factor iteration (SQ eqs. 8-10) and the exact global optimum."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.sq.scale import eq10_update, loss_at, nearest_points
from lowbit.core.points import point_index
from lowbit.sq.universal import enumerate_qps

QPS5_3 = enumerate_qps(5, 3)

weights = st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=40)
dyadic = st.lists(st.integers(-32, 32).map(lambda k: k / 16), min_size=1, max_size=40)


def test_worked_example_by_hand():
    # w = [1, 3], points {1, 2}: s0 = 3/2, q = [1, 2] -> s = (1 + 6) / 5 = 1.4; then
    # 1 -> 1.4 (q=1), 3 -> 2.8 (q=2) unchanged -> fixed point 1.4
    res = lowbit.optimal_scale(np.array([1.0, -3.0]), [1, 2])
    assert res.history[0] == 1.5
    assert res.scale == pytest.approx(1.4, abs=1e-15)
    assert res.iterations == 2 and res.converged
    assert res.loss == pytest.approx(0.4 ** 2 + 0.2 ** 2)


def test_argmin_assignment_agrees_with_shared_quantizer():
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal(500))
    p = QPS5_3[17]
    for s in (0.3, 1.0, 1.7):
        q = nearest_points(a, p, s)
        idx = point_index(torch.as_tensor(a), p, s).numpy()
        assert np.array_equal(q, p[idx])


@settings(max_examples=60, deadline=None)
@given(weights, st.integers(0, len(QPS5_3) - 1))
def test_fixed_point_and_monotone_loss(w, k):
    w = np.asarray(w)
    p = QPS5_3[k]
    res = lowbit.optimal_scale(w, p)
    assert res.converged
    assert res.loss == pytest.approx(loss_at(w, p, res.scale), rel=1e-12, abs=1e-12)
    assert len(res.history) == len(res.losses) == res.iterations + 1
    # majorize-minimize: the total loss never rises along the iteration
    assert np.all(np.diff(res.losses) <= 1e-12 * (res.losses[0] + 1e-300))
    if np.abs(w).max() > 0:
        s0 = res.history[0]
        assert s0 == np.abs(w).max() / p.max()  # paper's init: max|w| -> max point
        assert abs(eq10_update(w, p, res.scale) - res.scale) <= 2e-5 * s0


@settings(max_examples=60, deadline=None)
@given(st.one_of(weights, dyadic), st.integers(0, len(QPS5_3) - 1))
def test_global_optimum_beats_iteration_and_grid(w, k):
    w = np.asarray(w)
    p = QPS5_3[k]
    it = lowbit.optimal_scale(w, p)
    gl = lowbit.global_optimal_scale(w, p)
    energy = float(np.sum(w * w))
    assert gl.loss <= it.loss + 1e-12 * energy + 1e-300
    amax = np.abs(w).max()
    if amax > 0:
        grid = np.linspace(amax / 1000, 2 * amax / p[1], 400)
        assert gl.loss <= min(loss_at(w, p, s) for s in grid) + 1e-12 * energy


def test_global_finds_better_fixed_point_than_iteration():
    # the iteration stops at a local fixed point; the sweep must find the global one
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(50):
        w = rng.standard_normal(40)
        p = QPS5_3[rng.integers(len(QPS5_3))]
        found += lowbit.global_optimal_scale(w, p).loss < lowbit.optimal_scale(w, p).loss * (1 - 1e-6)
    assert found > 0


def test_degenerate_inputs():
    res = lowbit.optimal_scale(np.zeros(5), [0.5, 1])  # all-zero: scale 0 is the exact minimiser
    assert (res.scale, res.loss, res.iterations, res.converged) == (0.0, 0.0, 0, True)
    glob = lowbit.global_optimal_scale(torch.zeros(3), [1, 2])
    assert (glob.scale, glob.loss) == (0.0, 0.0)
    res = lowbit.optimal_scale([0.1, -0.2], [0])  # QPS {0}: loss is sum w^2
    assert res.loss == pytest.approx(0.05)
    # eq. 3 has no zero level when 0 is not a point: a zero weight sits on s * p_min, so
    # L(s) = s^2 + (2 - 2 s)^2 here, minimised at s = 0.8 (loss 0.8), by both scale searches
    res = lowbit.optimal_scale([0.0, 2.0], [1, 2])
    assert (res.scale, res.loss) == (pytest.approx(0.8), pytest.approx(0.8))
    glob = lowbit.global_optimal_scale([0.0, 2.0], [1, 2])
    assert (glob.scale, glob.loss) == (pytest.approx(0.8), pytest.approx(0.8))
    # with 0 in the QPS a zero weight costs nothing
    assert lowbit.optimal_scale([0.0, 2.0], [0, 2]).loss == pytest.approx(0.0)
    res = lowbit.optimal_scale([1.0, 1.0, 4.0], [0.5, 2], max_iter=1)
    assert res.iterations == 1


@pytest.mark.parametrize("bad", [[], [np.nan], [1.0, np.inf]])
def test_bad_weights_raise(bad):
    with pytest.raises(ValueError, match="empty|NaN"):
        lowbit.optimal_scale(np.asarray(bad, dtype=float), [0, 1])
    with pytest.raises(ValueError, match="empty|NaN"):
        lowbit.global_optimal_scale(np.asarray(bad, dtype=float), [0, 1])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="non-negative"):
        lowbit.optimal_scale([1.0], [-1, 1])
    with pytest.raises(ValueError, match="tol"):
        lowbit.optimal_scale([1.0], [1], tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        lowbit.optimal_scale([1.0], [1], max_iter=0)
    with pytest.raises(TypeError):
        lowbit.optimal_scale("abc", [1])


def test_convergence_record_counts_case3_but_no_loss_rise():
    rec = lowbit.sq.scale.convergence_record([0.41, 0.93, 1.17, 1.58, 2.07, 2.16], [1.0, 2.0])
    assert rec["iterations"] == 3 and rec["converged"] and rec["exact_fixed_point"]
    assert rec["case3_events"] == 1 and rec["loss_rises"] == 0 and rec["direction_changes"] == 0
    assert rec["global_loss"] <= rec["loss"] * (1 + 1e-12)
