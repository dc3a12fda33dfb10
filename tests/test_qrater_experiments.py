"""Tests of notebook 05's plumbing (lowbit.qrater.experiments): run configs and cache keys, tables,
figure data and the paper-claims checker, on small constructed run records."""
import json

import numpy as np
import pytest
import torch

from lowbit import paths, qrater
from lowbit.data import TensorImageDataset
from lowbit.qrater import experiments as ex
from lowbit.results import config_key

# notebook 05's `default` LeNet-5/MNIST profile (the fields run_config reads)
LENET = dict(model="lenet5", dataset="mnist", per_class=20, test_n=None, curve_bits=[2], layers=[1, 2, 3, 4],
             clip_grid=list(qrater.PAPER_CLIP_GRID), gamma_n_grid=list(qrater.PAPER_GAMMA_N_GRID),
             gamma_s_grid=list(qrater.PAPER_GAMMA_S_GRID), bo_steps=5)


def test_run_config_keys_match_the_committed_caches():
    # the cache key of a Table 1 cell must not change, or notebook 05 would recompute its runs
    derived = paths.project_root() / "data" / "derived"
    for bits, variant, search, extra in [(3, "MSE", "grid", {}), (2, "(1)+(2)+(3)", "bo", {}),
                                         (2, "(1) round", "grid", {"order": 1}),
                                         (2, "MSE", "grid", {"bias_mode": "always"})]:
        config = ex.run_config(LENET, bits, variant, search, seed=0, **extra)
        path = derived / f"qrater_run-{config_key(config)}.json"
        assert path.exists(), (bits, variant, extra)
        stored = json.loads(path.read_text())["config"]
        assert stored == json.loads(json.dumps(config))
    assert ex.run_config(LENET, 2, "MSE")["curve"] is True and ex.run_config(LENET, 3, "MSE")["curve"] is False
    with pytest.raises(ValueError):
        ex.run_config(LENET, 3, "median")


def test_cached_experiment_runs_once_and_replays_curves(out_dir, monkeypatch):
    calls = {"run": 0, "curve": 0}

    def fake_experiment(**config):
        calls["run"] += 1
        return {"test_accuracy": 90.0, "layers": [{"name": "a"}, {"name": "b"}], "config": config}

    def fake_curve(model, dataset, layers, test_n, counts):
        calls["curve"] += 1
        return {"counts": counts, "accuracy": [99.0 - k for k in counts], "test_n": test_n, "seconds": 0.0}

    monkeypatch.setattr(ex.runs, "experiment", fake_experiment)
    monkeypatch.setattr(ex.runs, "experiment_curve", fake_curve)
    c = dict(LENET, per_class=3, curve_bits=[], curve_n=50, curve_counts=[0, 2])  # no committed run has this
    r = ex.cached_experiment(c, 3, "(2) clip", with_curve=True)
    assert r["curve"] == [99.0, 97.0] and r["curve_counts"] == [0, 2] and r["curve_n"] == 50
    assert r["config"]["ops"] == ["clip"]  # JSON round trip of the Table 1 variant's ops
    again = ex.cached_experiment(c, 3, "(2) clip", with_curve=True)
    assert again == r and calls == {"run": 1, "curve": 1}  # both read from the cache the second time
    assert "curve" not in ex.cached_experiment(c, 3, "(2) clip")
    ex.cached_experiment(c, 3, "(2) clip", order=1)
    assert calls["run"] == 2  # another option is another run


def rec(acc, fp=99.0, calib=95.0, n_probes=4, corrected=(False, True), names=("l1", "l2")):
    layers = [{"name": n, "bias_corrected": b} for n, b in zip(names, corrected)]
    return {"test_accuracy": acc, "fp_test_accuracy": fp, "calib_accuracy": calib, "probes": [{}] * n_probes,
            "layers": layers}


def table1_runs(accs):
    """{(bits, variant): record} from {bits: [accuracy per Table 1 variant, in TABLE1_VARIANTS order]}."""
    return {(bits, v): rec(a) for bits, row in accs.items() for v, a in zip(ex.TABLE1_VARIANTS, row)}


#            MSE   ACIQ  KL    (1)   (2)   (3)   (1)+(2) (1)+(2)+(3)
PAPERLIKE = {4: [90.0, 85.0, 88.0, 91.0, 91.5, 90.5, 92.0, 92.5],
             3: [70.0, 60.0, 75.0, 80.0, 78.0, 76.0, 82.0, 84.0]}
ACIQ_WINS = {4: [90.0, 93.0, 88.0, 89.0, 91.5, 90.5, 92.0, 92.5],
             3: [70.0, 60.0, 75.0, 80.0, 78.0, 76.0, 82.0, 74.0]}


