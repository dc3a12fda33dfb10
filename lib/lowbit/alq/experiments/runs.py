"""What notebook 07 runs: STLQ-aware fine-tuning and STLQ without training, cached.

Our CPU-scale analogue of the ALQ supplement's Figs. 1-2 (Oh, Sim, Lee, Lee, *Automated Log-Scale
Quantization for Low-Cost Deep Neural Networks*, CVPR 2021, supplementary material). One fine-tuning
run is "prepare the committed FP checkpoint with :func:`lowbit.alq.prepare_stlq` (STLQ weights, LSQ
activations, first/last layer 8-bit LSQ, activation steps initialised on 256 training images),
fine-tune it with :func:`lowbit.alq.finetune` (task loss + ``lam`` * r1 penalty, with or without the
select tensor, per element or per tile) on a fixed seeded subset of ``train_n`` training images,
record accuracy and NZR every ``record_every`` iterations on the first ``curve_n`` test images, and
evaluate the final model on the whole test set as trained and deployed (exactly the top-k second
words at each of ``deploy_ratios``)"; cached through :func:`lowbit.results.cached`
(``data/derived/alq_run-*.json``). A PTQ run (``alq_ptq``) is the same preparation, no training,
deployed at one select ratio.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ...core.validation import device_key, resolve_device
from ...data import calibration_subset, head, load_dataset
from ...evaluate import accuracy, checkpoint_accuracy
from ...models import imagenet_key, load_pretrained
from ...results import cached, records
from ...train import batch_augmentation
from ...utils import seed_all
from ...lsq.experiments.runs import _std
from ...lsq.qat import CALIB_N
from ..finetune import finetune
from ..hw import encode_stlq, integer_weights, stlq_mac_conv2d, stlq_mac_cost, stlq_mac_linear, two_cycle_fraction
from ...lsq.qat import qat_layers
from ..modules import STLQWeight, nzr, prepare_stlq, set_deploy

LANES = 8  # PEs in lockstep on consecutive weights (lowbit.alq.hw's one-shifter design)


def stlq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, QAT layer)]`` of the layers whose weight quantizer is an :class:`~lowbit.alq.STLQWeight`."""
    return [(n, m) for n, m in qat_layers(model) if isinstance(m.weight_quantizer, STLQWeight)]


def mac_weighted_nzr(model: nn.Module, image: torch.Tensor) -> dict:
    """Per STLQ layer (in the model's current form, after a forward pass of ``image``): its NZR, its
    MACs per image and its fraction of two-cycle lane groups (:data:`LANES` PEs in lockstep), and
    the MAC-weighted totals over layers."""
    macs = {}
    layers = stlq_layers(model)
    hooks = [m.register_forward_hook(lambda mod, i, o, name=n: macs.__setitem__(
        name, mod.weight.numel() * (o[0, 0].numel() if o.ndim == 4 else 1))) for n, m in layers]
    with torch.no_grad():
        model.eval()(image[:1].to(next(model.parameters()).device))
    for h in hooks:
        h.remove()
    per = {n: {"nzr": float(m.weight_quantizer._nonzero.float().mean()), "macs": int(macs[n]),
               "two_cycle_fraction": two_cycle_fraction(m.weight_quantizer._nonzero, LANES)} for n, m in layers}
    total = sum(v["macs"] for v in per.values())
    return {"layers": per, "mac_nzr": sum(v["nzr"] * v["macs"] for v in per.values()) / total,
            "mac_two_cycle_fraction": sum(v["two_cycle_fraction"] * v["macs"] for v in per.values()) / total}


def _data(model_name, dataset, train_n, test_n):
    fp = load_pretrained(model_name, dataset)
    train = load_dataset(dataset, "train")
    if train_n is not None and train_n < len(train):
        train = calibration_subset(train, train_n, seed=0)  # the same images for every seed and setting
    return fp, train, head(load_dataset(dataset, "test"), test_n)


