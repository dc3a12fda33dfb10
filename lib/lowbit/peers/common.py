"""What every peer-library adapter shares: the request check, lowbit's first/last-layer rule, the copy back.

The adapters of :mod:`lowbit.peers` run a published library's own post-training quantizer on our FP
model and hand back a plain torch model. This module holds the parts that do not depend on the
library:

* :func:`prepare` checks a request up front (bit widths, finite weights, calibration inputs that
  fit the model) and makes the FP copy the library works on: BatchNorm folded
  (:func:`lowbit.nn.fold_bn.fold_bn`, as :func:`lowbit.sq.ptq.quantize_model` does by default), the
  input model untouched;
* :func:`layer_bits` is lowbit's one first/last-layer rule (Oh, Sim, Kim, Lee, *Non-Uniform Step
  Size Quantization for Accurate Post-Training Quantization*, ECCV 2022,
  doi:10.1007/978-3-031-20083-0_39, sec. 4.1): over :func:`lowbit.nn.graph.quantizable_layers` in
  registration order, the first conv and the last linear layer at ``first_last_bits`` (8), every
  other conv/linear at ``w_bits`` -- the same list and the same two ends as ``quantize_model``;
* :func:`finish` copies the library's fake-quantized weights into that copy, so the result is an
  ordinary ``nn.Module`` (no library types inside) that :func:`lowbit.evaluate.accuracy` evaluates;
* :func:`require` imports a peer library lazily; a missing one is a ``ValueError`` naming
  ``make peers`` (which installs ``requirements-peers.txt`` into ``.venv`` with ``--no-deps``, so
  the torch and torchvision pins hold);
* :func:`seeded` runs a library, which draws from the global RNGs, under ``lowbit.seed_all(seed)``
  and restores the caller's RNG state afterwards.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..core.validation import check_bits
from ..nn.calibration import calibration_tensor, check_inputs
from ..nn.fold_bn import fold_bn
from ..nn.graph import model_device, quantizable_layers
from ..utils import seed_all

MAX_BITS = 8  # the adapters are for low-bit weights: 2..8 bits, the sign bit included
INSTALL = "make peers"  # the command that installs the peer libraries (requirements-peers.txt)


@dataclass
class PeerRequest:
    """A checked request: ``fp`` is the FP copy the library works on (BN folded with ``fold``),
    ``calib`` the calibration inputs ``(N, ...)`` on its device, ``bits`` ``{layer name: bit width}``
    in forward (registration) order (:func:`layer_bits`)."""

    fp: nn.Module
    calib: torch.Tensor
    bits: dict
    w_bits: int
    first_last_bits: int
    fold: bool


def require(module: str, what: str):
    """``importlib.import_module(module)``; a ``ValueError`` naming ``make peers`` when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"{what} needs the peer library {module!r}, which cannot be imported ({err}): run "
                         f"`{INSTALL}` (installs requirements-peers.txt into .venv with --no-deps, keeping the "
                         "torch and torchvision pins)") from err


def version(distribution: str) -> str:
    """The installed version of a distribution (``"aimet-torch"``, ``"brevitas"``)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_count(value, what: str, example: int) -> int:
    """``value`` as a positive ``int`` (an iteration count, a batch size), else a ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int (e.g. {what}={example}), got {value!r}")
    return int(value)


def layer_bits(model: nn.Module, w_bits: int, first_last_bits: int = 8) -> dict:
    """``{layer name: bit width}``: lowbit's first/last rule (SQ sec. 4.1, as in
    :func:`lowbit.sq.ptq.quantize_model`): the first and the last entry of
    :func:`lowbit.nn.graph.quantizable_layers` at ``first_last_bits``, the others at ``w_bits``."""
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no nn.Conv2d / nn.Linear layers to quantize")
    last = len(layers) - 1
    return {name: first_last_bits if i in (0, last) else w_bits for i, (name, _) in enumerate(layers)}


def prepare(model: nn.Module, calib, w_bits: int, first_last_bits: int = 8, calib_size: int | None = None,
            fold: bool = True) -> PeerRequest:
    """Check a peer-quantization request up front and make the FP copy the library works on.

    ``model``: an ``nn.Module`` with finite weights; ``calib``: a tensor of inputs or a
    Dataset/DataLoader of ``(input, label)`` pairs (:func:`lowbit.nn.calibration.calibration_tensor`;
    the first ``calib_size`` are kept), checked against the model
    (:func:`lowbit.nn.calibration.check_inputs`); ``w_bits`` and ``first_last_bits``: ints in
    ``2..8``; ``fold``: fold BatchNorm into the preceding conv first. ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    w_bits = check_bits(w_bits, "w_bits", hi=MAX_BITS)
    first_last_bits = check_bits(first_last_bits, "first_last_bits", hi=MAX_BITS)
    if not isinstance(fold, bool):
        raise TypeError(f"fold must be True or False, got {fold!r}")
    if calib_size is not None:
        calib_size = check_count(calib_size, "calib_size", 1024)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name!r} of the model holds NaN or inf: quantize a trained, finite model "
                             "(e.g. lowbit.models.load_pretrained('lenet5', 'fashion-mnist'))")
    fp = fold_bn(model) if fold else copy.deepcopy(model)
    fp.eval()
    x = calibration_tensor(calib, calib_size)
    check_inputs(fp, x)
    return PeerRequest(fp, x.detach().to(model_device(fp)), layer_bits(fp, w_bits, first_last_bits), w_bits,
                       first_last_bits, fold)


def finish(request: PeerRequest, weights: dict, info: dict) -> tuple[nn.Module, dict]:
    """``(quantized model, info)``: the library's fake-quantized ``weights`` (``{layer name: tensor}``)
    copied into ``request.fp``, a plain torch model in eval mode (no gradients), with
    ``quant_config`` recording what was quantized."""
    qmodel = request.fp
    for name in request.bits:
        layer = qmodel.get_submodule(name)
        w = weights.get(name)
        if w is None or tuple(w.shape) != tuple(layer.weight.shape) or not torch.isfinite(w).all():
            raise RuntimeError(f"the peer library returned no usable weight for layer {name!r} "
                               f"(got {None if w is None else tuple(w.shape)}, expected {tuple(layer.weight.shape)})")
        with torch.no_grad():
            layer.weight.copy_(w.detach().to(layer.weight.device, layer.weight.dtype))
    for p in qmodel.parameters():
        p.requires_grad_(False)
    info = {**info, "w_bits": request.w_bits, "first_last_bits": request.first_last_bits,
            "calib_images": len(request.calib), "fold": request.fold, "layers": dict(request.bits)}
    qmodel.quant_config = {"method": info.get("method"), "w_bits": request.w_bits, "a_bits": None,
                           "first_last_bits": request.first_last_bits, "granularity": "channel",
                           "library": info.get("library"), "version": info.get("version")}
    return qmodel.eval(), info


@contextlib.contextmanager
def seeded(seed: int):
    """Run the body under ``lowbit.seed_all(seed)`` (peer libraries draw from the global RNGs);
    the caller's Python, NumPy and torch CPU RNG states are restored afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_all(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class Stopwatch:
    """``with Stopwatch() as clock: ...`` then ``clock.seconds`` (wall time of the body)."""

    def __enter__(self):
        self.started = time.perf_counter()
        self.seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        return False
