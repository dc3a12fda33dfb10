"""Algorithm 1 of appendix E: Q-Rater's layer-by-layer search, and the replay of its settings.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868. For each quantizable layer in forward order, earlier layers
frozen with their settings: ``WeightQuant(i)`` (weight clipping, then weight rounding),
``ActQuant(i)`` (the same for the layer's input activations) and ``BiasCorr(i)`` (eq. 7,
selective). Quantization is layer-wise and symmetric; an input activation that is non-negative
on the calibration set (after a ReLU) uses the unsigned range.

Choices where the paper is silent or ambiguous:

* Algorithm 1's ``WeightClip`` evaluates clipped *unrounded* weights; we evaluate clipped and
  RTN-rounded weights, as sec. 5.2 describes ("RTN is followed") and as ``ActClip`` does.
* The objective is top-1 accuracy on the fixed calibration subset, with ties (200 images give
  0.5 % steps) broken by the lower cross-entropy: ``target = acc% - 1e-3 * CE``.
* Bias correction (eq. 7) subtracts the per-channel mean output error against the FP model,
  ``E[W X] - E[W' X']``, where ``X'`` is the input in the partially quantized model; selective
  correction keeps it unless it lowers the objective (Algorithm 1, ``BiasCorr``: ties keep it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..core.clipping import baseline_threshold
from ..core.uniform import uniform_step
from ..core.validation import resolve_device
from ..data import as_tensors
from ..evaluate import accuracy
from ..nn.calibration import check_inputs
from ..nn.graph import QUANTIZABLE, model_device
from .config import ALL_BUT_FIRST, OPTION_NAMES, QRaterConfig
from .rounding import ActRounding, clip_round_weight
from .search import GAMMA_C_BOUNDS, clip_space, round_space, search_params
from .state import PrefixRunner, QuantizedCopy, channel_mean, output_means

_UNSET = object()  # "not given" (None is a meaningful w_bits / a_bits: keep that tensor FP)


@dataclass
class QRaterResult:
    """What :func:`run` returns: the quantized model, per-layer settings and every probe.

    ``config`` is the JSON-able summary of the options (:meth:`QRaterConfig.record`); unpacks
    as ``model, probes = run(...)``.
    """

    model: nn.Module
    layers: list[dict]
    probes: list[dict]
    config: dict
    fp_objective: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.probes))


@dataclass
class QRaterState:
    """What Algorithm 1 carries from layer to layer.

    ``quant``: the FP folded model (``quant.fp``) and the working quantized copy
    (``quant.model``); ``runner``: the copy on the calibration batches; ``fp_means``: the FP
    per-channel output means ``E[W X]`` of the selected layers (eq. 7); ``layers``: the
    per-layer records so far; ``probes``: every evaluation so far.
    """

    quant: QuantizedCopy
    runner: PrefixRunner
    fp_means: dict[str, torch.Tensor]
    layers: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)

    def measure(self, config: QRaterConfig, layer: str, stage: str, phase: str, params: dict) -> float:
        """Evaluate the working copy on the calibration set, log the probe, return its target."""
        acc, loss = self.runner.evaluate()
        t = config.target(acc, loss)
        self.probes.append({"layer": layer, "stage": stage, "phase": phase, "params": dict(params),
                            "accuracy": acc, "loss": loss, "target": t})
        return t


def calibration_pair(model: nn.Module, calib) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``calib`` (a data set or an ``(images, labels)`` pair), checked
    against ``model`` up front (:func:`lowbit.nn.calibration.check_inputs`)."""
    if isinstance(calib, (tuple, list)) and len(calib) == 2:
        images, labels = calib
    else:
        images, labels = as_tensors(calib)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.ndim < 2 or len(images) != len(labels) or len(labels) == 0:
        raise ValueError("calib must be a non-empty data set or an (images, labels) pair of equal length")
    images = images.float()
    check_inputs(model, images, labels)
    return images, labels.long()


def select_layers(order: list[str], layers) -> list[str]:
    """The layers to quantize (indices or names from ``order``), in forward order; all for ``None``,
    every one but the first for ``"all-but-first"`` (the paper quantizes "from the second layer to
    the last one", sec. 5.1)."""
    if layers is None:
        return list(order)
    if layers == ALL_BUT_FIRST:
        return list(order[1:])
    chosen = []
    for item in layers:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not -len(order) <= item < len(order):
                raise ValueError(f"layer index {item} out of range for {len(order)} quantizable layers")
            chosen.append(order[item])
        elif isinstance(item, str) and item in order:
            chosen.append(item)
        else:
            raise ValueError(f"unknown layer {item!r}: use indices or names from {order}")
    return [n for n in order if n in chosen]  # forward order


