"""Model definitions and committed FP checkpoints.

* ``resnet20`` / ``resnet32``: the CIFAR-style ResNets of He et al. (CVPR 2016, sec. 4.2),
  6n+2 layers with n = 3 / 5, widths 16-32-64, option-A (parameter-free, zero-padded)
  shortcuts, adapted to 1x28x28 inputs (stage resolutions 28 -> 14 -> 7).
* ``lenet5``: LeCun et al. 1998 with ReLU and max pooling, 1x28x28 inputs.

Every ReLU is its own module instance so activation quantizers can be attached per layer.
Checkpoints live in ``data/models/<name>-<dataset>.pt`` with a JSON metadata file beside it.
"""
from __future__ import annotations

import json
import shlex
import subprocess

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import imagenet
from .core.validation import resolve_device
from .paths import models_dir, project_root
from .results import sha256_file

MODEL_NAMES = ("resnet20", "resnet32", "lenet5")
TRAIN_DATASETS = ("fashion-mnist", "mnist")  # what `python -m lowbit.train` trains on
# `python -m lowbit.train <model> <dataset>` options of each model family (the committed FP
# baselines were trained with these; `make baselines` runs the three committed ones)
TRAIN_OPTIONS = {
    ("lenet5", "mnist"): ("--epochs", "12", "--lr", "0.05"),
    ("lenet5", "fashion-mnist"): ("--epochs", "15", "--lr", "0.05"),
    ("resnet20", "fashion-mnist"): ("--epochs", "10", "--lr", "0.1", "--batch-size", "128"),
}
BASELINES = tuple(TRAIN_OPTIONS)  # the committed FP checkpoints (model, data set)
FROM_ROOT = " (run from the project root)"


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity / option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):  # (B, C, H, W)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, sec. 4.2)."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, classes)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling for 1x28x28 inputs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, classes)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


