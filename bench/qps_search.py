"""Benchmark of the QPS search (SQ Algorithm 1) on torchvision ResNet-18 conv weights.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3, and its
supplementary material, Table 2: a full 4-bit option-5 search of ResNet-18 takes "0.5 h" on a GPU,
option 4 "40 h".

Setting: torchvision ``resnet18`` with random weights (seed 0), every conv layer except the first,
4 bits, channel granularity. Three paths of ``search_qps``, all in this one run:

* **new**: the default, the compiled kernel with the exact branch and bound over channels and the
  DP bound of the channels still to come (``engine="dp"``);
* **old**: the same branch and bound with the bound it had before (``engine="superset"``);
* **reference**: Algorithm 1 written plainly (``method="reference"``: ``optimal_scale`` for every
  QPS and channel in Python).

(a) option 5 on every layer: old and new per layer (interleaved, so a load change hits both), the
    ratio, that both returned the same QPS, scales (bit for bit) and loss, and the ratio of the new
    search to one ``torch.sort`` of the same weights (each channel's magnitudes, as the search sorts
    them first);
(b) reference vs old vs new (and the vectorised torch backend) on one whole real layer
    (``--ref-layer``, default the smallest, ``layer2.0.downsample.0``, 128 x 64 x 1 x 1, at
    ``--ref-bits``): times, ratios, same QPS and loss;
(b') the pruning alone on one large layer: plain kernel (``prune=False``) vs old vs new;
(c) option 4 (490,314 QPS): new on every layer, old on the first ``--c-old-layers`` layers (the old
    path took 1276 s for all of them), same result checked there. With ``--budget-c`` the new path
    stops after that many seconds and *projects* the rest from the measured seconds per
    (candidate, channel) pair; the JSON says which layers were measured.

Seconds are wall time of ``search_qps``; ``cpu_seconds`` (user + system, all threads) are printed
beside them because this 2-core machine is often shared: compare ratios measured in the same run.

Run: ``.venv/bin/python bench/qps_search.py`` (``make bench``); writes bench/results/qps_search.json.
``--device cuda`` runs the new path of (a) and (c) with the vectorised torch backend on the GPU
(the old path and the checks of (a) stay on the CPU kernel) and writes
bench/results/qps_search_cuda.json; without a GPU it stops with our error saying so.
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


def timed_search(w, bits, option, **kw):
    """``search_qps`` and the CPU seconds it took."""
    cpu0 = cpu_seconds()
    res = search_qps(w, bits, universal=option, method=kw.pop("method", "fast"), **kw)
    return res, cpu_seconds() - cpu0


def same_result(a, b) -> bool:
    """Same QPS (index and points), scales bit for bit, loss and per-channel losses bit for bit."""
    return bool(a.index == b.index and np.array_equal(a.points, b.points)
                and np.asarray(a.scale).tobytes() == np.asarray(b.scale).tobytes() and a.loss == b.loss
                and a.channel_losses.tobytes() == b.channel_losses.tobytes())


def sort_seconds(w, repeats: int = 5) -> float:
    """Best of ``repeats`` wall times of one ``torch.sort`` of each channel's magnitudes of ``w``."""
    mag = w.reshape(w.shape[0], -1).abs()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.sort(mag, dim=1)
        best = min(best, time.perf_counter() - t)
    return best


def row(name, w, res, cpu):
    return {"layer": name, "shape": list(w.shape), "seconds": res.seconds, "cpu_seconds": cpu,
            "points": res.points.tolist(), "pairs_evaluated": res.pairs,
            "mean_iterations": res.iterations / max(res.pairs, 1), "not_converged": res.not_converged,
            "backend": res.backend}


