"""ImageNet at paper scale: torchvision's networks with pretrained weights, the ImageFolder splits
with their standard transforms, loaders and the papers' calibration subsets.

The SQ paper (Oh, Sim, Kim, Lee, ECCV 2022, Tables 2-3; supplement Table 2) and Q-Rater (Kim et al.,
arXiv:2105.01868, Tables 1-2) evaluate torchvision's ResNet-18/50, MobileNetV2 and Inception-v3 on the
ImageNet validation set. Nothing here downloads data: ``data_dir`` is a folder holding ``train/`` and
``val/`` in torchvision's ``ImageFolder`` layout (one sub-folder of images per class, the same class
folders in both). Weights come from torchvision's own mechanism (``weights="DEFAULT"`` or a weights
name such as ``"IMAGENET1K_V1"``: on a connected machine torchvision downloads them into its cache)
or from a local state dict (``weights="/path/resnet18.pth"``).

Transforms (torchvision's ImageNet recipe, which the papers use): evaluation resizes the shorter
side to 256 and centre-crops 224 (342 and 299 for Inception-v3); training takes a random resized
crop of 224 (299) and a horizontal flip; both normalise with ImageNet's channel mean and std.
Calibration subsets: 1024 training images for SQ/BRECQ-style PTQ (:data:`CALIBRATION_IMAGES`), 20
images per class for Q-Rater's objective (:data:`QRATER_PER_CLASS`), both drawn seeded from ``train/``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .core.validation import resolve_device
from .results import sha256_file

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "inception_v3")  # the SQ and Q-Rater papers' networks
CLASSES = 1000
CALIBRATION_IMAGES = 1024  # SQ / BRECQ-style PTQ calibration set
QRATER_PER_CLASS = 20  # Q-Rater's objective subset: 20 training images per class
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_FOLDERS = {"train": "train", "val": "val", "test": "val"}  # "test" is an alias of "val"


_ACTIVE: dict = {"data_dir": None, "weights": None}  # this process's paper-scale inputs (:func:`use`)
_LOADER_WORKERS: list = [None]  # default DataLoader workers of :func:`loader` (None: one per CPU, up to 8)


class ImageNetMissingError(FileNotFoundError):
    """An ImageNet folder or a weights file that is not there (the message says what is needed)."""


def use(data_dir=None, weights=None) -> None:
    """Make ``data_dir`` and ``weights`` this process's ImageNet inputs: ``load_dataset("imagenet", ...)``
    and ``load_pretrained(name, "imagenet")`` called without them take these (a notebook's paper
    profile sets them once, from its ``parameters`` cell, through :func:`lowbit.profiles.resolve`)."""
    if data_dir is not None:
        split_folder(data_dir, "val")  # checked now, not mid-run
    _ACTIVE.update(data_dir=data_dir, weights=weights)


def active() -> dict:
    """``{"data_dir", "weights"}`` set by :func:`use` (``None`` where unset)."""
    return dict(_ACTIVE)


def weights_for(name: str, weights=None):
    """The weights ``load(name, weights)`` uses: ``weights``, else this process's (a dict is looked up)."""
    if weights is None:
        weights = _ACTIVE["weights"]
    return weights.get(name) if isinstance(weights, dict) else weights


def weights_identity(name: str, weights=None) -> str:
    """What identifies the weights ``load`` uses, for cache keys: the SHA-256 of a local file, else
    torchvision's weights entry (``"ResNet18_Weights.IMAGENET1K_V1"``)."""
    w = weights_for(name, weights)
    if w is None:
        raise ValueError(f"{name} on ImageNet needs weights: {_options(name)}")
    if _is_path(w):
        path = Path(w).expanduser()
        return sha256_file(path) if path.is_file() else str(path)
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    return str(enum.DEFAULT if w == "DEFAULT" else enum[w])


def check_model(name: str) -> str:
    """``name`` if it is one of :data:`MODELS`, else a ``ValueError`` listing them."""
    if name not in MODELS:
        raise ValueError(f"unknown ImageNet model {name!r}: use one of {MODELS} (torchvision's names)")
    return name


def image_size(name: str) -> int:
    """The input crop of a network: 299 for Inception-v3, else 224."""
    return 299 if check_model(name) == "inception_v3" else 224


def _size(size: int) -> int:
    if size not in (224, 299):
        raise ValueError(f"image_size must be 224 or 299 (Inception-v3), got {size!r}")
    return size


