"""lowbit.compare: the cross-paper rows of notebook 08 (cost model, record matching, Pareto front)."""
import numpy as np
import pytest

from lowbit import compare, results
from lowbit.sq.hw import sq_mac_cost, uniform_mac_cost
from lowbit.sq.quantizers import apot_points, log2_points, two_word_log_points


def test_pareto_front_keeps_exactly_the_undominated_points():
    pts = [(1.0, 90.0), (2.0, 92.0), (2.0, 91.0), (3.0, 92.0), (0.5, 80.0), (1.0, 90.0)]
    # (2, 91) is dominated by (2, 92); (3, 92) by (2, 92); the two equal (1, 90) do not dominate each other
    assert compare.pareto_front(pts) == {0, 1, 4, 5}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_term_sets_add_up_to_each_methods_points(bits):
    for method, points in (("log2", log2_points), ("two_word_log", two_word_log_points), ("apot", apot_points)):
        a, b = compare.term_sets(method, bits)
        sums = np.unique([x + y for x in a for y in b])
        assert np.allclose(sums / sums.max(), points(bits)), (method, bits)


def test_relative_cost_is_each_datapath_over_the_uniform_mac():
    u = uniform_mac_cost(4, 4)["uniform_mac_gates"]
    assert compare.relative_mac_cost("LSQ", 4, 4) == 1.0 == compare.relative_mac_cost("Q-Rater", 4, 4)
    assert compare.relative_mac_cost("sq + refine", 4, 4) == sq_mac_cost(5, 4, 4)["sq_mac_gates"] / u
    a, b = compare.term_sets("apot", 4)
    assert compare.relative_mac_cost("apot", 4, 4) == sq_mac_cost((a, b), 4, 4)["sq_mac_gates"] / u
    # STLQ: a second cycle for every group costs more than for none
    lo = compare.relative_mac_cost("STLQ", 3, 3, two_cycle_fraction=0.0, nzr=0.0)
    hi = compare.relative_mac_cost("STLQ", 3, 3, two_cycle_fraction=1.0, nzr=0.15)
    assert hi > lo
    with pytest.raises(ValueError, match="two_cycle_fraction"):
        compare.relative_mac_cost("STLQ", 3, 3)
    with pytest.raises(ValueError, match="no MAC model"):
        compare.relative_mac_cost("fp32", 4, 4)
    with pytest.raises(ValueError, match="third term"):
        compare.term_sets("apot", 6)


def _sq(method, seed, acc, universal=None, refine=False, w_bits=3, a_bits=3):
    results.save_result("sq_ptq_run", dict(model="tiny", dataset="toy", method=method, w_bits=w_bits, a_bits=a_bits,
                                           seed=seed, refine=refine, universal=universal, test_size=100),
                        {"accuracy": acc, "seconds": 2.0 * (seed + 1)})


def test_rows_come_from_matching_records_only(out_dir):
    _sq("sq", 0, 90.0, universal=5)
    _sq("sq", 1, 92.0, universal=5)
    _sq("sq", 2, 10.0, universal=3)  # another universal set: not notebook 03's SQ row
    _sq("uniform", 0, 80.0)
    _sq("uniform", 1, 70.0, w_bits=4)  # another W/A
    for extra, acc in (({}, 85.0), ({"targets": ["weight"]}, 1.0)):  # a Fig. 6 run is not Table 1's Q-Rater
        results.save_result("qrater_run", dict(model_name="tiny", dataset="toy", w_bits=3, a_bits=3, search="grid",
                                               ops=["clip", "round", "bias"], **extra),
                            {"test_accuracy": acc, "seconds": 5.0, "test_n": 100})
    rows = {r["method"]: r for r in compare.cross_paper_rows("tiny", "toy", 3, 3)}
    assert set(rows) == {"sq", "uniform", "Q-Rater"}
    assert rows["sq"]["top-1"] == 91.0 and rows["sq"]["seeds"] == 2 and rows["sq"]["std"] == pytest.approx(2 ** 0.5)
    assert rows["sq"]["seconds"] == 3.0 and rows["Q-Rater"]["top-1"] == 85.0
    # Q-Rater (85, cost 1) dominates uniform (80, cost 1); sq (91, cost > 1) is the other end of the front
    assert {m for m, r in rows.items() if r["pareto"]} == {"sq", "Q-Rater"}
    assert all(r["W/A"] == "3/3" and r["network"] == "tiny/toy" for r in rows.values())


def test_table_rows_and_front_lines_and_figures(out_dir):
    _sq("sq", 0, 91.0, universal=5)
    _sq("uniform", 0, 80.0)
    rows = compare.table_rows([("tiny", "toy", 3, 3), ("tiny", "toy", 4, 4)])
    assert [list(r) for r in rows] == [list(compare.COLUMNS)] * 2  # no 4/4 records: no rows for it
    line, = compare.front_lines(rows)
    assert line.startswith("W/A 3/3: front uniform (80.00 +- 0.00 at 1.00x) -> sq (91.00")
    assert line.endswith("most accurate sq; spread over 2 methods 11.00 points")
    for draw in (compare.plots.accuracy_vs_cost, compare.plots.accuracy_vs_compute):
        fig = draw(rows, "t")
        assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= 2


def _peer(method, iterations, seed, acc, w_bits=2, calib_size=1024, test_size=100):
    config = compare.peer_runs._config("tiny", "toy", method, w_bits, iterations, seed, calib_size, test_size)
    results.save_result("peer_run", config, {"accuracy": acc, "seconds": 10.0 + seed})


