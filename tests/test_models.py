"""Models: output shapes, parameter counts, checkpoints and accuracy."""
import json

import pytest
import torch

from lowbit import evaluate, models
from lowbit.data import TensorImageDataset


@pytest.mark.parametrize("name,params", [("resnet20", 269_434), ("resnet32", 463_866), ("lenet5", 61_706)])
def test_build_shapes_and_params(name, params):
    m = models.build(name).eval()
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_resnet20_depth():
    m = models.build("resnet20")
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    lin = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
    assert len(convs) + len(lin) == 20


def test_torchvision_paper_path():
    m = models.build("resnet18").eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown model"):
        models.build("resnet21")


def test_accuracy_counts_correct():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(10, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]).float()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 1, 1, 1])  # 7 of 10 right
    assert evaluate.accuracy(Fixed(), TensorImageDataset(x, y), batch_size=3) == pytest.approx(70.0)


def test_load_pretrained_roundtrip_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "models_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="make baselines"):
        models.load_pretrained("lenet5", "mnist")
    from lowbit.results import atomic_torch_save, sha256_file

    net = models.build("lenet5")
    path = tmp_path / "lenet5-mnist.pt"
    atomic_torch_save(net.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path)}))
    loaded = models.load_pretrained("lenet5", "mnist")
    assert not loaded.training
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), net.eval()(x))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        models.load_pretrained("lenet5", "mnist")


@pytest.mark.parametrize("name,dataset,target", [("lenet5", "mnist", 98.5), ("lenet5", "fashion-mnist", 89.0),
                                                 ("resnet20", "fashion-mnist", 92.5)])
def test_committed_baselines_meet_targets(name, dataset, target):
    """Re-evaluate each committed checkpoint on the full test set (not the metadata's number)."""
    from lowbit.data import load_dataset

    if not models.checkpoint_path(name, dataset).exists():
        pytest.skip(f"{name}-{dataset} not trained yet")
    acc = evaluate.accuracy(models.load_pretrained(name, dataset), load_dataset(dataset, "test"))
    meta = models.load_metadata(name, dataset)
    assert acc >= target
    assert acc == pytest.approx(meta["test_accuracy"], abs=0.02)


def test_checkpoint_accuracy_is_the_accuracy_and_is_computed_once(monkeypatch):
    from lowbit.data import TensorImageDataset, load_dataset

    model = models.load_pretrained("lenet5", "mnist")
    full = load_dataset("mnist", "test")
    test = TensorImageDataset(full.images[:300], full.labels[:300], full.name, full.split)
    first = evaluate.checkpoint_accuracy(model, "lenet5", "mnist", test)
    assert first == evaluate.accuracy(model, test)
    calls = []
    monkeypatch.setattr(evaluate, "accuracy", lambda *a, **k: calls.append(a) or -1.0)
    assert evaluate.checkpoint_accuracy(model, "lenet5", "mnist", test) == first and not calls  # memoised
    other = TensorImageDataset(full.images[:200], full.labels[:200], full.name, full.split)
    assert evaluate.checkpoint_accuracy(model, "lenet5", "mnist", other) == -1.0 and len(calls) == 1  # new key
