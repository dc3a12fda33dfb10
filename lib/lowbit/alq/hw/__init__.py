"""Hardware model of STLQ: fixed-point log words, a bit-exact shift MAC and a unit-gate cost model.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751), selective two-word log-scale quantization (STLQ). The weights come from
:func:`lowbit.alq.quantizers.stlq_quantize`: ``w_q = first + second`` with
``first = sgn1 * scale * p1``, ``second = sgn2 * scale * p2`` (zero where the weight has no second
word) and ``p`` in ``log_points(bits) = {0} u {2^-i : i = 0..N-2}``, ``N = 2^(bits-1)``. That a log
word multiplies by a shift, so that a second word costs a second shift and an add, is the premise
of log-scale quantization; the main paper is not available to us (see :mod:`lowbit.alq.quantizers`),
so **everything below is our interpretation** unless it restates the STLQ value set above.

The package: :mod:`.words` (fixed-point words), :mod:`.mac` (the bit-exact shift MAC and its
references), :mod:`.cost` (the unit-gate cost model).
"""
from .cost import COST_ASSUMPTIONS, stlq_mac_cost, two_cycle_fraction
from .mac import (MAX_ELEMENTS, stlq_mac_conv2d, stlq_mac_conv2d_reference, stlq_mac_linear,
                  stlq_mac_linear_reference, stlq_product)
from .words import STLQWords, decode_stlq, encode_stlq, integer_weights

__all__ = ["COST_ASSUMPTIONS", "MAX_ELEMENTS", "STLQWords", "decode_stlq", "encode_stlq", "integer_weights",
           "stlq_mac_conv2d", "stlq_mac_conv2d_reference", "stlq_mac_cost", "stlq_mac_linear",
           "stlq_mac_linear_reference", "stlq_product", "two_cycle_fraction"]
