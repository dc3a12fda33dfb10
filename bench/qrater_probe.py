"""Benchmark of Q-Rater's probes: the prefix-cached path (the target layer onward) vs a full forward pass.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, Algorithm 1 (appendix E): layer by layer, every probe of a
clipping / rounding / bias-correction setting evaluates the network on the objective subset.

Setting: notebook 05's default ResNet-20 / Fashion-MNIST profile (the committed checkpoint, 10
training images per class, layers 1-19, the grid search of its Table 1 with ``gamma_c`` in
{0.2, ..., 1.0}, ``gamma_n`` in {-0.5, 0, 0.5}, ``gamma_s`` in {0, 0.5}), W/A 4/4, ops
(1)+(2)+(3), one torch thread (the notebook's ``threads``).

(a) One layer-by-layer search, driven by the library's own steps (``freeze_before``,
    ``weight_quant``, ``act_quant``, ``bias_corr``, as :func:`lowbit.qrater.run`), in which every
    probe is evaluated twice in a row: the old path (``PrefixRunner.evaluate(use_cache=False)``, a
    full forward pass) and the new one (``evaluate()``: the frozen prefix's outputs on the
    objective subset, computed once per layer, are replayed and only the target layer and what
    follows it run). Both must give the identical (accuracy, loss), else the run stops. The new
    path's per-layer setup (the caching pass, the captures of the target's input and output, the
    steps' own work between probes) is timed apart and added to its total.
(b) :func:`lowbit.qrater.run` with the same options end to end (the new path only): its probes
    must equal (a)'s.
(c) A projection at the paper's resolutions (``gamma_c`` by 0.1, ``gamma_n`` by 0.1, ``gamma_s``
    by 0.25; sec. 5.4): probes per stage x the new path's measured seconds per probe of that stage
    and layer, plus the measured setup.

Times are wall clock and CPU seconds of this process (the CPU time is the steadier one on a loaded
machine). Prints a table with the ratio, writes bench/results/qrater_probe.json.

    .venv/bin/python bench/qrater_probe.py [--bits 4] [--ops clip,round,bias] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lowbit
from lowbit import qrater
from lowbit.data import as_tensors, load_dataset
from lowbit.models import load_pretrained
from lowbit.qrater.algorithm import calibration_pair, select_layers
from lowbit.qrater.state import PrefixRunner, QuantizedCopy, output_means

ROOT = Path(__file__).resolve().parents[1]
# notebook 05's default ResNet-20 profile (the Table 1 grid search)
PROFILE = dict(model="resnet20", dataset="fashion-mnist", per_class=10, layers=list(range(1, 20)),
               clip_grid=[0.2, 0.4, 0.6, 0.8, 1.0], gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.0, 0.5])
STAGES = ("w_clip", "w_round", "a_clip", "a_round", "bias")


def clocks() -> tuple[float, float]:
    """(wall, CPU seconds of this process)."""
    return time.perf_counter(), time.process_time()


@dataclass
class TimedState(qrater.QRaterState):
    """Algorithm 1's state whose every probe is also evaluated by a full forward pass, both timed."""

    timings: list = field(default_factory=list)

    def measure(self, config, layer, stage, phase, params):
        w0, c0 = clocks()
        old = self.runner.evaluate(use_cache=False)
        w1, c1 = clocks()
        target = super().measure(config, layer, stage, phase, params)  # the new path, logged as run() does
        w2, c2 = clocks()
        new = (self.probes[-1]["accuracy"], self.probes[-1]["loss"])
        if new != old:
            raise SystemExit(f"probe values differ at {layer} {stage} {params}: cached {new} vs full {old}")
        self.timings.append({"layer": layer, "stage": stage, "old_wall": w1 - w0, "old_cpu": c1 - c0,
                             "new_wall": w2 - w1, "new_cpu": c2 - c1})
        return target


