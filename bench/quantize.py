"""Benchmark: the shared quantizer (nearest point of a QPS times a scale, SQ eq. 3) vs its reference.

``lowbit.core.points.quantize_to_points`` (the fast path every quantizer in lowbit uses: the magnitudes
are compared with the N-1 scaled mid-points by ``searchsorted``) against
``lowbit.core.points.quantize_to_points_reference`` (argmin of |w - q| over every point, an N-times
larger tensor). Weights: every conv of a random-init torchvision resnet18 (the cost does not
depend on the values), per-output-channel scales, QPS of 2, 4 and 6 bits (N = 2, 8, 32 points:
SQ option 5 at 4 bits, uniform at 2 and 6 bits), in float64, the precision the reference
computes in. Both run in the same process (best of repeats) and must give bit-identical tensors. Prints a table with the ratio, writes
bench/results/quantize.json.

    .venv/bin/python bench/quantize.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit.core.points import quantize_to_points, quantize_to_points_reference

ROOT = Path(__file__).resolve().parents[1]


def qps_sets():
    """(label, points): uniform 2-bit, SQ option 5 4-bit (the paper's usual pick), uniform 6-bit."""
    sq4 = np.array([0.0625, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
    return [("uniform 2-bit (N=2)", np.arange(2.0)), ("SQ option 5, 4-bit (N=8)", sq4),
            ("uniform 6-bit (N=32)", np.arange(32.0))]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.json"))
    args = ap.parse_args(argv)
    lowbit.seed_all(0)
    model = lowbit.models.build("resnet18", num_classes=1000)
    weights = [m.weight.detach().to(torch.float64) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    numel = sum(w.numel() for w in weights)
    rows = []
    for label, pts in qps_sets():
        scales = [w.reshape(w.shape[0], -1).abs().amax(1).double() / pts[-1] for w in weights]

        def fast():
            return [quantize_to_points(w, pts, s, dim=0) for w, s in zip(weights, scales)]

        def ref():
            return [quantize_to_points_reference(w, pts, s, dim=0) for w, s in zip(weights, scales)]

        identical = all(torch.equal(a, b) for a, b in zip(fast(), ref()))
        t_fast = best_time(fast, args.repeats)
        t_ref = best_time(ref, args.repeats)
        rows.append({"qps": label, "points": len(pts), "fast_seconds": t_fast, "reference_seconds": t_ref,
                     "ratio": t_ref / t_fast, "identical": identical})
        print(f"  {label:26s} fast {t_fast:7.3f} s  reference {t_ref:7.3f} s  ratio {t_ref / t_fast:6.1f}x  "
              f"identical {identical}", flush=True)
    result = {"setting": {"weights": f"every conv of random-init torchvision resnet18 ({numel} weights, float64)",
                          "scales": "per output channel", "threads": torch.get_num_threads(),
                          "repeats": args.repeats, "timing": "best of repeats, wall"},
              "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                          "python": platform.python_version(), "torch": torch.__version__},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lowbit.results.atomic_write_text(out, json.dumps(result, indent=1))
    print("\n| QPS | fast (s) | reference (s) | ratio | identical |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['qps']} | {r['fast_seconds']:.3f} | {r['reference_seconds']:.3f} | {r['ratio']:.1f}x | "
              f"{r['identical']} |")
    print(f"wrote {out}")
    if not all(r["identical"] for r in rows):
        raise SystemExit("fast and reference quantizers disagree")


if __name__ == "__main__":
    main()
