"""AIMET's AdaRound as a peer baseline: a thin adapter, no AdaRound code of our own.

Nagel, Amjad, van Baalen, Louizos, Blankevoort, *Up or Down? Adaptive Rounding for Post-Training
Quantization*, ICML 2020, arXiv:2004.10568: each layer's rounding (up or down per weight) is learned
by minimising the layer's output reconstruction error with a rectified-sigmoid relaxation
``h(V)`` and an annealed regulariser that drives ``h`` to 0/1 (eqs. 21-25), layer by layer.

The library: AIMET, the AI Model Efficiency Toolkit of Qualcomm Innovation Center (github.com/quic/aimet;
Siddegowda, Fournarakis, Nagel, Blankevoort, Patel, Khobare, *Neural Network Quantization with AI Model
Efficiency Toolkit (AIMET)*, arXiv:2201.08442), PyPI ``aimet-torch`` (pinned in ``requirements-peers.txt``; installed by
``make peers``), through its public API ``aimet_torch.adaround.Adaround.apply_adaround`` and
``aimet_torch.quantsim.QuantizationSimModel``.

What is quantized (weight-only): the weight of every ``nn.Conv2d``/``nn.Linear`` of the
(BN-folded) model, per output channel, on AIMET's signed symmetric grid of ``2^b`` levels
``-2^(b-1) .. 2^(b-1)-1`` (AIMET's per-channel config ``default_config_per_channel.json``, scale by
its SQNR search ``post_training_tf_enhanced``, the AdaRound default); the first and last layer at
8 bits (lowbit's rule, :func:`lowbit.peers.common.layer_bits`), the others at ``w_bits``. Biases
and activations stay in floating point. Note the grid differs from lowbit's uniform quantizer
(:mod:`lowbit.core.uniform`: ``2^b - 1`` symmetric levels, MSE-fitted scale).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .common import Stopwatch, check_count, finish, prepare, require, seeded, version

LIBRARY = "aimet-torch"
ENCODINGS = "adaround"  # file prefix of the encodings AIMET writes (into a temporary folder)


@contextlib.contextmanager
def _quiet(verbose: bool):
    """AIMET's INFO logs and torch.jit deprecation warnings off for the call (unless ``verbose``)."""
    if verbose:
        yield
        return
    from aimet_torch.common.utils import AimetLogger

    loggers = [logging.getLogger(area.value) for area in AimetLogger.LogAreas]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _ignore_parameter_free_modules(model: nn.Module) -> None:
    """Tell AIMET to leave alone our parameter-free leaf modules it has no quantized definition for
    (e.g. ResNet-20's option-A shortcut ``lowbit.models.ShortcutA``): they hold no weight to quantize.
    ``QuantizationMixin.ignore`` is a process-wide AIMET registry (idempotent)."""
    from aimet_torch.nn import QuantizationMixin

    for m in model.modules():
        cls = type(m)
        leaf = next(m.children(), None) is None
        has_params = next(m.parameters(recurse=False), None) is not None
        if leaf and not has_params and cls not in QuantizationMixin.cls_to_qcls and not cls.__module__.startswith("torch."):
            QuantizationMixin.ignore(cls)


def _config_file() -> str:
    """AIMET's own per-channel quantsim config (per-channel weights for Conv/Gemm, symmetric, signed)."""
    aimet_torch = require("aimet_torch", "AIMET AdaRound")
    path = Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    if not path.exists():
        raise ValueError(f"AIMET's per-channel config {path.name} is missing from aimet_torch: reinstall the pinned "
                         "version with `make peers`")
    return str(path)


