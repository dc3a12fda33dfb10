"""Notebook 02's study (lowbit.sq.convergence): cache keys unchanged, tables on constructed records,
the global-scale candidate losses, Fig. 3 and the worked trajectory."""
from unittest import mock

import numpy as np
import pytest
import torch

import lowbit
from lowbit import results
from lowbit.sq import convergence as conv

DEFAULT_MODELS = [("resnet20", "fashion-mnist"), ("lenet5", "mnist")]  # notebook 02's default profile
have_checkpoints = all(lowbit.models.checkpoint_path(n, d).exists() for n, d in DEFAULT_MODELS)


def no_compute(name, config, compute):
    """``results.cached`` that must find the record: computing means the key changed."""
    return results.cached(name, config, lambda: pytest.fail(f"{name}: no committed record for {config}"))


def test_synthetic_tensors_are_the_committed_ones_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    t = conv.synthetic_tensors((32, 576))
    assert torch.equal(torch.get_rng_state(), state)
    assert list(t) == ["synthetic gaussian", "synthetic laplace", "synthetic uniform"]
    assert all(w.shape == (32, 576) and w.dtype == torch.float64 for w in t.values())
    assert t["synthetic uniform"].abs().max() <= 1 and t["synthetic laplace"].abs().max() > 3
    again = conv.synthetic_tensors((32, 576))
    assert all(torch.equal(t[k], again[k]) for k in t)
    with mock.patch.object(conv, "cached", no_compute):  # the default run's census keys are found
        recs = conv.census(t, [2, 3, 4], 5, 1e-5)
    assert [r["pairs"] for r in recs[:3]] == [105 * 32] * 3


@pytest.mark.skipif(not have_checkpoints, reason="FP checkpoints missing (make baselines)")
def test_every_default_cache_key_finds_its_committed_record():
    tensors, missing = conv.study_tensors((32, 576), DEFAULT_MODELS)
    assert not missing and len(tensors) == 3 + 18 + 3  # ResNet-20 body 18 convs, LeNet-5 conv2/fc1/fc2
    with mock.patch.object(conv, "cached", no_compute):
        census = conv.census(tensors, [2, 3, 4], 5, 1e-5)
        traced = conv.traced_runs(tensors, [2, 3, 4], 5, 1e-5, 600)
        winners = conv.winner_records(tensors, [2, 3], 5, 1e-5, 64)
    assert len(census) == 72 and len(traced) == 1800 and len(winners) == 38
    assert sum(r["pairs"] for r in census) == 7_810_140


def test_census_is_cached_and_matches_the_search(out_dir):
    w = torch.randn(3, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    recs = conv.census({"t": w}, [2], 5, 1e-5)
    res = lowbit.search_qps(w, 2, 5, prune=False)
    assert recs == [{"tensor": "t", "bits": 2, "pairs": 105 * 3, "iterations": res.iterations,
                     "not_converged": res.not_converged, "index": res.index, "loss": res.loss}]
    assert len(list(out_dir.glob("derived/sq_convergence_census-*.json"))) == 1
    with mock.patch.object(conv, "cached", no_compute):
        assert conv.census({"t": w}, [2], 5, 1e-5) == recs


def test_census_rows_aggregate_per_group():
    recs = [{"tensor": "synthetic a", "bits": 2, "pairs": 10, "iterations": 80, "not_converged": 0},
            {"tensor": "synthetic b", "bits": 2, "pairs": 30, "iterations": 120, "not_converged": 2},
            {"tensor": "m/d conv", "bits": 2, "pairs": 5, "iterations": 50, "not_converged": 1},
            {"tensor": "m/d conv", "bits": 3, "pairs": 4, "iterations": 8, "not_converged": 0}]
    rows = conv.census_rows(recs, [2, 3])
    assert rows == [
        {"bits": 2, "weights": "synthetic", "tensors": 2, "QPS x channel runs": 40, "mean iterations": 5.0,
         "not converged": 2},
        {"bits": 2, "weights": "model", "tensors": 1, "QPS x channel runs": 5, "mean iterations": 10.0,
         "not converged": 1},
        {"bits": 3, "weights": "model", "tensors": 1, "QPS x channel runs": 4, "mean iterations": 2.0,
         "not converged": 0}]


def test_traced_runs_sample_and_table(out_dir):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(4, 30, generator=g, dtype=torch.float64),
               "b": torch.randn(2, 3, 5, generator=g, dtype=torch.float64)}
    traced = conv.traced_runs(tensors, [2], 5, 1e-5, 7)
    assert len(traced) == 7 and {r["tensor"] for r in traced} <= {"a", "b"}
    r = traced[0]
    expect = lowbit.sq.scale.convergence_record(tensors[r["tensor"]][r["channel"]].reshape(-1).numpy(),
                                                lowbit.sq.universal.enumerate_qps(5, 2)[r["qps"]])
    assert r["iterations"] == expect["iterations"] and r["loss"] == pytest.approx(expect["loss"], rel=1e-15)
    rows = conv.traced_rows(traced, [2, 3])
    assert len(rows) == 1 and rows[0]["runs"] == 7  # no 3-bit runs: no row
    gaps = np.array([t["gap"] for t in traced])
    assert rows[0]["max gap %"] == pytest.approx(100 * gaps.max())
    assert rows[0]["mean iterations"] == pytest.approx(np.mean([t["iterations"] for t in traced]))
    assert rows[0]["runs with a loss rise"] == 0  # majorize-minimize: the total loss never rises