def _layer_seed(config: QRaterConfig, state: QRaterState, layer: str) -> int:
    return int(config.seed) * 100003 + 17 * state.quant.order.index(layer)


def _clip_and_round(state: QRaterState, config: QRaterConfig, layer: str, tag: str, x_max: float,
                    baseline: Callable[[], float], install: Callable, searched: bool, seed: int) -> tuple:
    """Clip then round one tensor of ``layer`` (``tag`` ``"w"`` or ``"a"``).

    Clipping: ``gamma_c`` searched (grid + BO) with RTN at ``Th_c = gamma_c * x_max``, or the
    ``baseline()`` threshold; rounding: ``gamma_n`` (x ``gamma_s``) searched at that threshold,
    or RTN. ``install(th, gamma_n, gamma_s)`` puts the quantizer in the working copy; the
    chosen one is left installed. Returns ``(gamma_c or None, Th_c, gamma_n, gamma_s)``.
    """
    search_clip = "clip" in config.ops and searched
    search_round = "round" in config.ops and searched
    if search_clip:
        def clip_probe(phase, gamma_c):
            install(min(max(gamma_c, GAMMA_C_BOUNDS[0]), 1.0) * x_max)
            return state.measure(config, layer, f"{tag}_clip", phase, {"gamma_c": gamma_c})

        gamma_c = search_params(clip_probe, clip_space(config.clip_grid), config.n_bo, seed + 1)["gamma_c"]
        threshold = gamma_c * x_max
    else:
        gamma_c, threshold = None, baseline()
    gamma_n, gamma_s = 0.0, 0.0
    if search_round:
        def round_probe(phase, gamma_n, gamma_s=0.0):
            install(threshold, gamma_n, gamma_s)
            return state.measure(config, layer, f"{tag}_round", phase, {"gamma_n": gamma_n, "gamma_s": gamma_s})

        space = round_space(config.order, config.gamma_n_grid, config.gamma_s_grid)
        found = search_params(round_probe, space, config.n_bo, seed + 2)
        gamma_n, gamma_s = found["gamma_n"], found.get("gamma_s", 0.0)
    install(threshold, gamma_n, gamma_s)
    return gamma_c, threshold, gamma_n, gamma_s


def weight_quant(state: QRaterState, layer: str, config: QRaterConfig) -> dict:
    """``WeightQuant(i)``: weight clipping, then weight rounding, of ``layer``; its record entries."""
    w_org = state.quant.fp_weight(layer).clone()
    wmax = float(w_org.abs().max())
    if wmax == 0.0:
        raise ValueError(f"layer {layer} has all-zero weights; it cannot be quantized")
    bits = config.w_bits

    def install(th, gamma_n=0.0, gamma_s=0.0):
        state.quant.set_weight(layer, clip_round_weight(w_org, th, bits, gamma_n, gamma_s, config.order))

    def baseline():
        return baseline_threshold(w_org.cpu(), bits, config.clip_rule, signed=True, seed=config.seed)

    gc, th, gn, gs = _clip_and_round(state, config, layer, "w", wmax, baseline, install,
                                     "weight" in config.targets, _layer_seed(config, state, layer))
    return dict(w_bits=bits, w_gamma_c=gc, w_max=wmax, w_threshold=th, w_step=uniform_step(th, bits),
                w_gamma_n=gn, w_gamma_s=gs)


