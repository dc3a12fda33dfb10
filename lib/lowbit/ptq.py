"""Model-level post-training quantization (PTQ): what SQ's Tables 2-3 run on a network.

SQ paper (001_ab6a87911af615e3.txt), sec. 4.1-4.2 and supplement (000_...txt) sec. 1:

* BatchNorm is folded into the preceding conv before the weights are quantized
  (:func:`lowbit.fold_bn.fold_bn`);
* the first conv and the last linear layer are at ``first_last_bits`` (8) uniform;
* every other conv/linear weight is quantized with one of the QPS quantizers of
  :mod:`lowbit.quantizers` (SQ eq. 3 with the QPS of eqs. 4-7), per output channel;
* activations (Table 3) are quantized uniformly per layer, unsigned after each ReLU, with a
  step size calibrated on a calibration set by minimising the MSE (the activation feeding
  the last layer is at ``first_last_bits``);
* SQ's "final optimisation" (``refine=True``): with the calibration set, re-fit each
  layer's per-channel scales (weights re-map to other points of the *same* QPS) to
  minimise the reconstruction error of the layer's output, then choose per weight between
  its two neighbouring QPS points (AdaRound-style up/down rounding, Nagel et al. ICML 2020)
  by exact coordinate descent on the same quadratic. The layers are processed in order and
  each sees the inputs produced by the already-quantized layers before it (as in
  AdaRound/BRECQ). The same procedure serves every method, so ``"uniform"`` + refine is
  the AdaRound/BRECQ-like uniform baseline SQ compares with.

Fast paths, each with the plain reference it is tested to equal exactly (``tests/test_ptq.py``):
the FP network's layer inputs are captured in one pass (:func:`all_layer_inputs`) instead of one
pass per layer; sub-sampled im2col rows are gathered directly (:func:`_rows_at` vs :func:`_rows`,
:func:`_gram` vs :func:`_gram_reference`); activation fake-quantization runs in place
(:meth:`ActQuantizer.quantize` vs ``quantize_reference``); SQ's per-layer searches are read from
the ``sq_search_model`` cache (:func:`prime_sq_fits`).

The per-layer objective, for output channel ``c`` with FP weight row ``w`` and quantized
row ``q``, inputs ``X_q`` (quantized network) and ``X`` (FP network), unfolded to rows:
``||X_q q - X w||^2 = q^T G q - 2 q^T C w + const`` with ``G = X_q^T X_q``, ``C = X_q^T X``.
Output channels decouple, so every channel's scale and rounding are optimised exactly
against these two Gram matrices, which are accumulated once per layer.

Reusable pieces (Q-Rater, :mod:`lowbit.qrater`, builds on them): :func:`fold_bn`,
:func:`quantizable_layers`, :func:`module_calls`, :class:`ActQuantizer`, :func:`attach_activation_quantizers`,
:func:`calibrate_activations`, :class:`QuantConv2d` / :class:`QuantLinear`,
:func:`replace_layer`, :func:`calibration_tensor`, :func:`layer_inputs`, :func:`summary`.
"""
from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .fold_bn import _set_module, fold_bn  # noqa: F401  (fold_bn is part of this module's API)
from .qps import quantize_to_points
from .quantizers import METHODS, FittedQuantizer, check_method, fit_quantizer, quantize_rows

QUANTIZABLE = (nn.Conv2d, nn.Linear)
REFINE_MODES = ("scale", "scale+round")


# ----------------------------------------------------------------------------- model walking
def module_calls(model: nn.Module, example: torch.Tensor) -> list[tuple]:
    """Run ``model(example)`` once; per submodule call ``(name, module, start, end, inputs, output)``.

    ``start``/``end`` are ticks of one counter advanced at every call entry and exit, so
    ``[start, end]`` spans nest like the calls (used to find forward order and which
    submodules finish before a layer starts). Listed in order of call *exit*.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    events: list = []
    counter = [0]
    starts: dict = {}
    handles = []
    for name, m in model.named_modules():
        if m is model:
            continue

        def pre(mod, inp, name=name):
            starts.setdefault(name, []).append(counter[0])
            counter[0] += 1

        def post(mod, inp, out, name=name):
            events.append((name, mod, starts[name][-1], counter[0], inp, out))
            counter[0] += 1

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return events


def quantizable_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` of every ``nn.Conv2d`` / ``nn.Linear``.

    Without ``example``: registration order. For the models here (and torchvision's ResNets)
    that is forward order, so the first entry is the first conv and the last the classifier.
    With ``example`` (a batch of inputs; two are used): forward (execution) order, found by
    tracing one pass (:func:`module_calls`), each layer at its first call; layers that the
    pass does not reach are left out. Q-Rater's layer-by-layer walk (Algorithm 1) uses this.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if example is None:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    seen, order = set(), []
    for name, mod, *_ in sorted(module_calls(model, example[:2]), key=lambda ev: ev[2]):
        if isinstance(mod, QUANTIZABLE) and name not in seen:
            seen.add(name)
            order.append((name, mod))
    return order


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new`` in place."""
    _set_module(model, name, new)


