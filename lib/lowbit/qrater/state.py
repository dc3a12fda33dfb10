"""Model plumbing of Q-Rater's layer-by-layer search: the quantized working copy and a prefix-cached runner.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, Algorithm 1 (appendix E) probes one layer at a time with the
earlier layers frozen. :class:`QuantizedCopy` holds the BN-folded FP model and its quantized copy
(weights overwritten in place, input activations quantized by forward pre-hooks);
:class:`PrefixRunner` evaluates the copy on fixed calibration batches, replaying the frozen prefix
from a cache. BN folding and the forward-order layer walk are the shared ones of :mod:`lowbit.nn`.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from ..nn.fold_bn import fold_bn
from ..nn.graph import module_calls, quantizable_layers, set_module
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


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward pass is skipped."""


class _Replay(nn.Module):
    """Stands in for a frozen module while it is frozen: returns its cached output of the current batch
    (the module itself, and so its hooks, e.g. the activation quantizer, is not called at all)."""

    def __init__(self, runner: "PrefixRunner", name: str):
        super().__init__()
        self.runner, self.name = runner, name

    def forward(self, *args, **kwargs):
        return self.runner.frozen[self.name][self.runner.batch_idx]


class PrefixRunner:
    """Evaluates a model on fixed batches; can replay a frozen prefix from a cache.

    :meth:`freeze_before` caches the outputs of the largest modules that finish before the
    target layer starts (they cannot depend on it) and puts stand-ins in their place that return
    the cache, so each probe only runs the target layer and what comes after it (inside a
    ResNet block the block's input and the outputs of the layers before the target are
    replayed; the frozen modules' hooks do not run). :meth:`evaluate` with ``use_cache=False``
    is the plain reference (a full forward pass of the model as it is); tests check that both
    agree exactly, for every layer of ResNet-20 and LeNet-5.
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

    def _put(self, names, replay: bool):
        """Put the stand-ins (``replay``) or the modules themselves at ``names`` in the model."""
        for n in names:
            set_module(self.model, n, _Replay(self, n) if replay else self.modules[n])

    def release(self):
        """Undo :meth:`freeze_before`: every module runs its own forward again."""
        self._put(self.frozen, replay=False)
        self.frozen = {}

    def freeze_before(self, layer: str, reuse: bool = False):
        """Cache what runs before ``layer`` (in its current, quantized state) and replay it.

        The caching pass stops where ``layer`` starts. With ``reuse`` it replays the current
        cache while it runs, which is exact when nothing the frozen modules compute has changed
        since they were frozen: Algorithm 1 walks forward and changes only the layer it searched
        (at or after the previous target). Without it (or when the current cache holds a module
        that does not finish before ``layer`` starts), the pass is a plain forward.
        """
        start = self.spans[layer][0]
        cands = {n for n, (s, e) in self.spans.items() if e < start}
        maximal = [n for n in cands if not any(n.startswith(c + ".") for c in cands)]
        old = self.frozen if reuse and all(n in cands for n in self.frozen) else {}
        if not old:
            self.release()
        outs: dict[str, list] = {n: old[n] if n in old else [] for n in maximal}
        handles = [self.modules[n].register_forward_hook(lambda mod, inp, out, n=n: outs[n].append(out))
                   for n in maximal if n not in old]
        handles.append(self.modules[layer].register_forward_pre_hook(_stop, prepend=True))
        try:
            self._run_until_stop(use_cache=True)
        finally:
            for h in handles:
                h.remove()
        self.release()
        self.frozen = outs
        self._put(outs, replay=True)

    @contextlib.contextmanager
    def _state(self, use_cache: bool):
        """Inference mode, with the frozen modules themselves in place of their stand-ins unless ``use_cache``."""
        plain = not use_cache and bool(self.frozen)
        if plain:
            self._put(self.frozen, replay=False)
        try:
            with torch.inference_mode():
                yield
        finally:
            if plain:
                self._put(self.frozen, replay=True)

    def forward_all(self, use_cache: bool = True):
        """Yield ``(logits, labels)`` per batch."""
        with self._state(use_cache):
            for i, (x, y) in enumerate(self.batches):
                self.batch_idx = i
                yield self.model(x), y

    def _run_until_stop(self, use_cache: bool):
        """Run every batch until a hook raises :class:`_Stop` (or to the end)."""
        with self._state(use_cache):
            for i, (x, _) in enumerate(self.batches):
                self.batch_idx = i
                try:
                    self.model(x)
                except _Stop:
                    pass

    def evaluate(self, use_cache: bool = True) -> tuple[float, float]:
        """``(top-1 accuracy %, mean cross-entropy)`` on the fixed batches."""
        correct, loss, n = 0, 0.0, 0
        for logits, y in self.forward_all(use_cache):
            correct += int((logits.argmax(1) == y).sum())
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return 100.0 * correct / n, loss / n

    def capture(self, layer: str, output: bool = False) -> list[torch.Tensor]:
        """The (unquantized) inputs, or the outputs, of ``layer`` per batch.

        Each batch's pass stops at ``layer`` (nothing after it can change what is captured); a
        frozen layer (or one inside a frozen module) is captured by a plain forward pass.
        """
        got: list = []
        mod = self.modules[layer]

        def keep(t):
            got.append(t.detach().clone())
            raise _Stop

        if output:
            h = mod.register_forward_hook(lambda m, i, o: keep(o))
        else:
            h = mod.register_forward_pre_hook(lambda m, i: keep(i[0]), prepend=True)
        inside = any(layer == n or layer.startswith(n + ".") for n in self.frozen)
        try:
            self._run_until_stop(use_cache=not inside)
        finally:
            h.remove()
        return got


def _stop(*_):
    raise _Stop


def channel_mean(outs: list[torch.Tensor]) -> torch.Tensor:
    """Per-output-channel mean over batch (and space) of a list of ``(B, C, ...)`` outputs."""
    y = torch.cat(outs)
    dims = [d for d in range(y.ndim) if d != 1]
    return y.mean(dim=dims)


def output_means(runner: PrefixRunner, layers: list[str]) -> dict[str, torch.Tensor]:
    """``{layer: channel_mean(runner.capture(layer, output=True))}`` for ``layers`` in forward order
    (eq. 7's ``E[W X]`` of the FP model), walking the runner's prefix cache forward so that each
    capture runs only from the enclosing block to the layer (exact: the model does not change)."""
    means = {}
    try:
        for name in layers:
            runner.freeze_before(name, reuse=True)
            means[name] = channel_mean(runner.capture(name, output=True))
    finally:
        runner.release()
    return means
