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
    with pytest.raises(FileNotFoundError, match="lowbit.train lenet5 mnist"):
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


def _commands(message: str) -> list[list[str]]:
    """The shell commands quoted in backticks in an error message, split as a shell would."""
    import re
    import shlex

    return [shlex.split(c) for c in re.findall(r"`([^`]+)`", message)]


def _train_args(message: str) -> list[str]:
    """The arguments after ``python -m lowbit.train`` of the one training command in ``message``."""
    found = [c for c in _commands(message) if c[:3] == [".venv/bin/python", "-m", "lowbit.train"]]
    assert len(found) == 1, message
    return found[0][3:]


@pytest.mark.parametrize("name,dataset", [("resnet32", "fashion-mnist"), ("lenet5", "mnist"),
                                          ("resnet20", "fashion-mnist"), ("resnet20", "mnist")])
def test_missing_checkpoint_names_a_train_command_that_trains_it(tmp_path, monkeypatch, name, dataset):
    """The printed command is accepted by the train CLI and trains exactly that model/data set
    into the checkpoint that was missing (train_fp is replaced: nothing is trained here)."""
    from lowbit import train

    monkeypatch.setattr(models, "models_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="project root") as err:
        models.load_pretrained(name, dataset)
    assert "make baselines" not in str(err.value)
    args = _train_args(str(err.value))
    parsed = train.build_parser().parse_args(args)
    assert (parsed.model, parsed.dataset) == (name, dataset)
    calls = []
    monkeypatch.setattr(train, "train_fp", lambda *a, **k: calls.append((a, k)) or (None, {
        "test_accuracy": 0.0, "train_seconds": 0.0}))
    assert train.main(args) == 0
    assert calls[0][0] == (name, dataset) and calls[0][1]["epochs"] == parsed.epochs
    with pytest.raises(FileNotFoundError) as meta_err:
        models.load_metadata(name, dataset)
    assert _train_args(str(meta_err.value)) == args


@pytest.mark.parametrize("name,dataset", models.BASELINES)
def test_train_commands_are_the_recipes_of_the_committed_baselines(name, dataset):
    """The command printed for a committed baseline is the one that trained it (its metadata) and
    the one `make baselines` runs; its checkpoint is committed at the printed path."""
    import shlex
    import subprocess

    from lowbit import train

    cmd = models.train_command(name, dataset)
    args = shlex.split(cmd)[3:]
    parsed = train.build_parser().parse_args(args)
    meta = models.load_metadata(name, dataset)
    assert (parsed.epochs, parsed.lr, parsed.batch_size, parsed.seed) == (
        meta["epochs"], meta["lr"], meta["batch_size"], meta["seed"])
    makefile = (models.project_root() / "Makefile").read_text()
    assert f"$(PY) -m lowbit.train {shlex.join(args)}\n" in makefile
    rel = models.checkpoint_path(name, dataset).relative_to(models.project_root())
    assert str(rel) == f"data/models/{name}-{dataset}.pt"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(rel)], cwd=models.project_root(),
                             capture_output=True, timeout=30)
    assert tracked.returncode == 0, f"{rel} is not committed"


def test_corrupt_checkpoint_message_git_command_works_as_printed(tmp_path, monkeypatch):
    """In a throw-away git checkout: the printed `git checkout -- data/models/...` run from the
    project root restores the file, after which it loads."""
    import shlex
    import subprocess

    from lowbit.results import atomic_torch_save, sha256_file

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("LOWBIT_ROOT", str(tmp_path))
    path = tmp_path / "data" / "models" / "lenet5-mnist.pt"
    path.parent.mkdir(parents=True)
    atomic_torch_save(models.build("lenet5").state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path)}))
    git("init", "-q")
    git("add", "data/models")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "ckpt")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt") as err:
        models.load_pretrained("lenet5", "mnist")
    message = str(err.value)
    restore = [c for c in _commands(message) if c[0] == "git"]
    assert restore == [["git", "checkout", "--", "data/models/lenet5-mnist.pt"]], message
    assert _train_args(message)[:2] == ["lenet5", "mnist"]
    subprocess.run(restore[0], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert not models.load_pretrained("lenet5", "mnist").training
    # a corrupt checkpoint that git does not hold: no git command is offered
    other = tmp_path / "data" / "models" / "resnet32-fashion-mnist.pt"
    atomic_torch_save(models.build("resnet32").state_dict(), other)
    other.with_suffix(".json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(ValueError, match="corrupt") as err:
        models.load_pretrained("resnet32", "fashion-mnist")
    assert "git" not in str(err.value) and _train_args(str(err.value))[:2] == ["resnet32", "fashion-mnist"]
    assert shlex.split(models.train_command("resnet32", "fashion-mnist"))[3:] == _train_args(str(err.value))


def test_untrainable_pairs_say_so(tmp_path, monkeypatch):
    from lowbit import train

    monkeypatch.setattr(models, "models_dir", lambda: tmp_path)
    assert models.train_command("resnet18", "mnist") is None and models.train_command("lenet5", "digits") is None
    with pytest.raises(FileNotFoundError, match="lowbit trains only") as err:
        models.load_pretrained("resnet18", "mnist")
    assert not [c for c in _commands(str(err.value)) if "lowbit.train" in c]
    with pytest.raises(ValueError, match="trains one of"):
        train.train_fp("resnet18", "mnist", epochs=1)
    with pytest.raises(ValueError, match="trains on one of"):
        train.train_fp("lenet5", "digits", epochs=1)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["lenet5", "digits"])