def finetune_experiment(model_name: str, dataset: str, bits: int, select_ratio: float, select: bool = True,
                        tile: int | None = None, *, lam: float = 3.0, seed: int = 0, epochs: int = 4,
                        train_n: int | None = 3840, curve_n: int | None = 1000, test_n: int | None = None,
                        record_every: int = 10, deploy_ratios=None, batch_size: int = 128, lr: float = 0.01,
                        step_lr: float = 1e-3, device=None, progress: bool = True) -> dict:
    """One fine-tuning run at W/A ``bits``/``bits`` as a JSON-able record (module docstring);
    ``device``: where it trains and is evaluated (``"cuda"`` without a GPU is a ``ValueError``)."""
    resolve_device(device)  # fail before loading anything
    t0 = time.time()
    seed_all(seed)
    fp, train, test = _data(model_name, dataset, train_n, test_n)
    ratios = [select_ratio] if deploy_ratios is None else list(deploy_ratios)
    qmodel, history = finetune(fp, train, head(test, curve_n), w_bits=bits, a_bits=bits, select_ratio=select_ratio,
                               lam=lam, tile=tile, select=select, epochs=epochs, lr=lr, step_lr=step_lr,
                               batch_size=batch_size, seed=seed, calib=head(train, CALIB_N), record_every=record_every,
                               deploy_ratios=ratios, progress=progress, augment=batch_augmentation(dataset),
                               device=device)
    train_seconds = time.time() - t0
    trained_acc = accuracy(qmodel, test)
    trained = {"accuracy": trained_acc, "nzr": nzr(qmodel), **mac_weighted_nzr(qmodel, test[0][0][None])}
    deployed = {}
    for r in ratios:
        set_deploy(qmodel, True, r)
        deployed[f"{r:g}"] = {"accuracy": accuracy(qmodel, test), "nzr": nzr(qmodel),
                              **mac_weighted_nzr(qmodel, test[0][0][None])}
    return {"model": model_name, "dataset": dataset, "bits": bits, "select_ratio": select_ratio, "select": select,
            "tile": tile, "lam": lam, "seed": seed,
            "records": [r for e in history for r in e["records"]],
            "history": [{k: v for k, v in e.items() if k != "records"} for e in history],
            "trained": trained, "deployed": deployed, "test_n": len(test),
            "fp_test_accuracy": checkpoint_accuracy(fp, model_name, dataset, test),
            "train_seconds": train_seconds, "seconds": time.time() - t0, "threads": torch.get_num_threads()}


def ptq_experiment(model_name: str, dataset: str, bits: int, select_ratio: float, tile: int | None = None, *,
                   test_n: int | None = None, act_init: str = "mse", device=None) -> dict:
    """STLQ without training: :func:`prepare_stlq` (scales fitted on the weights, the uniform activation
    steps set by ``act_init`` on 256 training images: ``"mse"``, the MSE-optimal step, since LSQ's
    ``2 mean|x| / sqrt(Qp)`` is a starting point for training, not a calibrated clip), deployed at
    ``select_ratio``, top-1 on the test set (evaluated on ``device``)."""
    t0 = time.time()
    seed_all(0)
    fp, train, test = _data(model_name, dataset, None, test_n)
    qmodel = set_deploy(prepare_stlq(fp, bits, bits, select_ratio, tile, calib=head(train, CALIB_N), init=act_init),
                        True).to(resolve_device(device))
    acc = accuracy(qmodel, test)
    return {"model": model_name, "dataset": dataset, "bits": bits, "select_ratio": select_ratio, "tile": tile,
            "accuracy": acc, "nzr": nzr(qmodel), **mac_weighted_nzr(qmodel, test[0][0][None]),
            "test_n": len(test), "fp_test_accuracy": checkpoint_accuracy(fp, model_name, dataset, test),
            "seconds": time.time() - t0}


def run_config(c: dict, bits: int, select_ratio: float, select: bool, tile, seed: int) -> dict:
    """The keyword arguments of :func:`finetune_experiment` (and the cache key) for profile ``c``."""
    return dict(model_name=c["model"], dataset=c["dataset"], bits=bits, select_ratio=select_ratio, select=select,
                tile=tile, lam=c["lam"], seed=seed, epochs=c["epochs"], train_n=c["train_n"], curve_n=c["curve_n"],
                test_n=c["test_n"], record_every=c["record_every"],
                deploy_ratios=None if select else list(c["ratios"]), batch_size=c["batch_size"], lr=c["lr"],
                step_lr=c["step_lr"], **device_key(c.get("device")))


