"""Shannon entropy of the integer codes a QAT model uses, per layer: :func:`code_entropy`.

The nuLSQ poster (Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for
Neural Network Quantization*, ACCV 2024, "Comparison of Shannon Entropy") compares the entropy of
LSQ and nuLSQ codes without publishing its definition. **Our definition**: for each quantized
layer, the histogram of the ``2^b`` codes (level indices, lowest level 0) of its fake-quantized
weights, and of its fake-quantized inputs over every image of ``data``; the entropy
``H = -sum_k p_k log2 p_k`` in bits (at most ``b``; empty codes contribute 0).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.calibration import batches, calibration_tensor
from ..nn.graph import model_device
from .qat import qat_layers


def entropy_bits(counts: torch.Tensor) -> float:
    """``-sum p log2 p`` of a histogram (bits)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("cannot take the entropy of an empty histogram")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


@torch.no_grad()
def code_entropy(model: nn.Module, data, max_images: int | None = 1000, batch_size: int = 250) -> dict:
    """``{layer: {"weight": H_w or None, "input": H_a or None, "w_bits", "a_bits"}}`` in bits, for
    every QAT layer of ``model`` (``None`` where that part is full precision). ``data`` is a
    Dataset, DataLoader or image tensor; its first ``max_images`` images are used."""
    layers = qat_layers(model)
    if not layers:
        raise ValueError("model has no QAT layer: prepare it with lowbit.lsq.prepare_qat first")
    x = calibration_tensor(data, max_images)
    counts = {n: None for n, _ in layers}
    handles = []
    for name, layer in layers:
        q = layer.input_quantizer
        if q is None:
            continue

        def hook(mod, args, name=name, q=q):
            h = torch.bincount(q.codes(args[0]).reshape(-1), minlength=2 ** q.bits).cpu()
            counts[name] = h if counts[name] is None else counts[name] + h
        handles.append(layer.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for xb in batches(x, batch_size):
            model(xb.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for name, layer in layers:
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        w_h = None
        if wq is not None:
            w_h = entropy_bits(torch.bincount(wq.codes(layer.weight).reshape(-1), minlength=2 ** wq.bits))
        out[name] = {"weight": w_h, "input": entropy_bits(counts[name]) if aq is not None else None,
                     "w_bits": None if wq is None else wq.bits, "a_bits": None if aq is None else aq.bits}
    return out
