"""Tests of lowbit.qrater: Q-Rater rounding (eqs. 3-6), clipping, baselines, BO and Algorithm 1."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import models, qrater
from lowbit.nn.fold_bn import fold_bn

SET = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one torch thread is much faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rtn(x, step, bits, signed=True):
    lo, hi = qrater.level_range(bits, signed)
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
    lo, hi = qrater.level_range(bits, signed)
    w_r = torch.floor(x / step + 0.5)
    f = qrater._rounding_offset(x, w_r, bits, gamma_n, gamma_s, order, signed)
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


# ----------------------------------------------------------------------------- clipping
def test_clip_threshold_and_step():
    x = torch.tensor([-2.0, 0.5, 1.0])
    assert qrater.clip_threshold(x, 0.5) == 1.0
    assert qrater.step_size(1.0, 3) == pytest.approx(1 / 3)
    assert qrater.step_size(1.0, 3, signed=False) == pytest.approx(1 / 7)
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError):
            qrater.clip_threshold(x, bad)


@pytest.mark.parametrize("signed", [True, False])
def test_batched_mse_threshold_agrees_with_reference(signed):
    x = torch.distributions.Laplace(0.0, 1.0).sample((1500,))
    x = x if signed else x.abs()
    for bits in (2, 4):
        fast = qrater._mse_threshold(x, bits, signed, 60)
        ref = qrater._mse_threshold_reference(x, bits, signed, 60)
        assert fast == pytest.approx(ref, rel=1e-6)


def test_aciq_coefficient_matches_banner_constants():
    # Banner et al. 2019, Laplace: alpha* = 2.83b, 3.89b, 5.03b, 6.2b, 7.41b, 8.64b, 9.89b for M = 2..8
    for m, c in zip(range(2, 9), (2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89)):
        assert qrater.aciq_coefficient(2 ** (m - 1)) == pytest.approx(c, abs=0.01)


def test_baselines_are_sane():
    g = torch.Generator().manual_seed(1)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((20000,))
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


# ----------------------------------------------------------------------------- model plumbing
def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_shared_fold_and_forward_order_walk():
    # Q-Rater uses the shared BN folding and the forward-order layer walk of lowbit.ptq
    torch.manual_seed(0)
    m = _randomize_bn(models.build("resnet20"))
    x = torch.randn(4, 1, 28, 28)
    folded = fold_bn(m)
    assert not any(isinstance(k, torch.nn.BatchNorm2d) for k in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-4)
    order = [n for n, _ in lowbit.nn.quantizable_layers(folded, x)]
    assert len(order) == 20 and order[0] == "conv1" and order[-1] == "fc"
    assert order[1:3] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert [n for n, _ in lowbit.nn.quantizable_layers(models.build("lenet5"), x)] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    state = qrater._QuantState(m, x)
    assert state.order == order


class _Reordered(torch.nn.Module):
    """Layers registered in the opposite order to the one they run in."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 3)
        self.body = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_quantizable_layers_example_gives_forward_order():
    m = _Reordered()
    assert [n for n, _ in lowbit.nn.quantizable_layers(m)] == ["head", "body"]  # registration order
    assert [n for n, _ in lowbit.nn.quantizable_layers(m, torch.randn(2, 4))] == ["body", "head"]  # forward order
    assert qrater._QuantState(m, torch.randn(2, 4)).order == ["body", "head"]


def test_prefix_cache_agrees_with_full_forward():
    torch.manual_seed(0)
    m = fold_bn(_randomize_bn(models.build("resnet20")))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    runner = qrater._Runner(m, x, y, batch_size=4)
    full = runner.evaluate(use_cache=False)
    for layer in ("layer3.0.conv1", "fc"):
        runner.freeze_before(layer)
        assert runner.frozen  # something was cached
        assert runner.evaluate() == full
        assert runner.evaluate(use_cache=False) == full
    # changing the target layer changes the cached evaluation exactly like the full one
    with torch.no_grad():
        dict(m.named_modules())["fc"].weight.mul_(-1)
    assert runner.evaluate() == runner.evaluate(use_cache=False) != full
    runner.release()
    assert "forward" not in vars(dict(m.named_modules())["layer1"])


