"""Accuracy and loss of a model on a data set."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .data import TensorImageDataset
from .models import checkpoint_path


def _batches(dataset, batch_size: int):
    if isinstance(dataset, TensorImageDataset):
        for i in range(0, len(dataset), batch_size):
            yield dataset.images[i:i + batch_size], dataset.labels[i:i + batch_size]
    elif isinstance(dataset, DataLoader):
        yield from dataset
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000, device=None) -> dict:
    """``{"accuracy": top-1 %, "loss": mean cross-entropy, "n": samples}`` in eval mode."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in _batches(dataset, batch_size):
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
           path.stat().st_mtime_ns if path.exists() else None)
    if key not in _CHECKPOINT_ACCURACY:
        _CHECKPOINT_ACCURACY[key] = accuracy(model, test)
    return _CHECKPOINT_ACCURACY[key]
