"""Calibration data and layer-input capture: the inputs PTQ calibrates and reconstructs on.

``calib`` anywhere in lowbit is a tensor of inputs, a Dataset of ``(input, label)`` pairs or a
DataLoader; :func:`calibration_tensor` turns it into one batch tensor and :func:`check_inputs`
checks it against the model up front (shape, dtype, finiteness, label range) so that a wrong
shape gets our message, not a RuntimeError from deep inside a convolution.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .graph import model_device


def calibration_tensor(calib, max_samples: int | None = None) -> torch.Tensor:
    """The inputs of ``calib`` as one tensor ``(N, ...)``.

    ``calib`` is a tensor of inputs, a Dataset of ``(input, label)`` pairs, or a DataLoader
    yielding ``(input, label)`` batches (or bare input batches).
    """
    if calib is None:
        raise ValueError("calib is required here: pass a DataLoader or Dataset of (input, label) "
                         "pairs or a tensor of inputs, e.g. lowbit.data.calibration_subset(train, 1024, seed)")
    if isinstance(calib, torch.Tensor):
        x = calib
    elif hasattr(calib, "images") and isinstance(getattr(calib, "images"), torch.Tensor):
        x = calib.images
    elif isinstance(calib, DataLoader):
        xs, n = [], 0
        for batch in calib:
            xb = batch[0] if isinstance(batch, (tuple, list)) else batch
            xs.append(xb)
            n += len(xb)
            if max_samples is not None and n >= max_samples:
                break
        if not xs:
            raise ValueError("calib DataLoader is empty")
        x = torch.cat(xs)
    elif isinstance(calib, Dataset) or hasattr(calib, "__getitem__"):
        n = len(calib) if max_samples is None else min(len(calib), max_samples)
        items = [calib[i] for i in range(n)]
        x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    else:
        raise TypeError(f"calib must be a tensor, Dataset or DataLoader, got {type(calib).__name__}")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    return x[:max_samples] if max_samples is not None else x


def batches(x: torch.Tensor, batch_size: int):
    """Consecutive slices of ``x`` of at most ``batch_size`` rows."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256):
    """Yield, batch by batch, the input tensor that ``layer`` receives when ``model`` runs on ``x``.

    The forward pass stops at ``layer`` (the rest of the network is not computed). For a
    quantized layer the input is taken *after* its ``act_in`` quantizer, if it has one.
    """
    captured = {}

    def hook(mod, args):
        captured["x"] = args[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    dev = model_device(model)
    try:
        for xb in batches(x, batch_size):
            captured.clear()
            try:
                model(xb.to(dev))
            except _Stop:
                pass
            if "x" not in captured:
                raise ValueError("layer was not called in the forward pass; is it part of model?")
            inp = captured["x"]
            if getattr(layer, "act_in", None) is not None:
                inp = layer.act_in(inp)
            yield inp
    finally:
        handle.remove()


class _Budget(Exception):
    pass


@torch.no_grad()
def all_layer_inputs(model: nn.Module, names, x: torch.Tensor, batch_size: int = 256,
                     max_bytes: int = 1 << 30) -> dict | None:
    """``{name: [input batch, ...]}`` for the layers ``names`` of ``model``, in one pass over ``x``.

    The same tensors :func:`layer_inputs` yields layer by layer (no ``act_in`` here: meant for
    the FP model), so that the refinement runs the FP network once instead of once per layer.
    Returns ``None`` when they would take more than ``max_bytes`` (then use :func:`layer_inputs`).
    """
    store = {n: [] for n in names}
    used = [0]

    def hook_for(name):
        def hook(mod, args):
            used[0] += args[0].numel() * args[0].element_size()
            if used[0] > max_bytes:
                raise _Budget
            store[name].append(args[0].clone())
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    dev = model_device(model)
    try:
        for xb in batches(x, batch_size):
            model(xb.to(dev))
    except _Budget:
        return None
    finally:
        for h in handles:
            h.remove()
    n_batches = max(1, -(-len(x) // batch_size))
    if any(len(v) != n_batches for v in store.values()):
        return None  # a layer called zero or several times per pass: fall back
    return store




def check_inputs(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, what: str = "calib"
                 ) -> None:
    """Check calibration inputs (and labels) against ``model`` before any work is done.

    Runs ``model`` on the first two inputs; a shape the model cannot take raises a ``ValueError``
    naming the shape given and, where the first layer tells it, the channels expected
    (``RuntimeError`` from inside a convolution otherwise). Inputs must be finite floats; labels,
    when given, one integer per input in ``0 .. n_classes - 1`` of the model's output.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} inputs must be a floating-point tensor batch (N, C, H, W) or (N, features), "
                        f"got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} inputs contain NaN or inf: clean or re-normalise the images first")
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        expected = f"(N, {first.in_channels}, H, W) images"
        ok = x.ndim == 4 and x.shape[1] == first.in_channels
    elif isinstance(first, nn.Linear):
        expected = f"(N, ...) inputs with {first.in_features} features per sample (flattened)"
        ok = x[0].numel() == first.in_features or x.shape[-1] == first.in_features
    else:
        expected, ok = "inputs the model accepts", True
    out = None
    if ok:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x[:2].to(model_device(model)))
        except RuntimeError as err:
            ok = False
            expected += f" (the model failed on them: {str(err).splitlines()[0]})"
        finally:
            model.train(was_training)
    if not ok:
        raise ValueError(f"{what} inputs have shape {tuple(x.shape)} but the model expects {expected}: "
                         "pass images from the data set the model was trained on, e.g. "
                         "lowbit.data.calibration_subset(lowbit.data.load_dataset(dataset, 'train'), n, seed)")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.ndim != 1 or len(labels) != len(x):
            raise ValueError(f"{what} labels must be one integer class per input ({len(x)}), got shape "
                             f"{tuple(labels.shape)} and dtype {labels.dtype}")
        n_classes = out.shape[-1] if out is not None and out.ndim >= 2 else None
        if len(labels) and (int(labels.min()) < 0 or (n_classes is not None and int(labels.max()) >= n_classes)):
            raise ValueError(f"{what} labels must lie in 0..{(n_classes or 0) - 1} (the model has {n_classes} "
                             f"outputs), got {int(labels.min())}..{int(labels.max())}: use the labels of the "
                             "data set the model was trained on")
