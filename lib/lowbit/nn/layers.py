"""Fake-quantized conv/linear layers: the forward pass uses a quantized copy of the weight.

A :class:`QuantConv2d` / :class:`QuantLinear` keeps the FP (BN-folded) weight in ``weight_fp``
and the simulated weight in ``weight``; ``quantizer`` is the fitted weight quantizer that made
it (any callable ``weight -> fake-quantized weight``; SQ's is :class:`lowbit.sq.quantizers.FittedQuantizer`).
Optional ``act_in`` / ``act_out`` modules quantize the layer's input / output.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _QuantMixin:
    """Shared parts of :class:`QuantConv2d` and :class:`QuantLinear`."""

    @torch.no_grad()
    def _take_float(self, layer: nn.Module, quantizer, role: str):
        """Copy ``layer``'s weight and bias, then quantize the weight with ``quantizer``; returns ``self``."""
        self.weight.copy_(layer.weight)
        if layer.bias is not None:
            self.bias.copy_(layer.bias)
        self._init_quant(quantizer, role)
        return self

    def _init_quant(self, quantizer, role: str):
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
    def from_float(cls, conv: nn.Conv2d, quantizer, role: str = "body") -> "QuantConv2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        return new._take_float(conv, quantizer, role)

    def forward(self, x):
        return self._wrap(x, lambda t: self._conv_forward(t, self.weight, self.bias))


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose ``weight`` is the fake-quantized weight (FP copy in ``weight_fp``)."""

    @classmethod
    def from_float(cls, fc: nn.Linear, quantizer, role: str = "body") -> "QuantLinear":
        new = cls(fc.in_features, fc.out_features, fc.bias is not None,
                  device=fc.weight.device, dtype=fc.weight.dtype)
        return new._take_float(fc, quantizer, role)

    def forward(self, x):
        return self._wrap(x, lambda t: F.linear(t, self.weight, self.bias))


def quantized_layers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, QuantConv2d | QuantLinear), ...]`` of a quantized model, registration order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, _QuantMixin)]


