"""lowbit.processes and the parallel Q-Rater runs built on it: a job computes the same record in a
worker process as in this one, lands in this process's output folder, and bad input is refused."""
import json

import pytest
import torch

from lowbit import paths, processes, qrater
from lowbit.qrater import experiments as ex

# notebook 05's smoke LeNet-5/MNIST setting: one searched layer, tiny grids (seconds per run)
SMOKE = dict(model="lenet5", dataset="mnist", per_class=3, test_n=200, layers=[4], clip_grid=[0.5, 1.0],
             gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.5], bo_steps=1)
JOBS = [(SMOKE, 3, "(1)+(2)+(3)", "grid", 0, False, {}), (SMOKE, 3, "(2) clip", "grid", 0, False, {}),
        (SMOKE, 3, "(1) round", "bo", 0, False, {"targets": ["weight"]}), (SMOKE, 3, "(2) clip", "grid", 0, False, {})]


def _without_time(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "seconds"}


def test_workers_give_the_same_records_in_this_processs_output_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("FORCE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for workers in (1, 2):
            folder = tmp_path / f"w{workers}"
            paths.set_run_output(folder)  # the state a worker must carry: no environment variable says it
            results[workers] = ex.cached_experiments(JOBS, workers)
            written = sorted((folder / "derived").glob("qrater_run-*.json"))
            assert len(written) == 3  # the repeated job ran once, in the output folder, not data/derived
            assert [json.loads(p.read_text())["config"]["ops"] for p in written]
    finally:
        paths.set_run_output(None)
        torch.set_num_threads(threads)
    one, two = ([_without_time(r) for r in results[w]] for w in (1, 2))
    assert one == two  # bit for bit: accuracies, probe logs, chosen settings
    assert one[1] == one[3] and len(one[0]["probes"]) > len(one[1]["probes"]) > 0
    assert [p["phase"] for p in one[2]["probes"]].count("bo") == 1  # the BO job ran its BO probe


def test_cached_jobs_are_read_not_rerun(out_dir, monkeypatch):
    calls = []

    def fake_experiment(**config):
        calls.append(config["ops"])
        return {"test_accuracy": 1.0, "layers": [], "config": config}

    monkeypatch.setattr(ex.runs, "experiment", fake_experiment)
    first = ex.cached_experiments(JOBS[:2], workers=1)
    again = ex.cached_experiments(JOBS[:2], workers=2)  # every record cached: no worker is started
    assert again == first and len(calls) == 2


def _double(x):
    return 2 * x


def _fail(x):
    raise ValueError(f"job {x} failed")


def test_map_in_processes_keeps_job_order_and_raises_a_jobs_error():
    assert processes.map_in_processes(_double, [(i,) for i in range(5)], workers=2) == [0, 2, 4, 6, 8]
    assert processes.map_in_processes(_double, [(3,)], workers=1) == [6]
    with pytest.raises(ValueError, match="job 1 failed"):
        processes.map_in_processes(_fail, [(1,), (2,)], workers=2)


@pytest.mark.parametrize("workers, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError),
                                            ("2", TypeError)])
def test_bad_worker_counts_are_refused(workers, error):
    with pytest.raises(error, match="workers"):
        processes.map_in_processes(_double, [(1,)], workers=workers)
    with pytest.raises(error, match="workers"):
        qrater.table1_runs(SMOKE, [3], ["MSE"], workers=workers)


def _loader_workers(_):
    from lowbit import imagenet

    return imagenet.loader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), 1).num_workers


def test_a_worker_loads_data_in_itself_not_in_nested_dataloader_processes():
    # a worker already has its core: nested DataLoader processes (spawned, each importing torch) made
    # notebook 05's paper path 5x slower
    assert processes.map_in_processes(_loader_workers, [(0,), (1,)], workers=2) == [0, 0]
    assert _loader_workers(0) >= 1  # this process keeps its default
