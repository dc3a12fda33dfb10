"""What notebook 06 runs: LSQ / nuLSQ-A / nuLSQ-W / nuLSQ-WA fine-tuning of our FP checkpoints, cached.

Our CPU-scale analogue of the nuLSQ poster's "CIFAR100 top-1 accuracy (%) comparison to LSQ" table
(Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024). One run is "prepare the committed FP checkpoint with one variant at W/A
``bits``/``bits`` (steps initialised on 256 training images), fine-tune it with :func:`train_qat` on a
fixed seeded subset of ``train_n`` training images for ``epochs`` epochs, record the per-epoch curve
on the first ``curve_n`` test images and the final top-1 on the whole test set (the first ``test_n``
images in the smoke profile)", cached through
:func:`lowbit.results.cached` (``data/derived/lsq_run-*.json``) with its learned steps and code entropy.
"""
from __future__ import annotations

import shlex
import time

import numpy as np
import torch
from tqdm import tqdm

from ...core.validation import check_positive_int, device_key, resolve_device
from ...data import calibration_subset, head, load_dataset
from ...evaluate import accuracy, checkpoint_accuracy, evaluate
from ...imagenet import active, weights_for
from ...models import imagenet_key, load_pretrained
from ...results import cached, records
from ...train import batch_augmentation
from ...utils import seed_all
from ..entropy import code_entropy
from ..modules import _LearnedStepQuantizer
from ..qat import CALIB_N, VARIANTS, prepare_variant
from ..training import train_qat

ENTROPY_N = 1000


def learned_steps(model: torch.nn.Module) -> dict:
    """``{quantizer name: {"method", "bits", "signed", "steps": [...]}}`` of every LSQ/nuLSQ quantizer."""
    return {n: {"method": m.method, "bits": m.bits, "signed": m.signed,
                "steps": m.step_parameter.detach().reshape(-1).tolist()}
            for n, m in model.named_modules() if isinstance(m, _LearnedStepQuantizer)}


def qat_experiment(model_name: str, dataset: str, variant: str, bits: int, *, seed: int = 0, epochs: int = 2,
                   train_n: int | None = None, curve_n: int | None = 2000, test_n: int | None = None,
                   batch_size: int = 128,
                   lr: float = 0.01, step_lr: float = 1e-3, weight_decay: float = 5e-4, first_last=8,
                   init: str = "lsq", device=None, progress: bool = True) -> dict:
    """One QAT run as a JSON-able record (API); see the module docstring. ``device``: where
    :func:`lowbit.lsq.train_qat` trains and the test top-1s (initial, final, FP) are evaluated
    (``None``: CPU; ``"cuda"`` without a GPU is a ``ValueError``); the step initialisation and the
    code entropy run on the CPU."""
    dev = resolve_device(device)  # fail before loading anything
    t0 = time.time()
    seed_all(seed)
    fp = load_pretrained(model_name, dataset)
    train = load_dataset(dataset, "train")
    if train_n is not None and train_n < len(train):
        train = calibration_subset(train, train_n, seed=0)  # the same images for every seed and variant
    test = head(load_dataset(dataset, "test"), test_n)
    qmodel = prepare_variant(fp, variant, bits, calib=head(train, CALIB_N), first_last=first_last,
                             init=init)
    init_steps = learned_steps(qmodel)
    at_init = evaluate(qmodel.to(dev), head(test, curve_n))  # epoch 0 of the curve: the initialised steps
    qmodel, history = train_qat(qmodel, train, head(test, curve_n), epochs, lr=lr, step_lr=step_lr,
                                weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                                augment=batch_augmentation(dataset), device=device, progress=progress)
    train_seconds = time.time() - t0
    test_accuracy = accuracy(qmodel.to(dev), test)
    fp_test_accuracy = checkpoint_accuracy(fp.to(dev), model_name, dataset, test)
    qmodel = qmodel.cpu()
    return {"model": model_name, "dataset": dataset, "variant": variant, "bits": bits, "seed": seed,
            "init_curve": {"test_accuracy": at_init["accuracy"], "test_loss": at_init["loss"]},
            "history": history, "test_accuracy": test_accuracy, "test_n": len(test),
            "fp_test_accuracy": fp_test_accuracy,
            "init_steps": init_steps, "steps": learned_steps(qmodel),
            "entropy": code_entropy(qmodel, head(test, ENTROPY_N)),
            "train_seconds": train_seconds, "seconds": time.time() - t0, "threads": torch.get_num_threads()}