def settings(c: dict, bits_list) -> list[tuple]:
    """Every ``(bits, select_ratio, select, tile)`` notebook 07 fine-tunes: with select at each ratio,
    without select (deployed at every ratio), per tile at the largest ratio."""
    out = []
    for b in bits_list:
        out += [(b, r, True, None) for r in c["ratios"]]
        out += [(b, max(c["ratios"]), False, None), (b, max(c["ratios"]), True, c["tile"])]
    return out


def cached_run(c: dict, bits, select_ratio, select, tile, seed, progress: bool = True) -> dict:
    config = run_config(c, bits, select_ratio, select, tile, seed)
    key = dict(config, **imagenet_key(c["model"], c["dataset"]))
    return cached("alq_run", key, lambda: finetune_experiment(**config, progress=progress))


def sweep(c: dict, bits_list, seeds, progress: bool = True) -> dict:
    """``{(bits, select_ratio, select, tile, seed): record}`` for every setting and seed (cached)."""
    combos = [(*s, seed) for s in settings(c, bits_list) for seed in seeds]
    return {k: cached_run(c, *k, progress=False)
            for k in tqdm(combos, desc=f"STLQ fine-tuning {c['model']}/{c['dataset']}", disable=not progress)}


def ptq_sweep(c: dict, bits_list, ratios, tiles=(None,), progress: bool = True) -> dict:
    """``{(bits, select_ratio, tile): record}`` of :func:`ptq_experiment` (cached, ``alq_ptq``)."""
    combos = [(b, r, t) for b in bits_list for r in ratios for t in tiles]
    out = {}
    for b, r, t in tqdm(combos, desc="STLQ without training", disable=not progress):
        config = dict(model_name=c["model"], dataset=c["dataset"], bits=b, select_ratio=r, tile=t, test_n=c["test_n"],
                      act_init="mse", **device_key(c.get("device")))
        key = dict(config, **imagenet_key(c["model"], c["dataset"]))
        out[b, r, t] = cached("alq_ptq", key, lambda config=config: ptq_experiment(**config))
    return out


def _mean_std(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f} +- {_std(v):.2f}"


def final_table(runs: dict, bits_list, c: dict, seeds) -> list[dict]:
    """One row per setting: top-1 as trained and deployed (mean +- std over seeds), NZR as trained and
    deployed, MAC-weighted fraction of two-cycle lane groups when deployed."""
    rows = []
    for b, r, sel, tile in settings(c, bits_list):
        deploy = [r] if sel else list(c["ratios"])
        for d in deploy:
            recs = [runs[b, r, sel, tile, s] for s in seeds]
            key = f"{d:g}"
            rows.append({"W/A": f"{b}/{b}", "training": ("with select" if sel else "without select")
                         + (f", per tile ({tile})" if tile else ""),
                         "select ratio": d,
                         "top-1 as trained": _mean_std([x["trained"]["accuracy"] for x in recs]),
                         "NZR as trained": float(np.mean([x["trained"]["nzr"] for x in recs])),
                         "top-1 deployed": _mean_std([x["deployed"][key]["accuracy"] for x in recs]),
                         "NZR deployed": float(np.mean([x["deployed"][key]["nzr"] for x in recs])),
                         "two-cycle groups deployed": float(np.mean([x["deployed"][key]["mac_two_cycle_fraction"]
                                                                     for x in recs]))})
    return rows


def curve(record: dict, field: str = "accuracy", ratio=None) -> tuple[np.ndarray, np.ndarray]:
    """``(iterations, values)`` of one run's records: ``accuracy``, ``nzr`` or (``ratio`` given) the
    deployed accuracy at that ratio."""
    its = np.array([r["iteration"] for r in record["records"]], dtype=np.float64)
    vals = [r["deployed"][f"{ratio:g}"] if ratio is not None else r[field] for r in record["records"]]
    return its, np.array(vals, dtype=np.float64)