def timed_search(model, calib, config: qrater.QRaterConfig):
    """(a): Algorithm 1 as :func:`lowbit.qrater.run` walks it, every probe timed on both paths."""
    images, labels = calibration_pair(model, calib)
    quant = QuantizedCopy(model, images)
    selected = select_layers(quant.order, config.layers)
    runner = PrefixRunner(quant.model, images, labels, config.batch_size)
    fp_means = output_means(PrefixRunner(quant.fp, images, labels, config.batch_size), selected)
    state = TimedState(quant, runner, fp_means)
    setup = {}
    for layer in selected:
        n0 = len(state.timings)
        w0, c0 = clocks()
        runner.freeze_before(layer, reuse=True)
        record = {"name": layer, "index": quant.order.index(layer), "order": config.order}
        if config.w_bits is not None:
            record.update(qrater.weight_quant(state, layer, config))
        if config.a_bits is not None:
            record.update(qrater.act_quant(state, layer, config))
        record.update(qrater.bias_corr(state, layer, config))
        state.layers.append(record)
        w1, c1 = clocks()
        probes = state.timings[n0:]
        setup[layer] = {"wall": w1 - w0 - sum(t["old_wall"] + t["new_wall"] for t in probes),
                        "cpu": c1 - c0 - sum(t["old_cpu"] + t["new_cpu"] for t in probes)}
        print(f"  {layer:16s} {len(probes):3d} probes  full {sum(t['old_cpu'] for t in probes):6.2f} s  "
              f"cached {sum(t['new_cpu'] for t in probes):6.2f} s (+ setup {setup[layer]['cpu']:5.2f} s) CPU",
              flush=True)
    runner.release()
    return state, setup


def per_layer_rows(timings, setup):
    rows = []
    for layer, s in setup.items():
        mine = [t for t in timings if t["layer"] == layer]
        row = {"layer": layer, "probes": len(mine), "setup_wall": s["wall"], "setup_cpu": s["cpu"]}
        for k in ("old_wall", "old_cpu", "new_wall", "new_cpu"):
            row[k] = sum(t[k] for t in mine)
        row["ratio_cpu"] = row["old_cpu"] / (row["new_cpu"] + row["setup_cpu"])
        row["stage_new_cpu_per_probe"] = {st: sum(t["new_cpu"] for t in mine if t["stage"] == st)
                                          / max(1, sum(t["stage"] == st for t in mine)) for st in STAGES}
        rows.append(row)
    return rows