def aimet_adaround(model: nn.Module, calib, w_bits: int, *, iterations: int, first_last_bits: int = 8,
                   calib_size: int | None = None, batch_size: int = 256, fold: bool = True, seed: int = 0,
                   reg_param: float = 0.01, beta_range: tuple = (20, 2), warm_start: float = 0.2,
                   verbose: bool = False) -> tuple[nn.Module, dict]:
    """``(quantized model, info)``: weight-only AdaRound (Nagel et al., ICML 2020) by AIMET.

    ``iterations``: AdaRound optimisation steps per layer (required: AIMET's own default is
    15,000 below 8 bits, ~minutes per layer on a CPU). ``calib``: calibration images (a tensor
    ``(N, C, H, W)`` or a Dataset/DataLoader of ``(image, label)``; the first ``calib_size``),
    cached by AIMET in batches of ``batch_size``; each AdaRound step draws 32 cached samples.
    ``reg_param``, ``beta_range``, ``warm_start``: AIMET's ``AdaroundParameters`` (its defaults,
    the paper's ``lambda``, ``beta`` annealing and warm-up). ``seed``: AIMET draws its batches from
    the global RNGs; the caller's RNG state is restored afterwards.

    Every conv/linear weight per output channel on AIMET's symmetric ``2^b``-level grid, first and
    last layer at ``first_last_bits``; biases and activations in FP (module docstring). Returns a
    new plain torch model (the BN-folded copy of ``model`` with AIMET's hard-rounded weights
    copied in; ``model`` is untouched) and ``{"library", "version", "method", "iterations",
    "seconds", ...}``.
    """
    request = prepare(model, calib, w_bits, first_last_bits, calib_size, fold)
    iterations = check_count(iterations, "iterations", 500)
    batch_size = check_count(batch_size, "batch_size", 256)
    require("aimet_torch", "AIMET AdaRound")
    from aimet_torch.adaround import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.nn.base import UnknownModuleError
    from aimet_torch.quantsim import QuantizationSimModel

    config_file = _config_file()
    scheme = QuantScheme.post_training_tf_enhanced
    dummy = request.calib[:1]
    loader = DataLoader(request.calib, batch_size=batch_size)  # bare input batches: AIMET calls model(batch)
    params = AdaroundParameters(loader, num_batches=len(loader), default_num_iterations=iterations,
                                default_reg_param=reg_param, default_beta_range=tuple(beta_range),
                                default_warm_start=warm_start)
    work = copy.deepcopy(request.fp)
    _ignore_parameter_free_modules(work)
    overrides = [(work.get_submodule(name), bits) for name, bits in request.bits.items() if bits != request.w_bits]
    weights = {}
    with seeded(seed), _quiet(verbose), tempfile.TemporaryDirectory() as tmp, Stopwatch() as clock:
        try:
            rounded = Adaround.apply_adaround(work, dummy, params, path=tmp, filename_prefix=ENCODINGS,
                                              default_param_bw=request.w_bits, param_bw_override_list=overrides,
                                              default_quant_scheme=scheme, default_config_file=config_file)
        except UnknownModuleError as err:
            raise ValueError(f"AIMET cannot quantize a module of this model: {err}") from err
        # AIMET's deployment view: a QuantSim with the AdaRound encodings frozen; its weight quantizers
        # give the hard-rounded weights (AdaRound leaves soft-rounded weights in `rounded`)
        sim = QuantizationSimModel(rounded, dummy, quant_scheme=scheme, default_param_bw=request.w_bits,
                                   config_file=config_file)
        sim.set_and_freeze_param_encodings(os.path.join(tmp, f"{ENCODINGS}.encodings"))
        with torch.no_grad():
            for name, bits in request.bits.items():
                qm = sim.model.get_submodule(name)
                quantizer = qm.param_quantizers["weight"]
                if quantizer is None or int(quantizer.bitwidth) != bits:
                    raise RuntimeError(f"AIMET's weight quantizer of {name!r} is not at {bits} bits: {quantizer}")
                weights[name] = quantizer(qm.weight).as_subclass(torch.Tensor).detach().clone()
    info = {"library": LIBRARY, "version": version(LIBRARY), "method": "aimet-adaround", "iterations": iterations,
            "seconds": clock.seconds, "seed": seed, "grid": "symmetric signed 2^b levels, SQNR scale (tf_enhanced)"}
    return finish(request, weights, info)