def build(name: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Build an untrained model by name: ``"resnet20"``, ``"resnet32"``, ``"lenet5"``.

    torchvision model names (e.g. ``"resnet18"``) are passed to ``torchvision.models``
    with random weights, which is the paper-scale path (ImageNet, 3x224x224).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    if name == "resnet20":
        return CifarResNet(3, num_classes, in_channels)
    if name == "resnet32":
        return CifarResNet(5, num_classes, in_channels)
    if name == "lenet5":
        return LeNet5(num_classes, in_channels)
    import torchvision

    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(
        f"unknown model {name!r}: use one of {MODEL_NAMES} or a torchvision classification "
        "model name such as 'resnet18'"
    )


def checkpoint_path(name: str, dataset: str):
    """Path of the committed FP checkpoint ``data/models/<name>-<dataset>.pt``."""
    return models_dir() / f"{name}-{dataset}.pt"


def train_command(name: str, dataset: str) -> str | None:
    """The shell command, run from the project root, that trains ``name`` on ``dataset`` into
    :func:`checkpoint_path` (``None`` for a pair lowbit does not train). A model without its
    own options takes those of its family on that data set (``resnet32`` those of ``resnet20``)."""
    if name not in MODEL_NAMES or dataset not in TRAIN_DATASETS:
        return None
    family = "lenet5" if name == "lenet5" else "resnet20"
    options = TRAIN_OPTIONS.get((name, dataset)) or TRAIN_OPTIONS.get((family, dataset)) \
        or TRAIN_OPTIONS[(family, "fashion-mnist")]
    return shlex.join([".venv/bin/python", "-m", "lowbit.train", name, dataset, *options])


def _repo_path(path) -> str:
    """``path`` relative to the project root when it lies inside it (as git and make need it)."""
    root = project_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _is_committed(path) -> bool:
    try:
        out = subprocess.run(["git", "ls-files", "--error-unmatch", "--", _repo_path(path)], cwd=project_root(),
                             capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def _how_to_get(name: str, dataset: str) -> str:
    cmd = train_command(name, dataset)
    if cmd is None:
        return (f"lowbit trains only {MODEL_NAMES} on {TRAIN_DATASETS}; for {name}/{dataset} save a state dict "
                f"to {_repo_path(checkpoint_path(name, dataset))} and its metadata JSON (with \"sha256\") beside it")
    return f"train it with `{cmd}`"


def available(name: str, dataset: str) -> bool:
    """Whether :func:`load_pretrained` has weights for ``name``/``dataset``: the committed checkpoint
    exists, or (ImageNet) this process's ImageNet weights name one for ``name``
    (:func:`lowbit.imagenet.use`)."""
    if dataset == "imagenet":
        return imagenet.weights_for(name) is not None
    return checkpoint_path(name, dataset).exists()


def weights_identity(name: str, dataset: str) -> str:
    """What identifies the FP weights of ``name``/``dataset`` in cache keys: the committed checkpoint's
    recorded SHA-256, or for ImageNet :func:`lowbit.imagenet.weights_identity`."""
    if dataset == "imagenet":
        return imagenet.weights_identity(name)
    return load_metadata(name, dataset).get("sha256", "")


def imagenet_key(name: str, dataset: str) -> dict:
    """What a cached result of an ImageNet network adds to its cache key: the weights' identity
    (:func:`weights_identity`) and this process's ImageNet folder; ``{}`` for our committed
    checkpoints, whose cache keys predate it (so their committed records keep being found)."""
    if dataset != "imagenet":
        return {}
    folder = imagenet.active()["data_dir"]
    return {"imagenet_weights": weights_identity(name, dataset),
            "imagenet_data": None if folder is None else str(Path(folder).expanduser().resolve())}


def load_metadata(name: str, dataset: str) -> dict:
    """The JSON metadata (accuracy, seed, epochs, time, commit) next to a checkpoint."""
    path = checkpoint_path(name, dataset).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"no metadata {_repo_path(path)}: {_how_to_get(name, dataset)}{FROM_ROOT}")
    return json.loads(path.read_text())


def load_pretrained(name: str, dataset: str, device: str | torch.device = "cpu", weights=None) -> nn.Module:
    """The FP model in eval mode on ``device``.

    ``dataset="imagenet"``: torchvision's ``name`` (:data:`lowbit.imagenet.MODELS`: ResNet-18/50,
    MobileNetV2, Inception-v3) with ``weights="DEFAULT"`` (torchvision's weights mechanism; on a
    connected machine it downloads into torchvision's cache), another torchvision weights name, or
    ``weights="/path/file.pth"`` (a local state dict); a missing file or no network is an error naming
    both options (:func:`lowbit.imagenet.load`).

    Otherwise the committed checkpoint ``data/models/<name>-<dataset>.pt``: its SHA-256 is checked
    against its metadata, so a truncated or corrupt file raises instead of loading garbage. Every
    error names the command that fixes it.
    """
    if dataset == "imagenet":
        return imagenet.load(name, weights, device)
    if weights is not None:
        raise ValueError(f"weights={weights!r} is for dataset='imagenet'; {name}/{dataset} loads the committed "
                         "checkpoint (leave weights=None)")
    path = checkpoint_path(name, dataset)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {_repo_path(path)}: {_how_to_get(name, dataset)}{FROM_ROOT}")
    meta = load_metadata(name, dataset)
    digest = sha256_file(path)
    if meta.get("sha256") and meta["sha256"] != digest:
        fixes = [f"restore it with `git checkout -- {_repo_path(path)}`"] if _is_committed(path) else []
        fixes.append(_how_to_get(name, dataset).replace("train it", "retrain it"))
        raise ValueError(
            f"checkpoint {_repo_path(path)} is corrupt (sha256 {digest[:12]} != recorded "
            f"{meta['sha256'][:12]}): {' or '.join(fixes)}{FROM_ROOT}"
        )
    model = build(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(resolve_device(device, default="cpu")).eval()