class Tiny(torch.nn.Module):
    """A small conv net on 1x8x8 inputs, so the Algorithm-1 tests run in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.flatten = torch.nn.Flatten()
        self.fc1 = torch.nn.Linear(24, 16)
        self.relu3 = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(self.flatten(self.pool(x)))))


def _tiny_problem():
    torch.manual_seed(0)
    m = _randomize_bn(Tiny())
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        y = m(x).argmax(1)  # labels the FP model gets right
    return m, (x, y)


def test_run_grid_log_replay_and_rtn_equivalence():
    m, calib = _tiny_problem()
    grids = dict(clip_grid=[0.5, 1.0], gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.0, 1.0])
    res = qrater.run(m, 3, 3, calib, search="grid", ops=("clip", "round", "bias"), seed=0,
                     layers=[1, 2, 3], **grids)
    model, probes = res  # unpacks as (model, probes)
    assert [r["name"] for r in res.layers] == ["conv2", "fc1", "fc2"]
    assert {p["phase"] for p in probes} <= {"grid", "off", "on"}
    per_layer = {s: sum(p["stage"] == s and p["layer"] == "fc1" for p in probes)
                 for s in ("w_clip", "w_round", "a_clip", "a_round", "bias")}
    assert per_layer == {"w_clip": 2, "w_round": 6, "a_clip": 2, "a_round": 6, "bias": 2}
    for rec in res.layers:
        assert rec["a_signed"] is False  # inputs of conv2/fc1/fc2 follow ReLUs
        best = max((p for p in probes if p["layer"] == rec["name"] and p["stage"] == "w_round"),
                   key=lambda p: p["target"])
        assert (rec["w_gamma_n"], rec["w_gamma_s"]) == (best["params"]["gamma_n"], best["params"]["gamma_s"])
        on_off = [p for p in probes if p["layer"] == rec["name"] and p["stage"] == "bias"]
        assert rec["bias_corrected"] == (on_off[1]["target"] >= on_off[0]["target"])
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(qrater.apply(m, res.layers, example=x)(x), model(x))
        # quantized weights sit on the layer's grid
        w = dict(model.named_modules())["fc1"].weight
        rec = res.layers[1]
        k = w / rec["w_step"]
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 3
    # RTN-only run: every gamma_n is 0 and no search probes are made
    rtn_res = qrater.run(m, 3, 3, calib, search="grid", ops=(), layers=[1, 2, 3], **grids)
    assert all(r["w_gamma_n"] == 0 and r["a_gamma_n"] == 0 and not r["bias_corrected"] for r in rtn_res.layers)
    assert {p["stage"] for p in rtn_res.probes} == {"bias"}


def test_run_bo_is_seeded_and_validates():
    m, calib = _tiny_problem()
    kw = dict(ops=("clip",), layers=[3], clip_grid=[0.5, 1.0], bo_steps=1)
    a = qrater.run(m, 3, None, calib, search="bo", seed=3, **kw)
    b = qrater.run(m, 3, None, calib, search="bo", seed=3, **kw)
    assert [p["params"] for p in a.probes] == [p["params"] for p in b.probes]
    assert any(p["phase"] == "bo" for p in a.probes)
    with pytest.raises(ValueError):
        qrater.run(m, 1, 3, calib)
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, calib, search="random")
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, calib, ops=("clip", "prune"))
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, calib, gamma_n_grid=[-2.0, 0.0])
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, calib, clip_grid=[0.0, 0.5])


def test_incremental_accuracy_counts_are_a_subset_of_the_full_curve():
    from lowbit.data import TensorImageDataset

    m, (x, y) = _tiny_problem()
    res = qrater.run(m, 2, 2, (x, y), search="grid", ops=("round",), layers=[1, 2, 3],
                     gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.0])
    data = TensorImageDataset(x, y, "tiny", "test")
    full = qrater.incremental_accuracy(m, res.layers, data, example=x[:2])
    assert len(full) == len(res.layers) + 1
    assert qrater.incremental_accuracy(m, res.layers, data, example=x[:2], counts=[0, 2, 3]) == [full[0], full[2],
                                                                                                   full[3]]
    assert full[0] == 100.0  # labels are the FP model's predictions
    with pytest.raises(ValueError):
        qrater.incremental_accuracy(m, res.layers, data, counts=[4])