def paper_probes_per_stage(config: qrater.QRaterConfig) -> dict:
    """Grid probes per stage of one layer at the paper's resolutions (sec. 5.4), for ``config``'s ops."""
    n_c, n_r = len(qrater.PAPER_CLIP_GRID), len(qrater.PAPER_GAMMA_N_GRID) * len(qrater.PAPER_GAMMA_S_GRID)
    clip, rnd = "clip" in config.ops, "round" in config.ops
    bias = 2 if config.bias_mode != "never" else 1
    return {"w_clip": n_c * clip, "w_round": n_r * rnd, "a_clip": n_c * clip, "a_round": n_r * rnd, "bias": bias}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4, help="W/A bit width")
    ap.add_argument("--ops", default="clip,round,bias", help="Q-Rater operations, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "qrater_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ops = tuple(o for o in args.ops.split(",") if o)
    config = qrater.QRaterConfig(args.bits, args.bits, search="grid", ops=ops, layers=PROFILE["layers"],
                                 clip_grid=PROFILE["clip_grid"], gamma_n_grid=PROFILE["gamma_n_grid"],
                                 gamma_s_grid=PROFILE["gamma_s_grid"], bo_steps=0)
    model = load_pretrained(PROFILE["model"], PROFILE["dataset"])
    calib = as_tensors(qrater.balanced_subset(load_dataset(PROFILE["dataset"], "train"), PROFILE["per_class"], 0))
    print(f"(a) {PROFILE['model']}/{PROFILE['dataset']} W/A {args.bits}/{args.bits} ops {ops}, "
          f"{len(calib[1])} objective images, {args.threads} thread(s): every probe on both paths")
    w0, c0 = clocks()
    state, setup = timed_search(model, calib, config)
    wall_a, cpu_a = clocks()[0] - w0, clocks()[1] - c0
    rows = per_layer_rows(state.timings, setup)

    print("(b) lowbit.qrater.run end to end (new path)")
    w0, c0 = clocks()
    res = qrater.run(model, calib=calib, config=config)
    run_wall, run_cpu = clocks()[0] - w0, clocks()[1] - c0
    same_run = res.probes == state.probes and res.layers == state.layers

    tot = {k: sum(r[k] for r in rows) for k in ("probes", "old_wall", "old_cpu", "new_wall", "new_cpu",
                                                 "setup_wall", "setup_cpu")}
    ratio_probe = tot["old_cpu"] / tot["new_cpu"]
    ratio_total = tot["old_cpu"] / (tot["new_cpu"] + tot["setup_cpu"])
    per_stage = paper_probes_per_stage(config)
    projection = sum(sum(n * r["stage_new_cpu_per_probe"][st] for st, n in per_stage.items()) + r["setup_cpu"]
                     for r in rows)
    paper_probes = len(rows) * sum(per_stage.values())

    result = {
        "setting": {"model": PROFILE["model"], "dataset": PROFILE["dataset"], "objective_images": len(calib[1]),
                    "w_bits": args.bits, "a_bits": args.bits, "ops": list(ops), "layers": PROFILE["layers"],
                    "clip_grid": PROFILE["clip_grid"], "gamma_n_grid": PROFILE["gamma_n_grid"],
                    "gamma_s_grid": PROFILE["gamma_s_grid"], "threads": args.threads,
                    "old": "PrefixRunner.evaluate(use_cache=False): a full forward pass every probe",
                    "new": "PrefixRunner.evaluate(): the frozen prefix replayed, the target layer onward run"},
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                    "python": platform.python_version(), "torch": torch.__version__},
        "identical_probe_values": True,  # (a) stops at the first probe that differs
        "run_equals_timed_search": same_run,
        "totals": dict(tot, ratio_cpu_per_probe=ratio_probe, ratio_cpu_with_setup=ratio_total,
                       search_wall=wall_a, search_cpu=cpu_a),
        "run_end_to_end": {"wall": run_wall, "cpu": run_cpu, "probes": len(res.probes)},
        "paper_resolution_projection": {"probes_per_layer": per_stage, "probes": paper_probes,
                                        "cpu_seconds": projection},
        "layers": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lowbit.results.atomic_write_text(out, json.dumps(result, indent=1))

    print("\n| layer | probes | full forward (ms/probe) | cached (ms/probe) | cached setup (ms) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        n = r["probes"]
        print(f"| {r['layer']} | {n} | {1e3 * r['old_cpu'] / n:.1f} | {1e3 * r['new_cpu'] / n:.1f} | "
              f"{1e3 * r['setup_cpu']:.0f} | {r['ratio_cpu']:.1f}x |")
    print(f"| all | {tot['probes']} | {tot['old_cpu']:.1f} s | {tot['new_cpu']:.1f} s | {tot['setup_cpu']:.1f} s | "
          f"{ratio_total:.1f}x |")
    print(f"CPU seconds; wall: full {tot['old_wall']:.1f} s, cached {tot['new_wall']:.1f} s "
          f"+ setup {tot['setup_wall']:.1f} s. Ratio per probe {ratio_probe:.1f}x, with the setup {ratio_total:.1f}x; "
          f"identical probe values: True")
    print(f"(b) qrater.run end to end: {run_wall:.1f} s wall, {run_cpu:.1f} s CPU, {len(res.probes)} probes, "
          f"equal to (a): {same_run}")
    print(f"(c) at the paper's resolutions: {paper_probes} probes ({per_stage} per layer), projected "
          f"{projection:.0f} CPU s with the cached path")
    print(f"wrote {out}")
    if not same_run:
        raise SystemExit("qrater.run's probes differ from the timed search's")


if __name__ == "__main__":
    main()
