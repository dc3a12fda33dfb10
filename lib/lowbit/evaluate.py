"""Accuracy and loss of a model on a data set; the ImageNet FP baselines of the papers."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from . import imagenet
from .core.validation import resolve_device
from .data import TensorImageDataset, head, load_dataset
from .models import checkpoint_path, load_pretrained


def _batches(dataset, batch_size: int, device):
    if isinstance(dataset, TensorImageDataset):
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i:i + batch_size], dataset.labels[i:i + batch_size]
    elif isinstance(dataset, DataLoader):
        yield from dataset
    else:  # an ImageFolder and the like: worker processes, pinned memory on CUDA
        yield from imagenet.loader(dataset, batch_size, device=device)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000, device=None) -> dict:
    """``{"accuracy": top-1 %, "loss": mean cross-entropy, "n": samples}`` in eval mode, on ``device``
    (default: the model's; another one moves ``model`` there in place, as ``model.to(device)`` does)."""
    device = resolve_device(device, default=next((p.device for p in model.parameters()), torch.device("cpu")))
    model.to(device)
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in _batches(dataset, batch_size, device):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n, "n": n}


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 1000, device=None) -> float:
    """Top-1 accuracy in percent (API)."""
    return evaluate(model, dataset, batch_size, device)["accuracy"]


_CHECKPOINT_ACCURACY: dict = {}  # (model, dataset, split, size, checkpoint mtime) -> accuracy, per process


def checkpoint_accuracy(model: nn.Module, model_name: str, dataset: str, test) -> float:
    """:func:`accuracy` of the committed FP checkpoint ``model_name``/``dataset`` (already loaded
    as ``model``) on ``test``, computed once per process: every PTQ or Q-Rater run of a notebook
    compares with the same FP number. Keyed by the test split and size and the checkpoint
    file's modification time, so a retrained checkpoint is evaluated again."""
    path = checkpoint_path(model_name, dataset)
    key = (model_name, dataset, getattr(test, "split", None), len(test),
           path.stat().st_mtime_ns if path.exists() else repr(imagenet.active()))
    if key not in _CHECKPOINT_ACCURACY:
        _CHECKPOINT_ACCURACY[key] = accuracy(model, test)
    return _CHECKPOINT_ACCURACY[key]


def imagenet_baselines(names, n_val: int | None = None, device=None, batch_size: int = 64) -> list[dict]:
    """The FP rows of the papers' ImageNet tables, measured: top-1 of each torchvision network in
    ``names`` (:data:`lowbit.imagenet.MODELS`) with the process's ImageNet weights on the first
    ``n_val`` validation images (``None``: all), at its own input size (299 for Inception-v3)."""
    rows = []
    for name in names:
        net = load_pretrained(name, "imagenet", device=device)
        val = head(load_dataset("imagenet", "val", image_size=imagenet.image_size(name)), n_val)
        out = evaluate(net, val, batch_size=batch_size, device=device)
        rows.append({"model": name, "weights": str(imagenet.weights_for(name)),
                     "params": sum(p.numel() for p in net.parameters()), "val images": out["n"],
                     "top-1": out["accuracy"], "loss": out["loss"]})
    return rows
