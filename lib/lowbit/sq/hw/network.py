"""A whole network on SQ's shift-add MAC, beside its fake-quantized float twin.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 3.5 / Fig. 4: weights are SQ codes (eq. 3,
eq. 7), activations are linear-quantized unsigned integers, and every conv / linear layer is a MAC
array of shifts, adds and sign flips. Scale factors live outside the MAC ("implemented as
part of the succeeding layer", Sec. 3.1): a layer's float output is

    y = acc * act_scale * weight_scale[o] * 2**e_min + bias[o]

with ``acc`` the integer accumulator of :func:`lowbit.hw.mac_conv2d`. The *fake* mode computes
the same layer as ``F.conv2d`` of the dequantized (fake-quantized) activation and weight in
float64; the two modes must agree to float rounding, layer by layer and on the logits.

Everything that is not a conv / linear (BN, folded into the weights first; ReLU; residual
adds; pooling) runs in float64 in both modes. Asymmetric activations (the normalized input
image) use an integer zero point ``z``: the border is padded with ``z`` and ``z * sum_k w_k``
(itself computed on the MAC) is subtracted, as in integer-only inference (Jacob et al. 2018).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...nn.fold_bn import fold_bn
from ...nn.graph import quantizable_layers, set_module
from ..model_search import search_model
from ..search import search_qps

from .encode import SQDecoder, decode_sq, encode_sq
from .mac import (activation_qparams, dequantize_activation, mac_conv2d, mac_linear, activation_codes,
                  selection_matrices)

MODES = ("int", "fake")


class ShiftAddLayer(nn.Module):
    """A Conv2d / Linear whose products run on SQ's shift-add MAC (``mode="int"``) or on the
    fake-quantized float tensors (``mode="fake"``)."""

    def __init__(self, layer: nn.Module, codes: torch.Tensor, decoder: SQDecoder, bias,
                 act_bits: int, act_scale: float, act_zero_point: int = 0, name: str = ""):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"ShiftAddLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)
                                             or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
            raise ValueError("only plain convolutions (groups=1, dilation=1, numeric zero padding) are simulated")
        self.name = name
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.stride = getattr(layer, "stride", (1, 1))
        self.padding = getattr(layer, "padding", (0, 0))
        self.decoder = decoder
        self.act_bits, self.act_scale, self.act_zero_point = int(act_bits), float(act_scale), int(act_zero_point)
        self.mode = "int"
        self.register_buffer("codes", codes.to(torch.int64))
        out_ch = codes.shape[0]
        b = torch.zeros(out_ch, dtype=torch.float64) if bias is None else torch.as_tensor(bias, dtype=torch.float64)
        self.register_buffer("bias", b.detach().clone())
        self.register_buffer("weight_fake", decode_sq(codes, decoder))  # dequantized weight, float64
        s = decoder.scale
        self.register_buffer("weight_scale", (s if s.ndim else s.expand(out_ch)).to(torch.float64).clone())
        # z * sum_k w_int[o, k] on the MAC itself: the zero-point correction
        flat = self.codes.reshape(out_ch, -1)
        zeros = torch.full((1, flat.shape[1]), self.act_zero_point, dtype=torch.int64)
        self.register_buffer("zero_correction", mac_linear(zeros, flat, decoder)[0])
        self._selection = selection_matrices(self.codes, decoder)  # the decoder's output, computed once

    def quantize_input(self, x) -> torch.Tensor:
        return activation_codes(x, self.act_bits, self.act_scale, self.act_zero_point)

    def _view(self, v, ndim):
        return v.view(1, -1, *([1] * (ndim - 2)))

    def integer_forward(self, x_int) -> torch.Tensor:
        """Integer accumulators (zero point removed) of the layer on the shift-add MAC."""
        if self.kind == "conv":
            acc = mac_conv2d(x_int, self.codes, self.decoder, self.stride, self.padding,
                             pad_value=self.act_zero_point, selection=self._selection)
        else:
            acc = mac_linear(x_int, self.codes, self.decoder, selection=self._selection)
        return acc - self._view(self.zero_correction, acc.ndim)

    def output_scale(self) -> torch.Tensor:
        """Per-output-channel factor ``act_scale * weight_scale * 2**e_min`` (float64)."""
        return self.act_scale * self.weight_scale * self.decoder.unit

    def fake_forward(self, x_int) -> torch.Tensor:
        """``F.conv2d`` / ``F.linear`` of the fake-quantized activation and weight, float64."""
        xq = dequantize_activation(x_int, self.act_scale, self.act_zero_point)
        if self.kind == "conv":
            return F.conv2d(xq, self.weight_fake, self.bias, self.stride, self.padding)
        return F.linear(xq, self.weight_fake, self.bias)

    def forward(self, x):
        x_int = self.quantize_input(x)
        if self.mode == "fake":
            return self.fake_forward(x_int)
        acc = self.integer_forward(x_int)
        return acc.to(torch.float64) * self._view(self.output_scale(), acc.ndim) + self._view(self.bias, acc.ndim)

    def extra_repr(self):
        return (f"{self.kind}, {self.decoder.bits}-bit SQ weights, {self.act_bits}-bit activations "
                f"(zero point {self.act_zero_point}), mode={self.mode}")


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every :class:`ShiftAddLayer` of ``model`` to ``"int"`` or ``"fake"``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for m in model.modules():
        if isinstance(m, ShiftAddLayer):
            m.mode = mode
    return model


def shift_add_layers(model: nn.Module) -> list[tuple[str, ShiftAddLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShiftAddLayer)]


def _search_qps(weight, bits, option):
    """SQ Algorithm 1 (:func:`lowbit.sq.search.search_qps`) on one weight: ``(points, scale)``."""
    res = search_qps(weight, bits, universal=option, granularity="channel")
    return res.points, res.scale


@torch.no_grad()
def search_model_qps(model: nn.Module, weight_bits: int = 4, option=5, progress: bool = False) -> dict:
    """SQ Algorithm 1 on every Conv2d / Linear of the BN-folded ``model``.

    Returns ``{layer: {"points": [...], "scale": [...]}}`` (JSON-able, for
    :func:`lowbit.results.cached`), one QPS per layer and one scale per output channel.
    """
    searches = search_model(fold_bn(model).to(torch.float64), weight_bits, universal=option, skip_first_last=False,
                            progress=progress)
    return {r["layer"]: {"points": [float(p) for p in r["points"]], "scale": [float(v) for v in r["scale"]]}
            for r in searches}


@torch.no_grad()
def to_shift_add(model: nn.Module, calib_images: torch.Tensor, weight_bits: int = 4, act_bits: int = 8,
                 option=5, qps_fn=None, calib_batch: int = 256):
    """``(hw_model, report)``: ``model`` with BN folded and every Conv2d / Linear on the MAC.

    Weights: SQ with one QPS per layer and one scale per output channel (the paper's setting,
    Sec. 4), from ``qps_fn(weight, bits, option) -> (points, scale)`` (default
    :func:`lowbit.search_qps`) or from a mapping ``{layer: {"points", "scale"}}`` such as
    :func:`search_model_qps` returns. Activations: unsigned ``act_bits``-bit linear quantization at
    every layer input, min/max calibrated on ``calib_images`` through the float folded model
    (asymmetric with a zero point where the input can be negative, i.e. the normalized image).
    The returned model is float64, in ``"int"`` mode.
    """
    qps_fn = qps_fn or _search_qps
    folded = fold_bn(model).to(torch.float64).eval()
    layers = quantizable_layers(folded)
    table = qps_fn if isinstance(qps_fn, dict) else None
    if table is not None:
        missing = [n for n, _ in layers if n not in table]
        if missing:
            raise ValueError(f"the QPS mapping has no entry for layers {missing}")
    if not layers:
        raise ValueError("model has no Conv2d / Linear layer to map onto the MAC")
    lo = {n: float("inf") for n, _ in layers}
    hi = {n: float("-inf") for n, _ in layers}

    def hook(name):
        def fn(_mod, inputs):
            lo[name] = min(lo[name], float(inputs[0].min()))
            hi[name] = max(hi[name], float(inputs[0].max()))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        calib = torch.as_tensor(calib_images).to(torch.float64)
        for start in range(0, calib.shape[0], calib_batch):
            folded(calib[start:start + calib_batch])
    finally:
        for h in handles:
            h.remove()

    report = []
    for name, layer in layers:
        w = layer.weight.detach().to(torch.float64)
        if table is not None:
            points, scale = table[name]["points"], torch.as_tensor(table[name]["scale"], dtype=torch.float64)
        else:
            points, scale = qps_fn(w, weight_bits, option)
        codes, decoder = encode_sq(w, points, scale, option)
        a_scale, zp = activation_qparams(torch.tensor([lo[name], hi[name]]), act_bits)
        set_module(folded, name, ShiftAddLayer(layer, codes, decoder, layer.bias, act_bits, a_scale, zp, name))
        wq = decode_sq(codes, decoder)
        report.append({"layer": name, "kind": type(layer).__name__, "shape": list(w.shape),
                       "points": [float(p) for p in decoder.points[0]],
                       "register": f"0x{decoder.register():0{(decoder.register_bits + 3) // 4}x}",
                       "act_scale": a_scale, "act_zero_point": zp,
                       "weight_rel_error": float(((w - wq) ** 2).sum() / (w ** 2).sum())})
    return folded, report


@torch.no_grad()
def layer_exactness(hw_model: nn.Module, images: torch.Tensor) -> list[dict]:
    """Per layer: the integer-MAC output vs ``F.conv2d`` of the fake-quantized tensors.

    Runs ``images`` through the model in ``"int"`` mode; at every :class:`ShiftAddLayer` the
    quantized input is fed to both paths. ``max_abs_diff`` is relative to ``max_abs_output``;
    ``exact_acc`` says the accumulator equals ``F.conv2d`` of the *integer* tensors (int64 codes
    as integers), which checks the MAC itself with no float rounding at all.
    """
    rows = []

    def hook(mod, inputs, _out):
        x_int = mod.quantize_input(inputs[0])
        y_int = mod.integer_forward(x_int)
        y_int_f = y_int.to(torch.float64) * mod._view(mod.output_scale(), y_int.ndim) + mod._view(mod.bias, y_int.ndim)
        y_fake = mod.fake_forward(x_int)
        # the same accumulator from a float64 conv of the integer tensors (exact below 2**53)
        w_int = _integer_weights(mod)
        xz = x_int.to(torch.float64) - mod.act_zero_point
        ref = F.conv2d(xz, w_int, None, mod.stride, mod.padding) if mod.kind == "conv" else F.linear(xz, w_int)
        rows.append({"layer": mod.name, "outputs": int(y_int.numel()),
                     "exact_acc": bool(torch.equal(ref.round().to(torch.int64), y_int)
                                       and bool((ref == ref.round()).all())),
                     "max_abs_diff": float((y_int_f - y_fake).abs().max()),
                     "max_abs_output": float(y_fake.abs().max())})

    set_mode(hw_model, "int")
    handles = [m.register_forward_hook(hook) for _, m in shift_add_layers(hw_model)]
    try:
        hw_model(torch.as_tensor(images).to(torch.float64))
    finally:
        for h in handles:
            h.remove()
    return rows


def _integer_weights(mod: ShiftAddLayer) -> torch.Tensor:
    """Signed integer weights ``(-1)**sign * p * 2**-e_min`` as float64 (for the check only)."""
    dec = mod.decoder
    sign = mod.codes >> dec.index_bits
    idx = mod.codes & (dec.n_points - 1)
    ip = torch.as_tensor(dec.int_points)
    mag = ip[0][idx] if dec.groups == 1 else torch.gather(ip, 1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)
    return ((1 - 2 * sign) * mag).to(torch.float64)


@torch.no_grad()
def compare_logits(hw_model: nn.Module, images: torch.Tensor, labels=None, batch: int = 500,
                   progress: bool = False) -> dict:
    """Logits of the integer pipeline vs the fake-quantized float pipeline on ``images``.

    Returns the number of images, how many predictions agree, the largest logit difference
    (and the largest logit), and both accuracies when ``labels`` are given.
    """
    images = torch.as_tensor(images)
    starts = range(0, images.shape[0], batch)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="int vs fake")
    agree, max_diff, max_logit, correct_int, correct_fake = 0, 0.0, 0.0, 0, 0
    for s in starts:
        x = images[s:s + batch].to(torch.float64)
        y_int = set_mode(hw_model, "int")(x)
        y_fake = set_mode(hw_model, "fake")(x)
        p_int, p_fake = y_int.argmax(1), y_fake.argmax(1)
        agree += int((p_int == p_fake).sum())
        max_diff = max(max_diff, float((y_int - y_fake).abs().max()))
        max_logit = max(max_logit, float(y_fake.abs().max()))
        if labels is not None:
            lab = torch.as_tensor(labels[s:s + batch])
            correct_int += int((p_int == lab).sum())
            correct_fake += int((p_fake == lab).sum())
    set_mode(hw_model, "int")
    out = {"images": int(images.shape[0]), "same_prediction": agree, "max_abs_logit_diff": max_diff,
           "max_abs_logit": max_logit}
    if labels is not None:
        out["accuracy_int"] = correct_int / images.shape[0]
        out["accuracy_fake"] = correct_fake / images.shape[0]
    return out


def walk_weight(hw_model: nn.Module, layer_name: str, x_int: int, position=None) -> dict:
    """One real weight of ``layer_name`` through Fig. 4's datapath (for the notebook's walk-through).

    ``position``: index tuple into the layer's weight (default: the first weight with a
    non-zero code of sign 1, to show the sign flip). Returns the trace of
    :func:`lowbit.hw.shift_add_product` plus the float weight and the dequantized product.
    """
    from .mac import shift_add_product

    mod = dict(hw_model.named_modules())[layer_name]
    if not isinstance(mod, ShiftAddLayer):
        raise ValueError(f"{layer_name!r} is not a ShiftAddLayer; pick one of "
                         f"{[n for n, _ in shift_add_layers(hw_model)]}")
    dec = mod.decoder
    if position is None:
        neg = ((mod.codes >> dec.index_bits) == 1).nonzero()
        position = tuple(int(i) for i in (neg[0] if len(neg) else torch.zeros(mod.codes.ndim, dtype=torch.int64)))
    code = int(mod.codes[position])
    group = position[0] if dec.groups > 1 else 0
    trace = shift_add_product(int(x_int), code, dec, group)
    trace["position"] = list(position)
    trace["weight_scale"] = float(mod.weight_scale[position[0]])
    trace["weight_dequantized"] = float(mod.weight_fake[position])
    trace["unit"] = dec.unit
    trace["product_dequantized"] = trace["product"] * dec.unit * trace["weight_scale"]
    trace["check_x_times_weight"] = int(x_int) * trace["weight_dequantized"]
    return trace
