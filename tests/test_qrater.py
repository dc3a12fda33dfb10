"""Tests of lowbit.qrater's rounding (eqs. 3-6), clipping, the Table 1 baselines and the grid + BO search.

Algorithm 1 (lowbit.qrater.algorithm) is tested in test_qrater_algorithm.py, notebook 05's
plumbing (lowbit.qrater.experiments.runs) in test_qrater_experiments.py.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import qrater
from lowbit.core import clipping
from lowbit.core.uniform import uniform_levels, uniform_step
from lowbit.qrater import rounding, search

SET = settings(max_examples=40, deadline=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rtn(x, step, bits, signed=True):
    lo, hi = uniform_levels(bits, signed)
    return torch.floor(x / step + 0.5).clamp(lo, hi) * step


def values(n=257, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale)


# ----------------------------------------------------------------------------- rounding
@SET
@given(bits=st.integers(2, 8), order=st.sampled_from([1, 2]), signed=st.booleans(),
       gamma_s=st.floats(0, 1), step=st.floats(0.01, 2.0), seed=st.integers(0, 1000))
def test_gamma_n_zero_is_rtn(bits, order, signed, gamma_s, step, seed):
    x = values(seed=seed, scale=step * 2 ** bits / 3)
    got = qrater.round_values(x, step, bits, 0.0, gamma_s, order=order, signed=signed)
    assert torch.equal(got, rtn(x, step, bits, signed))


@SET
@given(bits=st.integers(2, 6), order=st.sampled_from([1, 2]), signed=st.booleans(),
       gamma_n=st.floats(-1, 1), gamma_s=st.floats(0, 1), seed=st.integers(0, 1000))
def test_offset_bounded_on_grid_in_range_and_matches_reference(bits, order, signed, gamma_n, gamma_s, seed):
    step = 0.37
    x = values(seed=seed, scale=step * 2 ** (bits - 1))
    lo, hi = uniform_levels(bits, signed)
    w_r = torch.floor(x / step + 0.5)
    f = rounding.rounding_offset(x, w_r, bits, gamma_n, gamma_s, order, signed)
    assert f.abs().max() <= 0.5
    got = qrater.round_values(x, step, bits, gamma_n, gamma_s, order=order, signed=signed)
    k = got / step
    assert torch.allclose(k, k.round(), atol=1e-9)  # on the step grid
    k = k.round()
    assert k.min() >= lo and k.max() <= hi  # inside the q-bit range
    # at most one level away from RTN (|f_r| <= 0.5)
    assert ((got - rtn(x, step, bits, signed)).abs() <= step * (1 + 1e-9)).all()
    ref = qrater.round_values_reference(x.numpy(), step, bits, gamma_n, gamma_s, order, signed)
    assert np.allclose(got.numpy(), ref, atol=1e-12)


def test_first_order_ranges_shrink_away_from_zero_for_positive_gamma_n():
    bits = 4  # levels -7..7
    for g in (0.3, 0.6, 0.9):
        rd = qrater.range_division(bits, g, order=1, points=140001)
        w = dict(zip(rd["levels"].tolist(), rd["width"].tolist()))
        inner = [w[k] for k in range(1, 7)]  # level 7 is cut by the clamp
        assert all(a > b for a, b in zip(inner, inner[1:])), inner
        assert math.isclose(w[1], 1.5 - 0.5 * g, abs_tol=1e-3)  # 1 + 0.5 g^0 (1 - g)
        assert w[0] < 1e-3  # documented |gamma_n|**0 = 1: the zero level is emptied
        neg = [w[-k] for k in range(1, 7)]
        assert np.allclose(neg, inner, atol=1e-3)  # odd-symmetric


def test_first_order_ranges_grow_away_from_zero_for_negative_gamma_n():
    bits = 4
    for g in (-0.3, -0.6, -0.9):
        rd = qrater.range_division(bits, g, order=1, points=140001)
        w = dict(zip(rd["levels"].tolist(), rd["width"].tolist()))
        inner = [w[k] for k in range(1, 7)]
        assert all(a < b for a, b in zip(inner, inner[1:])), inner
        assert math.isclose(w[1], 1 - 0.5 * abs(g) * (1 - abs(g)), abs_tol=1e-3)
        assert math.isclose(w[0], 1 + abs(g), abs_tol=1e-3)  # the zero level widens to 1 + |gamma_n|


def test_rtn_range_division_is_uniform_and_second_order_changes_it():
    rd = qrater.range_division(3, 0.0, 0.5, order=2, points=60001)
    assert np.allclose(rd["width"][1:-1], 1.0, atol=1e-3)
    rd2 = qrater.range_division(3, 0.5, 0.5, order=2, points=60001)
    assert not np.allclose(rd2["width"], rd["width"], atol=1e-2)
    assert math.isclose(rd2["width"].sum(), rd["width"].sum(), rel_tol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(gamma_n=1.1), dict(gamma_n=-1.01), dict(gamma_n=0.1, gamma_s=1.5), dict(gamma_n=0.1, gamma_s=-0.1),
    dict(gamma_n=0.1, bits=1), dict(gamma_n=0.1, order=3), dict(gamma_n=float("nan")),
    dict(gamma_n=0.1, step=0.0), dict(gamma_n=0.1, step=-1.0),
])
def test_round_values_rejects_bad_input(kwargs):
    args = dict(x=torch.ones(3), step=0.1, bits=3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        qrater.round_values(**args)


def test_bits_type_error():
    with pytest.raises(TypeError):
        qrater.round_values(torch.ones(2), 0.1, 3.0, 0.0)


def test_round_values_matches_reference_on_exact_ties_and_integer_input():
    # values on the half-step ties (where floor(u + 0.5) rounds up) and an integer tensor (cast to float64)
    step, bits = 0.5, 3
    x = torch.tensor([-1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75], dtype=torch.float64)
    for order, gn, gs in [(1, 0.0, None), (1, 0.4, None), (2, -0.6, 0.5), (2, 0.6, 0.0)]:
        got = qrater.round_values(x, step, bits, gn, gs, order=order)
        assert got.tolist() == qrater.round_values_reference(x.numpy(), step, bits, gn, gs, order)
    # RTN ties go up: +-0.25 is half a step of 0.5
    assert qrater.round_values(torch.tensor([0.1, 0.25, -0.25, -0.26]), 0.5, 3, 0.0).tolist() == [0.0, 0.5, 0.0, -0.5]
    ints = qrater.round_values(torch.tensor([-9, -1, 0, 1, 9]), 1.0, 3, 0.0)
    assert ints.dtype == torch.float64 and ints.tolist() == [-3.0, -1.0, 0.0, 1.0, 3.0]  # clamped to |k| <= 3


# ----------------------------------------------------------------------------- clipping
def laplace(n, seed, dtype=torch.float32):
    """Seeded Laplace(0, 1) samples by the inverse CDF."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(dtype)