def test_table_rows_from_run_records():
    runs = table1_runs(PAPERLIKE)
    rows = ex.table1_rows(runs, [4, 3], list(ex.TABLE1_VARIANTS))
    assert [r["W/A"] for r in rows] == ["4/4", "3/3"]
    assert list(rows[0]) == ["W/A", "FP", *ex.TABLE1_VARIANTS]
    assert rows[1]["FP"] == 99.0 and rows[1]["(1)+(2)+(3)"] == 84.0 and rows[0]["ACIQ"] == 85.0
    bo = {4: rec(93.0, calib=97.0, n_probes=9), 3: rec(83.0, calib=96.0, n_probes=7)}
    t2 = ex.table2_rows(runs, bo, [4, 3])
    assert t2[1] == {"W/A": "3/3", "FP": 99.0, "MSE": 70.0, "Q-Rater grid": 84.0, "Q-Rater BO": 83.0,
                     "grid calib": 95.0, "BO calib": 96.0, "grid probes": 4, "BO probes": 7}


def test_table1_claims_verdicts():
    ok = ex.table1_claims(table1_runs(PAPERLIKE), [4, 3], "m")
    assert len(ok) == 2 * 4 + 1 and all(holds for _, holds, _ in ok)
    assert ok[-1][2] == "4/4: +2.50, 3/3: +14.00"
    bad = dict((text, holds) for text, holds, _ in ex.table1_claims(table1_runs(ACIQ_WINS), [4, 3], "m"))
    assert bad["m 4/4: (1)+(2)+(3) beats the best baseline"] is False  # ACIQ 93.0 > 92.5
    assert bad["m 4/4: Q-Rater (1) round beats MSE+RTN"] is False  # 89 < 90
    assert bad["m 3/3: (1)+(2)+(3) beats the best baseline"] is False  # 74 < KL 75
    assert bad["m 3/3: Q-Rater (1) round beats MSE+RTN"] is True
    assert bad["m: gain of (1)+(2)+(3) over MSE grows as bits decrease"] is True  # +2.5 then +4.0
    shrinking = {4: [80.0] + PAPERLIKE[4][1:], 3: PAPERLIKE[3][:7] + [71.0]}
    assert ex.table1_claims(table1_runs(shrinking), [4, 3], "m")[-1][1] is False  # +12.5 then +1.0


def test_figure_and_bo_claims_verdicts():
    r6 = {"W RTN / A RTN": rec(80.0), "W Q-Rater / A RTN": rec(82.0), "W RTN / A Q-Rater": rec(83.0),
          "W/A Q-Rater (2nd order)": rec(85.0), "W/A Q-Rater (1st order)": rec(84.0)}
    r8 = {"never": rec(80.0), "always": rec(70.0), "selective (Q-Rater)": rec(80.0)}
    claims = ex.figure_claims("m", 3, r6, r8)
    assert [holds for _, holds, _ in claims] == [True, True, True]  # selective ties never: "at least as good"
    assert claims[0][2] == "never 80.00, always 70.00, selective (Q-Rater) 80.00"
    r6_first_wins = dict(r6, **{"W/A Q-Rater (1st order)": rec(86.0), "W RTN / A Q-Rater": rec(85.0)})
    assert [holds for _, holds, _ in ex.figure_claims("m", 3, r6_first_wins, r8)] == [True, False, False]
    with_bo = ex.figure_claims("m", 3, r6, r8, grid=rec(84.0), bo=rec(83.9))
    assert with_bo[0] == ("m 3/3: BO >= grid for (1)+(2)+(3)", False, "83.90 vs 84.00")
    runs = table1_runs(PAPERLIKE)
    assert [h for _, h, _ in ex.bo_claims(runs, {4: rec(92.5), 3: rec(83.0)}, [4, 3], "m")] == [True, False]
    text = ex.claim_lines(with_bo[:2])
    assert text.splitlines() == ["False  m 3/3: BO >= grid for (1)+(2)+(3): 83.90 vs 84.00",
                                 "True   m 3/3: selective bias correction is at least as good as always and never: "
                                 "never 80.00, always 70.00, selective (Q-Rater) 80.00"]


def test_bias_selection_and_sweep():
    rows = [("grid", rec(1.0, corrected=(True, False, True), names=("a", "b", "c"))),
            ("bo", rec(1.0, corrected=(False, False, True), names=("a", "b", "c")))]
    names, onoff, counts = ex.bias_selection(rows)
    assert names == ["a", "b", "c"] and counts == {"grid": 2, "bo": 1}
    assert np.array_equal(onoff, [[1, 0, 1], [0, 0, 1]])
    with pytest.raises(ValueError):
        ex.bias_selection(rows + [("other", rec(1.0, names=("a", "b")))])
    probe = lambda layer, stage, phase, acc, **p: {"layer": layer, "stage": stage, "phase": phase,  # noqa: E731
                                                   "params": p, "accuracy": acc}
    record = {"layers": [{"name": "a"}, {"name": "fc"}], "probes": [
        probe("a", "w_round", "grid", 1.0, gamma_n=0.0, gamma_s=0.0),
        probe("fc", "w_round", "grid", 90.0, gamma_n=0.5, gamma_s=0.0),
        probe("fc", "w_round", "grid", 80.0, gamma_n=-0.5, gamma_s=0.0),
        probe("fc", "w_round", "grid", 70.0, gamma_n=-0.5, gamma_s=1.0),
        probe("fc", "w_round", "bo", 99.0, gamma_n=0.1, gamma_s=0.0),
        probe("fc", "a_round", "grid", 60.0, gamma_n=0.0, gamma_s=0.0)]}
    assert ex.sweep(record, "w_round", "gamma_n", {"gamma_s": 0.0}) == ([-0.5, 0.5], [80.0, 90.0], "fc")
    assert ex.sweep(record, "w_round", "gamma_n") == ([-0.5, -0.5, 0.5], [80.0, 70.0, 90.0], "fc")


