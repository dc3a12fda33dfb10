"""Model-level post-training quantization (PTQ): what SQ's Tables 2-3 run on a network.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, SQ), ECCV 2022, doi:10.1007/978-3-031-20083-0_39, sec. 4.1-4.2, and its supplementary material, sec. 1:

* BatchNorm is folded into the preceding conv before the weights are quantized
  (:func:`lowbit.nn.fold_bn.fold_bn`);
* the first conv and the last linear layer are at ``first_last_bits`` (8) uniform, with the same
  MSE-fitted per-channel scale as every fixed-QPS method (:func:`lowbit.sq.quantizers.fit_scale`).
  This is the one first/last rule of lowbit (notebook 01's weight-only rows use it too): its grid
  starts at the max-abs scale and keeps a candidate only when it lowers the MSE, so its weight
  error is never above max-abs scaling's, and one rule means one code path for every table;
* every other conv/linear weight is quantized with one of the QPS quantizers of
  :mod:`lowbit.sq.quantizers` (SQ eq. 3 with the QPS of eqs. 4-7), per output channel;
* activations (Table 3) are quantized uniformly per layer, unsigned after each ReLU, with a
  step calibrated on a calibration set by minimising the MSE (:mod:`lowbit.nn.activations`; the
  activation feeding the last layer is at ``first_last_bits``);
* SQ's "final optimisation" (``refine``): :mod:`lowbit.sq.refine`.

:class:`PTQConfig` holds every setting; :func:`quantize_model` takes it or the same settings as
keywords. The per-layer fits are memoised in an explicit :class:`FitCache` that the caller owns
(no module-level state): :meth:`FitCache.prime_sq` fills it from the cached model-level QPS
searches (:func:`lowbit.sq.model_search.search_model`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..core.memo import TensorMemo, tensor_digest
from ..core.validation import check_bits, check_choice, resolve_device
from ..nn.activations import ActQuantizer, attach_activation_quantizers, calibrate_activations
from ..nn.calibration import all_layer_inputs, calibration_tensor, check_inputs
from ..nn.fold_bn import fold_bn
from ..nn.graph import model_device, quantizable_layers, set_module
from ..nn.layers import QuantConv2d, QuantLinear, quantized_layers
from .model_search import search_model
from .quantizers import GRANULARITIES, METHODS, FittedQuantizer, check_method, fit_quantizer
from .refine import REFINE_MODES, refine_layer


@dataclass(frozen=True)
class PTQConfig:
    """Every setting of :func:`quantize_model` (SQ sec. 4.1-4.2).

    ``method``: ``"uniform"``, ``"log2"``, ``"two_word_log"``, ``"apot"`` or ``"sq"`` for the body
    layers at ``w_bits``; ``a_bits``: ReLU outputs (``None``: FP activations); ``first_last_bits``:
    first conv, last linear and the activation feeding it; ``granularity``: ``"channel"`` or
    ``"layer"``; ``refine``: ``False``, ``True`` (= ``"scale+round"``) or ``"scale"`` (SQ's final
    optimisation); ``seed``: row subsampling of the refinement; ``calib_size``: keep the first
    ``calib_size`` calibration inputs; ``refine_size``: refine on the first ``refine_size`` of them
    (activation steps still use all); ``max_rows``/``batch_size``: refinement rows and batches;
    ``universal``: SQ universal set (option 1..5 of SQ Table 1 or a pair ``(A, B)``);
    ``fold``: fold BatchNorm first (``False`` quantizes the weights as they are, e.g. the
    weight-only rows of supplement Table 2); ``device``: where the quantized model runs (default:
    the model's device; ``"cuda"`` without a GPU is a ``ValueError``).
    """

    method: str
    w_bits: int
    a_bits: int | None = None
    first_last_bits: int = 8
    granularity: str = "channel"
    refine: bool | str = False
    seed: int = 0
    calib_size: int | None = None
    max_rows: int = 16384
    batch_size: int = 256
    universal: object = 5
    refine_size: int | None = None
    fold: bool = True
    device: object = None

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: pass one of {METHODS}")
        object.__setattr__(self, "w_bits", check_bits(self.w_bits, "w_bits"))
        object.__setattr__(self, "a_bits", check_bits(self.a_bits, "a_bits", allow_none=True))
        object.__setattr__(self, "first_last_bits", check_bits(self.first_last_bits, "first_last_bits"))
        check_method(self.method, self.w_bits)
        check_choice(self.granularity, GRANULARITIES, "granularity")
        refine = "scale+round" if self.refine is True else self.refine
        if refine not in (False, None) and refine not in REFINE_MODES:
            raise ValueError(f"refine must be False, True or one of {REFINE_MODES}, got {self.refine!r}")
        object.__setattr__(self, "refine", refine or False)
        if not isinstance(self.fold, bool):
            raise TypeError(f"fold must be True or False, got {self.fold!r}")

    @property
    def needs_calib(self) -> bool:
        """Whether calibration data is needed (activation steps or refinement)."""
        return self.a_bits is not None or bool(self.refine)


class FitCache:
    """Memo of fitted weight quantizers, keyed by the weight's bytes and the fit's settings.

    An SQ search (Algorithm 1) is the slow part of :func:`quantize_model`; one ``FitCache`` passed
    to several calls (e.g. five calibration seeds of one table row) fits each layer once. It holds
    at most ``max_size`` entries (least recently used dropped); each call returns a copy.
    """

    def __init__(self, max_size: int = 512):
        self.max_size = int(max_size)
        self._fits = TensorMemo(self.max_size)

    def __len__(self) -> int:
        return len(self._fits)

    @staticmethod
    def key(weight: torch.Tensor, method: str, bits: int, granularity: str, universal=5) -> tuple:
        return (*tensor_digest(weight), method, int(bits), granularity, repr(universal) if method == "sq" else None)

    def put(self, key: tuple, fq: FittedQuantizer) -> None:
        self._fits.put(key, fq)

    def fit(self, weight: torch.Tensor, method: str, bits: int, granularity: str, universal=5) -> FittedQuantizer:
        """:func:`lowbit.sq.quantizers.fit_quantizer`, memoised."""
        key = self.key(weight, method, bits, granularity, universal)
        if key in self._fits:
            return self._fits.get(key)
        fq = fit_quantizer(weight, method, bits, granularity, universal=universal)
        self.put(key, fq)
        return fq

    def prime_sq(self, model: nn.Module, bits: int, universal=5, tag: str | None = None, fold: bool = True) -> int:
        """Fill the memo with the SQ fits of ``model``'s body layers from the model-level search.

        :func:`lowbit.sq.model_search.search_model` runs (or, with a ``tag``, reads from
        ``data/derived/sq_search_model-*.json``) Algorithm 1 on the (BN-folded, with ``fold``)
        weights: exactly what :func:`fit_quantizer` would compute, same QPS, same scales, so
        notebook 01's searches serve notebook 03. Returns the number of layers primed.
        """
        target = fold_bn(model) if fold else model
        layers = quantizable_layers(target)[1:-1]  # the body: first and last stay uniform
        if not layers:
            return 0
        by_name = {r["layer"]: r for r in search_model(target, bits, universal=universal, tag=tag)}
        for name, layer in layers:
            r = by_name[name]
            scale = torch.as_tensor(np.asarray(r["scale"], dtype=np.float64)).reshape(-1)
            fq = FittedQuantizer("sq", int(bits), np.sort(np.asarray(r["points"], dtype=np.float64)), scale,
                                 "channel", {"universal": universal, "search_loss": float(r["loss"])})
            self.put(self.key(layer.weight, "sq", bits, "channel", universal), fq)
        return len(layers)


def _config(method, w_bits, config: PTQConfig | None, options: dict) -> PTQConfig:
    if config is not None:
        if method is not None or w_bits is not None or options:
            raise TypeError("pass either config=PTQConfig(...) or method/w_bits/keywords, not both")
        if not isinstance(config, PTQConfig):
            raise TypeError(f"config must be a PTQConfig, got {type(config).__name__}")
        return config
    if method is None or w_bits is None:
        raise TypeError("quantize_model needs method and w_bits (or config=PTQConfig(...))")
    names = {f.name for f in dataclasses.fields(PTQConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown quantize_model option(s) {unknown}: use {sorted(names - {'method', 'w_bits'})}")
    return PTQConfig(method, w_bits, **options)


def quantize_model(model: nn.Module, method: str | None = None, w_bits: int | None = None, a_bits=None,
                   calib=None, *, config: PTQConfig | None = None, fits: FitCache | None = None,
                   **options) -> nn.Module:
    """A new module simulating ``model`` after post-training quantization (API).

    ``quantize_model(model, "sq", 4, a_bits=4, calib=calib, refine=True)`` or
    ``quantize_model(model, config=PTQConfig("sq", 4, a_bits=4, refine=True), calib=calib)``
    (settings: :class:`PTQConfig`).

    * BN folded into the preceding conv (:func:`fold_bn`), then every ``Conv2d``/``Linear``
      replaced by a :class:`QuantConv2d`/:class:`QuantLinear` with fake-quantized weight;
    * first conv and last linear: ``"uniform"`` at ``first_last_bits``; the others ``method`` at
      ``w_bits``, per output channel (``granularity="channel"``) or per layer;
    * ``a_bits``: each ReLU output quantized uniformly (unsigned, one MSE-calibrated step per
      layer on ``calib``); the activation feeding the last layer at ``first_last_bits``;
    * ``refine``: SQ's final optimisation (:mod:`lowbit.sq.refine`) on ``calib``.

    ``calib``: a DataLoader/Dataset of ``(input, label)`` pairs or a tensor of inputs (needed
    when ``a_bits`` or ``refine`` is set), checked against the model up front. ``fits``: a
    :class:`FitCache` to reuse fits across calls. ``model`` is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if a_bits is not None:
        options["a_bits"] = a_bits
    cfg = _config(method, w_bits, config, options)
    device = resolve_device(cfg.device, default=model_device(model))
    if calib is None and cfg.needs_calib:
        need = "a_bits" if cfg.a_bits is not None else "refine"
        raise ValueError(f"{need} needs calibration data: pass calib= (a DataLoader or Dataset of "
                         "(input, label) pairs or a tensor of inputs, e.g. "
                         "lowbit.data.calibration_subset(train_set, 1024, seed))")
    fits = FitCache() if fits is None else fits
    fp = (fold_bn(model) if cfg.fold else copy.deepcopy(model).eval()).to(device)  # a copy: model untouched
    for p in fp.parameters():
        p.requires_grad_(False)
    x_calib = calibration_tensor(calib, cfg.calib_size) if calib is not None else None
    if x_calib is not None:
        check_inputs(fp, x_calib)
    qmodel = copy.deepcopy(fp)
    layers = quantizable_layers(qmodel)
    if not layers:
        raise ValueError("model has no nn.Conv2d / nn.Linear layers to quantize")
    for i, (name, layer) in enumerate(layers):
        role = "first" if i == 0 else ("last" if i == len(layers) - 1 else "body")
        if role == "body":
            fq = fits.fit(layer.weight, cfg.method, cfg.w_bits, cfg.granularity, cfg.universal)
        else:
            fq = fits.fit(layer.weight, "uniform", cfg.first_last_bits, cfg.granularity)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        set_module(qmodel, name, cls.from_float(layer, fq, role))
    if cfg.a_bits is not None:
        attach_activation_quantizers(qmodel, cfg.a_bits, last_bits=cfg.first_last_bits)
        calibrate_activations(qmodel, x_calib, cfg.batch_size)
    if cfg.refine:
        qmodel.eval()
        names = [name for name, _ in quantized_layers(qmodel)]
        x_refine = x_calib[:cfg.refine_size]
        fp_inputs = all_layer_inputs(fp, names, x_refine, cfg.batch_size)  # one FP pass (None: too big)
        for j, name in enumerate(names):
            refine_layer(qmodel, name, fp, x_refine, cfg.refine, cfg.max_rows, cfg.seed * 1000 + j, cfg.batch_size,
                         None if fp_inputs is None else fp_inputs.pop(name))
    qmodel.quant_config = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
                           "first_last_bits": cfg.first_last_bits, "granularity": cfg.granularity,
                           "refine": cfg.refine, "seed": cfg.seed,
                           "universal": cfg.universal if cfg.method == "sq" else None}
    return qmodel.eval()


