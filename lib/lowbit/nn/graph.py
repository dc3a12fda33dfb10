"""The layer graph of a network: quantizable layers in forward order, module calls, module surgery.

Shared by post-training quantization (SQ, Q-Rater) and quantization-aware training. Q-Rater's
layer-by-layer walk (Kim, Lee et al., *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, Algorithm 1 of appendix E) needs forward (execution) order;
SQ's first/last-layer rule (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate
Post-Training Quantization*, ECCV 2022, doi:10.1007/978-3-031-20083-0_39, sec. 4.1) needs the first
conv and the classifier.
"""
from __future__ import annotations

import torch
import torch.nn as nn

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def module_calls(model: nn.Module, example: torch.Tensor) -> list[tuple]:
    """Run ``model(example)`` once; per submodule call ``(name, module, start, end, inputs, output)``.

    ``start``/``end`` are ticks of one counter advanced at every call entry and exit, so
    ``[start, end]`` spans nest like the calls (used to find forward order and which
    submodules finish before a layer starts). Listed in order of call *exit*.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    events: list = []
    counter = [0]
    starts: dict = {}
    handles = []
    for name, m in model.named_modules():
        if m is model:
            continue

        def pre(mod, inp, name=name):
            starts.setdefault(name, []).append(counter[0])
            counter[0] += 1

        def post(mod, inp, out, name=name):
            events.append((name, mod, starts[name][-1], counter[0], inp, out))
            counter[0] += 1

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return events


def quantizable_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]`` of every ``nn.Conv2d`` / ``nn.Linear``.

    Without ``example``: registration order. For the models here (and torchvision's ResNets)
    that is forward order, so the first entry is the first conv and the last the classifier.
    With ``example`` (a batch of inputs; two are used): forward (execution) order, found by
    tracing one pass (:func:`module_calls`), each layer at its first call; layers that the
    pass does not reach are left out. Q-Rater's layer-by-layer walk (Algorithm 1) uses this.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if example is None:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    seen, order = set(), []
    for name, mod, *_ in sorted(module_calls(model, example[:2]), key=lambda ev: ev[2]):
        if isinstance(mod, QUANTIZABLE) and name not in seen:
            seen.add(name)
            order.append((name, mod))
    return order


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``root`` by ``new`` in place."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
