"""Model-level quantization-aware training set-up: :func:`prepare_qat` and the QAT layers.

The paper's variants (Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for
Neural Network Quantization*, ACCV 2024, comparison tables): **LSQ** (LSQ weights and activations,
Esser et al., *Learned Step Size Quantization*, ICLR 2020), **nuLSQ-A** (nuLSQ activations, LSQ
weights), **nuLSQ-W** (LSQ activations, nuLSQ weights), **nuLSQ-WA** (both nuLSQ).

Every ``nn.Conv2d``/``nn.Linear`` becomes a :class:`QATConv2d`/:class:`QATLinear` whose trainable FP
``weight`` is fake-quantized by ``weight_quantizer`` (signed) and whose input is fake-quantized by
``input_quantizer``: unsigned when every calibration input of the layer is non-negative (it follows
a ReLU, or a pooling of one), signed otherwise (the network input). First and last layer:
``first_last=8`` (default) quantizes them with 8-bit LSQ, the convention of Esser et al. (sec. 3;
the poster does not say), ``"fp"`` keeps them in full precision.

Gradient scale ``num_elements``: ``weight.numel()`` for weights; for activations ``act_elements``
chooses ``"features"`` (default: the features of one sample, ``C*H*W``, LSQ's ``N_F``) or
``"channels"`` (the input channels, as the authors' code does).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.validation import check_bits, check_choice
from ..nn.calibration import all_layer_inputs, calibration_tensor, check_inputs
from ..nn.graph import model_device, quantizable_layers, set_module
from .modules import INITS, _LearnedStepQuantizer, make_quantizer
from .quantizers import MAX_QAT_BITS

METHODS = ("lsq", "nulsq")
VARIANTS = {"LSQ": ("lsq", "lsq"), "nuLSQ-A": ("lsq", "nulsq"), "nuLSQ-W": ("nulsq", "lsq"),
            "nuLSQ-WA": ("nulsq", "nulsq")}  # name -> (weights, activations)
ACT_ELEMENTS = ("features", "channels")
FIRST_LAST_BITS = 8
CALIB_N = 256  # calibration images the experiments and the CLI initialise steps on


class _QATMixin:
    """A conv/linear layer whose weight and input are fake-quantized in every forward pass."""

    def _attach(self, weight_quantizer, input_quantizer, role: str):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.role = role  # "first", "last" or "body"
        return self

    def _quantized(self, x):
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return x, w


class QATConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input (straight-through gradients)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer, input_quantizer, role: str = "body") -> "QATConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new._attach(weight_quantizer, input_quantizer, role)

    def forward(self, x):
        x, w = self._quantized(x)
        return self._conv_forward(x, w, self.bias)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input (straight-through gradients)."""

    @classmethod
    def from_float(cls, fc: nn.Linear, weight_quantizer, input_quantizer, role: str = "body") -> "QATLinear":
        new = cls(fc.in_features, fc.out_features, fc.bias is not None, device=fc.weight.device,
                  dtype=fc.weight.dtype)
        new.load_state_dict(fc.state_dict())
        return new._attach(weight_quantizer, input_quantizer, role)

    def forward(self, x):
        x, w = self._quantized(x)
        return F.linear(x, w, self.bias)


def qat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, QATConv2d | QATLinear), ...]`` of a prepared model, registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QATMixin)]


def step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable step sizes of every LSQ/nuLSQ quantizer in ``model``."""
    return [m.step_parameter for m in model.modules() if isinstance(m, _LearnedStepQuantizer)]


def variant_methods(variant: str) -> tuple[str, str]:
    """``(weights, activations)`` quantizer of a paper variant, e.g. ``"nuLSQ-W"`` -> ``("nulsq", "lsq")``."""
    return VARIANTS[check_choice(variant, tuple(VARIANTS), "QAT variant")]


def _check_method(method, what: str):
    if method is not None:
        check_choice(method, METHODS, f"{what} quantizer")
    return method


def prepare_qat(model: nn.Module, weights: str | None = "lsq", activations: str | None = "lsq", *,
                w_bits: int = 4, a_bits: int = 4, first_last: str | int = FIRST_LAST_BITS, calib=None,
                init: str = "lsq", act_elements: str = "features", reference: bool = False,
                max_calib: int = 256) -> nn.Module:
    """A new model (``model`` is left untouched) ready for QAT with LSQ/nuLSQ quantizers.

    ``weights`` / ``activations``: ``"lsq"``, ``"nulsq"`` or ``None`` (full precision). ``calib``
    (a Dataset, DataLoader or image tensor; its first ``max_calib`` images) initialises every step:
    weight steps from the weights, input steps from the layer inputs the FP model sees on it.
    ``reference=True`` uses the slow reference quantizers (for tests and the benchmark).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_method(weights, "weight")
    _check_method(activations, "activation")
    w_bits = check_bits(w_bits, "w_bits", hi=MAX_QAT_BITS)
    a_bits = check_bits(a_bits, "a_bits", hi=MAX_QAT_BITS)
    if first_last != "fp" and first_last != FIRST_LAST_BITS:
        raise ValueError(f"first_last must be 'fp' (full precision) or {FIRST_LAST_BITS} (8-bit LSQ), got {first_last!r}")
    check_choice(init, INITS, "init")
    check_choice(act_elements, ACT_ELEMENTS, "act_elements")
    x = calibration_tensor(calib, max_calib)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise ValueError("model has NaN or inf parameters: load a valid checkpoint before prepare_qat")
    check_inputs(model, x, what="calib")
    qmodel = copy.deepcopy(model).eval()
    layers = quantizable_layers(qmodel)
    if not layers:
        raise ValueError("model has no nn.Conv2d or nn.Linear layer to quantize")
    inputs = all_layer_inputs(qmodel, [n for n, _ in layers], x.to(model_device(qmodel)), max_bytes=1 << 31)
    if inputs is None:
        raise ValueError("a layer is called more than once per forward pass (or the inputs exceed 2 GiB): "
                         "prepare_qat quantizes each conv/linear layer once; pass fewer calib images (max_calib)")
    for i, (name, layer) in enumerate(layers):
        role = "first" if i == 0 else "last" if i == len(layers) - 1 else "body"
        edge = role != "body"
        if edge and first_last == "fp":
            continue
        w_method = "lsq" if edge else weights
        a_method = "lsq" if edge else activations
        bw, ba = (FIRST_LAST_BITS, FIRST_LAST_BITS) if edge else (w_bits, a_bits)
        wq = aq = None
        if w_method is not None:
            wq = make_quantizer(w_method, bw, True, init=init, num_elements=layer.weight.numel(),
                                reference=reference).initialize(layer.weight)
        if a_method is not None:
            inp = torch.cat(inputs[name])
            signed = bool((inp < 0).any())
            n = inp[0].numel() if act_elements == "features" else inp.shape[1]
            aq = make_quantizer(a_method, ba, signed, init=init, num_elements=int(n),
                                reference=reference).initialize(inp)
        cls = QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear
        set_module(qmodel, name, cls.from_float(layer, wq, aq, role).to(model_device(qmodel)))
    return qmodel.train(model.training)


def prepare_variant(model: nn.Module, variant: str, bits: int, **kw) -> nn.Module:
    """:func:`prepare_qat` for a paper variant at W/A ``bits``/``bits``."""
    w, a = variant_methods(variant)
    return prepare_qat(model, w, a, w_bits=bits, a_bits=bits, **kw)