def test_clip_threshold_and_clip_round_step():
    x = torch.tensor([-2.0, 0.5, 1.0])
    assert qrater.clip_threshold(x, 0.5) == 1.0
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            qrater.clip_threshold(x, bad)
    with pytest.raises(ValueError):
        qrater.clip_threshold(torch.empty(0), 0.5)
    # weights: clipped to [-Th, Th] on the signed grid of step Th / (2^(q-1) - 1) = 1/3 at 3 bits
    w = qrater.clip_round_weight(torch.tensor([-5.0, -0.1, 0.2, 0.5, 5.0]), 1.0, 3)
    assert torch.allclose(w, torch.tensor([-1.0, 0.0, 1 / 3, 2 / 3, 1.0]))
    # unsigned activations: negatives to 0, step Th / (2^q - 1) = 1/7
    setting = qrater.ActRounding.at(1.0, 3, signed=False)
    assert setting.step == uniform_step(1.0, 3, signed=False) == pytest.approx(1 / 7)
    a = qrater.clip_round_activation(torch.tensor([-1.0, 0.2, 0.6, 3.0]), setting)
    assert torch.allclose(a, torch.tensor([0.0, 1 / 7, 4 / 7, 1.0]))
    signed = qrater.clip_round_activation(torch.tensor([-3.0, -0.4]), qrater.ActRounding.at(1.0, 3, signed=True))
    assert torch.allclose(signed, torch.tensor([-1.0, -1 / 3]))


def _mse_reference_with_qrater_rtn(xs, bits, signed, grid):
    """The MSE rule written with Q-Rater's own RTN (clip, then round_values with gamma_n = 0)."""
    amax = float(xs.abs().max())
    best_t, best_e = amax, float("inf")
    for k in range(1, grid + 1):
        t = float(amax * torch.tensor(k, dtype=xs.dtype) / grid)
        q = qrater.round_values(xs.clamp(-t if signed else 0.0, t), uniform_step(t, bits, signed), bits, 0.0,
                                signed=signed)
        e = float(((xs - q) ** 2).mean())
        if e < best_e:
            best_t, best_e = t, e
    return best_t


@pytest.mark.parametrize("signed", [True, False])
def test_core_mse_threshold_equals_plain_loops(signed):
    # the Table 1 "MSE" baseline is lowbit.core.clipping.mse_threshold; two plain references agree with it
    for seed, bits in [(0, 2), (1, 3), (2, 4)]:
        x = laplace(1500, seed)
        x = x if signed else x.abs()
        grid = 60
        fast = clipping.mse_threshold(x, bits, signed, grid)
        lo, hi = uniform_levels(bits, signed)
        cands = float(x.abs().max()) * torch.arange(1, grid + 1, dtype=x.dtype) / grid
        ref = float(cands[clipping.mse_step_index_reference(x, lo, hi, cands / hi, tie="up")])
        assert fast == ref
        assert fast == pytest.approx(_mse_reference_with_qrater_rtn(x, bits, signed, grid), rel=1e-6)
        assert fast < float(x.abs().max())  # heavy tails: clipping pays off at these widths