def part_a(layers, bits: int, threads: int, device: str):
    """Option 5 on every layer: old and new (interleaved), same result, ratio to one torch.sort."""
    rows = []
    for name, w in layers:
        pairs = qps_count(5, bits) * w.shape[0]
        old, old_cpu = timed_search(w, bits, 5, threads=threads, engine="superset")
        new, new_cpu = timed_search(w, bits, 5, threads=threads, engine="dp", device=device)
        cpu_check = new if device == "cpu" else timed_search(w, bits, 5, threads=threads)[0]
        sort_s = sort_seconds(w)
        same = same_result(old, cpu_check)
        r = row(name, w, new, new_cpu)
        r.update({"pairs": pairs, "measured": True, "old_seconds": old.seconds, "old_cpu_seconds": old_cpu,
                  "old_pairs_evaluated": old.pairs, "ratio_old_over_new": old.seconds / new.seconds,
                  "torch_sort_seconds": sort_s, "ratio_new_over_sort": new.seconds / sort_s, "same_result": same})
        rows.append(r)
        print(f"  {name:24s} {str(tuple(w.shape)):18s} old {old.seconds:6.2f} s (cpu {old_cpu:6.2f})  "
              f"new {new.seconds:6.2f} s (cpu {new_cpu:6.2f})  old/new {old.seconds / new.seconds:5.2f}x  "
              f"pairs {old.pairs / pairs:5.1%} -> {new.pairs / pairs:5.1%}  new/sort {new.seconds / sort_s:6.0f}x  "
              f"same {same}", flush=True)
    return rows


