"""Benchmark: SQ's shift-add MAC simulator vs torch's float convolution on the same layers.

The simulator (lowbit.hw.mac_conv2d, SQ Sec. 3.5 / Fig. 4) is bit-exact integer arithmetic;
the baseline is ``F.conv2d`` in float32 on the fake-quantized tensors (what a PTQ study
would run instead). Layers are the three conv shapes of our ResNet-20 on 28x28 inputs.
The slow reference (one Fig. 4 product at a time) is timed on a small slice and checked to
agree. Prints a table and the ratio, writes bench/results/mac.json.

    .venv/bin/python bench/mac.py [--batch 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lowbit
import lowbit.hw as hw

LAYERS = [  # name in resnet20, (C_in, H, W), stride
    ("layer1.0.conv1", (16, 28, 28), 1),
    ("layer2.0.conv1", (16, 28, 28), 2),
    ("layer3.1.conv1", (64, 7, 7), 1),
]
TARGET_RATIO = 20.0  # issue 5: no more than 20x slower than float conv


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--act-bits", type=int, default=8)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    try:
        model, source = lowbit.models.load_pretrained("resnet20", "fashion-mnist"), "resnet20-fashion-mnist.pt"
    except (FileNotFoundError, ValueError):
        model, source = lowbit.models.build("resnet20").eval(), "resnet20 random init (no checkpoint yet)"
    modules = dict(model.named_modules())
    points = lowbit.universal_set(5)[[0, 1, 2, 4, 6, 9, 12, 14]]  # a fixed 4-bit QPS of option 5
    rng = np.random.default_rng(0)
    rows = []
    for name, (cin, h, w), stride in LAYERS:
        weight = modules[name].weight.detach().double()
        scale = weight.reshape(weight.shape[0], -1).abs().amax(1) / points.max()
        codes, dec = hw.encode_sq(weight, points, scale, 5)
        x_int = torch.as_tensor(rng.integers(0, 2 ** args.act_bits, size=(args.batch, cin, h, w)))
        act_scale = 0.02
        x_fake = (x_int.double() * act_scale).float()
        w_fake = hw.decode_sq(codes, dec).float()

        t_float = best_time(lambda: F.conv2d(x_fake, w_fake, stride=stride, padding=1), args.repeats)
        t_mac = best_time(lambda: hw.mac_conv2d(x_int, codes, dec, stride, 1), args.repeats)
        acc = hw.mac_conv2d(x_int, codes, dec, stride, 1)
        out = acc.double() * act_scale * scale.view(1, -1, 1, 1) * dec.unit
        ref_f64 = F.conv2d(x_int.double() * act_scale, hw.decode_sq(codes, dec), stride=stride, padding=1)
        rel_err = float((out - ref_f64).abs().max() / ref_f64.abs().max())

        # the plain reference on one image and two output channels, extrapolated per output
        small_x, small_c = x_int[:1, :, :8, :8], codes[:2]
        t = time.perf_counter()
        ref = hw.mac_conv2d_reference(small_x, small_c, dec, stride, 1)
        t_ref = time.perf_counter() - t
        agree = bool(torch.equal(ref, hw.mac_conv2d(small_x, small_c, dec, stride, 1)))
        per_out_ref = t_ref / ref.numel()
        per_out_mac = t_mac / acc.numel()
        rows.append({"layer": name, "input": [args.batch, cin, h, w], "stride": stride,
                     "outputs": int(acc.numel()), "float_conv_s": t_float, "mac_sim_s": t_mac,
                     "ratio_mac_over_float": t_mac / t_float,
                     "reference_s_per_output": per_out_ref, "mac_s_per_output": per_out_mac,
                     "speedup_over_reference": per_out_ref / per_out_mac,
                     "reference_agrees": agree, "max_rel_err_vs_float64_conv": rel_err})

    print(f"SQ shift-add MAC simulator vs float32 F.conv2d ({source}; batch {args.batch}, "
          f"{args.act_bits}-bit activations, best of {args.repeats}, {torch.get_num_threads()} threads)")
    print(f"{'layer':16s} {'float ms':>9s} {'MAC ms':>9s} {'ratio':>6s} {'ref us/out':>10s} "
          f"{'vs ref':>8s} {'ref ok':>6s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['layer']:16s} {1e3 * r['float_conv_s']:9.2f} {1e3 * r['mac_sim_s']:9.2f} "
              f"{r['ratio_mac_over_float']:6.2f} {1e6 * r['reference_s_per_output']:10.1f} "
              f"{r['speedup_over_reference']:8.0f}x {str(r['reference_agrees']):>6s} "
              f"{r['max_rel_err_vs_float64_conv']:8.1e}")
    worst = max(r["ratio_mac_over_float"] for r in rows)
    verdict = "within" if worst <= TARGET_RATIO else "OVER"
    print(f"worst ratio {worst:.2f}x: {verdict} the {TARGET_RATIO:.0f}x target")
    result = {"benchmark": "mac", "checkpoint": source, "batch": args.batch, "act_bits": args.act_bits,
              "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(), "rows": rows,
              "worst_ratio": worst, "target_ratio": TARGET_RATIO, "within_target": worst <= TARGET_RATIO}
    out = Path(__file__).resolve().parent / "results" / "mac.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(out.parents[2])}")
    return 0 if all(r["reference_agrees"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