def test_peer_rows_group_by_method_and_iterations_and_sit_on_the_uniform_datapath(out_dir):
    _peer("brevitas-gptq", None, 0, 88.0)
    _peer("brevitas-gptq", None, 1, 91.0)
    _peer("aimet-adaround", 500, 0, 89.0)
    _peer("aimet-adaround", 100, 0, 85.0)
    _peer("aimet-adaround", 500, 1, 70.0, calib_size=64)  # another calibration size: not this table's
    _peer("aimet-adaround", 500, 2, 70.0, w_bits=3)  # another W
    _sq("uniform + refine", 0, 87.0, refine=False, w_bits=2, a_bits=None)  # hand-named: a uniform-datapath row
    rows = {r["method"]: r for r in compare.cross_paper_rows("tiny", "toy", 2, None)}
    assert set(rows) == {"Brevitas GPTQ", "AIMET AdaRound (500 it)", "AIMET AdaRound (100 it)", "uniform + refine"}
    gptq = rows["Brevitas GPTQ"]
    assert gptq["top-1"] == 89.5 and gptq["seeds"] == 2 and gptq["seconds"] == 10.5 and gptq["source"].endswith("(peer_run)")
    assert all(rows[m]["relative MAC cost"] == 1.0 for m in rows)
    assert {m for m, r in rows.items() if r["pareto"]} == {"Brevitas GPTQ"}  # most accurate at the one cost
    assert not compare.peer_rows("tiny", "toy", 2, calib_size=32)
    sweep = compare.iteration_rows("tiny", "toy", 2)
    assert [(r["method"], r["iterations"], r["seeds"]) for r in sweep] == [
        ("AIMET AdaRound", 100, 1), ("AIMET AdaRound", 500, 2), ("Brevitas GPTQ", None, 2)]


def test_peer_run_checks_its_request_up_front():
    with pytest.raises(ValueError, match="unknown peer method"):
        compare.run_peer("lenet5", "mnist", "adaround", 2)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        compare.run_peer("lenet5", "mnist", "aimet-adaround", 2)
    with pytest.raises(ValueError, match="no iteration count"):
        compare.run_peer("lenet5", "mnist", "brevitas-gptq", 2, iterations=10)


@pytest.mark.usefixtures("one_torch_thread")
def test_cached_peer_run_is_the_adapter_on_notebook_03s_calibration_draw_and_test_images(out_dir):
    # the run's accuracy is exactly the adapter's model, calibrated on data.calibration_subset(train, n, seed)
    # (notebook 03's draw) and evaluated on the first test_size test images; a second call reads the cache
    from lowbit import data, evaluate, models, peers
    res = compare.cached_peer("lenet5", "mnist", "brevitas-gptq", 3, seed=1, calib_size=64, test_size=300)
    fp = models.load_pretrained("lenet5", "mnist")
    calib = data.calibration_subset(data.load_dataset("mnist", "train"), 64, 1)
    qmodel, _ = peers.quantize_with_peer(fp, "brevitas-gptq", calib, 3, seed=1)
    assert res["accuracy"] == evaluate.accuracy(qmodel, data.head(data.load_dataset("mnist", "test"), 300))
    assert res["fp_accuracy"] > res["accuracy"] - 5.0 and res["iterations"] is None
    assert compare.cached_peer("lenet5", "mnist", "brevitas-gptq", 3, seed=1, calib_size=64, test_size=300) == res
    row, = compare.peer_rows("lenet5", "mnist", 3, calib_size=64)
    assert row["top-1"] == res["accuracy"] and row["test images"] == 300


def test_qrater_row_takes_the_chosen_objective_and_subset(out_dir):
    for extra, acc in (({}, 85.0), ({"objective": "loss", "per_class": 50}, 86.0),
                       ({"objective": "loss", "per_class": 100}, 87.0)):
        results.save_result("qrater_run", dict(model_name="tiny", dataset="toy", w_bits=3, a_bits=3, search="grid",
                                               ops=["clip", "round", "bias"], **{"per_class": 10, **extra}),
                            {"test_accuracy": acc, "seconds": 5.0, "test_n": 100})
    rows = compare.cross_paper_rows("tiny", "toy", 3, 3)
    assert [(r["method"], r["top-1"], r["source"]) for r in rows] == [("Q-Rater", 85.0, "notebook 05 (qrater_run)")]
    row, = compare.table_rows([("tiny", "toy", 3, 3)], qrater=("loss", 100))
    assert (row["method"], row["top-1"], row["source"]) == ("Q-Rater (loss, 100/class)", 87.0, "notebook 08 (qrater_run)")
    assert [r["top-1"] for r in compare.qrater_rows("tiny", "toy", 3, 3, "loss")] == [86.0, 87.0]
    # the same setting on two grids: two rows that name their grids, never one row averaged over both
    for grid, acc in (([0.5, 1.0], 80.0), ([0.1 * i for i in range(1, 11)], 90.0)):
        results.save_result("qrater_run", dict(model_name="tiny", dataset="toy", w_bits=2, a_bits=2, search="grid",
                                               ops=["clip", "round", "bias"], per_class=10, clip_grid=grid,
                                               gamma_n_grid=[0.0, 0.5], gamma_s_grid=[0.5]),
                            {"test_accuracy": acc, "seconds": 5.0, "test_n": 100})
    assert [(r["method"], r["top-1"], r["seeds"]) for r in compare.qrater_rows("tiny", "toy", 2, 2)] == [
        ("Q-Rater (2+2 probes per tensor)", 80.0, 1), ("Q-Rater (10+2 probes per tensor)", 90.0, 1)]
