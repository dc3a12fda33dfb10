"""Model plumbing of Q-Rater's layer-by-layer search: the quantized working copy and a prefix-cached runner.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, Algorithm 1 (appendix E) probes one layer at a time with the
earlier layers frozen. :class:`QuantizedCopy` holds the BN-folded FP model and its quantized copy
(weights overwritten in place, input activations quantized by forward pre-hooks);
:class:`PrefixRunner` evaluates the copy on fixed calibration batches, replaying the frozen prefix
from a cache. BN folding and the forward-order layer walk are the shared ones of :mod:`lowbit.nn`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..nn.fold_bn import fold_bn
from ..nn.graph import module_calls, quantizable_layers
from .rounding import ActRounding, clip_round_activation


class QuantizedCopy:
    """The FP (BN-folded) model ``fp``, its quantized working copy ``model`` and per-layer
    input-activation quantizers ``act`` (``None``: that layer's input stays FP).

    ``order`` lists the quantizable layers in forward order (traced on ``example``). Every
    quantizable layer of the copy gets a bias (zeros where the FP layer has none), so that bias
    correction (eq. 7) has somewhere to go.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, device: torch.device | None = None):
        self.fp = fold_bn(model)
        if device is not None:
            self.fp = self.fp.to(device)
        self.model = copy.deepcopy(self.fp)
        self.modules = dict(self.model.named_modules())
        self._fp_modules = dict(self.fp.named_modules())
        example = example.to(device) if device is not None else example
        self.order = [name for name, _ in quantizable_layers(self.model, example)]
        self.act: dict[str, ActRounding | None] = {n: None for n in self.order}
        for n in self.order:
            layer = self.modules[n]
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                      device=layer.weight.device))
            layer.register_forward_pre_hook(self._hook(n))

    def _hook(self, name):
        def pre(mod, inp):
            setting = self.act[name]
            if setting is None:
                return None
            return (clip_round_activation(inp[0], setting),) + tuple(inp[1:])
        return pre

    def fp_weight(self, name) -> torch.Tensor:
        return self._fp_modules[name].weight.detach()

    def fp_bias(self, name) -> torch.Tensor:
        b = self._fp_modules[name].bias
        w = self.fp_weight(name)
        return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b.detach()

    def set_weight(self, name, w):
        with torch.no_grad():
            self.modules[name].weight.copy_(w)

    def set_bias(self, name, b):
        with torch.no_grad():
            self.modules[name].bias.copy_(b)


class PrefixRunner:
    """Evaluates a model on fixed batches; can replay a frozen prefix from a cache.

    :meth:`freeze_before` caches the outputs of the largest modules that finish before the
    target layer starts (they cannot depend on it) and makes them return the cache, so each
    probe only recomputes the rest of the network. :meth:`evaluate` with ``use_cache=False``
    is the plain reference (a full forward pass); tests check that both agree.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.model = model
        self.batches = [(images[i:i + batch_size], labels[i:i + batch_size])
                        for i in range(0, len(labels), batch_size)]
        self.frozen: dict[str, list] = {}
        self.batch_idx = 0
        events = module_calls(model, images[:2])
        calls: dict[str, int] = {}
        for ev in events:
            calls[ev[0]] = calls.get(ev[0], 0) + 1
        self.spans = {ev[0]: (ev[2], ev[3]) for ev in events if calls[ev[0]] == 1}
        self.modules = dict(model.named_modules())

    def release(self):
        """Undo :meth:`freeze_before`: every module runs its own forward again."""
        for name in self.frozen:
            self.modules[name].__dict__.pop("forward", None)
        self.frozen = {}

    def freeze_before(self, layer: str):
        """Cache what runs before ``layer`` (in its current, quantized state) and replay it."""
        self.release()
        start = self.spans[layer][0]
        cands = {n for n, (s, e) in self.spans.items() if e < start}
        maximal = [n for n in cands if not any(n.startswith(c + ".") for c in cands)]
        outs: dict[str, list] = {n: [] for n in maximal}
        handles = [self.modules[n].register_forward_hook(
            lambda mod, inp, out, n=n: outs[n].append(out)) for n in maximal]
        try:
            with torch.inference_mode():
                for x, _ in self.batches:
                    self.model(x)
        finally:
            for h in handles:
                h.remove()
        for n in maximal:
            self.modules[n].forward = (lambda *a, n=n, **k: outs[n][self.batch_idx])
        self.frozen = outs

    def forward_all(self, use_cache: bool = True):
        """Yield ``(logits, labels)`` per batch."""
        saved = None
        if not use_cache and self.frozen:
            saved = {n: self.modules[n].__dict__.pop("forward") for n in self.frozen}
        try:
            with torch.inference_mode():
                for i, (x, y) in enumerate(self.batches):
                    self.batch_idx = i
                    yield self.model(x), y
        finally:
            if saved:
                for n, fwd in saved.items():
                    self.modules[n].forward = fwd

    def evaluate(self, use_cache: bool = True) -> tuple[float, float]:
        """``(top-1 accuracy %, mean cross-entropy)`` on the fixed batches."""
        correct, loss, n = 0, 0.0, 0
        for logits, y in self.forward_all(use_cache):
            correct += int((logits.argmax(1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return 100.0 * correct / n, loss / n

    def capture(self, layer: str, output: bool = False) -> list[torch.Tensor]:
        """The (unquantized) inputs, or the outputs, of ``layer`` per batch."""
        got: list = []
        mod = self.modules[layer]
        if output:
            h = mod.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
        else:
            h = mod.register_forward_pre_hook(lambda m, i: got.append(i[0].detach().clone()), prepend=True)
        try:
            for _ in self.forward_all():
                pass
        finally:
            h.remove()
        return got


def channel_mean(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-output-channel mean over batch (and space) of a list of ``(B, C, ...)`` outputs."""
    y = torch.cat(outs)
    dims = [d for d in range(y.ndim) if d != 1]
    return y.mean(dim=dims)
