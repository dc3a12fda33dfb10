"""Benchmark of SQ's final optimisation (per-layer scale and rounding refinement) on ResNet-18's layer shapes.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 4.1 "final optimization": each layer's
per-channel scales, then each weight's up/down choice between its two QPS neighbours, re-fitted to the
layer's output reconstruction error ``q^T G q - 2 q^T C w`` (:mod:`lowbit.sq.refine`).

For every distinct (output channels C, inputs K) shape of torchvision ResNet-18's convolutions (layer3 and
layer4, where the cost is), on a random problem built as ``refine_layer`` builds it (Gram matrices of
correlated inputs, float64), in this one run:

* ``refine_scales_reference`` (one full ``q @ G`` product for each of the 51 scale multipliers) vs
  ``refine_scales`` (codes walked in increasing multiplier order, ``z @ G`` updated by the sparse code
  changes): same scales and losses, bit for bit (checked here, and in tests/test_ptq.py);
* ``refine_rounding_reference`` (a rank-1 update of all of ``q @ G`` per changed input) vs
  ``refine_rounding`` (block-local rank-1 updates, one ``(C, block) @ (block, K)`` product per block):
  same rows, bit for bit.

Run: ``.venv/bin/python bench/sq_refine.py`` (``make bench``); writes bench/results/sq_refine.json.
Seconds are wall time on this machine's threads (``--threads``, default 2): compare the ratios, both paths
are timed in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowbit.results import atomic_write_text
from lowbit.sq import refine
from lowbit.sq.quantizers import qps
from lowbit.utils import timed

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(256, 1152), (256, 2304), (512, 2304), (512, 4608)]  # ResNet-18 layer3/layer4 convs as (C, K)


def problem(c: int, k: int, seed: int):
    """``(w, G, C w)`` of one layer: correlated float64 inputs, rows of random per-channel magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * k, k, generator=gen, dtype=torch.float64)
    x = x + 0.3 * torch.roll(x, 1, dims=1)  # neighbouring inputs correlate, as im2col rows of a conv do
    xq = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g, cmat = xq.T @ xq / len(x), xq.T @ x / len(x)
    w = torch.randn(c, k, generator=gen, dtype=torch.float64) * (0.5 + torch.rand(c, 1, generator=gen, dtype=torch.float64))
    return w, g, w @ cmat.T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2, help="weight bits of the uniform QPS refined (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sq_refine.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    points = qps("uniform", args.bits)
    rows = []
    print(f"{'C x K':>11s} | {'scales ref':>10s} {'fast':>7s} {'ratio':>6s} same | {'rounding ref':>12s} {'fast':>7s} "
          f"{'ratio':>6s} same")
    for i, (c, k) in enumerate(SHAPES):
        w, g, cw = problem(c, k, seed=i)
        scale = w.abs().amax(1) / max(points) * 0.8
        (s_ref, l_ref), t_sref = timed(lambda: refine.refine_scales_reference(w, points, scale, g, cw))
        (s_new, l_new), t_snew = timed(lambda: refine.refine_scales(w, points, scale, g, cw))
        q_ref, t_rref = timed(lambda: refine.refine_rounding_reference(w, points, s_ref, g, cw))
        q_new, t_rnew = timed(lambda: refine.refine_rounding(w, points, s_ref, g, cw))
        row = {"C": c, "K": k, "scales_reference_s": t_sref, "scales_fast_s": t_snew, "scales_ratio": t_sref / t_snew,
               "scales_same": bool(torch.equal(s_ref, s_new) and torch.equal(l_ref, l_new)),
               "rounding_reference_s": t_rref, "rounding_fast_s": t_rnew, "rounding_ratio": t_rref / t_rnew,
               "rounding_same": bool(torch.equal(q_ref, q_new))}
        rows.append(row)
        print(f"{c:4d} x {k:4d} | {t_sref:9.2f}s {t_snew:6.2f}s {row['scales_ratio']:5.1f}x {row['scales_same']!s:4s} | "
              f"{t_rref:11.2f}s {t_rnew:6.2f}s {row['rounding_ratio']:5.1f}x {row['rounding_same']!s:4s}", flush=True)
    total_ref = sum(r["scales_reference_s"] + r["rounding_reference_s"] for r in rows)
    total_new = sum(r["scales_fast_s"] + r["rounding_fast_s"] for r in rows)
    print(f"all shapes: reference {total_ref:.1f} s, fast {total_new:.1f} s, {total_ref / total_new:.1f}x")
    atomic_write_text(Path(args.out), json.dumps({"bits": args.bits, "threads": args.threads, "rows": rows,
                                                  "total_reference_s": total_ref, "total_fast_s": total_new},
                                                 indent=1) + "\n")
    if not all(r["scales_same"] and r["rounding_same"] for r in rows):
        raise SystemExit("the fast and reference refinements differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