def act_quant(state: QRaterState, layer: str, config: QRaterConfig) -> dict:
    """``ActQuant(i)``: clipping, then rounding, of ``layer``'s input activations; its record entries.

    ``Th_c = gamma_c * mean_j max|x_j|`` over calibration batches of ``stat_batch`` images.
    """
    xs = state.runner.capture(layer)
    signed = bool(min(float(x.min()) for x in xs) < 0)
    flat = torch.cat([x.reshape(-1) for x in xs])
    chunks = torch.cat(list(xs)).split(config.stat_batch)
    a_max = float(np.mean([float(c.abs().max()) for c in chunks]))  # mean_j max|x_j|
    if a_max == 0.0:
        a_max = 1e-8
    bits = config.a_bits

    def install(th, gamma_n=0.0, gamma_s=0.0):
        state.quant.act[layer] = ActRounding.at(th, bits, signed, gamma_n, gamma_s, config.order)

    def baseline():
        return baseline_threshold(flat.cpu(), bits, config.clip_rule, signed=signed, seed=config.seed)

    gc, th, gn, gs = _clip_and_round(state, config, layer, "a", a_max, baseline, install,
                                     "activation" in config.targets, _layer_seed(config, state, layer) + 2)
    return dict(a_bits=bits, a_gamma_c=gc, a_threshold=th, a_max=a_max, a_signed=signed,
                a_step=uniform_step(th, bits, signed), a_gamma_n=gn, a_gamma_s=gs)


def bias_corr(state: QRaterState, layer: str, config: QRaterConfig) -> dict:
    """``BiasCorr(i)`` (eq. 7): add ``E[W X] - E[W' X']`` to the bias, keep it unless the
    objective drops (``bias_mode="selective"``); its record entries, with the kept state's
    calibration accuracy and loss."""
    base = state.quant.fp_bias(layer).clone()
    state.quant.set_bias(layer, base)
    t_off = state.measure(config, layer, "bias", "off", {"bias": 0})
    delta = torch.zeros_like(base)
    keep = False
    if config.bias_mode != "never":
        delta = state.fp_means[layer] - channel_mean(state.runner.capture(layer, output=True))
        state.quant.set_bias(layer, base + delta)
        t_on = state.measure(config, layer, "bias", "on", {"bias": 1})
        keep = config.bias_mode == "always" or not (t_off > t_on)
        if not keep:
            state.quant.set_bias(layer, base)
    kept = state.probes[-1] if keep or config.bias_mode == "never" else state.probes[-2]
    return dict(bias_corrected=keep, bias_delta=(delta if keep else torch.zeros_like(delta)).tolist(),
                calib_accuracy=kept["accuracy"], calib_loss=kept["loss"])


def _resolve_config(w_bits, a_bits, search, ops, seed, config, options) -> QRaterConfig:
    given = {k: v for k, v in dict(w_bits=w_bits, a_bits=a_bits, search=search, ops=ops, seed=seed).items()
             if v is not _UNSET}
    given.update(options)
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown Q-Rater option(s) {unknown}: use {list(OPTION_NAMES)}")
    if config is not None:
        if not isinstance(config, QRaterConfig):
            raise TypeError(f"config must be a lowbit.qrater.QRaterConfig, got {type(config).__name__}")
        if given:
            raise TypeError(f"pass the options either as keywords or in config, not both (got {sorted(given)})")
        return config
    if "w_bits" not in given or "a_bits" not in given:
        raise TypeError("run needs w_bits and a_bits (None keeps that tensor FP), or config=QRaterConfig(...)")
    return QRaterConfig(**given)