# ----------------------------------------------------------------------------- calibration data
def calibration_tensor(calib, max_samples: int | None = None) -> torch.Tensor:
    """The inputs of ``calib`` as one tensor ``(N, ...)``.

    ``calib`` is a tensor of inputs, a Dataset of ``(input, label)`` pairs, or a DataLoader
    yielding ``(input, label)`` batches (or bare input batches).
    """
    if calib is None:
        raise ValueError("calib is required here: pass a DataLoader or Dataset of (input, label) "
                         "pairs or a tensor of inputs, e.g. lowbit.data.calibration_subset(train, 1024, seed)")
    if isinstance(calib, torch.Tensor):
        x = calib
    elif hasattr(calib, "images") and isinstance(getattr(calib, "images"), torch.Tensor):
        x = calib.images
    elif isinstance(calib, DataLoader):
        xs, n = [], 0
        for batch in calib:
            xb = batch[0] if isinstance(batch, (tuple, list)) else batch
            xs.append(xb)
            n += len(xb)
            if max_samples is not None and n >= max_samples:
                break
        if not xs:
            raise ValueError("calib DataLoader is empty")
        x = torch.cat(xs)
    elif isinstance(calib, Dataset) or hasattr(calib, "__getitem__"):
        n = len(calib) if max_samples is None else min(len(calib), max_samples)
        items = [calib[i] for i in range(n)]
        x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    else:
        raise TypeError(f"calib must be a tensor, Dataset or DataLoader, got {type(calib).__name__}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    return x[:max_samples] if max_samples is not None else x


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


# ----------------------------------------------------------------------------- activations
class ActQuantizer(nn.Module):
    """Uniform activation quantizer with one step per layer (SQ eq. 2 / eq. 4 grid).

    Unsigned (``signed=False``, after ReLU): levels ``step * {0, .., 2^b - 1}``; signed:
    ``step * {-(2^(b-1)-1), .., 2^(b-1)-1}``. ``step`` is set by :meth:`calibrate` (MSE over
    clipping thresholds). While ``observe`` is true it passes inputs through unchanged and
    keeps a random sample of them for calibration; with ``step`` unset it is the identity.
    """

    def __init__(self, bits: int, signed: bool = False, max_samples: int = 1 << 18):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
            raise ValueError(f"activation bits must be an int in 2..16, got {bits!r}")
        self.bits, self.signed, self.max_samples = int(bits), bool(signed), int(max_samples)
        self.register_buffer("step", torch.tensor(float("nan")))
        self.observe = False
        self._samples: list[torch.Tensor] = []
        self._absmax = 0.0
        self._generator = torch.Generator().manual_seed(0)

    @property
    def levels(self) -> tuple[int, int]:
        """Integer range ``(lo, hi)`` of the codes."""
        if self.signed:
            h = 2 ** (self.bits - 1) - 1
            return -h, h
        return 0, 2 ** self.bits - 1

    def quantize(self, x: torch.Tensor, step) -> torch.Tensor:
        """``clamp(round(x / step), lo, hi) * step`` (in place on one temporary: same values,
        a quarter of the memory traffic; :meth:`quantize_reference` is the plain form)."""
        if torch.is_grad_enabled() and (x.requires_grad or getattr(step, "requires_grad", False)):
            return self.quantize_reference(x, step)  # autograd: no in-place ops
        lo, hi = self.levels
        return torch.div(x, step).round_().clamp_(lo, hi).mul_(step)

    def quantize_reference(self, x: torch.Tensor, step) -> torch.Tensor:
        """Plain reference of :meth:`quantize`."""
        lo, hi = self.levels
        return torch.clamp(torch.round(x / step), lo, hi) * step

    def forward(self, x):
        if self.observe:
            flat = x.detach().reshape(-1).float()
            self._absmax = max(self._absmax, float(flat.abs().max())) if flat.numel() else self._absmax
            keep = min(flat.numel(), max(1, self.max_samples // 8))
            if keep < flat.numel():
                idx = torch.randint(flat.numel(), (keep,), generator=self._generator)
                flat = flat[idx.to(flat.device)]
            self._samples.append(flat.cpu())
            return x
        if torch.isnan(self.step):
            return x
        return self.quantize(x, self.step)

    @torch.no_grad()
    def calibrate(self, samples: torch.Tensor | None = None, grid: int = 100) -> float:
        """Choose the step minimising the MSE on ``samples`` (default: the observed ones)."""
        if samples is None:
            if not self._samples:
                raise ValueError("no observed activations: run calibrate_activations(model, calib) "
                                 "or pass samples")
            samples = torch.cat(self._samples)
            amax = self._absmax
            self._samples = []
        else:
            samples = samples.detach().reshape(-1).float()
            amax = float(samples.abs().max()) if samples.numel() else 0.0
        if samples.numel() > self.max_samples:
            idx = torch.randint(samples.numel(), (self.max_samples,), generator=self._generator)
            samples = samples[idx]
        if amax <= 0:
            self.step.fill_(1.0)
            return 1.0
        hi = self.levels[1]
        best = (float("inf"), amax / hi)
        for r in np.linspace(1.0, 0.02, grid):
            step = float(r * amax / hi)
            mse = float(((self.quantize(samples, step) - samples) ** 2).mean())
            if mse < best[0]:
                best = (mse, step)
        self.step.fill_(best[1])
        return best[1]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step):.4g}"


class QuantReLU(nn.Module):
    """``ReLU`` followed by an unsigned :class:`ActQuantizer` (activation quantization point)."""

    def __init__(self, relu: nn.Module, bits: int):
        super().__init__()
        self.relu = relu
        self.act = ActQuantizer(bits, signed=False)

    def forward(self, x):
        return self.act(self.relu(x))


def attach_activation_quantizers(model: nn.Module, bits: int, last_bits: int | None = None
                                 ) -> list[tuple[str, ActQuantizer]]:
    """Replace every ``nn.ReLU``/``nn.ReLU6`` of ``model`` (in place) by a :class:`QuantReLU`.

    The last ReLU in registration order (it feeds the classifier) gets ``last_bits``
    (default ``bits``). Returns ``[(relu_name, ActQuantizer), ...]``. A ReLU module called
    twice in the forward pass (torchvision's blocks) shares one quantizer.
    """
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    if not relus:
        raise ValueError("the model has no nn.ReLU modules to attach activation quantizers to; "
                         "use ReLU modules (not F.relu) or attach ActQuantizer yourself")
    out = []
    for i, (name, relu) in enumerate(relus):
        b = last_bits if (last_bits is not None and i == len(relus) - 1) else bits
        q = QuantReLU(relu, b)
        replace_layer(model, name, q)
        out.append((name, q.act))
    return out


@torch.no_grad()
def calibrate_activations(model: nn.Module, calib, batch_size: int = 256) -> dict[str, float]:
    """Calibrate every :class:`ActQuantizer` of ``model`` on ``calib`` (one pass, MSE steps).

    All quantizers observe FP-activation samples of the (weight-quantized) model in one pass,
    then each picks its MSE-optimal step. Returns ``{name: step}``.
    """
    x = calibration_tensor(calib)
    quants = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer)]
    was_training = model.training
    model.eval()
    for _, q in quants:
        q.observe, q._samples, q._absmax = True, [], 0.0
    try:
        dev = _device(model)
        for xb in _batches(x, batch_size):
            model(xb.to(dev))
    finally:
        for _, q in quants:
            q.observe = False
    steps = {n: q.calibrate() for n, q in quants}
    model.train(was_training)
    return steps


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# ----------------------------------------------------------------------------- quantized layers
class _QuantMixin:
    """Shared parts of :class:`QuantConv2d` and :class:`QuantLinear`."""

    def _init_quant(self, quantizer: FittedQuantizer, role: str):
        w_fp = self.weight.detach().clone()
        self.register_buffer("weight_fp", w_fp)
        self.quantizer = quantizer
        self.role = role  # "first", "last" or "body"
        self.act_in: nn.Module | None = None  # optional input quantizer (applied before the op)
        self.act_out: nn.Module | None = None  # optional output quantizer
        self.refine_info: dict = {}
        self.set_quantized_weight(quantizer(w_fp))

    @torch.no_grad()
    def set_quantized_weight(self, wq: torch.Tensor) -> None:
        """Install ``wq`` (same shape) as the simulated weight used in the forward pass."""
        self.weight.data = wq.detach().to(self.weight_fp.dtype).reshape(self.weight_fp.shape).clone()
        self.weight.requires_grad_(False)

    def weight_mse(self) -> float:
        """Mean squared error of the simulated weight against the FP (BN-folded) weight."""
        return float(((self.weight.double() - self.weight_fp.double()) ** 2).mean())

    def _wrap(self, x, op):
        if self.act_in is not None:
            x = self.act_in(x)
        y = op(x)
        if self.act_out is not None:
            y = self.act_out(y)
        return y


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose ``weight`` is the fake-quantized weight (FP copy in ``weight_fp``)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, quantizer: FittedQuantizer, role: str = "body") -> "QuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new._init_quant(quantizer, role)
        return new

    def forward(self, x):
        return self._wrap(x, lambda t: self._conv_forward(t, self.weight, self.bias))


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose ``weight`` is the fake-quantized weight (FP copy in ``weight_fp``)."""

    @classmethod
    def from_float(cls, fc: nn.Linear, quantizer: FittedQuantizer, role: str = "body") -> "QuantLinear":
        new = cls(fc.in_features, fc.out_features, fc.bias is not None,
                  device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(fc.weight)
            if fc.bias is not None:
                new.bias.copy_(fc.bias)
        new._init_quant(quantizer, role)
        return new

    def forward(self, x):
        return self._wrap(x, lambda t: F.linear(t, self.weight, self.bias))


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, QuantConv2d | QuantLinear), ...]`` of a quantized model, registration order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, _QuantMixin)]


# ----------------------------------------------------------------------------- weight fitting
_FIT_CACHE: "OrderedDict[tuple, FittedQuantizer]" = OrderedDict()
_FIT_CACHE_SIZE = 512


def _fit_key(weight: torch.Tensor, method: str, bits: int, granularity: str, universal=5) -> tuple:
    w = weight.detach().cpu().contiguous()
    return (hashlib.sha256(w.numpy().tobytes()).hexdigest(), tuple(w.shape), str(w.dtype),
            method, int(bits), granularity, repr(universal) if method == "sq" else None)


def _fit_cached(weight: torch.Tensor, method: str, bits: int, granularity: str, universal=5) -> FittedQuantizer:
    """:func:`fit_quantizer` memoised on the weight's bytes (an SQ search is the slow part)."""
    key = _fit_key(weight, method, bits, granularity, universal)
    if key in _FIT_CACHE:
        _FIT_CACHE.move_to_end(key)
        return copy.deepcopy(_FIT_CACHE[key])
    fq = fit_quantizer(weight, method, bits, granularity, universal=universal)
    _FIT_CACHE[key] = copy.deepcopy(fq)
    while len(_FIT_CACHE) > _FIT_CACHE_SIZE:
        _FIT_CACHE.popitem(last=False)
    return fq