def run_new(layers, option: int, bits: int, budget: float | None, threads: int, device: str = "cpu", keep: int = 0):
    """New path layer by layer; past ``budget`` seconds the remaining layers are projected. Also
    returns the results of the first ``keep`` layers."""
    rows, kept, spent, per_pair = [], [], 0.0, None
    for name, w in layers:
        pairs = qps_count(option, bits) * w.shape[0]
        if budget is not None and spent >= budget and per_pair is not None:
            rows.append({"layer": name, "shape": list(w.shape), "pairs": pairs, "seconds": pairs * per_pair,
                         "measured": False})
            continue
        res, cpu = timed_search(w, bits, option, threads=threads, device=device)
        spent += res.seconds
        if len(kept) < keep:
            kept.append(res)
        r = row(name, w, res, cpu)
        r.update({"pairs": pairs, "measured": True})
        rows.append(r)
        measured = [x for x in rows if x["measured"]]
        per_pair = sum(x["seconds"] for x in measured) / sum(x["pairs"] for x in measured)
        print(f"  option {option} {name:24s} {str(tuple(w.shape)):18s} {res.seconds:8.2f} s (cpu {cpu:8.2f} s)  "
              f"pairs evaluated {res.pairs / pairs:6.2%}  iterations/pair {res.iterations / res.pairs:5.1f}", flush=True)
    return rows, kept


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--budget-c", type=float, default=None, help="seconds for (c) before projecting (default: none)")
    ap.add_argument("--c-old-layers", type=int, default=4, help="layers of (c) also run on the old path")
    ap.add_argument("--ref-layer", default="layer2.0.downsample.0", help="the whole layer of (b)")
    ap.add_argument("--ref-bits", type=int, default=4, help="bits of (b)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu (the compiled kernel) or cuda (torch backend on the GPU)")
    ap.add_argument("--skip-c", action="store_true", help="leave out (c) (option 4)")
    ap.add_argument("--out", default=None, help="default: bench/results/qps_search.json (_cuda.json on CUDA)")
    args = ap.parse_args(argv)
    device = lowbit.core.validation.resolve_device(args.device)  # our error when there is no GPU
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / f"qps_search{'_cuda' if device.type == 'cuda' else ''}.json")
    torch.set_num_threads(args.threads)
    layers = conv_layers()
    started, load_start = time.time(), list(os.getloadavg())
    lowbit.sq.kernel.load()  # compile (or find) the kernel before any timing

    print(f"(a) option 5, {args.bits}-bit, channel granularity, {len(layers)} layers: old vs new")
    rows_a = part_a(layers, args.bits, args.threads, args.device)
    total_new = sum(r["seconds"] for r in rows_a)
    total_old = sum(r["old_seconds"] for r in rows_a)
    total_sort = sum(r["torch_sort_seconds"] for r in rows_a)
    same_a = all(r["same_result"] for r in rows_a)

    name_b, w_b = next((n, w) for n, w in layers if n == args.ref_layer)
    print(f"(b) reference vs old vs new on the whole layer {name_b} {tuple(w_b.shape)}, option 5, {args.ref_bits}-bit")
    ref_b, ref_cpu = timed_search(w_b, args.ref_bits, 5, method="reference")
    old_b, _ = timed_search(w_b, args.ref_bits, 5, threads=args.threads, engine="superset")
    new_b, _ = timed_search(w_b, args.ref_bits, 5, threads=args.threads)
    torch_b, _ = timed_search(w_b, args.ref_bits, 5, backend="torch", device="cpu")
    same_b = bool(ref_b.index == new_b.index == old_b.index == torch_b.index)
    rel = abs(new_b.loss - ref_b.loss) / ref_b.loss
    scale_rel = float(np.max(np.abs(new_b.scale - ref_b.scale) / ref_b.scale))
    print(f"  reference {ref_b.seconds:.1f} s (cpu {ref_cpu:.1f}), old {old_b.seconds:.3f} s, new {new_b.seconds:.3f} s, "
          f"torch backend {torch_b.seconds:.2f} s; reference/new {ref_b.seconds / new_b.seconds:.0f}x, "
          f"reference/old {ref_b.seconds / old_b.seconds:.0f}x, old/new {old_b.seconds / new_b.seconds:.2f}x; same QPS "
          f"{same_b}, relative loss difference {rel:.1e}, largest relative scale difference {scale_rel:.1e}; "
          f"old and new identical {same_result(old_b, new_b)}")

    name_p, w_p = next((n, w) for n, w in layers if n == "layer3.1.conv1")
    plain_p, _ = timed_search(w_p, args.bits, 5, threads=args.threads, prune=False)
    old_p, _ = timed_search(w_p, args.bits, 5, threads=args.threads, engine="superset")
    new_p, _ = timed_search(w_p, args.bits, 5, threads=args.threads)
    same_p = bool(plain_p.index == old_p.index == new_p.index and same_result(old_p, new_p)
                  and abs(plain_p.loss - new_p.loss) <= 1e-9 * plain_p.loss)
    print(f"(b') {name_p}: plain kernel {plain_p.seconds:.2f} s, old {old_p.seconds:.2f} s "
          f"({old_p.pairs / plain_p.pairs:.1%} of the pairs), new {new_p.seconds:.2f} s "
          f"({new_p.pairs / plain_p.pairs:.2%}); plain/new {plain_p.seconds / new_p.seconds:.1f}x, same {same_p}")

    rows_c, old_c = [], []
    if not args.skip_c:
        print(f"(c) option 4, {args.bits}-bit ({qps_count(4, args.bits)} QPS): new on every layer "
              f"(budget {args.budget_c} s), old on the first {args.c_old_layers}")
        rows_c, kept = run_new(layers, 4, args.bits, args.budget_c, args.threads, args.device, args.c_old_layers)
        for (name, w), r, new in zip(layers, rows_c, kept):
            old, old_cpu = timed_search(w, args.bits, 4, threads=args.threads, engine="superset")
            if args.device != "cpu":  # the checks are on the CPU kernel
                new = search_qps(w, args.bits, 4, threads=args.threads)
            same = same_result(old, new)
            old_c.append({"layer": name, "old_seconds": old.seconds, "old_cpu_seconds": old_cpu,
                          "new_seconds": r["seconds"], "ratio_old_over_new": old.seconds / r["seconds"],
                          "same_result": same})
            print(f"  option 4 old {name:24s} {old.seconds:8.2f} s, new {r['seconds']:6.2f} s, "
                  f"old/new {old.seconds / r['seconds']:5.1f}x, same {same}", flush=True)
    total_c = sum(r["seconds"] for r in rows_c)
    measured_c = all(r["measured"] for r in rows_c)

    result = {
        "setting": {"model": "torchvision resnet18, random init (seed 0)", "layers": "every conv except the first",
                    "bits": args.bits, "granularity": "channel", "threads": args.threads,
                    "old": "search_qps(engine='superset')", "new": "search_qps() (engine='dp')",
                    "reference": "search_qps(method='reference')"},
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load_start,
                    "load_average_at_end": list(os.getloadavg()), "nice": os.nice(0),
                    "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "a_fast_option5": {"seconds": total_new, "cpu_seconds": sum(r["cpu_seconds"] for r in rows_a),
                           "old_seconds": total_old, "old_cpu_seconds": sum(r["old_cpu_seconds"] for r in rows_a),
                           "ratio_old_over_new": total_old / total_new, "torch_sort_seconds": total_sort,
                           "ratio_new_over_sort": total_new / total_sort, "same_result_every_layer": same_a,
                           "all_measured": True, "target_seconds": 10, "paper": "0.5 h on a GPU", "layers": rows_a},
        "b_reference_vs_fast": {"layer": name_b, "shape": list(w_b.shape), "bits": args.ref_bits,
                                "reference_seconds": ref_b.seconds, "reference_cpu_seconds": ref_cpu,
                                "old_seconds": old_b.seconds, "fast_seconds": new_b.seconds,
                                "fast_backend": new_b.backend, "fast_torch_seconds": torch_b.seconds,
                                "ratio_reference_over_fast": ref_b.seconds / new_b.seconds,
                                "ratio_reference_over_old": ref_b.seconds / old_b.seconds,
                                "ratio_reference_over_fast_torch": ref_b.seconds / torch_b.seconds,
                                "same_qps": same_b, "relative_loss_difference": rel,
                                "max_relative_scale_difference": scale_rel,
                                "old_and_new_identical": same_result(old_b, new_b), "points": ref_b.points.tolist()},
        "b_prime_pruning": {"layer": name_p, "shape": list(w_p.shape), "plain_seconds": plain_p.seconds,
                            "old_seconds": old_p.seconds, "pruned_seconds": new_p.seconds,
                            "ratio": plain_p.seconds / new_p.seconds, "pairs_plain": plain_p.pairs,
                            "pairs_old": old_p.pairs, "pairs_pruned": new_p.pairs, "same_qps_and_loss": same_p},
        "c_fast_option4": {"seconds": total_c, "cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in rows_c),
                           "all_measured": measured_c, "skipped": bool(args.skip_c), "target_seconds": 300,
                           "paper": "40 h", "budget_seconds": args.budget_c, "old_path_layers": old_c,
                           "layers": rows_c},
        "wall_seconds": time.time() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lowbit.results.atomic_write_text(out, json.dumps(result, indent=1))
    print("\n| part | what | seconds | target |\n|---|---|---|---|")
    print(f"| (a) | option 5, all {len(layers)} layers: old / new | {total_old:.1f} / {total_new:.1f} = "
          f"{total_old / total_new:.1f}x, identical: {same_a} | new <= 10 |")
    print(f"| (a) | new / one torch.sort of the same weights | {total_new:.2f} / {total_sort:.4f} = "
          f"{total_new / total_sort:.0f}x | - |")
    print(f"| (b) | reference / new on the whole {name_b} | {ref_b.seconds:.1f} / {new_b.seconds:.3f} = "
          f"{ref_b.seconds / new_b.seconds:.0f}x, same QPS: {same_b} | - |")
    print(f"| (b') | plain / old / new on {name_p} | {plain_p.seconds:.1f} / {old_p.seconds:.1f} / "
          f"{new_p.seconds:.2f}, same: {same_p} | - |")
    if rows_c:
        print(f"| (c) | option 4, all layers, new ({'measured' if measured_c else 'partly projected'}) | "
              f"{total_c:.1f} | <= 300 |")
        if old_c:
            o, nw = sum(r["old_seconds"] for r in old_c), sum(r["new_seconds"] for r in old_c)
            print(f"| (c) | option 4, first {len(old_c)} layers, old / new | {o:.1f} / {nw:.1f} = {o / nw:.1f}x, "
                  f"identical: {all(r['same_result'] for r in old_c)} | - |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