def eval_transform(size: int = 224):
    """Resize the shorter side to 256 (342 for 299), centre crop ``size``, normalise."""
    import torchvision.transforms as T

    resize = {224: 256, 299: 342}[_size(size)]
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])


def train_transform(size: int = 224):
    """Random resized crop of ``size``, horizontal flip, normalise."""
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(_size(size)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def split_folder(data_dir, split: str) -> Path:
    """``data_dir/train`` or ``data_dir/val`` (``split="test"`` means ``val``), checked to exist."""
    if data_dir is None:
        data_dir = _ACTIVE["data_dir"]
    if data_dir is None:
        raise ValueError("ImageNet needs data_dir=...: a folder holding train/ and val/ in torchvision's "
                         "ImageFolder layout (one sub-folder of images per class)")
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown ImageNet split {split!r}: use 'train' or 'val' ('test' is an alias of 'val')")
    root = Path(data_dir).expanduser() / SPLIT_FOLDERS[split]
    if not root.is_dir():
        raise ImageNetMissingError(
            f"{root} is not a folder: data_dir={str(data_dir)!r} must hold train/ and val/ ImageFolders "
            "(e.g. ILSVRC2012 extracted with one sub-folder per class in both)")
    return root


def image_folder(data_dir, split: str, size: int = 224):
    """The ``ImageFolder`` of a split with its transform (training or evaluation)."""
    from torchvision.datasets import ImageFolder

    root = split_folder(data_dir, split)
    tf = train_transform(size) if split == "train" else eval_transform(size)
    return ImageFolder(str(root), transform=tf)


def set_loader_workers(workers: int | None) -> None:
    """The default number of :func:`loader` worker processes in this process (``None``: one per CPU,
    up to 8). :mod:`lowbit.processes` sets 0 in its own workers, which already use a core each."""
    _LOADER_WORKERS[0] = workers


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, device=None, workers: int | None = None,
           seed: int = 0) -> DataLoader:
    """A ``DataLoader`` with worker processes (default: up to 8, one per CPU, or what
    :func:`set_loader_workers` set) and pinned memory when ``device`` is CUDA; a seeded generator
    makes the shuffled order reproducible."""
    dev = resolve_device(device, default="cpu")
    if workers is None:
        workers = _LOADER_WORKERS[0]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=dev.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def build(name: str) -> nn.Module:
    """torchvision's ``name`` with random weights and 1000 classes (Inception-v3 with its auxiliary
    head, as its published state dict has one)."""
    import torchvision

    check_model(name)
    extra = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **extra)


def _options(name: str) -> str:
    return (f"pass weights='DEFAULT' on a connected machine (torchvision downloads its weights into "
            f"{torch.hub.get_dir()}) or, offline, weights='/path/{name}.pth' (a state dict saved with "
            f"torch.save(model.state_dict(), path))")


def _is_path(weights) -> bool:
    return isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
        os.sep in weights or weights.endswith((".pth", ".pt")) or weights.startswith("~")))


def load(name: str, weights, device=None) -> nn.Module:
    """The pretrained network in eval mode on ``device``: ``weights`` is a torchvision weights name
    (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) or the path of a local state dict (``None``: the
    weights set by :func:`use`; a dict maps network names to either)."""
    check_model(name)
    dev = resolve_device(device, default="cpu")
    weights = weights_for(name, weights)  # a dict has one entry per network
    if weights is None:
        raise ValueError(f"{name} on ImageNet needs weights: {_options(name)}")
    if _is_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ImageNetMissingError(f"no weights file {path}: {_options(name)}")
        model = build(name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise ValueError(f"{path} is not a {name} state dict ({type(err).__name__}: {str(err)[:200]}): "
                             f"{_options(name)}") from err
        return model.to(dev).eval()
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a torchvision weights name or a path, got {type(weights).__name__}")
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise ValueError(f"unknown weights {weights!r} for {name}: use 'DEFAULT' or one of "
                         f"{[w.name for w in enum]}, or a local path") from None
    try:
        model = torchvision.models.get_model(name, weights=chosen)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a broken download
        raise ImageNetMissingError(f"could not get torchvision's {name} weights {chosen} "
                                   f"({type(err).__name__}: {str(err)[:200]}): {_options(name)}") from err
    return model.to(dev).eval()