def run_config(c: dict, variant: str, bits: int, seed: int) -> dict:
    """The keyword arguments of :func:`qat_experiment` (and the cache key) for profile ``c``:
    ``model``, ``dataset``, ``epochs``, ``train_n``, ``curve_n``, ``test_n`` (``None``: the whole test set),
    ``batch_size``, ``lr``, ``step_lr``, and ``device`` when ``c`` names one other than the CPU (a GPU
    run is keyed apart from the CPU runs)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {list(VARIANTS)}")
    return dict(model_name=c["model"], dataset=c["dataset"], variant=variant, bits=bits, seed=seed,
                epochs=c["epochs"], train_n=c["train_n"], curve_n=c["curve_n"], test_n=c["test_n"],
                batch_size=c["batch_size"],
                lr=c["lr"], step_lr=c["step_lr"],
                **device_key(c.get("device")))


def cached_run(c: dict, variant: str, bits: int, seed: int, progress: bool = True) -> dict:
    """One cached :func:`qat_experiment` of profile ``c`` (an ImageNet network's weights and folder are
    part of the key)."""
    config = run_config(c, variant, bits, seed)
    key = dict(config, **imagenet_key(c["model"], c["dataset"]))
    return cached("lsq_run", key, lambda: qat_experiment(**config, progress=progress))


def torchrun_command(c: dict, variant: str, bits: int, seed: int, nproc: int) -> str:
    """The ``torchrun`` command line that trains the run ``(variant, bits, seed)`` of the ImageNet
    profile ``c`` on ``nproc`` GPUs of one node with ``python -m lowbit.lsq`` (DDP over NCCL; the
    batch per process is ``c["batch_size"] // nproc``, at least 1, so the global batch is
    ``c["batch_size"]`` where ``nproc`` divides it),
    from the project root, with the process's ImageNet inputs (:func:`lowbit.imagenet.active`)."""
    if c["dataset"] != "imagenet":
        raise ValueError(f"torchrun_command is for the ImageNet profile, not {c['model']}/{c['dataset']}")
    check_positive_int(nproc, "nproc", " (GPUs per node)")
    inputs = active()
    weights = weights_for(c["model"], inputs["weights"])
    args = [".venv/bin/torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "lowbit.lsq", c["model"],
            "imagenet", "--data-dir", str(inputs["data_dir"]), "--weights", str(weights), "--device", "cuda",
            "--variant", variant, "--bits", str(bits), "--epochs", str(c["epochs"]),
            "--batch-size", str(max(1, c["batch_size"] // nproc)), "--lr", f"{c['lr']:g}",
            "--step-lr", f"{c['step_lr']:g}", "--seed", str(seed)]
    if c.get("train_n") is not None:
        args += ["--train-n", str(c["train_n"])]
    if c.get("test_n") is not None:
        args += ["--test-n", str(c["test_n"])]
    stem = f"runs/qat/{c['model']}-{variant}-w{bits}a{bits}-s{seed}"
    args += ["--checkpoint", f"{stem}.ckpt", "--save", f"{stem}.pt"]
    return shlex.join(args)


LEVEL_LAYERS = {"resnet20": ["layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv2"]}  # notebook 06's figure


def level_layers(record: dict, model_name: str, k: int = 3) -> list[str]:
    """The layers whose learned levels notebook 06 draws: :data:`LEVEL_LAYERS` for ResNet-20, else
    ``k`` body layers of the run ``record`` spread from the first to the last (the first and last
    layers of the network, 8-bit LSQ, are not body layers)."""
    if model_name in LEVEL_LAYERS:
        return list(LEVEL_LAYERS[model_name])
    suffix = ".weight_quantizer"
    body = [n[:-len(suffix)] for n, q in record["steps"].items()
            if n.endswith(suffix) and q["bits"] == record["bits"]]
    if not body:
        raise ValueError(f"run {record.get('variant')} W/A {record.get('bits')} has no body layers")
    picks = sorted({round(i * (len(body) - 1) / max(1, k - 1)) for i in range(k)})
    return [body[i] for i in picks]


def sweep(c: dict, variants, bits_list, seeds, progress: bool = True) -> dict:
    """``{(variant, bits, seed): record}`` for every combination (cached runs)."""
    combos = [(v, b, s) for b in bits_list for v in variants for s in seeds]
    return {k: cached_run(c, *k, progress=False)
            for k in tqdm(combos, desc=f"QAT runs {c['model']}/{c['dataset']}", disable=not progress)}


def _std(values: np.ndarray) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _standard_error(values: np.ndarray) -> float:
    """Standard error of the mean over seeds (NaN for a single seed: no noise estimate)."""
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def accuracy_table(runs: dict, variants, bits_list, seeds) -> list[dict]:
    """One row per variant: ``mean +- std`` top-1 over seeds at each W/A, and the FP accuracy."""
    rows = []
    for v in variants:
        row = {"method": v}
        for b in bits_list:
            acc = np.array([runs[v, b, s]["test_accuracy"] for s in seeds])
            row[f"{b}/{b}"] = f"{acc.mean():.2f} +- {_std(acc):.2f}"
        rows.append(row)
    first = next(iter(runs.values()))
    rows.append({"method": "FP", **{f"{b}/{b}": f"{first['fp_test_accuracy']:.2f}" for b in bits_list}})
    return rows


def difference_to_lsq(runs: dict, variants, bits_list, seeds) -> list[dict]:
    """Per variant and W/A: mean difference to LSQ over seeds (paired by seed), its std, and
    whether it lies outside two standard errors of the paired differences."""
    rows = []
    for v in variants:
        if v == "LSQ":
            continue
        for b in bits_list:
            d = np.array([runs[v, b, s]["test_accuracy"] - runs["LSQ", b, s]["test_accuracy"] for s in seeds])
            se = _standard_error(d)
            rows.append({"method": v, "W/A": f"{b}/{b}", "mean diff to LSQ": float(d.mean()),
                         "std": _std(d) if len(d) > 1 else float("nan"), "2 SE": 2 * se,
                         "outside noise": bool(abs(d.mean()) > 2 * se) if len(d) > 1 else False})
    return rows


def nonuniformity(steps: list[float]) -> float:
    """Coefficient of variation (std / mean) of a quantizer's steps: 0 for uniform levels."""
    s = np.asarray(steps, dtype=np.float64)
    return float(s.std() / s.mean()) if len(s) > 1 and s.mean() > 0 else 0.0


def mean_entropy(record: dict, part: str) -> float:
    """Mean code entropy (bits) of ``part`` (``"weight"`` or ``"input"``) over the body layers."""
    vals = [e[part] for e in record["entropy"].values() if e[part] is not None and e["w_bits"] == record["bits"]]
    return float(np.mean(vals))


def nonuniformity_table(runs: dict, variants, bits_list, seeds) -> list[dict]:
    """Mean coefficient of variation of the nuLSQ quantizers' steps (body layers), before and after
    training: 0 means uniform levels, so ``after > 0`` is the learned non-uniformity."""
    rows = []
    for v in variants:
        for b in bits_list:
            before, after = [], []
            for s in seeds:
                r = runs[v, b, s]
                for name, q in r["steps"].items():
                    if q["method"] == "nuLSQ" and q["bits"] == b:
                        before.append(nonuniformity(r["init_steps"][name]["steps"]))
                        after.append(nonuniformity(q["steps"]))
            if after:
                rows.append({"method": v, "W/A": f"{b}/{b}", "quantizers": len(after) // len(seeds),
                             "CV of steps at init": float(np.mean(before)), "CV after QAT": float(np.mean(after)),
                             "max CV after QAT": float(np.max(after))})
    return rows


def entropy_table(runs: dict, variants, bits_list, seeds) -> list[dict]:
    """Mean code entropy (bits) over the body layers, weights and inputs, mean +- std over seeds."""
    rows = []
    for v in variants:
        row = {"method": v}
        for b in bits_list:
            for part in ("weight", "input"):
                vals = np.array([mean_entropy(runs[v, b, s], part) for s in seeds])
                row[f"{b}/{b} {part}"] = f"{vals.mean():.3f} +- {_std(vals):.3f}"
        rows.append(row)
    return rows


def best_ptq(model: str, dataset: str, bits: int, a_bits: int | None = None) -> dict | None:
    """The best post-training result at W/A ``bits``/``a_bits`` (``a_bits`` defaults to ``bits``) among notebook 03's SQ Table 3 cells
    (``sq_ptq_run``, mean over seeds per method) and notebook 05's Q-Rater runs (``qrater_run``), read
    from their cached records: ``{"source", "method", "accuracy", "seconds", "test_n", "seeds"}``."""
    a_bits = bits if a_bits is None else a_bits
    groups: dict = {}
    for rec in records("sq_ptq_run"):
        c, p = rec["config"], rec["payload"]
        if (c.get("model"), c.get("dataset"), c.get("w_bits"), c.get("a_bits")) == (model, dataset, bits, a_bits):
            key = ("notebook 03 (SQ)", f"{c['method']}{' + refine' if c.get('refine') else ''}", c.get("test_size"))
            groups.setdefault(key, []).append((p["accuracy"], p["seconds"]))
    for rec in records("qrater_run"):
        c, p = rec["config"], rec["payload"]
        if (c.get("model_name"), c.get("dataset"), c.get("w_bits"), c.get("a_bits")) == (model, dataset, bits, a_bits):
            ops = c.get("ops")
            method = (f"Q-Rater {'+'.join(ops)} ({c.get('search', 'grid')} search)" if ops is None or ops
                      else f"{str(c.get('clip_rule')).upper()} clipping + RTN")
            key = ("notebook 05 (Q-Rater)", method, p.get("test_n"))
            groups.setdefault(key, []).append((p["test_accuracy"], p["seconds"]))
    if not groups:
        return None
    (source, method, test_n), vals = max(groups.items(), key=lambda kv: np.mean([a for a, _ in kv[1]]))
    acc, sec = np.array(vals).T
    return {"source": source, "method": method, "accuracy": float(acc.mean()), "seconds": float(sec.mean()),
            "test_n": test_n, "seeds": len(vals), "W/A": f"{bits}/{a_bits}"}


def qat_vs_ptq(runs: dict, c: dict, bits_list, seeds) -> list[dict]:
    """Per W/A: the best QAT variant (mean over seeds) beside the best PTQ of notebooks 03 and 05,
    with the compute each took (QAT: mean wall minutes per run on our CPU; PTQ: per cell). Where no
    PTQ ran at ``b``/``b``, the nearest easier setting ``b``/4 (more activation bits) is shown."""
    rows = []
    for b in bits_list:
        best_v = max({v for v, bb, _ in runs if bb == b},
                     key=lambda v: np.mean([runs[v, b, s]["test_accuracy"] for s in seeds]))
        q = [runs[best_v, b, s] for s in seeds]
        ptq = best_ptq(c["model"], c["dataset"], b) or best_ptq(c["model"], c["dataset"], b, max(4, b))
        row = {"network": f"{c['model']}/{c['dataset']}", "W/A": f"{b}/{b}", "best QAT": best_v, "QAT top-1": float(np.mean([r["test_accuracy"] for r in q])),
               "QAT minutes": float(np.mean([r["seconds"] for r in q]) / 60), "QAT test images": q[0]["test_n"]}
        if ptq is None:
            row.update({"best PTQ": "none at this width in notebooks 03/05", "PTQ top-1": None, "PTQ minutes": None,
                        "PTQ test images": None, "QAT - PTQ": None})
        else:
            row.update({"best PTQ": f"{ptq['method']}, {ptq['source']}, W/A {ptq['W/A']}", "PTQ top-1": ptq["accuracy"],
                        "PTQ minutes": ptq["seconds"] / 60, "PTQ test images": ptq["test_n"] or "all",
                        "QAT - PTQ": row["QAT top-1"] - ptq["accuracy"]})
        rows.append(row)
    return rows


def claim_lines(runs: dict, c: dict, variants, bits_list, seeds) -> list[str]:
    """The poster's claims, checked on our runs of profile ``c``: one line each, ``True``/``False``
    first (does our analogue agree?), with the numbers behind it."""
    net = f"{c['model']}/{c['dataset']}"
    lines = []
    for b in bits_list:
        diffs = {r["method"]: r for r in difference_to_lsq(runs, variants, [b], seeds)}
        worst = max(abs(r["mean diff to LSQ"]) for r in diffs.values())
        outside = [m for m, r in diffs.items() if r["outside noise"]]
        lines.append(f"{worst <= 0.3!s:5s} {net} {b}/{b}: every nuLSQ variant within 0.3 points of LSQ (poster: "
                     f"|diff| <= 0.3); largest |mean diff| {worst:.2f}, outside 2 SE: {', '.join(outside) or 'none'}")
    for b in bits_list:
        cv = nonuniformity_table(runs, variants, [b], seeds)
        grew = all(r["CV after QAT"] > r["CV of steps at init"] for r in cv)
        lines.append(f"{grew!s:5s} {net} {b}/{b}: learned nuLSQ steps become non-uniform (mean CV after QAT "
                     + ", ".join(f"{r['method']} {r['CV after QAT']:.3f}" for r in cv) + "; 0 at init)")
    for b in bits_list:
        for part in ("weight", "input"):
            lsq_h = np.array([mean_entropy(runs["LSQ", b, s], part) for s in seeds])
            nu_h = np.array([mean_entropy(runs["nuLSQ-WA", b, s], part) for s in seeds])
            d = nu_h - lsq_h
            se = _standard_error(d)
            changed = bool(len(d) > 1 and abs(d.mean()) > 2 * se)
            lines.append(f"{changed!s:5s} {net} {b}/{b}: nuLSQ-WA changes the {part} code entropy (body mean "
                         f"{nu_h.mean():.3f} vs LSQ {lsq_h.mean():.3f} bits, diff {d.mean():+.3f} +- {se:.3f} SE)")
    return lines
