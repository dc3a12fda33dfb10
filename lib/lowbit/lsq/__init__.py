"""nuLSQ and LSQ quantization-aware training.

Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural Network
Quantization*, ACCV 2024 (code: github.com/DensoITLab/nuLSQ), and its baseline Esser, McKinstry,
Bablani, Appuswamy, Modha, *Learned Step Size Quantization*, ICLR 2020 (arXiv:1902.08153).

* :mod:`.quantizers`: ``lsq_quantize`` / ``nulsq_quantize`` (fast autograd Functions) and their
  references; :mod:`.modules`: ``LSQQuantizer`` / ``NuLSQQuantizer`` with LSQ/MSE initialisation;
* :mod:`.qat`: ``prepare_qat`` (the paper's LSQ, nuLSQ-A, nuLSQ-W, nuLSQ-WA variants);
* :mod:`.training`: ``train_qat`` (one process or ``torchrun``/DDP, checkpoint and resume);
* :mod:`.entropy`: ``code_entropy``; :mod:`.experiments`: notebook 06's cached runs.

Built on :mod:`lowbit.core` and :mod:`lowbit.nn` only (no SQ or Q-Rater code).
"""
from __future__ import annotations

from .entropy import code_entropy, entropy_bits
from .modules import LSQQuantizer, NuLSQQuantizer, initial_step, make_quantizer
from .qat import VARIANTS, QATConv2d, QATLinear, prepare_qat, prepare_variant, qat_layers, step_parameters
from .quantizers import (lsq_levels, lsq_quantize, lsq_quantize_reference, nulsq_levels, nulsq_quantize,
                         nulsq_quantize_reference, qrange)
from .training import load_checkpoint, save_checkpoint, train_qat

__all__ = ["LSQQuantizer", "NuLSQQuantizer", "QATConv2d", "QATLinear", "VARIANTS", "code_entropy", "entropy_bits",
           "initial_step", "load_checkpoint", "lsq_levels", "lsq_quantize", "lsq_quantize_reference",
           "make_quantizer", "nulsq_levels", "nulsq_quantize", "nulsq_quantize_reference", "prepare_qat",
           "prepare_variant", "qat_layers", "qrange", "save_checkpoint", "step_parameters", "train_qat"]
