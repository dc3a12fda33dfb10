"""Paper scale without downloads: a fake ImageNet folder written here, torchvision networks from a
locally saved state dict, the papers' calibration subsets, loaders and the device checks."""
import urllib.error

import numpy as np
import pytest
import torch

from lowbit import data, evaluate, imagenet, models

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def fake_imagenet(root, classes=3, per_class=4, size=(300, 260)):
    """``root/train`` and ``root/val`` ImageFolders of random RGB PNGs (``classes`` x ``per_class``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    return fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_splits_transforms_and_alias(imagenet_dir):
    train = data.load_dataset("imagenet", "train", data_dir=imagenet_dir)
    val = data.load_dataset("imagenet", "val", data_dir=imagenet_dir)
    test = data.load_dataset("imagenet", "test", data_dir=imagenet_dir)  # an alias of val
    assert len(train) == len(val) == len(test) == 12 and val.root == test.root
    assert train[0][0].shape == val[0][0].shape == (3, 224, 224)
    assert torch.equal(val[5][0], test[5][0]) and val[5][1] == 1  # evaluation is deterministic
    big = data.load_dataset("imagenet", "val", data_dir=imagenet_dir, image_size=imagenet.image_size("inception_v3"))
    assert big[0][0].shape == (3, 299, 299)
    assert imagenet.image_size("resnet18") == 224


def test_missing_and_bad_imagenet_input(tmp_path, imagenet_dir):
    with pytest.raises(ValueError, match="needs data_dir"):
        data.load_dataset("imagenet", "val")
    with pytest.raises(FileNotFoundError, match="must hold train/ and val/"):
        data.load_dataset("imagenet", "val", data_dir=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        data.load_dataset("imagenet", "dev", data_dir=imagenet_dir)
    with pytest.raises(ValueError, match="224 or 299"):
        data.load_dataset("imagenet", "val", data_dir=imagenet_dir, image_size=256)
    with pytest.raises(ValueError, match="unknown ImageNet model"):
        imagenet.image_size("resnet20")


def test_calibration_subsets_are_seeded(imagenet_dir):
    train = data.load_dataset("imagenet", "train", data_dir=imagenet_dir)
    a = data.per_class_subset(train, 2, seed=3)
    assert len(a) == 6 and a.indices == data.per_class_subset(train, 2, seed=3).indices
    labels = [train.targets[i] for i in a.indices]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]  # Q-Rater's objective: the same count of every class
    assert a.indices != data.per_class_subset(train, 2, seed=4).indices
    with pytest.raises(ValueError, match="fewer than per_class=5"):
        data.per_class_subset(train, 5)
    calib = data.calibration_subset(train, 5, seed=1)  # SQ's 1024 images, here 5
    assert len(calib) == 5 and calib.indices == data.calibration_subset(train, 5, seed=1).indices
    assert imagenet.CALIBRATION_IMAGES == 1024 and imagenet.QRATER_PER_CLASS == 20


def test_local_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    net = imagenet.build("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    loaded = models.load_pretrained("resnet18", "imagenet", weights=str(path))
    assert not loaded.training and loaded.fc.out_features == 1000
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(net.eval()(x), loaded(x))


def test_weights_errors_name_both_options(tmp_path, monkeypatch):
    for call in (lambda: models.load_pretrained("resnet18", "imagenet"),
                 lambda: models.load_pretrained("resnet18", "imagenet", weights=str(tmp_path / "none.pth"))):
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            call()
        assert "weights='DEFAULT'" in str(err.value) and ".pth" in str(err.value)
    wrong = tmp_path / "wrong.pth"
    torch.save(models.build("lenet5").state_dict(), wrong)
    with pytest.raises(ValueError, match="is not a resnet18 state dict"):
        models.load_pretrained("resnet18", "imagenet", weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a resnet18 state dict"):
        models.load_pretrained("resnet18", "imagenet", weights=str(garbage))
    with pytest.raises(ValueError, match="unknown weights 'V9'"):
        models.load_pretrained("resnet18", "imagenet", weights="V9")
    with pytest.raises(ValueError, match="is for dataset='imagenet'"):
        models.load_pretrained("lenet5", "mnist", weights="DEFAULT")

    def offline(*args, **kwargs):  # what torchvision's download raises without network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    import torchvision
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(FileNotFoundError, match="could not get torchvision's resnet18 weights") as err:
        models.load_pretrained("resnet18", "imagenet", weights="DEFAULT")
    assert ".pth" in str(err.value)


def test_evaluate_on_an_image_folder(imagenet_dir):
    torch.manual_seed(0)
    net = imagenet.build("resnet18").eval()
    val = data.load_dataset("imagenet", "val", data_dir=imagenet_dir)
    out = evaluate.evaluate(net, val, batch_size=4)
    assert out["n"] == 12 and 0.0 <= out["accuracy"] <= 100.0
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in imagenet.loader(val, 5, workers=0))
    assert out["accuracy"] == pytest.approx(100.0 * correct / 12)  # worker processes change nothing
    assert not imagenet.loader(val, 4).pin_memory  # pinned only for CUDA


@NO_CUDA
def test_cuda_without_a_gpu_is_our_error(tmp_path, imagenet_dir):
    val = data.load_dataset("imagenet", "val", data_dir=imagenet_dir)
    for call in (lambda: evaluate.evaluate(models.build("lenet5"), val, device="cuda"),
                 lambda: imagenet.loader(val, 4, device="cuda"),
                 lambda: models.load_pretrained("lenet5", "mnist", device="cuda")):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            call()


def test_device_key_keeps_cpu_cache_keys():
    from lowbit.core.validation import device_key

    assert device_key(None) == device_key("cpu") == device_key(torch.device("cpu")) == {}
    assert device_key("cuda:1") == {"device": "cuda:1"}


def test_imagenet_cache_keys_name_the_weights_and_folder(imagenet_dir, tmp_path):
    from lowbit import models

    before = imagenet.active()
    try:
        assert models.imagenet_key("lenet5", "mnist") == {}  # committed checkpoints: keys as they were
        torch.manual_seed(0)
        state = tmp_path / "r18.pth"
        torch.save(imagenet.build("resnet18").state_dict(), state)
        imagenet.use(imagenet_dir, {"resnet18": str(state)})
        key = models.imagenet_key("resnet18", "imagenet")
        assert key["imagenet_weights"] == imagenet.weights_identity("resnet18") and len(key["imagenet_weights"]) == 64
        assert key["imagenet_data"] == str(imagenet_dir.resolve())
        torch.save({k: v + 1 for k, v in torch.load(state).items()}, state)  # other weights, same path
        assert models.imagenet_key("resnet18", "imagenet") != key
    finally:
        imagenet.use(**before)
