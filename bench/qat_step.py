"""Benchmark: one QAT training step of ResNet-20, FP vs LSQ vs nuLSQ (fast) vs nuLSQ (reference).

One step = forward, backward and optimizer step (SGD with momentum for the weights, Adam for the
step sizes, as :func:`lowbit.lsq.train_qat`) of our ResNet-20 (random init, 1x28x28 inputs, batch
128) at W/A 4/4 with first and last layer at 8-bit LSQ: ``FP`` (no quantizer), ``LSQ`` (LSQ weights
and activations, Esser et al. ICLR 2020), ``nuLSQ fast`` (nuLSQ-WA, Gongyo et al. ACCV 2024, the
``torch.bucketize`` autograd Function) and ``nuLSQ reference`` (the same model with the unit-step
reference quantizers). All four run in this process on the same batch, interleaved round by round
(so that a load change hits all of them), median over rounds after warm-up; the fast and
reference nuLSQ models must give the same loss on the first step (same parameters). Prints seconds per step and the ratios against
the targets (LSQ <= 1.5x FP, nuLSQ fast <= 1.2x LSQ), writes bench/results/qat_step.json.

``--device cuda`` (a GPU machine; without one our ``ValueError``) also runs a copy of every model on the
GPU, interleaved with the CPU ones in the same rounds, and prints each model's CPU / CUDA ratio
(bench/results/qat_step_cuda.json): notebook 06's training step, CUDA vs CPU in one command.

    .venv/bin/python bench/qat_step.py [--rounds 7] [--batch 128] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lowbit
from lowbit.lsq import prepare_variant, step_parameters

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"LSQ / FP": 1.5, "nuLSQ fast / LSQ": 1.2}


def make_step(model):
    """A closure doing one training step of ``model`` on ``(x, y)``; returns the loss."""
    steps = {id(p) for p in step_parameters(model)}
    weights = [p for p in model.parameters() if id(p) not in steps]
    opt_w = torch.optim.SGD(weights, lr=1e-3, momentum=0.9)
    opt_s = torch.optim.Adam(step_parameters(model), lr=1e-5) if steps else None

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt_w.zero_grad(set_to_none=True)
        if opt_s:
            opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_w.step()
        if opt_s:
            opt_s.step()
        return float(loss.detach())
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: also time every model on the GPU")
    ap.add_argument("--out", default=None, help="default bench/results/qat_step.json (qat_step_cuda.json with cuda)")
    args = ap.parse_args(argv)
    device = lowbit.core.validation.resolve_device(args.device)  # our error when there is no GPU
    args.out = args.out or str(ROOT / "bench" / "results" / f"qat_step{'_cuda' if device.type == 'cuda' else ''}.json")
    lowbit.seed_all(0)
    fp = lowbit.models.build("resnet20").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    calib = torch.randn(256, 1, 28, 28, generator=g)
    models = {"FP": fp,
              "LSQ": prepare_variant(fp, "LSQ", 4, calib=calib).train(),
              "nuLSQ fast": prepare_variant(fp, "nuLSQ-WA", 4, calib=calib).train(),
              "nuLSQ reference": prepare_variant(fp, "nuLSQ-WA", 4, calib=calib, reference=True).train()}
    steps = {k: make_step(m) for k, m in models.items()}
    on_gpu = {}
    if device.type == "cuda":  # copies made before any CPU step: the same parameters on both
        gpu_models = {k: copy.deepcopy(m).to(device) for k, m in models.items()}
        on_gpu = {f"{k} (cuda)": make_step(m) for k, m in gpu_models.items()}
    x_dev, y_dev = x.to(device), y.to(device)
    times = {k: [] for k in (*steps, *on_gpu)}
    losses = {k: [] for k in times}
    for r in range(args.warmup + args.rounds):
        for k, step in (*steps.items(), *on_gpu.items()):
            gpu = k in on_gpu
            t0 = time.perf_counter()
            losses[k].append(step(x_dev, y_dev) if gpu else step(x, y))  # float(loss) waits for the GPU
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    sec_all = {k: float(np.median(v)) for k, v in times.items()}
    sec = {k: sec_all[k] for k in steps}
    ratios = {"LSQ / FP": sec["LSQ"] / sec["FP"], "nuLSQ fast / LSQ": sec["nuLSQ fast"] / sec["LSQ"],
              "nuLSQ fast / FP": sec["nuLSQ fast"] / sec["FP"],
              "nuLSQ reference / nuLSQ fast": sec["nuLSQ reference"] / sec["nuLSQ fast"]}
    # the first step sees identical parameters, so the forward passes must agree exactly; later steps
    # drift apart by rounding (the reference sums its step gradients in another order, and Adam
    # normalises those differences up)
    same_loss = losses["nuLSQ fast"][0] == losses["nuLSQ reference"][0]
    print(f"ResNet-20, batch {args.batch} of 1x28x28, W/A 4/4, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print("| model | s / step |\n|---|---|")
    for k, v in sec.items():
        print(f"| {k} | {v:.3f} |")
    print("\n| ratio | measured | target |\n|---|---|---|")
    for k, v in ratios.items():
        t = TARGETS.get(k)
        print(f"| {k} | {v:.2f}x | {f'<= {t}x ' + ('met' if v <= t else 'NOT met') if t else ''} |")
    print(f"nuLSQ fast and reference give the same first-step loss: {same_loss}")
    cuda_vs_cpu = {k: sec[k] / sec_all[f"{k} (cuda)"] for k in steps} if on_gpu else {}
    if on_gpu:
        print(f"\n| model | CPU s / step | CUDA s / step ({torch.cuda.get_device_name(device)}) | CPU / CUDA |\n|---|---|---|---|")
        for k, v in cuda_vs_cpu.items():
            print(f"| {k} | {sec[k]:.3f} | {sec_all[k + ' (cuda)']:.4f} | {v:.1f}x |")
    result = {"setting": {"model": "resnet20 (random init)", "input": f"{args.batch}x1x28x28", "bits": "W/A 4/4",
                          "first_last": "8-bit LSQ", "threads": torch.get_num_threads(), "rounds": args.rounds,
                          "warmup": args.warmup, "timing": "median over interleaved rounds, wall"},
              "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                          "python": platform.python_version(), "torch": torch.__version__},
              "seconds_per_step": sec, "ratios": ratios, "targets": TARGETS,
              "targets_met": {k: ratios[k] <= t for k, t in TARGETS.items()},
              "fast_equals_reference_loss": same_loss, "first_step_loss": {k: v[0] for k, v in losses.items()},
              "device": str(device), "cuda_seconds_per_step": {k: sec_all[f"{k} (cuda)"] for k in steps} if on_gpu else {},
              "cpu_over_cuda": cuda_vs_cpu}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lowbit.results.atomic_write_text(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not same_loss:
        raise SystemExit("nuLSQ fast and reference training steps disagree")


if __name__ == "__main__":
    main()