def accuracy_at_nzr(record: dict, target: float) -> tuple[float, float] | None:
    """``(accuracy, iteration)`` as trained where the run's NZR curve first falls to ``target`` (linear
    interpolation between the two records around the crossing; ``None`` if it never does)."""
    its, acc = curve(record, "accuracy")
    _, z = curve(record, "nzr")
    for i in range(1, len(z)):
        if z[i - 1] >= target >= z[i]:
            t = 0.0 if z[i - 1] == z[i] else (z[i - 1] - target) / (z[i - 1] - z[i])
            return float(acc[i - 1] + t * (acc[i] - acc[i - 1])), float(its[i - 1] + t * (its[i] - its[i - 1]))
    return None


def equal_nzr_table(runs: dict, bits_list, c: dict, seeds) -> list[dict]:
    """The supplement's "similar NZR" comparison, per seed then averaged: the with-select run's final
    NZR (as trained) is the target; the without-select accuracy is read where its own NZR curve
    crosses that target; the difference is with minus without."""
    rows = []
    r = max(c["ratios"])
    for b in bits_list:
        for ratio in c["ratios"]:
            diffs, targets, w_acc, wo_acc, its = [], [], [], [], []
            for s in seeds:
                w = runs[b, ratio, True, None, s]
                wo = runs[b, r, False, None, s]
                target = w["records"][-1]["nzr"]
                crossing = accuracy_at_nzr(wo, target)
                if crossing is None:
                    continue
                a_wo, it = crossing
                targets.append(target)
                its.append(it)
                w_acc.append(w["records"][-1]["accuracy"])
                wo_acc.append(a_wo)
                diffs.append(w_acc[-1] - a_wo)
            rows.append({"W/A": f"{b}/{b}", "select ratio": ratio, "seeds compared": len(diffs),
                         "NZR (with select, final)": float(np.mean(targets)) if targets else None,
                         "iteration (with select)": w["records"][-1]["iteration"],
                         "iteration (without select)": float(np.mean(its)) if its else None,
                         "with select": _mean_std(w_acc) if diffs else None,
                         "without select at equal NZR": _mean_std(wo_acc) if diffs else None,
                         "difference": _mean_std(diffs) if diffs else None,
                         "mean difference": float(np.mean(diffs)) if diffs else None})
    return rows


# --------------------------------------------------------------------------- beside notebook 03
# the fraction of MACs that need two shifts (and an add) for each of notebook 03's fixed-QPS methods:
# one log word is one shift; two-word log, APoT and SQ's shift-add MAC (SQ Fig. 4: a term of set A
# plus a term of set B) always add two shifted copies; a uniform weight needs a multiplier
TWO_SHIFT_FRACTION = {"log2": 0.0, "two_word_log": 1.0, "apot": 1.0, "sq": 1.0, "sq + refine": 1.0, "uniform": None,
                      "uniform + refine": None}


def notebook03_points(model: str, dataset: str, w_bits: int, a_bits: int) -> list[dict]:
    """Notebook 03's cached PTQ cells (``sq_ptq_run``) at W/A ``w_bits``/``a_bits``: one row per
    method, mean +- std top-1 over its seeds, its test images and its fraction of two-shift MACs."""
    groups: dict = {}
    for rec in records("sq_ptq_run"):
        c, p = rec["config"], rec["payload"]
        if (c.get("model"), c.get("dataset"), c.get("w_bits"), c.get("a_bits")) == (model, dataset, w_bits, a_bits):
            method = f"{c['method']}{' + refine' if c.get('refine') else ''}"
            groups.setdefault((method, c.get("test_size")), []).append(p["accuracy"])
    return [{"method": m, "test images": n, "seeds": len(a), "top-1": float(np.mean(a)), "std": _std(np.array(a)),
             "two-shift MACs": TWO_SHIFT_FRACTION.get(m)} for (m, n), a in sorted(groups.items())]


