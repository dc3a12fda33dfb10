"""What notebook 04 runs: SQ's shift-add MAC (Fig. 4) on our trained networks, checked end to end.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Fig. 4: the integer network (shifts, adds and
sign flips only, :mod:`lowbit.sq.hw.network`) against the same fake-quantized float network and
the FP model, on the test set.
"""
from __future__ import annotations

import numpy as np
import torch

from ... import imagenet, models as model_zoo
from ..hw import network
from ..universal import universal_set


def study_network(name: str, dataset: str) -> tuple[torch.nn.Module, str, str]:
    """``(FP model, where its weights come from, their identity for cache keys)`` of the network put on
    the MAC: the committed checkpoint (or, for ``dataset="imagenet"``, torchvision's ``name`` with this
    process's ImageNet weights, :func:`lowbit.imagenet.use`); a network without a checkpoint is built
    with random weights and says so."""
    if model_zoo.available(name, dataset):
        source = (f"torchvision {name}, weights {imagenet.weights_for(name)}" if dataset == "imagenet"
                  else model_zoo.checkpoint_path(name, dataset).name)
        return (model_zoo.load_pretrained(name, dataset).eval(), source,
                model_zoo.weights_identity(name, dataset))
    return model_zoo.build(name).eval(), f"{name} random init (no checkpoint)", "random-init-seed0"


@torch.no_grad()
def fp_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 fraction of the FP ``model`` on ``images`` (in batches)."""
    correct = sum(int((model(images[s:s + batch]).argmax(1) == labels[s:s + batch]).sum())
                  for s in range(0, len(images), batch))
    return correct / len(images)


def integer_vs_fake_logits(fp_model, hw_model, images: torch.Tensor, labels: torch.Tensor, batch: int = 250,
                           progress: bool = False) -> dict:
    """:func:`lowbit.sq.hw.network.compare_logits` of the integer network plus the FP model's top-1."""
    out = network.compare_logits(hw_model, images, labels, batch=batch, progress=progress)
    out["accuracy_fp"] = fp_accuracy(fp_model, images, labels)
    return out


def lenet_shift_add_check(calib_images: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, n_exact: int,
                          weight_bits: int, act_bits: int, option, qps=None) -> dict:
    """The whole Fig. 4 check on LeNet-5 / Fashion-MNIST: every layer's accumulator against the fake-quant
    float layer on ``n_exact`` images, then logits and top-1 on ``images``. ``qps``: a fixed QPS function
    (smoke profile) or ``None`` to search (Algorithm 1)."""
    lenet = model_zoo.load_pretrained("lenet5", "fashion-mnist")
    q = network.search_model_qps(lenet, weight_bits, option) if qps is None else qps
    lenet_hw, _ = network.to_shift_add(lenet, calib_images, weight_bits=weight_bits, act_bits=act_bits,
                                       option=option, qps_fn=q)
    exact = network.layer_exactness(lenet_hw, images[:n_exact])
    out = integer_vs_fake_logits(lenet, lenet_hw, images, labels, batch=1000)
    out.update(layers=len(exact), layers_exact=sum(r["exact_acc"] for r in exact),
               worst_rel_layer_diff=max(r["max_abs_diff"] / max(r["max_abs_output"], 1e-300) for r in exact))
    return out


def fixed_qps(option, weight_bits: int):
    """A QPS function for :func:`lowbit.sq.hw.network.to_shift_add` that does not search (the smoke
    profile): ``N = 2^(bits-1)`` points of the universal set, evenly spaced by index, and a max-abs
    scale per output channel (0 for an all-zero channel)."""
    s_u = universal_set(option)
    points = s_u[np.linspace(0, len(s_u) - 1, 2 ** (weight_bits - 1)).round().astype(int)]

    def qps(weight, bits, opt):
        return points, weight.reshape(weight.shape[0], -1).abs().amax(1) / points.max()

    return qps


@torch.no_grad()
def layer_input_codes(hw_model, layer_name: str, images: torch.Tensor) -> torch.Tensor:
    """The unsigned integer activation codes that the MAC layer ``layer_name`` receives for ``images``."""
    layer = hw_model.get_submodule(layer_name)
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, inp: captured.setdefault("x", m.quantize_input(inp[0])))
    try:
        hw_model(images.double())
    finally:
        handle.remove()
    return captured["x"]
