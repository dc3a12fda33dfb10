"""Brevitas' GPTQ and learned rounding as peer baselines: thin adapters, no GPTQ/AdaRound code of our own.

* GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, *GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers*, ICLR 2023, arXiv:2210.17323: the columns of each layer's
  weight are quantized one at a time and the not yet quantized columns updated to absorb the error,
  using the inverse of the layer's input Hessian ``H = 2 X X^T`` (Cholesky form, Algorithm 1),
  layer by layer. Brevitas' ``brevitas.graph.gptq.gptq_mode``.
* Learned rounding: Brevitas' AdaRound (Nagel, Amjad, van Baalen, Louizos, Blankevoort, *Up or
  Down? Adaptive Rounding for Post-Training Quantization*, ICML 2020, arXiv:2004.10568): the
  rectified-sigmoid rounding ``h(V)`` (``hard_sigmoid``) with the annealed rounding regulariser
  (``regularised_mse``), layer by layer, through the learned-round trainer that ships with
  Brevitas in ``brevitas_examples`` (``LearnedRoundTrainer``, configured by its ImageNet example's
  ``parse_args_to_dataclass``), in float32 (its AMP switched off for the CPU).

The library: Franco, Monteagudo-Lago, Colbert, Pappalardo, Fraser, *Brevitas* (AMD; github.com/Xilinx/brevitas,
doi:10.5281/zenodo.3333552), PyPI ``brevitas`` (pinned in ``requirements-peers.txt``; installed by ``make peers``).

What is quantized (weight-only): the weight of every ``nn.Conv2d``/``nn.Linear`` of the (BN-folded)
model is replaced by Brevitas' ``QuantConv2d``/``QuantLinear`` with ``Int8WeightPerChannelFloat``
at the layer's bit width: signed, ``2^b`` levels ``-2^(b-1) .. 2^(b-1)-1`` (``narrow_range`` off,
the same grid as the AIMET adapter), one scale per output channel initialised from the channel's
max-abs and then held fixed (``PARAMETER_FROM_STATS``: Brevitas' default runtime-stats scale is
recomputed from the column slice GPTQ quantizes, which leaves the weights unchanged); the first and
last layer at 8 bits (lowbit's rule, :func:`lowbit.peers.common.layer_bits`), the others at
``w_bits``. No input, output or bias quantizer: biases and activations stay in floating point.
"""
from __future__ import annotations

import copy
import functools
from argparse import Namespace

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ..nn.calibration import batches
from .common import PeerRequest, Stopwatch, check_count, finish, prepare, require, seeded, version

LIBRARY = "brevitas"


def _quant_model(request: PeerRequest) -> nn.Module:
    """A copy of ``request.fp`` with each conv/linear replaced by Brevitas' weight-only quantized layer
    at its bit width (module docstring), scales initialised by one forward pass."""
    require("brevitas", "Brevitas")
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.inject.enum import ScalingImplType
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    from brevitas.quant import Int8WeightPerChannelFloat

    qmodel = copy.deepcopy(request.fp)
    for bits in sorted(set(request.bits.values())):
        kwargs = {"weight_quant": Int8WeightPerChannelFloat, "weight_bit_width": bits, "weight_narrow_range": False,
                  "weight_scaling_impl_type": ScalingImplType.PARAMETER_FROM_STATS, "input_quant": None,
                  "output_quant": None, "bias_quant": None, "return_quant_tensor": False}
        others = [name for name, b in request.bits.items() if b != bits]
        qmodel = layerwise_quantize(qmodel, {nn.Conv2d: (qnn.QuantConv2d, kwargs), nn.Linear: (qnn.QuantLinear, kwargs)},
                                    name_blacklist=others)
    missing = [name for name in request.bits
               if not isinstance(qmodel.get_submodule(name), QuantWeightBiasInputOutputLayer)]
    if missing:
        raise RuntimeError(f"Brevitas did not replace the layers {missing} by quantized layers")
    qmodel.eval()
    with torch.no_grad():
        qmodel(request.calib[:2])  # PARAMETER_FROM_STATS: the scales are taken from the weights at the first call
    return qmodel


def _weights(qmodel: nn.Module, request: PeerRequest) -> dict:
    """``{layer name: Brevitas' fake-quantized weight}`` (what its ``QuantConv2d``/``QuantLinear`` compute with)."""
    qmodel.eval()
    with torch.no_grad():
        return {name: qmodel.get_submodule(name).quant_weight().value.detach().clone() for name in request.bits}


def _info(method: str, seconds: float, iterations, seed: int) -> dict:
    return {"library": LIBRARY, "version": version(LIBRARY), "method": method, "iterations": iterations,
            "seconds": seconds, "seed": seed, "grid": "symmetric signed 2^b levels, max-abs scale per channel"}