def test_baseline_threshold_is_reexported_from_core():
    assert qrater.baseline_threshold is clipping.baseline_threshold
    assert qrater.aciq_coefficient is clipping.aciq_coefficient


def test_aciq_coefficient_matches_banner_constants():
    # Banner et al. 2019, Laplace: alpha* = 2.83b, 3.89b, 5.03b, 6.2b, 7.41b, 8.64b, 9.89b for M = 2..8
    for m, c in zip(range(2, 9), (2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89)):
        assert qrater.aciq_coefficient(2 ** (m - 1)) == pytest.approx(c, abs=0.01)


def test_baselines_are_sane():
    g = torch.Generator().manual_seed(1)
    lap = laplace(20000, seed=3)
    amax = float(lap.abs().max())
    mse_err = lambda t: float(((lap - rtn(lap.clamp(-t, t), t / 3, 3)) ** 2).mean())  # noqa: E731
    th = {r: qrater.baseline_threshold(lap, 3, r) for r in qrater.CLIP_RULES}
    assert th["max"] == pytest.approx(amax)
    for r in ("mse", "aciq", "kl"):
        assert 0 < th[r] < amax, (r, th)
    # MSE rule beats no clipping on a heavy-tailed distribution
    assert mse_err(th["mse"]) < mse_err(amax)
    # ACIQ = coefficient * b (b = mean |x - mean|, about 1 here)
    b = float((lap - lap.mean()).abs().mean())
    assert b == pytest.approx(1.0, rel=0.05)
    assert th["aciq"] == pytest.approx(qrater.aciq_coefficient(3) * b, rel=1e-6)
    # unsigned data (after a ReLU) uses the unsigned range
    relu = torch.relu(torch.randn(5000, generator=g))
    t = qrater.baseline_threshold(relu, 4, "kl")
    assert 0 < t <= float(relu.max())
    with pytest.raises(ValueError):
        qrater.baseline_threshold(lap, 3, "median")
    with pytest.raises(ValueError):
        qrater.baseline_threshold(lap, 1, "mse")


# ----------------------------------------------------------------------------- Bayesian search
def test_same_seed_same_bo_probes():
    f = lambda gamma_n, gamma_s: -(gamma_n - 0.3) ** 2 - (gamma_s - 0.6) ** 2  # noqa: E731
    grid = [{"gamma_n": a, "gamma_s": b} for a in (-1, 0, 1) for b in (0, 1)]
    bounds = {"gamma_n": (-1, 1), "gamma_s": (0, 1)}
    a = qrater.bayes_search(f, bounds, grid, 1, seed=7)
    b = qrater.bayes_search(f, bounds, grid, 1, seed=7)
    assert [p["params"] for p in a] == [p["params"] for p in b]
    assert [p["phase"] for p in a] == ["grid"] * 6 + ["bo"] * (len(a) - 6)
    assert len(a) > 6
    assert qrater.bayes_search(f, bounds, grid, 0, seed=7) == a[:6]
    with pytest.raises(ValueError):
        qrater.bayes_search(f, bounds, [{"gamma_n": 0.0}], 0)  # a grid point without gamma_s
    with pytest.raises(ValueError):
        qrater.bayes_search(f, bounds, grid, -1)


def test_best_probe_keeps_the_first_of_equal_targets():
    probes = [{"params": {"g": 1}, "target": 0.5}, {"params": {"g": 2}, "target": 0.9},
              {"params": {"g": 3}, "target": 0.9}]
    assert qrater.best_probe(probes)["params"] == {"g": 2}
    with pytest.raises(ValueError):
        qrater.best_probe([])


def test_search_params_tells_measure_the_phase_of_each_call():
    calls = []

    def measure(phase, gamma_n, gamma_s=0.0):
        calls.append((phase, gamma_n, gamma_s))
        return -abs(gamma_n - 0.5) - abs(gamma_s - 1.0)

    space = search.round_space(2, [-0.5, 0.0, 0.5], [0.0, 1.0])
    assert space[1] == [{"gamma_n": a, "gamma_s": b} for a in (-0.5, 0.0, 0.5) for b in (0.0, 1.0)]
    best = search.search_params(measure, space, n_bo=2, seed=0)
    assert [c[0] for c in calls[:6]] == ["grid"] * 6 and {c[0] for c in calls[6:]} == {"bo"} and len(calls) > 6
    assert best == {"gamma_n": 0.5, "gamma_s": 1.0}  # the optimum is a grid point
    # order 1 searches gamma_n alone; the clipping space is gamma_c in (0, 1]
    assert search.round_space(1, [0.0, 0.5], [0.0, 1.0]) == ({"gamma_n": (-1.0, 1.0)},
                                                             [{"gamma_n": 0.0}, {"gamma_n": 0.5}])
    assert search.clip_space([0.5, 1.0]) == ({"gamma_c": search.GAMMA_C_BOUNDS},
                                             [{"gamma_c": 0.5}, {"gamma_c": 1.0}])
