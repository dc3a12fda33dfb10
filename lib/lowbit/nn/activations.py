"""Uniform activation quantizers: one MSE-calibrated step per layer, attached after each ReLU.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39, sec. 4.2, Table 3) quantizes activations uniformly per layer, unsigned after each ReLU, with a step calibrated on a calibration set; the
grid is :mod:`lowbit.core.uniform`, the step search :func:`lowbit.core.clipping.mse_step_index`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..core.clipping import mse_step_index
from ..core.uniform import round_to_grid, round_to_grid_reference, uniform_levels
from ..core.validation import check_bits
from .calibration import batches, calibration_tensor
from .graph import model_device, set_module


class ActQuantizer(nn.Module):
    """Uniform activation quantizer with one step per layer (SQ eq. 2 / eq. 4 grid).

    Unsigned (``signed=False``, after ReLU): levels ``step * {0, .., 2^b - 1}``; signed:
    ``step * {-(2^(b-1)-1), .., 2^(b-1)-1}``. ``step`` is set by :meth:`calibrate` (MSE over
    clipping thresholds). While ``observe`` is true it passes inputs through unchanged and
    keeps a random sample of them for calibration; with ``step`` unset it is the identity.
    """

    def __init__(self, bits: int, signed: bool = False, max_samples: int = 1 << 18):
        super().__init__()
        bits = check_bits(bits, "activation bits")
        self.bits, self.signed, self.max_samples = int(bits), bool(signed), int(max_samples)
        self.register_buffer("step", torch.tensor(float("nan")))
        self.observe = False
        self._samples: list[torch.Tensor] = []
        self._absmax = 0.0
        self._generator = torch.Generator().manual_seed(0)

    @property
    def levels(self) -> tuple[int, int]:
        """Integer range ``(lo, hi)`` of the codes (:func:`lowbit.core.uniform.uniform_levels`)."""
        return uniform_levels(self.bits, self.signed)

    def quantize(self, x: torch.Tensor, step) -> torch.Tensor:
        """``clamp(round(x / step), lo, hi) * step`` (:func:`lowbit.core.uniform.round_to_grid`)."""
        return round_to_grid(x, step, *self.levels)

    def quantize_reference(self, x: torch.Tensor, step) -> torch.Tensor:
        """Plain reference of :meth:`quantize`."""
        return round_to_grid_reference(x, step, *self.levels)

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
        """Choose the step minimising the MSE on ``samples`` (default: the observed ones).

        Candidates ``r * amax / hi`` for ``grid`` values of ``r`` from 1 down to 0.02 (first
        minimum wins), :func:`lowbit.core.clipping.mse_step_index` with round-half-to-even."""
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
        lo, hi = self.levels
        steps = [float(r * amax / hi) for r in np.linspace(1.0, 0.02, grid)]
        best = steps[mse_step_index(samples, lo, hi, steps, tie="even")]
        self.step.fill_(best)
        return best

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
    out, device = [], model_device(model)
    for i, (name, relu) in enumerate(relus):
        b = last_bits if (last_bits is not None and i == len(relus) - 1) else bits
        q = QuantReLU(relu, b).to(device)  # the step buffer on the model's device
        set_module(model, name, q)
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
        dev = model_device(model)
        for xb in batches(x, batch_size):
            model(xb.to(dev))
    finally:
        for _, q in quants:
            q.observe = False
    steps = {n: q.calibrate() for n, q in quants}
    model.train(was_training)
    return steps


