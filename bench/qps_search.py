"""Benchmark of the QPS search (SQ Algorithm 1) on torchvision ResNet-18 conv weights.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3, and its
supplementary material, Table 2: a full 4-bit option-5 search of ResNet-18 takes "0.5 h" on a GPU,
option 4 "40 h".

Setting: torchvision ``resnet18`` with random weights (the search cost does not depend on the
values), every conv layer except the first, 4 bits, channel granularity.

(a) fast search, option 5: total seconds over all layers;
(b) reference (Algorithm 1 written plainly) vs fast on one small layer in the same run:
    both times, the ratio, and that both found the same QPS and loss;
(c) fast search, option 4 (490,314 candidate QPS): total seconds. With ``--budget-c`` the
    run stops after that many seconds and *projects* the rest from the measured seconds per
    (candidate, channel) pair; the JSON says which layers were measured and which projected.

The fast search is the default ``search_qps`` (the compiled kernel of ``lowbit.sq.kernel`` with
the exact branch and bound over channels, ``prune=True``); ``pairs_evaluated`` per layer says how many (QPS, channel)
pairs it actually ran. (b) also times the plain kernel (``prune=False``) for the ratio of the
pruning alone on one large layer.

Run: ``.venv/bin/python bench/qps_search.py`` (``make bench``); writes bench/results/qps_search.json.
``--device cuda`` runs the fast searches (a) and (c) with the vectorised torch backend on the GPU
and writes bench/results/qps_search_cuda.json (the same command with ``--device cpu`` gives the CPU
numbers to set beside it); without a GPU it stops with our error saying so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

import lowbit  # noqa: E402
from lowbit.sq.search import search_qps  # noqa: E402
from lowbit.sq.universal import qps_count  # noqa: E402


def conv_layers(seed: int = 0):
    """(name, weight) of every conv of a random-init torchvision resnet18 except the first."""
    lowbit.seed_all(seed)
    model = lowbit.models.build("resnet18", num_classes=1000)
    convs = [(n, m.weight.detach().clone()) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[1:]


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): comparable across loaded machines."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_fast(layers, option: int, bits: int, budget: float | None, threads: int, device: str = "cpu"):
    """Fast search layer by layer; past ``budget`` seconds the remaining layers are projected."""
    rows, spent, per_pair = [], 0.0, None
    for name, w in layers:
        pairs = qps_count(option, bits) * w.shape[0]
        if budget is not None and spent >= budget and per_pair is not None:
            rows.append({"layer": name, "shape": list(w.shape), "pairs": pairs, "seconds": pairs * per_pair,
                         "measured": False})
            continue
        cpu0 = cpu_seconds()
        res = search_qps(w, bits, universal=option, method="fast", threads=threads, device=device)
        cpu = cpu_seconds() - cpu0
        spent += res.seconds
        rows.append({"layer": name, "shape": list(w.shape), "pairs": pairs, "seconds": res.seconds, "cpu_seconds": cpu, "measured": True,
                     "points": res.points.tolist(), "pairs_evaluated": res.pairs,
                     "mean_iterations": res.iterations / res.pairs,
                     "not_converged": res.not_converged, "backend": res.backend})
        measured = [r for r in rows if r["measured"]]
        per_pair = sum(r["seconds"] for r in measured) / sum(r["pairs"] for r in measured)
        print(f"  option {option} {name:28s} {str(tuple(w.shape)):18s} {res.seconds:8.2f} s (cpu {cpu:8.2f} s)  "
              f"pairs evaluated {res.pairs / pairs:5.1%}  iterations/pair {res.iterations / res.pairs:5.1f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget-a", type=float, default=None, help="seconds for (a) before projecting (default: none)")
    ap.add_argument("--budget-c", type=float, default=None, help="seconds for (c) before projecting (default: none)")
    ap.add_argument("--ref-channels", type=int, default=8, help="output channels of the small layer for (b)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu (the compiled kernel) or cuda (torch backend on the GPU)")
    ap.add_argument("--out", default=None, help="default: bench/results/qps_search.json (_cuda.json on CUDA)")
    args = ap.parse_args(argv)
    device = lowbit.core.validation.resolve_device(args.device)  # our error when there is no GPU
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"qps_search{'_cuda' if device.type == 'cuda' else ''}.json")
    torch.set_num_threads(args.threads)
    layers = conv_layers()
    started = time.time()

    print(f"(a) fast search, option 5, {args.bits}-bit, channel granularity, {len(layers)} layers")
    rows_a = run_fast(layers, 5, args.bits, args.budget_a, args.threads, args.device)
    total_a = sum(r["seconds"] for r in rows_a)

    # (b) the smallest layer, first output channels
    name_b, w_b = min(layers, key=lambda nw: nw[1].numel())
    w_b = w_b[: args.ref_channels]
    print(f"(b) reference vs fast on {name_b}[:{args.ref_channels}] {tuple(w_b.shape)}")
    fast_b = search_qps(w_b, args.bits, 5, method="fast", threads=args.threads)
    torch_b = search_qps(w_b, args.bits, 5, method="fast", backend="torch")
    ref_b = search_qps(w_b, args.bits, 5, method="reference")
    same = bool(np.array_equal(fast_b.points, ref_b.points) and np.array_equal(torch_b.points, ref_b.points))
    rel = abs(fast_b.loss - ref_b.loss) / ref_b.loss
    print(f"  reference {ref_b.seconds:.2f} s, fast ({fast_b.backend}) {fast_b.seconds:.3f} s, "
          f"fast (torch) {torch_b.seconds:.2f} s; ratio reference/fast {ref_b.seconds / fast_b.seconds:.0f}x; "
          f"same QPS {same}, relative loss difference {rel:.1e}")

    # (b') the pruning alone: plain kernel vs branch and bound on one large layer
    name_p, w_p = next((n, w) for n, w in layers if n == "layer3.1.conv1")
    plain_p = search_qps(w_p, args.bits, 5, method="fast", threads=args.threads, prune=False)
    pruned_p = search_qps(w_p, args.bits, 5, method="fast", threads=args.threads, prune=True)
    same_p = bool(plain_p.index == pruned_p.index and abs(plain_p.loss - pruned_p.loss) <= 1e-9 * plain_p.loss)
    print(f"(b') {name_p}: plain kernel {plain_p.seconds:.2f} s, branch and bound {pruned_p.seconds:.2f} s "
          f"({pruned_p.pairs / plain_p.pairs:.1%} of the pairs), ratio {plain_p.seconds / pruned_p.seconds:.2f}x, "
          f"same QPS and loss {same_p}")

    print(f"(c) fast search, option 4, {args.bits}-bit ({qps_count(4, args.bits)} QPS), budget {args.budget_c} s")
    rows_c = run_fast(layers, 4, args.bits, args.budget_c, args.threads, args.device)
    total_c = sum(r["seconds"] for r in rows_c)
    measured_c = all(r["measured"] for r in rows_c)

    result = {
        "setting": {"model": "torchvision resnet18, random init (seed 0)", "layers": "every conv except the first",
                    "bits": args.bits, "granularity": "channel", "threads": args.threads},
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "a_fast_option5": {"seconds": total_a, "all_measured": all(r["measured"] for r in rows_a),
                           "target_seconds": 60, "paper": "0.5 h on a GPU", "layers": rows_a},
        "b_reference_vs_fast": {"layer": f"{name_b}[:{args.ref_channels}]", "shape": list(w_b.shape),
                                "reference_seconds": ref_b.seconds, "fast_seconds": fast_b.seconds,
                                "fast_backend": fast_b.backend, "fast_torch_seconds": torch_b.seconds,
                                "ratio_reference_over_fast": ref_b.seconds / fast_b.seconds,
                                "ratio_reference_over_fast_torch": ref_b.seconds / torch_b.seconds,
                                "same_qps": same, "relative_loss_difference": rel,
                                "points": ref_b.points.tolist()},
        "b_prime_pruning": {"layer": name_p, "shape": list(w_p.shape), "plain_seconds": plain_p.seconds,
                            "pruned_seconds": pruned_p.seconds, "ratio": plain_p.seconds / pruned_p.seconds,
                            "pairs_plain": plain_p.pairs, "pairs_pruned": pruned_p.pairs, "same_qps_and_loss": same_p},
        "c_fast_option4": {"seconds": total_c, "all_measured": measured_c, "target_seconds": 1800,
                           "paper": "40 h", "budget_seconds": args.budget_c, "layers": rows_c},
        "wall_seconds": time.time() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lowbit.results.atomic_write_text(out, json.dumps(result, indent=1))
    print("\n| part | what | seconds | target |\n|---|---|---|---|")
    print(f"| (a) | fast, option 5, all {len(layers)} layers | {total_a:.1f} | <= 60 |")
    print(f"| (b) | reference / fast on {name_b}[:{args.ref_channels}] | {ref_b.seconds:.1f} / "
          f"{fast_b.seconds:.3f} = {ref_b.seconds / fast_b.seconds:.0f}x, same QPS: {same} | - |")
    print(f"| (b') | plain / branch and bound on {name_p} | {plain_p.seconds:.1f} / {pruned_p.seconds:.1f} = "
          f"{plain_p.seconds / pruned_p.seconds:.2f}x, same QPS: {same_p} | - |")
    print(f"| (c) | fast, option 4, all layers ({'measured' if measured_c else 'partly projected'}) | "
          f"{total_c:.1f} | <= 1800 |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
