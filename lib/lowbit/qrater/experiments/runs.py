"""What notebook 05 runs: Q-Rater's tables, figure data and claims on our CPU-scale models, cached.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868: Table 1 (clipping baselines vs Q-Rater operations), Table 2
(grid vs Bayesian optimisation), the incremental curves of Figs. 6-8 and the bias-correction
map of Fig. 20. One run is "quantize the committed FP checkpoint with one set of options,
objective on a class-balanced training subset, test top-1" (:func:`experiment`), cached through
:func:`lowbit.results.cached` (``data/derived/qrater_run-*.json``, curves ``qrater_curve-*.json``).

A notebook *profile* ``c`` is a dict with ``model``, ``dataset``, ``per_class``, ``test_n``,
``layers``, ``clip_grid``, ``gamma_n_grid``, ``gamma_s_grid``, ``bo_steps`` and optionally
``curve_bits`` (bit widths whose runs record the full curve) or ``curve_n``/``curve_counts``
(curves replayed later on the first ``curve_n`` test images at those layer counts).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...data import as_tensors, head, load_dataset, per_class_subset
from ...core.validation import device_key
from ...evaluate import accuracy, checkpoint_accuracy
from ...models import imagenet_key, load_pretrained
from ...processes import check_workers, map_in_processes
from ...results import cached, config_key, force_requested, load_result
from ..algorithm import incremental_accuracy, run
from ..config import OPS, TARGETS

# Table 1 columns: clipping baselines with RTN, and Q-Rater operations (1) round, (2) clip, (3) bias
TABLE1_VARIANTS = {
    "MSE": {"ops": (), "clip_rule": "mse"},
    "ACIQ": {"ops": (), "clip_rule": "aciq"},
    "KL": {"ops": (), "clip_rule": "kl"},
    "(1) round": {"ops": ("round",)},
    "(2) clip": {"ops": ("clip",)},
    "(3) bias": {"ops": ("bias",)},
    "(1)+(2)": {"ops": ("clip", "round")},
    "(1)+(2)+(3)": {"ops": ("clip", "round", "bias")},
}
BASELINES = ("MSE", "ACIQ", "KL")
# the paper's ResNet-18/ImageNet rows, quoted in the paper profile's table notes
PAPER_RESNET18_TABLE1 = ("Paper ResNet-18/ImageNet (FP 69.69), MSE / ACIQ / KL / (1) / (2) / (3) / (1)+(2) / "
                         "(1)+(2)+(3): 8/8 69.25 / 68.15 / 68.39 / 69.27 / 69.35 / 69.50 / 69.33 / 69.43; 6/6 66.75 / "
                         "59.78 / 65.64 / 67.34 / 67.91 / 67.42 / 67.95 / 68.46; 4/4 32.16 / 2.10 / 11.27 / 45.18 / "
                         "52.59 / 51.59 / 54.87 / 59.17.")
PAPER_RESNET18_TABLE2 = ("Paper ResNet-18/ImageNet grid vs BO: 8/8 69.43 vs 69.67, 6/6 68.46 vs 68.60, "
                         "4/4 59.17 vs 60.77.")
COMBINED = "(1)+(2)+(3)"


def balanced_subset(dataset, per_class: int = 20, seed: int = 0):
    """Q-Rater's objective subset: ``per_class`` seeded random images of every class (the paper's 20
    per class, appendix D), :func:`lowbit.data.per_class_subset` (API)."""
    return per_class_subset(dataset, per_class, seed)


def first_test_images(dataset: str, test_n: int | None):
    """The test split of ``dataset``, cut to its first ``test_n`` images (all if ``None``)."""
    return head(load_dataset(dataset, "test"), test_n)


def experiment(model_name: str, dataset: str, w_bits: int | None, a_bits: int | None, *, per_class: int = 20,
               test_n: int | None = None, curve: bool = False, seed: int = 0, **run_kwargs) -> dict:
    """One Q-Rater (or baseline) run on a committed FP checkpoint, as a JSON-able record (API).

    Loads ``models.load_pretrained(model_name, dataset)``, draws ``per_class`` training images
    per class as the fixed objective subset (:func:`balanced_subset`), calls :func:`run` with
    ``run_kwargs`` and measures test accuracy (on the first ``test_n`` test images, all if
    ``None``) of the FP and the quantized model; ``curve=True`` adds the test accuracy after
    each incrementally quantized layer (:func:`incremental_accuracy`, Figs. 6-8).
    """
    t0 = time.time()
    model = load_pretrained(model_name, dataset)
    calib = as_tensors(balanced_subset(load_dataset(dataset, "train"), per_class, seed))  # in memory: every probe
    test = first_test_images(dataset, test_n)
    res = run(model, w_bits, a_bits, calib, seed=seed, **run_kwargs)
    out = {
        "model": model_name, "dataset": dataset, "config": res.config, "layers": res.layers,
        "probes": res.probes, "fp_calib": res.fp_objective, "test_n": len(test),
        "fp_test_accuracy": checkpoint_accuracy(model, model_name, dataset, test),
        "test_accuracy": accuracy(res.model, test),
        "calib_accuracy": res.layers[-1]["calib_accuracy"] if res.layers else res.fp_objective["accuracy"],
    }
    if curve:
        out["curve"] = incremental_accuracy(model, res.layers, test, example=calib[0][:2])
    out["seconds"] = time.time() - t0
    return out


def experiment_curve(model_name: str, dataset: str, layers: list[dict], *, test_n: int | None = None,
                     counts=None) -> dict:
    """The Figs. 6-8 curve of a finished :func:`experiment` from its ``layers`` records alone.

    Replays the recorded settings with :func:`apply` (no search is re-run), so a cached run
    recorded without ``curve=True`` gets its curve later, on the first ``test_n`` test images
    and at the layer counts ``counts`` (all of ``0..len(layers)`` if ``None``). Returns
    ``{"counts": [...], "accuracy": [...], "test_n": n, "seconds": s}``.
    """
    t0 = time.time()
    model = load_pretrained(model_name, dataset)
    test = first_test_images(dataset, test_n)
    counts = list(range(len(layers) + 1)) if counts is None else [int(k) for k in counts]
    acc = incremental_accuracy(model, layers, test, example=as_tensors(head(test, 2))[0], counts=counts)
    return {"counts": counts, "accuracy": acc, "test_n": len(test), "seconds": time.time() - t0}


def run_config(c: dict, bits: int, variant: str | None = None, search: str = "grid", seed: int = 0,
               **extra) -> dict:
    """The keyword arguments of :func:`experiment` (and the cache key) for profile ``c`` at W/A
    ``bits``/``bits``, Table 1 column ``variant`` (``None``: Q-Rater's defaults) and ``extra``
    options of :func:`run`; ``c["device"]`` other than the CPU is part of it."""
    if variant is not None and variant not in TABLE1_VARIANTS:
        raise ValueError(f"unknown Table 1 variant {variant!r}: use one of {list(TABLE1_VARIANTS)}")
    kw = dict(TABLE1_VARIANTS[variant]) if variant else {}
    kw.update(extra)
    return dict(model_name=c["model"], dataset=c["dataset"], w_bits=bits, a_bits=bits, search=search,
                per_class=c["per_class"], test_n=c["test_n"], curve=bits in c.get("curve_bits", []), seed=seed,
                layers=c["layers"], clip_grid=c["clip_grid"], gamma_n_grid=c["gamma_n_grid"],
                gamma_s_grid=c["gamma_s_grid"], bo_steps=c["bo_steps"], **kw,
                **device_key(c.get("device")))


def cached_experiment(c: dict, bits: int, variant: str | None = None, search: str = "grid", *, seed: int = 0,
                      with_curve: bool = False, **extra) -> dict:
    """One cached :func:`experiment` of profile ``c`` (see :func:`run_config`).

    A profile with ``curve_bits`` records its curve in the run itself; for one with ``curve_n``
    (``curve_counts``), ``with_curve`` replays the recorded settings on the first ``curve_n``
    test images (:func:`experiment_curve`, cached under the run's key) and adds ``curve``,
    ``curve_counts`` and ``curve_n`` to the record.
    """
    config = run_config(c, bits, variant, search, seed, **extra)
    key = _run_key(c, config)
    r = cached("qrater_run", key, lambda: experiment(**config))
    if with_curve and "curve" not in r and c.get("curve_n"):
        cconf = dict(run=config_key(key), test_n=c["curve_n"], counts=c["curve_counts"])
        cur = cached("qrater_curve", cconf, lambda: experiment_curve(
            c["model"], c["dataset"], r["layers"], test_n=c["curve_n"], counts=c["curve_counts"]))
        r = dict(r, curve=cur["accuracy"], curve_counts=cur["counts"], curve_n=cur["test_n"])
    return r


def _run_key(c: dict, config: dict) -> dict:
    """The ``qrater_run`` cache key of the :func:`run_config` ``config`` of profile ``c``."""
    return dict(config, **imagenet_key(c["model"], c["dataset"]))


def _job_run(c: dict, bits: int, variant, search: str, seed: int, with_curve: bool, extra: dict) -> dict:
    """One job of :func:`cached_experiments` (module level: it runs in a worker process)."""
    return cached_experiment(c, bits, variant, search, seed=seed, with_curve=with_curve, **extra)


def _probe_estimate(config: dict) -> int:
    """About how many objective-image forward passes a run costs per layer (to start the longest first)."""
    ops = config.get("ops", OPS)
    targets = len(config.get("targets", TARGETS))
    order = config.get("order", 2)
    n_round = len(config["gamma_n_grid"]) * (len(config["gamma_s_grid"]) if order == 2 else 1)
    searches = targets * (("clip" in ops) + ("round" in ops))
    probes = targets * (len(config["clip_grid"]) * ("clip" in ops) + n_round * ("round" in ops)) + 2 * ("bias" in ops)
    if config["search"] == "bo":
        probes += config["bo_steps"] * searches
    return config["per_class"] * (probes + 1)


def cached_experiments(jobs, workers: int = 1, desc: str | None = None) -> list[dict]:
    """:func:`cached_experiment` of every job, the uncached ones in ``workers`` processes (API).

    A job is ``(c, bits, variant, search, seed, with_curve, extra)`` (``extra``: a dict of
    :func:`run` options). Runs with a cached record (and curve, where asked) are read here; the
    others go to :func:`lowbit.processes.map_in_processes`, the costliest first. A worker computes
    the same record as this process would (same seed, same thread count), so ``workers`` changes the
    wall time only. ``FORCE=1`` recomputes every job, once. Returns the records in job order.
    """
    check_workers(workers)
    jobs = [tuple(j) for j in jobs]
    force = force_requested()

    def missing(job):
        c, bits, variant, search, seed, with_curve, extra = job
        key = _run_key(c, run_config(c, bits, variant, search, seed, **extra))
        rec = load_result("qrater_run", key)
        if force or rec is None:
            return True
        return bool(with_curve and "curve" not in rec and c.get("curve_n") and load_result(
            "qrater_curve", dict(run=config_key(key), test_n=c["curve_n"], counts=c["curve_counts"])) is None)

    def signature(job):
        c, bits, variant, search, seed, with_curve, extra = job
        return config_key({"c": c, "run": run_config(c, bits, variant, search, seed, **extra), "curve": with_curve})

    first = {}  # one computation per distinct job
    for i, job in enumerate(jobs):
        first.setdefault(signature(job), i)
    todo = sorted((i for i in first.values() if missing(jobs[i])),
                  key=lambda i: -_probe_estimate(run_config(*jobs[i][:5], **jobs[i][6])))
    done = dict(zip(todo, map_in_processes(_job_run, [jobs[i] for i in todo], workers, desc)))
    out = []
    for job in jobs:
        i = first[signature(job)]
        out.append(done[i] if i in done else _job_run(*job))
    return out


def table1_runs(c: dict, bits_list, variants=tuple(TABLE1_VARIANTS), seed: int = 0, workers: int = 1,
                **extra) -> dict:
    """``{(bits, variant): record}`` of Table 1 (cached runs, grid search; ``extra`` options of
    :func:`run`, e.g. ``objective="loss"``; uncached runs in ``workers`` processes,
    :func:`cached_experiments`)."""
    keys = [(bits, v) for bits in bits_list for v in variants]
    recs = cached_experiments([(c, bits, v, "grid", seed, False, extra) for bits, v in keys], workers,
                              desc=f"Q-Rater Table 1 runs {c['model']}/{c['dataset']}")
    return dict(zip(keys, recs))


def probe_ties(record: dict) -> dict:
    """How a run's searches were decided: over its searches (the probes of one ``(layer, stage)``,
    two or more of them), how many have the top calibration accuracy reached by two or more probes
    (``accuracy_ties``: accuracy alone cannot tell them apart) and how many have their top *target*
    (the run's objective, :meth:`QRaterConfig.target`) reached by two or more (``target_ties``: the
    search is decided by probe order). Under ``objective="accuracy"`` a search in ``accuracy_ties``
    but not ``target_ties`` was decided by the cross-entropy tie-break alone."""
    groups: dict = {}
    for p in record["probes"]:
        groups.setdefault((p["layer"], p["stage"]), []).append(p)
    searches = [g for g in groups.values() if len(g) > 1]

    def tied(g, key):
        top = max(p[key] for p in g)
        return sum(p[key] == top for p in g) > 1

    return {"searches": len(searches), "probes": sum(len(g) for g in searches),
            "accuracy_ties": sum(tied(g, "accuracy") for g in searches),
            "target_ties": sum(tied(g, "target") for g in searches)}


def _figure_jobs(c: dict, bits: int, seed: int) -> dict:
    """``{figure: {curve name: job}}`` of Figs. 6-8 (jobs of :func:`cached_experiments`)."""
    def job(variant, **extra):
        return (c, bits, variant, "grid", seed, True, extra)

    return {
        # Fig. 6 / 11: MSE clipping, rounding on W, A, both; 1st vs 2nd order
        6: {"W RTN / A RTN": job("MSE"), "W Q-Rater / A RTN": job("(1) round", targets=["weight"]),
            "W RTN / A Q-Rater": job("(1) round", targets=["activation"]), "W/A Q-Rater (2nd order)": job("(1) round"),
            "W/A Q-Rater (1st order)": job("(1) round", order=1)},
        # Fig. 7: RTN with MSE / ACIQ / KL / Q-Rater clipping
        7: {name: job(key) for name, key in [("MSE", "MSE"), ("ACIQ", "ACIQ"), ("KL", "KL"), ("Q-Rater clip", "(2) clip")]},
        # Fig. 8 / Figs. 18-19: bias correction never / always / selective (RTN, MSE clipping)
        8: {"never": job("MSE"), "always": job("MSE", bias_mode="always"), "selective (Q-Rater)": job("(3) bias")},
    }


def figure_runs(c: dict, bits: int, seed: int = 0, workers: int = 1, bo_steps: int | None = None) -> dict:
    """The runs of Figs. 6, 7 and 8 at W/A ``bits``/``bits`` as ``{6: {curve: record}, 7: .., 8: ..}``
    (:func:`figure6_runs` ... :func:`figure8_runs`), and with ``bo_steps`` also ``"bo"``: Table 2's
    (1)+(2)+(3) run with that many BO probes per search; the uncached ones all in one pool of
    ``workers`` processes (:func:`cached_experiments`)."""
    figs = _figure_jobs(c, bits, seed)
    jobs = [j for fig in figs.values() for j in fig.values()]
    if bo_steps is not None:
        jobs.append((dict(c, bo_steps=bo_steps), bits, COMBINED, "bo", seed, False, {}))
    recs = iter(cached_experiments(jobs, workers, desc=f"Q-Rater figure runs {c['model']}/{c['dataset']}"))
    out = {f: {name: next(recs) for name in fig} for f, fig in figs.items()}
    if bo_steps is not None:
        out["bo"] = next(recs)
    return out


def figure6_runs(c: dict, bits: int, seed: int = 0, workers: int = 1) -> dict:
    """Fig. 6 / 11: incremental curves with MSE clipping, rounding on W, A, both; 1st vs 2nd order."""
    jobs = _figure_jobs(c, bits, seed)[6]
    return dict(zip(jobs, cached_experiments(list(jobs.values()), workers)))


def figure7_runs(c: dict, bits: int, seed: int = 0, workers: int = 1) -> dict:
    """Fig. 7: incremental curves with RTN and MSE / ACIQ / KL / Q-Rater clipping."""
    jobs = _figure_jobs(c, bits, seed)[7]
    return dict(zip(jobs, cached_experiments(list(jobs.values()), workers)))


def figure8_runs(c: dict, bits: int, seed: int = 0, workers: int = 1) -> dict:
    """Fig. 8 / Figs. 18-19: bias correction never / always / selective (RTN, MSE clipping)."""
    jobs = _figure_jobs(c, bits, seed)[8]
    return dict(zip(jobs, cached_experiments(list(jobs.values()), workers)))


def sweep(record: dict, stage: str, key: str, fixed: dict | None = None) -> tuple[list, list, str]:
    """The last layer's grid probes of ``stage`` (e.g. ``"w_round"``) along parameter ``key``,
    the other parameters at ``fixed``: ``(values, calibration accuracies, layer name)``, sorted."""
    last = record["layers"][-1]["name"]
    pts = [p for p in record["probes"] if p["layer"] == last and p["stage"] == stage and p["phase"] == "grid"
           and all(p["params"].get(k) == v for k, v in (fixed or {}).items())]
    pts.sort(key=lambda p: p["params"][key])
    return [p["params"][key] for p in pts], [p["accuracy"] for p in pts], last


def table1_rows(runs: dict, bits_list, variants) -> list[dict]:
    """Table 1: one row per W/A width, the FP accuracy and each variant's test accuracy."""
    rows = []
    for bits in bits_list:
        row = {"W/A": f"{bits}/{bits}", "FP": runs[bits, variants[0]]["fp_test_accuracy"]}
        row.update({v: runs[bits, v]["test_accuracy"] for v in variants})
        rows.append(row)
    return rows


SEARCHED = ("(1) round", "(2) clip", "(3) bias", "(1)+(2)", "(1)+(2)+(3)")  # the Table 1 columns that probe
# the coarse-grid ResNet-20/Fashion-MNIST Table 1 setting (5 clipping and 6 rounding probes per tensor, objective
# on 10 training images per class, first 2,000 test images): notebook 05's default until it moved to the paper's
# grids (qrater.search_grids("paper")); notebook 08's objective study is keyed on exactly this
TABLE1_RESNET20 = dict(model="resnet20", dataset="fashion-mnist", bits=[5, 4, 3], per_class=10, test_n=2000,
                       layers=list(range(1, 20)), clip_grid=[0.2, 0.4, 0.6, 0.8, 1.0], gamma_n_grid=[-0.5, 0.0, 0.5],
                       gamma_s_grid=[0.0, 0.5], bo_steps=0)


def objective_rows(c: dict, bits_list, studies, seed: int = 0) -> list[dict]:
    """The objective study: for each ``(objective, per_class, columns)`` in ``studies``, the Table 1
    runs of profile ``c`` with that objective on ``per_class`` training images per class (cached
    runs, computed if missing), one row per W/A and column with its test top-1, how its searches
    were decided (:func:`probe_ties`) and the best clipping baseline of ``c``'s own Table 1 runs."""
    rows = []
    for objective, per_class, columns in studies:
        extra = {} if objective == "accuracy" else {"objective": objective}
        runs = table1_runs(dict(c, per_class=per_class), bits_list, columns, seed=seed, **extra)
        for bits in bits_list:
            base = table1_runs(c, [bits], BASELINES, seed=seed)
            best = max(BASELINES, key=lambda v: base[bits, v]["test_accuracy"])
            for v in columns:
                r, ties = runs[bits, v], probe_ties(runs[bits, v])
                rows.append({"objective": objective, "per class": per_class, "W/A": f"{bits}/{bits}", "column": v,
                             "test top-1": r["test_accuracy"], "calib top-1": r["calib_accuracy"],
                             "searches": ties["searches"], "accuracy ties": ties["accuracy_ties"],
                             "target ties": ties["target_ties"], "best baseline": best,
                             "baseline top-1": base[bits, best]["test_accuracy"]})
    return rows


def table2_rows(runs: dict, bo_runs: dict, bits_list) -> list[dict]:
    """Table 2: (1)+(2)+(3) by grid search (``runs[bits, COMBINED]``) vs with BO (``bo_runs[bits]``)."""
    out = []
    for bits in bits_list:
        g, b = runs[bits, COMBINED], bo_runs[bits]
        out.append({"W/A": f"{bits}/{bits}", "FP": g["fp_test_accuracy"], "MSE": runs[bits, "MSE"]["test_accuracy"],
                    "Q-Rater grid": g["test_accuracy"], "Q-Rater BO": b["test_accuracy"],
                    "grid calib": g["calib_accuracy"], "BO calib": b["calib_accuracy"],
                    "grid probes": len(g["probes"]), "BO probes": len(b["probes"])})
    return out


def bias_selection(rows: list[tuple[str, dict]]) -> tuple[list[str], np.ndarray, dict]:
    """Fig. 20 data: ``(layer names, on/off matrix (row per run), {row name: layers corrected})``
    for ``rows = [(row name, run record), ...]`` of runs over the same layers."""
    names = [rec["name"] for rec in rows[0][1]["layers"]]
    for n, r in rows:
        if [rec["name"] for rec in r["layers"]] != names:
            raise ValueError(f"run {n!r} quantized other layers than {rows[0][0]!r}: Fig. 20 needs the same layers")
    onoff = np.array([[rec["bias_corrected"] for rec in r["layers"]] for _, r in rows], dtype=float)
    return names, onoff, {n: int(onoff[i].sum()) for i, (n, _) in enumerate(rows)}


def table1_claims(runs: dict, bits_list, model: str) -> list[tuple[str, bool, str]]:
    """The paper's Table 1 claims on ``runs[(bits, variant)]``: ``[(claim, holds, numbers), ...]``."""
    def acc(bits, v):
        return runs[bits, v]["test_accuracy"]

    out = []
    for bits in bits_list:
        for v in ["(1) round", "(2) clip", "(3) bias"]:
            out.append((f"{model} {bits}/{bits}: Q-Rater {v} beats MSE+RTN", acc(bits, v) > acc(bits, "MSE"),
                        f"{acc(bits, v):.2f} vs {acc(bits, 'MSE'):.2f}"))
        best_base = max(acc(bits, b) for b in BASELINES)
        out.append((f"{model} {bits}/{bits}: (1)+(2)+(3) beats the best baseline",
                    acc(bits, COMBINED) > best_base, f"{acc(bits, COMBINED):.2f} vs {best_base:.2f}"))
    gains = {bits: acc(bits, COMBINED) - acc(bits, "MSE") for bits in bits_list}
    desc = sorted(gains, reverse=True)
    out.append((f"{model}: gain of (1)+(2)+(3) over MSE grows as bits decrease",
                all(gains[a] <= gains[b] for a, b in zip(desc, desc[1:])),
                ", ".join(f"{b}/{b}: {g:+.2f}" for b, g in gains.items())))
    return out


def _bo_claim(model: str, bits: int, grid: dict, bo: dict) -> tuple[str, bool, str]:
    return (f"{model} {bits}/{bits}: BO >= grid for (1)+(2)+(3)", bo["test_accuracy"] >= grid["test_accuracy"],
            f"{bo['test_accuracy']:.2f} vs {grid['test_accuracy']:.2f}")


def bo_claims(runs: dict, bo_runs: dict, bits_list, model: str) -> list[tuple[str, bool, str]]:
    """Table 2's claim (BO at least as good as the grid) at each width."""
    return [_bo_claim(model, bits, runs[bits, COMBINED], bo_runs[bits]) for bits in bits_list]


def figure_claims(model: str, bits: int, r6: dict, r8: dict, grid: dict | None = None, bo: dict | None = None
                  ) -> list[tuple[str, bool, str]]:
    """The claims of Figs. 6, 8, 11 (and Table 2 when ``grid``/``bo`` records are given) on the
    runs of :func:`figure6_runs` (``r6``) and :func:`figure8_runs` (``r8``)."""
    out = [] if grid is None else [_bo_claim(model, bits, grid, bo)]
    sel = r8["selective (Q-Rater)"]["test_accuracy"]
    out.append((f"{model} {bits}/{bits}: selective bias correction is at least as good as always and never",
                sel >= max(r8["always"]["test_accuracy"], r8["never"]["test_accuracy"]),
                ", ".join(f"{k} {r['test_accuracy']:.2f}" for k, r in r8.items())))
    both, first = r6["W/A Q-Rater (2nd order)"]["test_accuracy"], r6["W/A Q-Rater (1st order)"]["test_accuracy"]
    out.append((f"{model} {bits}/{bits}: W/A Q-Rater rounding (2nd order) beats the 1st order", both > first,
                f"{both:.2f} vs {first:.2f}"))
    w_only, a_only = r6["W Q-Rater / A RTN"]["test_accuracy"], r6["W RTN / A Q-Rater"]["test_accuracy"]
    out.append((f"{model} {bits}/{bits}: rounding on W and A beats W only and A only", both > max(w_only, a_only),
                f"{both:.2f} vs W {w_only:.2f}, A {a_only:.2f}"))
    return out


def claim_lines(claims: list[tuple[str, bool, str]]) -> str:
    """The claims as printed in the notebook: ``True ``/``False`` then the claim and its numbers."""
    return "\n".join(f"{'True ' if ok else 'False'}  {text}: {numbers}" for text, ok, numbers in claims)