def _fmt_points(points, max_items: int = 8) -> str:
    p = np.asarray(points, dtype=np.float64)
    txt = ", ".join(f"{v:.4g}" for v in p[:max_items])
    return "{" + txt + (f", ... ({len(p)})" if len(p) > max_items else "") + "}"


def summary(qmodel: nn.Module):
    """Per-layer table (pandas DataFrame) of a quantized model: layer, role, method, bits,
    QPS (unscaled points), number of points, scale range, weight MSE, activation bits/step.
    """
    import pandas as pd

    rows = []
    acts = {n.rsplit(".act", 1)[0]: m for n, m in qmodel.named_modules() if isinstance(m, ActQuantizer)}
    for name, layer in quantized_layers(qmodel):
        fq = layer.quantizer
        s = torch.as_tensor(fq.scale, dtype=torch.float64).reshape(-1)
        rows.append({"layer": name, "kind": type(layer).__name__, "role": layer.role, "method": fq.method,
                     "bits": fq.bits, "qps": _fmt_points(fq.points), "n_points": len(fq.points),
                     "scale_min": float(s.min()), "scale_max": float(s.max()),
                     "weight_mse": layer.weight_mse(), "refined": bool(layer.refine_info)})
    for name, act in acts.items():
        rows.append({"layer": name, "kind": "ActQuantizer", "role": "activation",
                     "method": "uniform-unsigned" if not act.signed else "uniform-signed",
                     "bits": act.bits, "scale_min": float(act.step), "scale_max": float(act.step)})
    return pd.DataFrame(rows)
