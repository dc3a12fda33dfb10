"""Fold BatchNorm into the preceding convolution / linear layer (inference form).

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39, sec. 4.1) quantizes the weights of the *folded* network
(its code base is BRECQ's, whose ``fold_bn.py`` does the same; Jacob et al. CVPR 2018, sec. 3.2): for a conv with weight
``W`` (C_out, ...) and bias ``b`` followed by an eval-mode BN (``gamma``, ``beta``, running
``mu``, ``var``, ``eps``),

    W' = W * gamma / sqrt(var + eps)        (per output channel)
    b' = (b - mu) * gamma / sqrt(var + eps) + beta

and the BN becomes ``nn.Identity``. Pairs are found with ``torch.fx`` (a BN whose only input
is a conv/linear output used by nothing else); models that fx cannot trace fall back to
registration order (a BN right after a conv/linear with matching channel count).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .graph import set_module

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx as fx

    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), BATCHNORMS):
            continue
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            continue
        prev = node.args[0]
        if prev.op == "call_module" and isinstance(mods.get(prev.target), FOLDABLE) and len(prev.users) == 1:
            pairs.append((prev.target, node.target))
    return pairs


def _pairs_registration(model: nn.Module) -> list[tuple[str, str]]:
    pairs, last = [], None
    for name, m in model.named_modules():
        if isinstance(m, FOLDABLE):
            last = (name, m)
        elif isinstance(m, BATCHNORMS):
            if last is not None:
                out = last[1].out_features if isinstance(last[1], nn.Linear) else last[1].out_channels
                if out == m.num_features:
                    pairs.append((last[0], name))
            last = None
    return pairs


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(layer_name, bn_name), ...]``: each BN and the conv/linear whose output it normalises."""
    try:
        return _pairs_fx(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure falls back
        warnings.warn(f"torch.fx could not trace {type(model).__name__} ({err}); pairing BNs by "
                      "registration order", stacklevel=2)
        return _pairs_registration(model)


@torch.no_grad()
def fold_layer_bn(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into ``layer`` in place (weight rescaled, bias created/updated)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std  # (C_out,)
    w = layer.weight.double()
    shape = [-1] + [1] * (w.ndim - 1)
    layer.weight.copy_((w * factor.reshape(shape)).to(layer.weight.dtype))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(std)
    new_bias = ((b - bn.running_mean.double()) * factor + beta).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm folded into its preceding layer.

    The input model is left untouched; the copy computes the same eval-mode outputs (up to
    float rounding) with ``nn.Identity`` in place of each folded BN. BNs that do not follow a
    conv/linear (e.g. a pre-activation BN) are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn needs an nn.Module, got {type(model).__name__}")
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in bn_pairs(folded):
        fold_layer_bn(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        set_module(folded, bn_name, nn.Identity())
    return folded
