"""Learnable quantizer modules: :class:`LSQQuantizer` (one step) and :class:`NuLSQQuantizer`
(``2^b - 1`` steps), with LSQ and MSE initialisation.

Esser et al., *Learned Step Size Quantization*, ICLR 2020 (arXiv:1902.08153), sec. 2.1 for the
``"lsq"`` initialisation ``2 * mean|x| / sqrt(Qp)``; Gongyo, Liang, Ambai, Kawakami, Sato,
*Learning Non-Uniform Step Sizes for Neural Network Quantization*, ACCV 2024, for nuLSQ, whose
steps all start equal (so a fresh nuLSQ quantizer is the LSQ quantizer of the same init).

``init="mse"`` is the step, among ``max|x| * k / (200 Qp)`` for ``k = 1..200``, that minimises the
quantization MSE of the initial tensor on the LSQ grid ``-Qn..Qp`` (a grid search on the tensor
itself, :func:`lowbit.core.clipping.mse_step_index`; not the Gaussian-optimal step times the
standard deviation of the authors' code).

A quantizer that has not been initialised initialises itself from the first tensor it sees;
:func:`lowbit.lsq.qat.prepare_qat` initialises every quantizer from a calibration batch first.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.clipping import mse_step_index, sample_values
from ..core.validation import check_choice
from .quantizers import (lsq_levels, lsq_quantize, lsq_quantize_reference, nulsq_levels, nulsq_quantize,
                         nulsq_quantize_reference, qrange)

INITS = ("lsq", "mse")
MSE_GRID = 200
MSE_MAX_VALUES = 1 << 18


def initial_step(x: torch.Tensor, bits: int, signed: bool, init: str = "lsq") -> float:
    """The initial step for tensor ``x``: ``"lsq"`` (``2 mean|x| / sqrt(Qp)``) or ``"mse"``."""
    check_choice(init, INITS, "init")
    x = x.detach().float().reshape(-1)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("cannot initialise a step from an empty tensor or one with NaN/inf values")
    qn, qp = qrange(bits, signed)
    if init == "lsq":
        step = 2.0 * float(x.abs().mean()) / math.sqrt(qp)
    else:
        xs = sample_values(x, MSE_MAX_VALUES)
        cands = float(xs.abs().max()) * torch.arange(1, MSE_GRID + 1, dtype=torch.float32) / (MSE_GRID * qp)
        step = float(cands[mse_step_index(xs, -qn, qp, cands, tie="up")])
    if not step > 0:
        raise ValueError(f"the {init!r} initial step of an all-zero tensor is 0: pass a tensor with non-zero values")
    return step


class _LearnedStepQuantizer(nn.Module):
    """What LSQ and nuLSQ quantizers share: bits, sign, gradient scale, init and ``initialized``."""

    method = ""

    def __init__(self, bits: int, signed: bool, init: str = "lsq", grad_scale="lsq",
                 num_elements: int | None = None, reference: bool = False):
        super().__init__()
        self.qn, self.qp = qrange(bits, signed)
        self.bits, self.signed = int(bits), signed
        self.init = check_choice(init, INITS, "init")
        self.grad_scale, self.num_elements, self.reference = grad_scale, num_elements, bool(reference)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> "_LearnedStepQuantizer":
        """Set every step to :func:`initial_step` of ``x``; returns ``self``."""
        self.set_steps(initial_step(x, self.bits, self.signed, self.init))
        return self

    @torch.no_grad()
    def set_steps(self, value) -> None:
        """Set the step(s): a positive number (all steps equal) or a tensor of the right shape."""
        p = self.step_parameter
        v = torch.as_tensor(value, dtype=p.dtype).to(p.device)
        v = v.expand_as(p) if v.numel() == 1 else v
        if v.shape != p.shape:
            raise ValueError(f"{self.method} at {self.bits} bits needs {p.numel()} step(s), got shape {tuple(v.shape)}")
        if not (torch.isfinite(v).all() and (v > 0).all()):
            raise ValueError(f"initial steps must be positive and finite, got {v.tolist()}")
        p.copy_(v)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(x)
        fn = self._reference if self.reference else self._fast
        return fn(x, self.step_parameter, self.bits, self.signed, self.grad_scale, self.num_elements)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer code of each element (0 for the lowest level, ``2^b - 1`` for the highest)."""
        levels = self.levels().to(x.dtype).to(x.device)
        with torch.no_grad():
            y = self._fast(x.detach(), self.step_parameter.detach(), self.bits, self.signed, None, None)
        return torch.bucketize(y, levels[:-1] + (levels[1:] - levels[:-1]) / 2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, init={self.init!r}, reference={self.reference}"


class LSQQuantizer(_LearnedStepQuantizer):
    """LSQ (Esser et al. 2020): one learnable ``step``, ``y = s round(clamp(x/s, -Qn, Qp))``."""

    method = "LSQ"
    _fast, _reference = staticmethod(lsq_quantize), staticmethod(lsq_quantize_reference)

    def __init__(self, bits: int, signed: bool, **kw):
        super().__init__(bits, signed, **kw)
        self.step = nn.Parameter(torch.tensor(1.0))

    @property
    def step_parameter(self) -> nn.Parameter:
        return self.step

    def levels(self) -> torch.Tensor:
        """The ``2^b`` output levels ``s * (-Qn .. Qp)``."""
        return lsq_levels(self.step, self.bits, self.signed)


class NuLSQQuantizer(_LearnedStepQuantizer):
    """nuLSQ (Gongyo et al. 2024): ``2^b - 1`` learnable ``steps`` ``[negative, positive]`` from zero
    outwards (all positive when unsigned)."""

    method = "nuLSQ"
    _fast, _reference = staticmethod(nulsq_quantize), staticmethod(nulsq_quantize_reference)

    def __init__(self, bits: int, signed: bool, **kw):
        super().__init__(bits, signed, **kw)
        self.steps = nn.Parameter(torch.ones(self.qn + self.qp))

    @property
    def step_parameter(self) -> nn.Parameter:
        return self.steps

    def levels(self) -> torch.Tensor:
        """The ``2^b`` sorted output levels."""
        return nulsq_levels(self.steps, self.bits, self.signed).to(torch.float64)


QUANTIZERS = {"lsq": LSQQuantizer, "nulsq": NuLSQQuantizer}


def make_quantizer(method: str, bits: int, signed: bool, **kw) -> _LearnedStepQuantizer:
    """``"lsq"`` -> :class:`LSQQuantizer`, ``"nulsq"`` -> :class:`NuLSQQuantizer`."""
    return QUANTIZERS[check_choice(method, tuple(QUANTIZERS), "quantizer")](bits, signed, **kw)