# ----------------------------------------------------------------------------- refinement
class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256):
    """Yield, batch by batch, the input tensor that ``layer`` receives when ``model`` runs on ``x``.

    The forward pass stops at ``layer`` (the rest of the network is not computed). For a
    quantized layer the input is taken *after* its ``act_in`` quantizer, if it has one.
    """
    captured = {}

    def hook(mod, args):
        captured["x"] = args[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    dev = _device(model)
    try:
        for xb in _batches(x, batch_size):
            captured.clear()
            try:
                model(xb.to(dev))
            except _Stop:
                pass
            if "x" not in captured:
                raise ValueError("layer was not called in the forward pass; is it part of model?")
            inp = captured["x"]
            if getattr(layer, "act_in", None) is not None:
                inp = layer.act_in(inp)
            yield inp
    finally:
        handle.remove()


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows ``(M, K)`` such that the layer's pre-bias output is ``rows @ W.reshape(C, K).T``."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            pad = 0
        else:
            pad = layer.padding
        cols = F.unfold(x, layer.kernel_size, layer.dilation, pad, layer.stride)  # (B, K, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _n_rows(layer: nn.Module, x: torch.Tensor) -> int:
    """Number of rows :func:`_rows` would return for ``x`` (without building them)."""
    if isinstance(layer, nn.Conv2d):
        ho, wo = _conv_out_hw(layer, x)
        return x.shape[0] * ho * wo
    return x.numel() // x.shape[-1]


def _conv_out_hw(layer: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    pl, pr, pt, pb = layer._reversed_padding_repeated_twice
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho = (x.shape[-2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[-1] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return ho, wo


def _rows_at(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``_rows(layer, x)[idx]`` gathered directly (no full im2col): the same values, exactly.

    For a conv, row ``r`` is the receptive field of output pixel ``r % L`` of image ``r // L``
    (``L`` output pixels per image), flattened channel-major like ``F.unfold``.
    """
    if not isinstance(layer, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])[idx]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)  # (B, Cin, Hp, Wp)
    hp, wp = xp.shape[-2:]
    pixels = xp.permute(0, 2, 3, 1).reshape(-1, xp.shape[1])  # (B * Hp * Wp, Cin), one copy
    ho, wo = _conv_out_hw(layer, x)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    idx = idx.to(x.device)
    b, pix = idx // (ho * wo), idx % (ho * wo)
    top = b * hp * wp + (pix // wo) * sh * wp + (pix % wo) * sw  # (R,) flat pixel of each window corner
    taps = [pixels.index_select(0, top + i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]
    patches = torch.stack(taps, dim=2)  # (R, Cin, kh * kw): channel-major like F.unfold
    return patches.reshape(len(idx), -1)  # (R, Cin * kh * kw)


class _Budget(Exception):
    pass


@torch.no_grad()
def all_layer_inputs(model: nn.Module, names, x: torch.Tensor, batch_size: int = 256,
                     max_bytes: int = 1 << 30) -> dict | None:
    """``{name: [input batch, ...]}`` for the layers ``names`` of ``model``, in one pass over ``x``.

    The same tensors :func:`layer_inputs` yields layer by layer (no ``act_in`` here: meant for
    the FP model), so that the refinement runs the FP network once instead of once per layer.
    Returns ``None`` when they would take more than ``max_bytes`` (then use :func:`layer_inputs`).
    """
    store = {n: [] for n in names}
    used = [0]

    def hook_for(name):
        def hook(mod, args):
            used[0] += args[0].numel() * args[0].element_size()
            if used[0] > max_bytes:
                raise _Budget
            store[name].append(args[0].clone())
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    dev = _device(model)
    try:
        for xb in _batches(x, batch_size):
            model(xb.to(dev))
    except _Budget:
        return None
    finally:
        for h in handles:
            h.remove()
    n_batches = max(1, -(-len(x) // batch_size))
    if any(len(v) != n_batches for v in store.values()):
        return None  # a layer called zero or several times per pass: fall back
    return store


@torch.no_grad()
def _gram(qmodel, qlayer, fp_model, fp_layer, x, max_rows: int, seed: int, batch_size: int, fp_inputs=None):
    """``G = X_q^T X_q`` and ``C = X_q^T X_fp`` (float64) over (subsampled) input rows.

    ``fp_inputs``: the FP layer's input batches if already captured (:func:`all_layer_inputs`);
    rows are subsampled by gathering them (:func:`_rows_at`), same rows as ``_rows(..)[idx]``.
    """
    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, -(-len(x) // batch_size))
    per_batch = max(1, max_rows // n_batches)
    g = c = None
    rows_used = 0
    fp_iter = iter(fp_inputs) if fp_inputs is not None else layer_inputs(fp_model, fp_layer, x, batch_size)
    for xq, xf in zip(layer_inputs(qmodel, qlayer, x, batch_size), fp_iter):
        n = _n_rows(qlayer, xq)
        if n > per_batch:
            idx = torch.randperm(n, generator=gen)[:per_batch]
            rq, rf = _rows_at(qlayer, xq, idx), _rows_at(fp_layer, xf, idx)
        else:
            rq, rf = _rows(qlayer, xq), _rows(fp_layer, xf)
        gb, cb = (rq.T @ rq).double(), (rq.T @ rf).double()  # float32 products, float64 sums
        g = gb if g is None else g + gb
        c = cb if c is None else c + cb
        rows_used += len(rq)
    return g / rows_used, c / rows_used, rows_used


@torch.no_grad()
def _gram_reference(qmodel, qlayer, fp_model, fp_layer, x, max_rows: int, seed: int, batch_size: int):
    """Plain reference of :func:`_gram`: full im2col of both inputs, then subsample the rows."""
    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, -(-len(x) // batch_size))
    per_batch = max(1, max_rows // n_batches)
    g = c = None
    rows_used = 0
    for xq, xf in zip(layer_inputs(qmodel, qlayer, x, batch_size), layer_inputs(fp_model, fp_layer, x, batch_size)):
        rq, rf = _rows(qlayer, xq), _rows(fp_layer, xf)
        if len(rq) > per_batch:
            idx = torch.randperm(len(rq), generator=gen)[:per_batch].to(rq.device)
            rq, rf = rq[idx], rf[idx]
        gb, cb = (rq.T @ rq).double(), (rq.T @ rf).double()
        g = gb if g is None else g + gb
        c = cb if c is None else c + cb
        rows_used += len(rq)
    return g / rows_used, c / rows_used, rows_used


def _recon_loss(q: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``q^T G q - 2 q^T b`` for rows ``q`` (C, K), ``b = W C^T`` (C, K)."""
    return ((q @ g) * q).sum(1) - 2 * (q * b).sum(1)


def refine_scales(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                  multipliers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale search minimising the output reconstruction error (SQ final opt.).

    ``w`` (C, K) FP rows, ``scale`` (C,), ``cw = w @ C^T``. Each channel tries
    ``scale * m`` for every multiplier ``m`` (default ``0.5 .. 1.5``, 51 values, incl. 1) with
    nearest-point rounding and keeps the best. Returns ``(scale, loss)`` (C,).
    """
    if multipliers is None:
        multipliers = torch.linspace(0.5, 1.5, 51, dtype=torch.float64)
    best_s = scale.clone()
    best_l = _recon_loss(quantize_rows(w, points, best_s), g, cw)
    for m in multipliers:
        s = scale * m
        loss = _recon_loss(quantize_rows(w, points, s), g, cw)
        better = loss < best_l
        best_s, best_l = torch.where(better, s, best_s), torch.where(better, loss, best_l)
    return best_s, best_l


def refine_rounding(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                    sweeps: int = 3) -> torch.Tensor:
    """Choose each weight's point among its two QPS neighbours to minimise the layer loss.

    AdaRound's up/down choice (Nagel et al. 2020) generalised to any QPS and solved by exact
    coordinate descent on ``q^T G q - 2 q^T C w`` (all channels at once, ``sweeps`` passes
    over the K inputs). Starts from nearest rounding; the loss never increases. Returns the
    quantized rows (C, K), every entry in ``{+-scale_c * p}``.
    """
    p = torch.as_tensor(np.unique(np.asarray(points, dtype=np.float64)), dtype=w.dtype)
    s = scale.reshape(-1, 1)
    u = w.abs() / s  # (C, K)
    lo_idx = (torch.searchsorted(p, u.contiguous(), right=True) - 1).clamp(0, len(p) - 1)
    hi_idx = (lo_idx + 1).clamp(max=len(p) - 1)
    sign = torch.sign(w)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    cand_lo, cand_hi = sign * s * p[lo_idx], sign * s * p[hi_idx]
    q = quantize_to_points(w, p, scale, dim=0)
    gq = q @ g  # (C, K)
    diag = torch.diagonal(g)
    for _ in range(sweeps):
        changed = 0
        for k in range(w.shape[1]):
            cur = q[:, k]
            alt = torch.where(cur == cand_lo[:, k], cand_hi[:, k], cand_lo[:, k])
            d = alt - cur
            delta = d * d * diag[k] + 2 * d * (gq[:, k] - cw[:, k])
            take = (delta < -1e-12 * diag[k] * s[:, 0] ** 2) & (d != 0)
            if take.any():
                d = torch.where(take, d, torch.zeros_like(d))
                q[:, k] = cur + d
                gq += d[:, None] * g[k][None, :]
                changed += int(take.sum())
        if changed == 0:
            break
    return q


@torch.no_grad()
def refine_layer(qmodel: nn.Module, name: str, fp_model: nn.Module, x: torch.Tensor,
                 mode: str = "scale+round", max_rows: int = 16384, seed: int = 0,
                 batch_size: int = 256, fp_inputs=None) -> dict:
    """SQ's final optimisation for one quantized layer ``name`` of ``qmodel`` (in place).

    Inputs come from ``qmodel`` (earlier layers already quantized), targets from the FP
    folded ``fp_model`` (or ``fp_inputs``, the FP layer's input batches from
    :func:`all_layer_inputs`). Returns ``{"loss_drop", "rows", "mode"}``: how much the summed
    per-channel output reconstruction error (mean over the ``rows`` input rows) went down.
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")
    layer = qmodel.get_submodule(name)
    fp_layer = fp_model.get_submodule(name)
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return {"skipped": "grouped convolution"}
    g, c, rows = _gram(qmodel, layer, fp_model, fp_layer, x, max_rows, seed, batch_size, fp_inputs)
    w = layer.weight_fp.double().reshape(layer.weight_fp.shape[0], -1)  # (C, K)
    fq = layer.quantizer
    points = np.asarray(fq.points, dtype=np.float64)
    scale = torch.as_tensor(fq.scale, dtype=torch.float64)
    per_layer = scale.ndim == 0
    scale_c = scale.expand(w.shape[0]).clone() if per_layer else scale.clone()
    cw = w @ c.T  # (C, K)
    q0 = layer.weight.double().reshape(w.shape)
    before = _recon_loss(q0, g, cw)
    if per_layer:  # one scale for the layer: search on the summed loss
        best = (float(before.sum()), scale_c[0].clone())
        for m in torch.linspace(0.5, 1.5, 51, dtype=torch.float64):
            s = scale_c[0] * m
            loss = float(_recon_loss(quantize_rows(w, points, s.expand(w.shape[0])), g, cw).sum())
            if loss < best[0]:
                best = (loss, s)
        scale_c = best[1].expand(w.shape[0]).clone()
    else:
        scale_c, _ = refine_scales(w, points, scale_c, g, cw)
    q = quantize_to_points(w, points, scale_c, dim=0)
    if mode == "scale+round":
        q = refine_rounding(w, points, scale_c, g, cw)
    after = _recon_loss(q, g, cw)
    if after.sum() > before.sum():  # keep the better of the two (never make it worse)
        q, after = q0, before
    else:
        fq.scale = scale_c[0].clone() if per_layer else scale_c
    layer.set_quantized_weight(q.to(layer.weight_fp.dtype))
    # the objective is known up to a per-channel constant (w^T X^T X w): report the drop
    info = {"loss_drop": float((before - after).sum()), "rows": rows, "mode": mode}
    layer.refine_info = info
    return info


# ----------------------------------------------------------------------------- the API
def _check_bits_arg(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int number of bits (e.g. 4){' or None' if allow_none else ''}, "
                         f"got {value!r}")
    if not 2 <= int(value) <= 16:
        raise ValueError(f"{name} must be between 2 and 16 bits, got {value}")
    return int(value)


def quantize_model(model: nn.Module, method: str, w_bits: int, a_bits: int | None = None, calib=None,
                   first_last_bits: int = 8, granularity: str = "channel", refine=False, seed: int = 0,
                   calib_size: int | None = None, max_rows: int = 16384, batch_size: int = 256,
                   universal=5, refine_size: int | None = None) -> nn.Module:
    """A new module simulating ``model`` after post-training quantization (API).

    * BN folded into the preceding conv (:func:`fold_bn`), then every ``Conv2d``/``Linear``
      replaced by a :class:`QuantConv2d`/:class:`QuantLinear` with fake-quantized weight;
    * first conv and last linear: ``"uniform"`` at ``first_last_bits``; the others:
      ``method`` (``"uniform"``, ``"log2"``, ``"two_word_log"``, ``"apot"``, ``"sq"``) at
      ``w_bits``, per output channel (``granularity="channel"``) or per layer;
    * ``a_bits``: each ReLU output quantized uniformly (unsigned, one MSE-calibrated step per
      layer on ``calib``); the activation feeding the last layer at ``first_last_bits``;
    * ``refine``: SQ's final optimisation (see module docstring) on ``calib``: ``True`` or
      ``"scale+round"`` (scales, then up/down rounding among QPS neighbours), ``"scale"``
      (per-channel scales only) or ``False``.

    ``calib``: a DataLoader/Dataset of ``(input, label)`` pairs or a tensor of inputs
    (needed when ``a_bits`` or ``refine`` is set); ``calib_size`` keeps its first samples and
    ``refine_size`` (default: all) limits the refinement to the first ``refine_size`` of them
    (activation steps still use all).
    ``seed`` seeds the row subsampling of the refinement; ``universal`` is the SQ universal
    set (option 1..5 of SQ Table 1, default 5). ``model`` is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}: pass one of {METHODS}")
    w_bits = _check_bits_arg(w_bits, "w_bits")
    a_bits = _check_bits_arg(a_bits, "a_bits", allow_none=True)
    first_last_bits = _check_bits_arg(first_last_bits, "first_last_bits")
    check_method(method, w_bits)
    if granularity not in ("channel", "layer"):
        raise ValueError(f"granularity must be 'channel' or 'layer', got {granularity!r}")
    if refine is True:
        refine = "scale+round"
    if refine not in (False, None) and refine not in REFINE_MODES:
        raise ValueError(f"refine must be False, True or one of {REFINE_MODES}, got {refine!r}")
    if calib is None and (a_bits is not None or refine):
        need = "a_bits" if a_bits is not None else "refine"
        raise ValueError(f"{need} needs calibration data: pass calib= (a DataLoader or Dataset of "
                         "(input, label) pairs or a tensor of inputs, e.g. "
                         "lowbit.data.calibration_subset(train_set, 1024, seed))")
    x_calib = calibration_tensor(calib, calib_size) if calib is not None else None

    fp = fold_bn(model)  # a copy: the input model is never modified
    for p in fp.parameters():
        p.requires_grad_(False)
    qmodel = copy.deepcopy(fp)
    layers = quantizable_layers(qmodel)
    if not layers:
        raise ValueError("model has no nn.Conv2d / nn.Linear layers to quantize")
    for i, (name, layer) in enumerate(layers):
        role = "first" if i == 0 else ("last" if i == len(layers) - 1 else "body")
        if role == "body":
            fq = _fit_cached(layer.weight, method, w_bits, granularity, universal)
        else:
            fq = _fit_cached(layer.weight, "uniform", first_last_bits, granularity)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        replace_layer(qmodel, name, cls.from_float(layer, fq, role))
    if a_bits is not None:
        attach_activation_quantizers(qmodel, a_bits, last_bits=first_last_bits)
        calibrate_activations(qmodel, x_calib, batch_size)
    if refine:
        qmodel.eval()
        names = [name for name, _ in quantized_layers(qmodel)]
        x_refine = x_calib[:refine_size]
        fp_inputs = all_layer_inputs(fp, names, x_refine, batch_size)  # one FP pass (None: too big)
        for j, name in enumerate(names):
            refine_layer(qmodel, name, fp, x_refine, refine, max_rows, seed * 1000 + j, batch_size,
                         None if fp_inputs is None else fp_inputs.pop(name))
    qmodel.quant_config = {"method": method, "w_bits": w_bits, "a_bits": a_bits,
                           "first_last_bits": first_last_bits, "granularity": granularity,
                           "refine": refine or False, "seed": seed,
                           "universal": universal if method == "sq" else None}
    return qmodel.eval()


def _fmt_points(points, max_items: int = 8) -> str:
    p = np.asarray(points, dtype=np.float64)
    txt = ", ".join(f"{v:.4g}" for v in p[:max_items])
    return "{" + txt + (f", ... ({len(p)})" if len(p) > max_items else "") + "}"


def summary(qmodel: nn.Module):
    """Per-layer table (pandas DataFrame) of a quantized model: layer, role, method, bits,
    QPS (unscaled points), number of points, scale range, weight MSE, activation bits/step.
    """
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
    try:
        import pandas as pd

        return pd.DataFrame(rows)
    except ImportError:  # pragma: no cover
        return rows


# ----------------------------------------------------------------------------- experiments
def run_ptq(model: str, dataset: str, method: str, w_bits: int, a_bits: int | None = None,
            refine=False, seed: int = 0, calib_size: int = 1024, test_size: int | None = None,
            first_last_bits: int = 8, universal=5, max_rows: int = 16384, refine_size: int | None = None) -> dict:
    """One cell of SQ Tables 2-3: quantize the committed FP ``model``/``dataset`` and test it.

    The calibration set is ``calib_size`` training images drawn with ``seed``
    (:func:`lowbit.data.calibration_subset`); accuracy is top-1 % on the first ``test_size``
    test images (all by default). Returns ``{"accuracy", "fp_accuracy", "seconds", "threads",
    "weight_mse"}`` (compute wall time and torch threads; mean weight MSE over the body layers)
    -- JSON-able, for
    :func:`lowbit.results.cached`.
    """
    import time

    from . import data, evaluate, models as model_zoo

    started = time.time()
    fp = model_zoo.load_pretrained(model, dataset)
    test = data.load_dataset(dataset, "test")
    if test_size is not None and test_size < len(test):
        test = data.TensorImageDataset(test.images[:test_size], test.labels[:test_size], test.name, test.split)
    needs_calib = a_bits is not None or bool(refine)
    calib = (data.calibration_subset(data.load_dataset(dataset, "train"), calib_size, seed)
             if needs_calib else None)
    if method == "sq":  # reuse (or store) the per-layer searches in data/derived/sq_search_model-*.json
        prime_sq_fits(fp, w_bits, universal, tag=f"{model}-{dataset}")
    qmodel = quantize_model(fp, method, w_bits, a_bits=a_bits, calib=calib, first_last_bits=first_last_bits,
                            refine=refine, seed=seed, max_rows=max_rows, universal=universal,
                            refine_size=refine_size)
    body = [layer.weight_mse() for _, layer in quantized_layers(qmodel) if layer.role == "body"]
    return {"accuracy": evaluate.accuracy(qmodel, test),
            "fp_accuracy": evaluate.checkpoint_accuracy(fp, model, dataset, test),  # once per process
            "seconds": time.time() - started, "threads": torch.get_num_threads(),
            "weight_mse": float(np.mean(body)) if body else 0.0}


def prime_sq_fits(model: nn.Module, bits: int, universal=5, tag: str | None = None) -> int:
    """Put the SQ fits of ``model``'s body layers into :func:`quantize_model`'s memo.

    The per-layer QPS searches (SQ Algorithm 1) come from :func:`lowbit.search.search_model`,
    which, with a ``tag``, caches them in ``data/derived/sq_search_model-*.json`` keyed by a hash
    of the weights (so notebook 01's searches serve notebook 03, and an option-4 search runs
    once). The BN-folded weights are searched, exactly what :func:`fit_quantizer` would do:
    same QPS, same scales. Returns the number of layers primed.
    """
    from .search import search_model

    folded = fold_bn(model)
    layers = quantizable_layers(folded)[1:-1]  # the body: first and last stay uniform
    if not layers:
        return 0
    found = search_model(folded, bits, universal=universal, tag=tag, skip_first_last=True)
    by_name = {r["layer"]: r for r in found}
    for name, layer in layers:
        r = by_name[name]
        scale = torch.as_tensor(np.asarray(r["scale"], dtype=np.float64)).reshape(-1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        fq = FittedQuantizer("sq", int(bits), np.sort(np.asarray(r["points"], dtype=np.float64)), scale, "channel",
                             {"universal": universal, "search_loss": float(r["loss"])})
        _FIT_CACHE[_fit_key(layer.weight, "sq", bits, "channel", universal)] = fq
    return len(layers)


def degradation_cell(fp_accuracy: float, accuracies) -> str:
    """SQ's table format: accuracy drop from FP with the accuracy in parentheses,
    ``"drop +- std (acc)"`` over seeds (``+-`` omitted for a single value)."""
    acc = np.asarray(list(accuracies), dtype=np.float64)
    if acc.size == 0:
        return "-"
    drop = fp_accuracy - acc
    if acc.size == 1:
        return f"{drop[0]:.2f} ({acc[0]:.2f})"
    return f"{drop.mean():.2f} \u00b1 {drop.std(ddof=1):.2f} ({acc.mean():.2f})"


def cached_run(model: str, dataset: str, method: str, w_bits: int, a_bits: int | None = None, refine=False,
               seed: int = 0, calib_size: int = 1024, test_size: int | None = None, universal=5,
               refine_size: int | None = None) -> dict:
    """:func:`run_ptq` through :func:`lowbit.results.cached` (``data/derived/sq_ptq_run-*.json``).

    Weight-only PTQ without refinement uses no calibration data, so its result does not depend
    on ``seed``/``calib_size``: they are left out of its cache key (one run serves every seed).
    """
    from .results import cached

    uses_calib = a_bits is not None or bool(refine)
    config = dict(model=model, dataset=dataset, method=method, w_bits=w_bits, a_bits=a_bits,
                  refine=refine, seed=seed if uses_calib else None, calib_size=calib_size if uses_calib else None,
                  test_size=test_size, first_last_bits=8, universal=universal if method == "sq" else None,
                  version=1)
    if refine and refine_size is not None and refine_size < calib_size:
        config["refine_size"] = refine_size
    else:
        refine_size = None
    return cached("sq_ptq_run", config, lambda: run_ptq(
        model, dataset, method, w_bits, a_bits=a_bits, refine=refine, seed=seed, calib_size=calib_size,
        test_size=test_size, universal=universal, refine_size=refine_size))