def ptq_table(ptq: dict) -> list[dict]:
    """One row per STLQ PTQ cell: top-1, NZR and the MAC-weighted fraction of two-shift MACs."""
    return [{"W/A": f"{b}/{b}", "selection": "per element" if t is None else f"per tile ({t})", "select ratio": r,
             "top-1": rec["accuracy"], "NZR": rec["nzr"], "two-shift MACs": rec["mac_nzr"],
             "two-cycle groups": rec["mac_two_cycle_fraction"], "test images": rec["test_n"]}
            for (b, r, t), rec in ptq.items()]


# --------------------------------------------------------------------------- the integer network
def _codes(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.round(x.detach().double() / float(step)).to(torch.int64)


def integer_network_check(qmodel: nn.Module, images: torch.Tensor) -> dict:
    """Every deployed STLQ layer of ``qmodel`` run on the shift MAC (:func:`lowbit.alq.hw.stlq_mac_conv2d`
    / ``stlq_mac_linear``) beside its float twin, on ``images``.

    Per layer: the integer accumulators equal ``F.conv2d`` of the integer codes and integer weights
    in float64 exactly (``exact``), and ``acc * act_step * scale * 2^-E`` differs from the float32
    layer output by at most ``max_abs_diff``. Then the whole network with every STLQ layer's output
    replaced by its integer pipeline: the logits' largest difference and the agreement of the
    predicted classes."""
    was = qmodel.training
    qmodel.eval()
    layers = stlq_layers(qmodel)
    rows = []

    def hook(mod, inputs, output, name):
        x = inputs[0]
        step = mod.input_quantizer.step_parameter.detach()
        xq = mod.input_quantizer(x)
        x_int = _codes(xq, step)
        res = mod.weight_quantizer.stlq(mod.weight)
        words = encode_stlq(res.first, res.second, res.scale, res.bits)
        w_int = integer_weights(words)
        if isinstance(mod, nn.Conv2d):
            acc = stlq_mac_conv2d(x_int, words, mod.stride, mod.padding)
            ref = F.conv2d(x_int.double(), w_int.double(), None, mod.stride, mod.padding)
        else:
            acc = stlq_mac_linear(x_int, words)
            ref = F.linear(x_int.double(), w_int.double())
        view = (1, -1) + (1,) * (acc.ndim - 2)
        y = acc.double() * float(step) * words.scale.double().reshape(view if words.scale.ndim else ()) * 2.0 ** -words.E
        if mod.bias is not None:
            y = y + mod.bias.detach().double().reshape(view)
        rows.append({"layer": name, "exact": bool(torch.equal(acc.double(), ref)),
                     "max_abs_diff": float((y - output.double()).abs().max()), "max_abs_acc": int(acc.abs().max()),
                     "two_word_weights": float(words.has2.double().mean())})
        return y.to(output.dtype)

    with torch.no_grad():
        fake = qmodel(images)
    handles = [m.register_forward_hook(lambda mod, i, o, name=n: hook(mod, i, o, name)) for n, m in layers]
    try:
        with torch.no_grad():
            integer = qmodel(images)  # every STLQ layer's output replaced by its integer pipeline
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was)
    return {"layers": rows, "logits_max_abs_diff": float((integer - fake).abs().max()),
            "same_prediction": float((integer.argmax(1) == fake.argmax(1)).double().mean()), "images": len(images)}


# --------------------------------------------------------------------------- hardware cost and claims
def cost_rows(runs: dict, bits: int, nzrs=None, lanes: int = LANES) -> list[dict]:
    """:func:`lowbit.alq.stlq_mac_cost` at W/A ``bits``/``bits`` along ``nzrs`` (per element with random
    placement, and per tile), plus one ``measured`` row per deployed fine-tuned run at that width
    (its MAC-weighted NZR and two-cycle fraction from the real masks)."""
    nzrs = np.linspace(0, 0.5, 26) if nzrs is None else nzrs
    rows = [{"kind": "per element", **stlq_mac_cost(bits, bits, float(z), lanes)} for z in nzrs]
    rows += [{"kind": "per tile", **stlq_mac_cost(bits, bits, float(z), lanes, per_tile=True)} for z in nzrs]
    for (b, _r, _sel, tile, _s), rec in runs.items():
        if b == bits:
            for d in rec["deployed"].values():
                rows.append({"kind": "measured", "tile": tile,
                             **stlq_mac_cost(bits, bits, d["mac_nzr"], lanes, d["mac_two_cycle_fraction"],
                                             per_tile=tile is not None)})
    return rows