def run(model: nn.Module, w_bits=_UNSET, a_bits=_UNSET, calib=None, search=_UNSET, ops=_UNSET, seed=_UNSET, *,
        config: QRaterConfig | None = None, **options) -> QRaterResult:
    """Q-Rater, Algorithm 1 of appendix E: quantize ``model`` layer by layer (API).

    ``run(model, w_bits, a_bits, calib, search="bo", ops=OPS, seed=0, **options)`` or
    ``run(model, calib=calib, config=QRaterConfig(...))``; the options are those of
    :class:`QRaterConfig`. ``calib`` is a data set or an ``(images, labels)`` pair (the fixed
    objective subset), checked against the model up front. For each quantizable layer in
    forward order (earlier layers frozen with their settings):

    1. weight clipping: ``gamma_c`` over ``clip_grid`` (0.1..1.0), then BO on ``(0, 1]``, each
       probe evaluated with RTN at ``Th_c = gamma_c * max|W|`` (``"clip"`` in ``ops``; else
       ``baseline_threshold(W, w_bits, clip_rule)``);
    2. weight rounding: ``gamma_n x gamma_s`` grid, then BO (``"round"``; else RTN);
    3. the same two steps for the layer's input activations, ``Th_c = gamma_c * mean_j max|x_j|``;
    4. bias correction (eq. 7), kept only if it does not lower the objective (``"bias"``;
       ``bias_mode`` ``"always"``/``"never"`` overrides, for Figs. 8, 18, 19).

    Returns a :class:`QRaterResult` (``model, probes = run(...)`` works): the quantized copy
    (BN folded), ``layers`` (JSON-able per-layer settings for :func:`apply`) and ``probes``
    (every evaluation: layer, stage, phase, params, accuracy, loss, target).
    """
    config = _resolve_config(w_bits, a_bits, search, ops, seed, config, options)
    if calib is None:
        raise ValueError("run needs calib: a data set or an (images, labels) pair, "
                         "e.g. lowbit.qrater.balanced_subset(train, 20, seed)")
    images, labels = calibration_pair(model, calib)
    device = resolve_device(config.device, default=model_device(model))
    images, labels = images.to(device), labels.to(device)
    quant = QuantizedCopy(model, images, device)
    selected = select_layers(quant.order, config.layers)
    runner = PrefixRunner(quant.model, images, labels, config.batch_size)
    fp_acc, fp_loss = runner.evaluate(use_cache=False)
    fp_means = output_means(PrefixRunner(quant.fp, images, labels, config.batch_size), selected)
    state = QRaterState(quant, runner, fp_means)

    for layer in tqdm(selected, desc="Q-Rater layers", disable=not config.progress):
        runner.freeze_before(layer, reuse=True)  # forward walk: earlier caches stay exact
        record = {"name": layer, "index": quant.order.index(layer), "order": config.order}
        if config.w_bits is not None:
            record.update(weight_quant(state, layer, config))
        if config.a_bits is not None:
            record.update(act_quant(state, layer, config))
        record.update(bias_corr(state, layer, config))
        state.layers.append(record)
    runner.release()
    return QRaterResult(quant.model.eval(), state.layers, state.probes, config.record(selected, len(labels)),
                        {"accuracy": fp_acc, "loss": fp_loss})


def apply(model: nn.Module, layers: list[dict], upto: int | None = None, example: torch.Tensor | None = None
          ) -> nn.Module:
    """A BN-folded copy of ``model`` with the settings of ``layers[:upto]`` (from :func:`run`) (API).

    Weights are re-quantized from the FP weights with the recorded threshold and
    ``gamma_n``/``gamma_s``; input-activation quantizers are attached as forward pre-hooks;
    recorded bias corrections are added. The result equals :func:`run`'s model for
    ``upto=None`` (tested). ``example`` is an input batch (for the forward-order trace).
    """
    if example is None:
        example = torch.zeros(2, *_input_shape(model))
    quant = QuantizedCopy(model, example, model_device(model))
    for rec in layers[:upto]:
        name = rec["name"]
        if name not in quant.modules:
            raise ValueError(f"layer {name!r} of the settings is not in this model")
        if rec.get("w_bits"):
            quant.set_weight(name, clip_round_weight(quant.fp_weight(name), rec["w_threshold"], rec["w_bits"],
                                                     rec["w_gamma_n"], rec["w_gamma_s"], rec["order"]))
        if rec.get("a_bits"):
            quant.act[name] = ActRounding(rec["a_threshold"], rec["a_step"], rec["a_bits"], rec["a_gamma_n"],
                                          rec["a_gamma_s"], rec["order"], rec["a_signed"])
        if rec.get("bias_corrected"):
            b = quant.fp_bias(name)
            quant.set_bias(name, b + torch.as_tensor(rec["bias_delta"], dtype=b.dtype, device=b.device))
    return quant.model.eval()


def _input_shape(model: nn.Module) -> tuple:
    first = next(m for m in model.modules() if isinstance(m, QUANTIZABLE))
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, 28, 28)
    return (first.in_features,)


def incremental_accuracy(model: nn.Module, layers: list[dict], dataset, batch_size: int = 1000,
                         example: torch.Tensor | None = None, counts=None) -> list[float]:
    """Test accuracy after quantizing layers ``1..k`` for ``k = 0..len(layers)`` (Figs. 6-8),
    or only for the layer counts ``k`` in ``counts`` (a coarser curve for a deep model)."""
    counts = range(len(layers) + 1) if counts is None else counts
    for k in counts:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= len(layers):
            raise ValueError(f"layer counts must be ints in [0, {len(layers)}], got {k!r}")
    return [accuracy(apply(model, layers, int(k), example), dataset, batch_size) for k in counts]
