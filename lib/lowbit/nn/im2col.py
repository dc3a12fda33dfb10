"""im2col rows of a layer's input: the rows ``X`` with ``layer(x) - bias = X @ W.reshape(C, K).T``.

Used by output-reconstruction refinement (SQ's final optimisation, AdaRound/BRECQ-style
objectives ``||X_q q - X w||^2``): :func:`layer_rows` is the plain full unfold, :func:`rows_at`
gathers a subset of rows directly and is tested to equal ``layer_rows(layer, x)[idx]`` exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows ``(M, K)`` such that the layer's pre-bias output is ``rows @ W.reshape(C, K).T``."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            pad = 0
        else:
            pad = layer.padding
        cols = F.unfold(x, layer.kernel_size, layer.dilation, pad, layer.stride)  # (B, K, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def n_rows(layer: nn.Module, x: torch.Tensor) -> int:
    """Number of rows :func:`layer_rows` would return for ``x`` (without building them)."""
    if isinstance(layer, nn.Conv2d):
        ho, wo = conv_out_hw(layer, x)
        return x.shape[0] * ho * wo
    return x.numel() // x.shape[-1]


def conv_out_hw(layer: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    pl, pr, pt, pb = layer._reversed_padding_repeated_twice
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho = (x.shape[-2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[-1] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return ho, wo


def rows_at(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``layer_rows(layer, x)[idx]`` gathered directly (no full im2col): the same values, exactly.

    For a conv, row ``r`` is the receptive field of output pixel ``r % L`` of image ``r // L``
    (``L`` output pixels per image), flattened channel-major like ``F.unfold``.
    """
    if not isinstance(layer, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])[idx]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)  # (B, Cin, Hp, Wp)
    hp, wp = xp.shape[-2:]
    pixels = xp.permute(0, 2, 3, 1).reshape(-1, xp.shape[1])  # (B * Hp * Wp, Cin), one copy
    ho, wo = conv_out_hw(layer, x)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    idx = idx.to(x.device)
    b, pix = idx // (ho * wo), idx % (ho * wo)
    top = b * hp * wp + (pix // wo) * sh * wp + (pix % wo) * sw  # (R,) flat pixel of each window corner
    taps = [pixels.index_select(0, top + i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]
    patches = torch.stack(taps, dim=2)  # (R, Cin, kh * kw): channel-major like F.unfold
    return patches.reshape(len(idx), -1)  # (R, Cin * kh * kw)
