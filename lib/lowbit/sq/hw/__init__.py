"""Hardware for SQ: bit-exact shift-add MAC simulator and the MUX/shifter cost model.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 3.5 and Fig. 4;
its supplementary material, Sec. 1, Table 2 (relative HW cost) and Fig. 2 (shifter designs).

* :mod:`.terms`: term sets A, B of SQ Table 1 as MUX cases.
* :mod:`.cost`: ``shifter_cost`` (k(M-1) model), ``shifter_design`` (Fig. 2), ``cost_table``.
* :mod:`.encode`: ``encode_sq`` / ``decode_sq`` and the decoder register.
* :mod:`.mac`: ``mac_conv2d`` / ``mac_linear`` and their plain references.
* :mod:`.network`: a whole model on the integer pipeline vs its fake-quantized float twin.
"""
from .cost import (ASSUMPTIONS, PAPER_HW_COST_4BIT, UNIT_GATES, cost_table, equivalent_uniform_bits, shifter_cost,
                   shifter_design, sq_mac_cost, supp_table2_hw_rows, uniform_mac_cost)
from .encode import SQDecoder, decode_sq, encode_sq, split_codes
from .mac import (activation_qparams, dequantize_activation, im2col, mac_conv2d, mac_conv2d_reference,
                  mac_linear, mac_linear_reference, activation_codes, selection_matrices, shift_add_product)
from .terms import OPTIONS, TermSet, universal_terms, universal_values

__all__ = [
    "ASSUMPTIONS", "PAPER_HW_COST_4BIT", "UNIT_GATES", "equivalent_uniform_bits", "supp_table2_hw_rows", "cost_table", "shifter_cost", "shifter_design", "sq_mac_cost",
    "uniform_mac_cost", "SQDecoder", "decode_sq", "encode_sq", "split_codes", "activation_qparams",
    "dequantize_activation", "im2col", "mac_conv2d", "mac_conv2d_reference", "mac_linear",
    "mac_linear_reference", "activation_codes", "selection_matrices", "shift_add_product", "OPTIONS", "TermSet",
    "universal_terms", "universal_values",
]
