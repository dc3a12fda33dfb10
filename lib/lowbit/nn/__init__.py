"""Network plumbing shared by post-training quantization and quantization-aware training.

Layer graph (:mod:`.graph`), BN folding (:mod:`.fold_bn`), calibration data and layer-input
capture (:mod:`.calibration`), im2col rows (:mod:`.im2col`), uniform activation quantizers
(:mod:`.activations`) and fake-quantized conv/linear layers (:mod:`.layers`). Builds on
:mod:`lowbit.core` only.
"""
from .activations import ActQuantizer, QuantReLU, attach_activation_quantizers, calibrate_activations  # noqa: F401
from .calibration import all_layer_inputs, batches, calibration_tensor, check_inputs, layer_inputs  # noqa: F401
from .fold_bn import bn_pairs, fold_bn, fold_layer_bn  # noqa: F401
from .graph import QUANTIZABLE, model_device, module_calls, quantizable_layers, set_module  # noqa: F401
from .layers import QuantConv2d, QuantLinear, quantized_layers  # noqa: F401