def test_traced_rows_on_constructed_records():
    base = {"bits": 4, "converged": True, "exact_fixed_point": True, "iterations": 3, "loss_rises": 0,
            "case3_events": 0, "direction_changes": 0, "gap": 0.0}
    recs = [base, {**base, "converged": False, "iterations": 9, "case3_events": 2, "gap": 0.5},
            {**base, "exact_fixed_point": False, "direction_changes": 1, "loss_rises": 1, "gap": 1e-10}]
    (row,) = conv.traced_rows(recs, [4])
    assert row["converged %"] == pytest.approx(200 / 3) and row["exact fixed point %"] == pytest.approx(200 / 3)
    assert row["max iterations"] == 9 and row["mean iterations"] == 5
    assert row["runs with a loss rise"] == 1 and row["runs with oscillation"] == 1
    assert row["runs with case-3 events %"] == pytest.approx(100 / 3)
    assert row["gap > 1e-9 %"] == pytest.approx(100 / 3) and row["median gap %"] == pytest.approx(1e-8)


def test_global_scale_losses_bound_fixed_point_losses():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 20, generator=g, dtype=torch.float64)
    fixed = lowbit.search_qps(w, 2, 5)
    glob = conv.candidate_losses_global(w, 2, 5)
    assert glob.shape == fixed.losses.shape
    assert np.all(glob <= fixed.losses * (1 + 1e-12) + 1e-12)
    qps = lowbit.sq.universal.enumerate_qps(5, 2)[17]
    assert glob[17] == pytest.approx(sum(lowbit.global_optimal_scale(w[c], qps).loss for c in range(3)), rel=1e-15)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        conv.candidate_losses_global(w[0], 2, 5)


def test_winner_records_skip_large_3bit_tensors(out_dir):
    g = torch.Generator().manual_seed(4)
    tensors = {"small": torch.randn(4, 12, generator=g, dtype=torch.float64),
               "large": torch.randn(2, conv.WINNER_3BIT_MAX_WEIGHTS, generator=g, dtype=torch.float64)}
    recs = conv.winner_records(tensors, [3], 5, 1e-5, max_channels=3)
    assert [r["tensor"] for r in recs] == ["small"]
    (r,) = recs
    fixed = lowbit.search_qps(tensors["small"][:3], 3, 5)
    assert r["fixed_index"] == fixed.index and r["fixed_loss"] == pytest.approx(fixed.loss, rel=1e-12)
    assert r["global_loss"] <= r["global_loss_of_fixed_winner"] <= r["fixed_loss"] * (1 + 1e-12)
    (row,) = conv.winner_rows(recs)
    assert row["same QPS wins"] == (r["fixed_index"] == r["global_index"])
    assert row["improvement %"] == pytest.approx(100 * (r["fixed_loss"] - r["global_loss"]) / r["fixed_loss"])


def test_fig3_subcases_are_the_reverse_of_the_text():
    f = conv.fig3_cases()
    assert (f["A"], f["B"], f["C"]) == pytest.approx((1.5, 1.6, 1.8))
    i = np.searchsorted(f["w"], 1.7)
    assert f["e1"][i] == pytest.approx(0.3) and f["e2"][i] == pytest.approx(0.5)
    assert conv.fig3_subcases() == ["w = 1.55: error 0.45 at t=1 -> 0.35 at t=2 (falls; B = 1.6)",
                                    "w = 1.7: error 0.30 at t=1 -> 0.50 at t=2 (rises; B = 1.6)"]


def test_worked_trajectory_text():
    lines = conv.worked_trajectory([0.41, 0.93, 1.17, 1.58, 2.07, 2.16], [1.0, 2.0])
    assert lines == [
        "t=0 alpha=1.080000 q=[1, 1, 1, 1, 2, 2] loss=0.737600",
        "t=1 alpha=1.045833 q=[1, 1, 1, 2, 2, 2] loss=0.700060  case 3: weights [1.58] moved and their error grew",
        "t=2 alpha=0.942000 q=[1, 1, 1, 2, 2, 2] loss=0.538340",
        "t=3 alpha=0.942000 q=[1, 1, 1, 2, 2, 2] loss=0.538340",
        "loss rises: 0 | case-3 events: 1 | global optimum: alpha=0.942000 loss=0.538340"]
    # signs do not matter: the same trajectory on mirrored weights
    assert conv.worked_trajectory([-0.41, 0.93, -1.17, 1.58, 2.07, -2.16], [1.0, 2.0]) == lines


def test_describe_tensors():
    text = conv.describe_tensors({"x": torch.zeros(3, 2, 5)})
    assert text.split() == ["x", "(3,", "2,", "5)", "channels", "3"]
