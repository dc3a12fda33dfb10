"""ALQ (Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*,
CVPR 2021): selective two-word log-scale quantization (STLQ), the select tensor, STLQ-aware
fine-tuning, per-tile quantization and the shift MAC. Only the supplementary material is available:
what it does not tell us is *our interpretation*, named in each module's docstring.

* :mod:`.quantizers`: ``log_quantize``, ``stlq_quantize`` (+ reference), the select tensor, scale fit;
* :mod:`.modules`: ``STLQWeight``, ``r1_penalty``, ``nzr``, ``set_deploy``, ``prepare_stlq``;
* :mod:`.finetune`: ``finetune`` (task loss + lam * penalty, curves every k iterations);
* :mod:`.hw`: STLQ words, the bit-exact shift MAC and its unit-gate cost;
* :mod:`.experiments`: notebook 07's cached runs, tables and figures.

Built on :mod:`lowbit.core`, :mod:`lowbit.nn` and, along the one declared paper-to-paper edge,
:mod:`lowbit.lsq`'s QAT machinery (LSQ activations, ``prepare_qat``, ``train_qat``).
"""
from .finetune import CurveRecorder, finetune
from .hw import (STLQWords, decode_stlq, encode_stlq, integer_weights, stlq_mac_conv2d, stlq_mac_conv2d_reference,
                 stlq_mac_cost, stlq_mac_linear, stlq_mac_linear_reference, stlq_product, two_cycle_fraction)
from .modules import R1Penalty, STLQWeight, nzr, prepare_stlq, r1_penalty, set_deploy, stlq_weights
from .quantizers import (STLQResult, fit_stlq_scale, in_two_word_set, log_points, log_quantize, select_second_words,
                         select_second_words_reference, stlq_quantize,
                         stlq_quantize_reference, two_word_log_points)

__all__ = ["CurveRecorder", "R1Penalty", "STLQResult", "STLQWeight", "STLQWords", "decode_stlq", "encode_stlq",
           "finetune", "fit_stlq_scale", "in_two_word_set", "integer_weights", "log_points", "log_quantize", "nzr", "prepare_stlq",
           "r1_penalty", "select_second_words", "select_second_words_reference", "set_deploy", "stlq_mac_conv2d", "stlq_mac_conv2d_reference",
           "stlq_mac_cost", "stlq_mac_linear", "stlq_mac_linear_reference", "stlq_product", "stlq_quantize",
           "stlq_quantize_reference", "stlq_weights", "two_cycle_fraction", "two_word_log_points"]