def brevitas_gptq(model: nn.Module, calib, w_bits: int, *, first_last_bits: int = 8, calib_size: int | None = None,
                  batch_size: int = 256, fold: bool = True, act_order: bool = False, seed: int = 0
                  ) -> tuple[nn.Module, dict]:
    """``(quantized model, info)``: weight-only GPTQ (Frantar et al., ICLR 2023) by Brevitas.

    One pass per layer over ``calib`` (calibration images: a tensor ``(N, C, H, W)`` or a
    Dataset/DataLoader of ``(image, label)``; the first ``calib_size``; in batches of
    ``batch_size``) accumulates the layer's Hessian, then Brevitas' GPTQ quantizes its columns
    (``act_order``: in order of decreasing Hessian diagonal, GPTQ's "act-order"). GPTQ has no
    iteration count (``info["iterations"]`` is ``None``).

    Every conv/linear weight per output channel on a symmetric ``2^b``-level grid with a fixed
    max-abs scale, first and last layer at ``first_last_bits``; biases and activations in FP
    (module docstring). Returns a new plain torch model (``model`` untouched) and
    ``{"library", "version", "method", "iterations", "seconds", ...}``.
    """
    request = prepare(model, calib, w_bits, first_last_bits, calib_size, fold)
    batch_size = check_count(batch_size, "batch_size", 256)
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be True or False, got {act_order!r}")
    require("brevitas", "Brevitas GPTQ")
    from brevitas.graph.gptq import gptq_mode

    with seeded(seed), Stopwatch() as clock:
        qmodel = _quant_model(request)
        with torch.no_grad(), gptq_mode(qmodel, use_quant_activations=False, create_weight_orig=False,
                                        act_order=act_order) as gptq:
            for _ in range(gptq.num_layers):
                for xb in batches(request.calib, batch_size):
                    gptq.model(xb)  # stops at the layer being quantized (Brevitas' StopFwdException)
                gptq.update()
        weights = _weights(qmodel, request)
    return finish(request, weights, _info("brevitas-gptq", clock.seconds, None, seed))


def brevitas_learned_round(model: nn.Module, calib, w_bits: int, *, iterations: int, first_last_bits: int = 8,
                           calib_size: int | None = None, batch_size: int = 32, lr: float = 1e-3, fold: bool = True,
                           seed: int = 0) -> tuple[nn.Module, dict]:
    """``(quantized model, info)``: weight-only learned rounding (AdaRound, Nagel et al., ICML 2020) by Brevitas.

    ``iterations``: optimisation steps per layer (Adam, learning rate ``lr``, mini-batches of
    ``batch_size`` cached layer inputs; Brevitas' example default is 1000). ``calib``: calibration
    images (a tensor ``(N, C, H, W)`` or a Dataset/DataLoader of ``(image, label)``; the first
    ``calib_size``). ``seed``: the trainer samples mini-batches from the global RNGs; the caller's
    RNG state is restored afterwards.

    Same grid and first/last rule as :func:`brevitas_gptq`; in eval mode the learned rounding is
    hard (``h(V) > 0.5``). Returns a new plain torch model (``model`` untouched) and ``info``.
    """
    request = prepare(model, calib, w_bits, first_last_bits, calib_size, fold)
    iterations = check_count(iterations, "iterations", 500)
    batch_size = check_count(batch_size, "batch_size", 32)
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < float("inf")):
        raise ValueError(f"lr must be a positive number (e.g. lr=1e-3), got {lr!r}")
    require("brevitas", "Brevitas learned round")
    trainer = require("brevitas_examples.common.learned_round.learned_round_trainer", "Brevitas learned round")
    lr_utils = require("brevitas_examples.imagenet_classification.ptq.learned_round_utils", "Brevitas learned round")

    config = lr_utils.parse_args_to_dataclass(Namespace(
        learned_round="hard_sigmoid", learned_round_loss="regularised_mse", learned_round_iters=iterations,
        learned_round_lr_scheduler=None, learned_round_lr=float(lr), learned_round_batch_size=batch_size))
    config.training_args.use_amp = False  # float32: the example's float16 autocast is meant for GPUs
    labels = torch.zeros(len(request.calib), dtype=torch.long, device=request.calib.device)
    loader = DataLoader(TensorDataset(request.calib, labels), batch_size=256)  # the example's (image, label) batches
    with seeded(seed), Stopwatch() as clock:
        qmodel = _quant_model(request)
        trainer.LearnedRoundTrainer(config=config).train(
            model=qmodel, model_forward=lr_utils.vision_forward, block_forward=lr_utils.vision_block_forward,
            data_loader=loader, cache=lr_utils.CacheVision(),
            get_blocks_fn=functools.partial(trainer.get_blocks, block_check_fn=lr_utils.is_layer), keep_gpu=True)
        weights = _weights(qmodel, request)
    return finish(request, weights, _info("brevitas-learned-round", clock.seconds, iterations, seed))
