"""Benchmark of STLQ's scale fit (``fit_stlq_scale``) on torchvision ResNet-18's STLQ layers.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(supplement), STLQ as SQ (Oh, Sim, Kim, Lee, ECCV 2022) sec. 2.1 and eqs. 5-6 describe it: each layer's
per-channel scale ``r * max|w|`` with the ``r`` of a 46-point grid minimising the STLQ MSE
(:func:`lowbit.alq.fit_stlq_scale`, what :func:`lowbit.alq.prepare_stlq` runs on every body layer).

On the 19 body layers of a random-init torchvision ResNet-18 (float32, every conv but the first; the
weights' values do not change the work), per element and per tile of 8, in this one run:

* ``backend="torch"``: each grid point's MSE by :func:`lowbit.alq.stlq_quantize`'s path (searchsorted
  words, ``torch.kthvalue`` selection);
* ``backend="kernel"``: the compiled one-pass words and squared errors of ``stlq.c`` and its quickselect
  top-k, the mean in torch: the same scales bit for bit (checked here, and in tests/test_alq.py).

Run: ``.venv/bin/python bench/stlq_fit.py`` (``make bench``); writes bench/results/stlq_fit.json. Seconds are
wall time on ``--threads`` torch threads (default 1, as notebook 07's runs use): compare the ratios, both
paths are timed in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit import imagenet
from lowbit.alq import quantizers
from lowbit.results import atomic_write_text
from lowbit.utils import timed

ROOT = Path(__file__).resolve().parents[1]


def body_weights():
    """The weights of ResNet-18's STLQ body layers (every conv but the stem; the fc is a last layer)."""
    torch.manual_seed(0)
    model = imagenet.build("resnet18")
    convs = [(n, m.weight.detach()) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=5, help="bits per word (default 5, the supplement's)")
    ap.add_argument("--ratio", type=float, default=0.15, help="select ratio (default 0.15)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stlq_fit.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = body_weights()
    rows = []
    print(f"{'tile':>5s} | {'layers':>6s} {'weights':>10s} | {'torch':>8s} {'kernel':>8s} {'ratio':>6s} same")
    for tile in (None, 8):
        t_ref = t_new = 0.0
        same = True
        for _, w in layers:
            s_ref, dt_ref = timed(lambda: quantizers.fit_stlq_scale_uncached(w, args.bits, args.ratio, tile,
                                                                             backend="torch"))
            s_new, dt_new = timed(lambda: quantizers.fit_stlq_scale_uncached(w, args.bits, args.ratio, tile,
                                                                             backend="kernel"))
            t_ref, t_new, same = t_ref + dt_ref, t_new + dt_new, same and bool(torch.equal(s_ref, s_new))
        row = {"tile": tile, "layers": len(layers), "weights": sum(w.numel() for _, w in layers),
               "torch_s": t_ref, "kernel_s": t_new, "ratio": t_ref / t_new, "same": same}
        rows.append(row)
        print(f"{str(tile):>5s} | {row['layers']:6d} {row['weights']:10,d} | {t_ref:7.2f}s {t_new:7.2f}s "
              f"{row['ratio']:5.1f}x {same!s}", flush=True)
    atomic_write_text(Path(args.out), json.dumps({"bits": args.bits, "select_ratio": args.ratio,
                                                  "threads": args.threads, "grid": len(quantizers.SCALE_GRID),
                                                  "rows": rows}, indent=1) + "\n")
    if not all(r["same"] for r in rows):
        raise SystemExit("the kernel and torch scale fits differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