def lane_table(bits: int, nzr: float = 0.15, lanes=(4, 8, 16)) -> list[dict]:
    """The one-shifter design's cost at one NZR against the lane-group (= tile) size: per element with
    random placement vs per tile."""
    rows = []
    for n in lanes:
        el, ti = stlq_mac_cost(bits, bits, nzr, n), stlq_mac_cost(bits, bits, nzr, n, per_tile=True)
        rows.append({"W/A": f"{bits}/{bits}", "NZR": nzr, "lanes = tile": n,
                     "two-cycle groups per element": el["b_two_cycle_fraction"],
                     "two-cycle groups per tile": ti["b_two_cycle_fraction"],
                     "gate-cycles per element": el["b_gate_cycles_per_mac"],
                     "gate-cycles per tile": ti["b_gate_cycles_per_mac"],
                     "storage bits per tile": ti["storage_bits_per_weight"]})
    return rows


def claim_lines(runs: dict, bits_list, c: dict, seeds) -> list[str]:
    """The supplement's three claims checked on our runs: one line each per W/A, ``True``/``False``
    first (does our analogue agree?), with the numbers and seed spread behind it."""
    lines = []
    r = max(c["ratios"])
    for b in bits_list:
        row = next(x for x in equal_nzr_table(runs, [b], c, seeds) if x["select ratio"] == r)
        key = f"{r:g}"
        final = np.array([runs[b, r, True, None, s]["deployed"][key]["accuracy"]
                          - runs[b, r, False, None, s]["deployed"][key]["accuracy"] for s in seeds])
        nzr_wo = np.mean([runs[b, r, False, None, s]["deployed"][key]["nzr"] for s in seeds])
        ok = row["mean difference"] is not None and row["mean difference"] > 0 and final.mean() > 0
        if row["mean difference"] is None:
            equal = "the without-select NZR curve never reaches the with-select run's final NZR"
        else:
            equal = (f"at equal NZR {row['NZR (with select, final)']:.3f} (with select at iteration "
                     f"{row['iteration (with select)']}, without at iteration {row['iteration (without select)']:.0f}) "
                     f"with {row['with select']} vs without {row['without select at equal NZR']}, difference "
                     f"{row['difference']} (curve images)")
        lines.append(f"{ok!s:5s} W/A {b}/{b}: with select beats without (supplement: about +1.2 points at equal NZR); "
                     f"select {r:.0%}: {equal}; final, deployed at {r:.0%} (without select's NZR "
                     f"{nzr_wo:.3f}): difference {_mean_std(final)} (test set, {len(seeds)} seeds)")
    for b in bits_list:
        key = f"{r:g}"
        el = np.array([runs[b, r, True, None, s]["deployed"][key]["accuracy"] for s in seeds])
        ti = np.array([runs[b, r, True, c["tile"], s]["deployed"][key]["accuracy"] for s in seeds])
        d = el - ti
        lines.append(f"{bool(d.mean() < 1.0)!s:5s} W/A {b}/{b}: per tile ({c['tile']}) costs under 1 point (supplement: "
                     f"69.72 -> 69.21); per element {_mean_std(el)}, per tile {_mean_std(ti)}, drop "
                     f"{_mean_std(d)}")
    lo = min(c["ratios"])
    for b in bits_list:
        low = np.array([runs[b, lo, True, None, s]["deployed"][f"{lo:g}"]["accuracy"] for s in seeds])
        fp = runs[b, lo, True, None, seeds[0]]["fp_test_accuracy"]
        lines.append(f"{bool(fp - low.mean() < 1.0)!s:5s} W/A {b}/{b}: a very low NZR still works (select {lo:.0%} "
                     f"within 1 point of FP {fp:.2f}): {_mean_std(low)}, drop {fp - low.mean():.2f}")
    return lines
