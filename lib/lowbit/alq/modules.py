"""STLQ-aware QAT: the weight quantizer :class:`STLQWeight`, the r1 penalty and :func:`prepare_stlq`.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021,
supplementary material sec. 1: training uses a predefined *select ratio*; a *select tensor* marks
the highest-ranking scaled error indication values of ``r1`` (the second word), which are excluded
from an L2-norm regularisation term added to the task loss; without it every quantization error is
penalised. The rest is **our interpretation**:

* In training (:class:`STLQWeight` in train mode) every weight is ``q1 + r1`` with ``q1`` its first
  log word and ``r1 = log_quantize(w - q1)`` its second word (zero when the residual is below half
  the smallest log point), straight-through (``dq/dw = 1``). The select tensor is the exact top-k
  of ``|w - q1| / scale`` at the select ratio (:func:`lowbit.alq.select_second_words`), recomputed
  every forward pass.
* :func:`r1_penalty` is the L2 norm ``||r1||_2`` (not squared) of each layer's second words outside
  the select tensor (``select=False``: of all of them), summed over layers; its gradient reaches
  ``w`` straight through ``r1`` (``dr1/dw = 1``, ``q1`` held constant), so it pulls each penalised
  weight onto its first word until its second word rounds to zero: the NZR falls, and with the
  select tensor the selected weights keep theirs. The norm, not its square: a squared norm's pull
  vanishes with the residual, and at 5 bits a second word is non-zero down to ``2^-15`` of the
  scale, which momentum SGD then needs hundreds of iterations to reach.
* Deployment (eval with ``deploy=True``, :func:`set_deploy`): exactly the top-k selection of
  :func:`lowbit.alq.stlq_quantize`, so at most the select ratio of weights carry a second word.
* The scale is fixed per output channel at initialisation (:func:`lowbit.alq.fit_stlq_scale`, the
  STLQ-MSE-optimal ``r * max|w|``), not learned.

Activations are uniform LSQ at the same width (Esser et al., *Learned Step Size Quantization*,
ICLR 2020), first and last layer 8-bit LSQ, through :func:`lowbit.lsq.prepare_qat`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..lsq.qat import prepare_qat, qat_layers
from .quantizers import (MAX_BITS, check_scale, check_select_ratio, check_tile, check_weight, fit_stlq_scale,
                         select_second_words, stlq_quantize, two_words)
from ..core.validation import check_bits


class STLQWeight(nn.Module):
    """A straight-through STLQ weight quantizer (module docstring): ``bits`` per word,
    ``select_ratio`` of weights (or of tiles of ``tile`` weights) selected."""

    def __init__(self, bits: int, select_ratio: float, tile: int | None = None):
        super().__init__()
        self.bits = check_bits(bits, hi=MAX_BITS)
        self.select_ratio = check_select_ratio(select_ratio)
        self.tile = tile
        self.deploy = False
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("initialized", torch.tensor(False))
        self._r1 = self._selected = self._nonzero = None

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> "STLQWeight":
        check_tile(self.tile, weight)
        self.scale = fit_stlq_scale(weight, self.bits, self.select_ratio, self.tile).to(weight.dtype).clone()
        self.initialized.fill_(True)
        return self

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.initialize(w)
        with torch.no_grad():
            first, second, scaled = two_words(check_weight(w.detach()), check_scale(self.scale, w), self.bits)
            selected = select_second_words(scaled, self.select_ratio, self.tile)
            if self.deploy:
                second = torch.where(selected, second, torch.zeros_like(second))
        e = w - first  # gradient 1 with respect to w: q1 is held constant
        self._r1 = e + (second - e).detach()  # the second word, straight through
        self._selected, self._nonzero = selected, second != 0
        q = first + second
        return w + (q - w).detach()

    def penalty(self, select: bool = True) -> torch.Tensor:
        """``||r1||_2`` (this layer's second words of the last forward pass) outside the select tensor
        (``select=False``: all of them)."""
        if self._r1 is None:
            raise ValueError("STLQWeight.penalty needs a forward pass first")
        r1 = self._r1 if not select else torch.where(self._selected, torch.zeros_like(self._r1), self._r1)
        sq = (r1 ** 2).sum()
        return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), sq)  # 0, with gradient 0, when r1 is all zero

    def stlq(self, w: torch.Tensor):
        """:func:`lowbit.alq.stlq_quantize` of ``w`` with this quantizer's scale, ratio and tile."""
        return stlq_quantize(w.detach(), self.scale, self.bits, self.select_ratio, self.tile)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, select_ratio={self.select_ratio}, tile={self.tile}, deploy={self.deploy}"


def stlq_weights(model: nn.Module) -> list[tuple[str, STLQWeight]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, STLQWeight)]


class R1Penalty:
    """``lam * r1_penalty(model, select)`` as a callable for :func:`lowbit.lsq.train_qat`."""

    def __init__(self, lam: float, select: bool = True):
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        self.lam, self.select = float(lam), bool(select)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.lam * r1_penalty(model, self.select)

    def __repr__(self) -> str:
        return f"R1Penalty(lam={self.lam!r}, select={self.select})"


def r1_penalty(model: nn.Module, select: bool = True) -> torch.Tensor:
    """The sum over every :class:`STLQWeight` of ``model`` of the L2 norm of its second words outside
    the select tensor (``select=False``: of all), from the last forward pass."""
    mods = stlq_weights(model)
    if not mods:
        raise ValueError("model has no STLQWeight: prepare it with lowbit.alq.prepare_stlq")
    return sum(m.penalty(select) for _, m in mods)


@torch.no_grad()
def nzr(model: nn.Module) -> float:
    """The fraction of STLQ weights with a non-zero second word in the last forward pass."""
    mods = stlq_weights(model)
    if any(m._nonzero is None for _, m in mods):
        raise ValueError("nzr needs a forward pass of the model first")
    return float(sum(m._nonzero.sum() for _, m in mods) / sum(m._nonzero.numel() for _, m in mods))


def set_deploy(model: nn.Module, deploy: bool = True, select_ratio: float | None = None) -> nn.Module:
    """Switch every :class:`STLQWeight` to deployment (top-k second words only) or back to training
    form; ``select_ratio`` (optional) changes the deployed ratio."""
    for _, m in stlq_weights(model):
        m.deploy = bool(deploy)
        if select_ratio is not None:
            m.select_ratio = check_select_ratio(select_ratio)
    return model


def prepare_stlq(model: nn.Module, w_bits: int = 5, a_bits: int = 5, select_ratio: float = 0.15,
                 tile: int | None = None, *, calib=None, first_last=8, max_calib: int = 256,
                 init: str = "lsq") -> nn.Module:
    """A new model (``model`` untouched): LSQ activations at ``a_bits``, STLQ weights at ``w_bits``
    on every layer but the first and last (8-bit LSQ, or ``first_last="fp"``); ``init`` initialises
    the LSQ steps (``"lsq"`` for fine-tuning, ``"mse"`` for use without training)."""
    w_bits = check_bits(w_bits, "w_bits", hi=MAX_BITS)
    check_select_ratio(select_ratio)
    qmodel = prepare_qat(model, None, "lsq", w_bits=w_bits, a_bits=a_bits, first_last=first_last, calib=calib,
                         max_calib=max_calib, init=init)
    for _, layer in qat_layers(qmodel):
        if layer.role == "body":
            layer.weight_quantizer = STLQWeight(w_bits, select_ratio, tile).initialize(layer.weight.detach())
    return qmodel