def test_balanced_subset_draws_per_class_seeded():
    labels = torch.as_tensor(np.repeat(np.arange(3), [5, 6, 7]))
    data = TensorImageDataset(torch.arange(18.0).reshape(18, 1, 1, 1).expand(18, 1, 2, 2).clone(), labels,
                              "toy", "train")  # image i holds the value i
    sub = ex.balanced_subset(data, per_class=4, seed=1)
    assert torch.bincount(sub.labels).tolist() == [4, 4, 4]
    assert sub.split == "train[4/class s1]"
    assert torch.equal(ex.balanced_subset(data, 4, seed=1).images, sub.images)  # seeded
    assert not torch.equal(ex.balanced_subset(data, 4, seed=2).images, sub.images)
    idx = sub.images[:, 0, 0, 0].long()
    assert torch.equal(data.labels[idx], sub.labels) and len(set(idx.tolist())) == 12  # distinct, right labels
    with pytest.raises(ValueError):
        ex.balanced_subset(data, per_class=6)  # class 0 has only 5
    with pytest.raises(ValueError):
        ex.balanced_subset(data, per_class=0)


def test_search_grids_and_all_but_first_layers():
    paper = qrater.search_grids("paper")
    assert len(paper["clip_grid"]) == 10 and len(paper["gamma_n_grid"]) == 21 and paper["gamma_s_grid"] == [
        0.0, 0.25, 0.5, 0.75, 1.0] and paper["bo_steps"] == 50  # sec. 5.4 and sec. 6
    coarse = qrater.search_grids("coarse")
    assert len(coarse["clip_grid"]) < 10 and coarse["bo_steps"] < 50
    with pytest.raises(ValueError, match="grid"):
        qrater.search_grids("fine")
    from lowbit.qrater.algorithm import select_layers

    order = ["conv1", "a", "b", "fc"]
    assert select_layers(order, qrater.ALL_BUT_FIRST) == ["a", "b", "fc"]
    assert qrater.QRaterConfig(4, 4, layers=qrater.ALL_BUT_FIRST).layers == qrater.ALL_BUT_FIRST
    with pytest.raises(ValueError, match="all-but-first"):
        qrater.QRaterConfig(4, 4, layers="all-but-last")


def test_probe_ties_counts_searches_decided_by_accuracy_ties_and_by_order():
    def probe(layer, stage, acc, target):
        return {"layer": layer, "stage": stage, "accuracy": acc, "target": target}

    record = {"probes": [
        probe("a", "w_clip", 90.0, 89.9), probe("a", "w_clip", 90.0, 89.8), probe("a", "w_clip", 80.0, 79.0),  # acc tie
        probe("a", "w_round", 95.0, 94.9), probe("a", "w_round", 95.0, 94.9),  # acc and target tie
        probe("b", "w_clip", 70.0, 69.0), probe("b", "w_clip", 71.0, 70.0),  # no tie
        probe("b", "bias", 50.0, 49.0),  # one probe: not a search
    ]}
    assert qrater.probe_ties(record) == {"searches": 3, "probes": 7, "accuracy_ties": 2, "target_ties": 1}


def test_objective_rows_table_each_study_against_the_best_baseline(monkeypatch):
    calls = []

    def fake_runs(c, bits_list, variants, seed=0, **extra):
        calls.append((c["per_class"], tuple(variants), extra))
        acc = {"MSE": 80.0, "ACIQ": 85.0, "KL": 70.0}
        probes = [{"layer": "a", "stage": "w_clip", "accuracy": 90.0, "target": t} for t in (1.0, 1.0)]
        return {(b, v): {"test_accuracy": acc.get(v, 81.0 + c["per_class"]), "calib_accuracy": 99.0, "probes": probes}
                for b in bits_list for v in variants}

    monkeypatch.setattr(ex.runs, "table1_runs", fake_runs)
    rows = qrater.objective_rows({"per_class": 10}, [3], [("accuracy", 10, ["(2) clip"]), ("loss", 50, ["(2) clip"])])
    assert [(r["objective"], r["per class"], r["test top-1"], r["best baseline"], r["baseline top-1"]) for r in rows] == \
        [("accuracy", 10, 91.0, "ACIQ", 85.0), ("loss", 50, 131.0, "ACIQ", 85.0)]
    assert rows[0]["accuracy ties"] == rows[0]["target ties"] == 1 and rows[0]["searches"] == 1
    assert (50, ("(2) clip",), {"objective": "loss"}) in calls and (10, ("(2) clip",), {}) in calls
    assert [c[0] for c in calls if c[1] == tuple(ex.BASELINES)] == [10, 10]  # baselines: the profile's own subset
