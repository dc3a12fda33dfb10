"""Model-level LSQ/nuLSQ QAT: prepare_qat, train_qat (determinism, resume, checkpoints, torchrun)
and code entropy."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lowbit.data import TensorImageDataset
from lowbit.lsq import (LSQQuantizer, NuLSQQuantizer, QATConv2d, QATLinear, code_entropy, entropy_bits,
                        load_checkpoint, prepare_qat, prepare_variant, qat_layers, save_checkpoint, train_qat)
from lowbit.models import checkpoint_path
from lowbit.paths import project_root
from lowbit.results import CorruptCacheError

from qat_helpers import random_images, seeded_lenet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n=96, seed=0):
    return random_images(n, seed)


def _lenet(seed=0):
    return seeded_lenet(seed)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_prepare_leaves_input_untouched_and_quantizes_the_intended_layers():
    model, data = _lenet(), _data()
    before = _state(model)
    q = prepare_variant(model, "nuLSQ-W", 3, calib=data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, type(model))
               for m in model.modules())  # no QAT module leaked into the input model
    layers = dict(qat_layers(q))
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    first, last = layers["conv1"], layers["fc3"]
    for edge in (first, last):  # first and last: 8-bit LSQ
        assert isinstance(edge.weight_quantizer, LSQQuantizer) and edge.weight_quantizer.bits == 8
        assert isinstance(edge.input_quantizer, LSQQuantizer) and edge.input_quantizer.bits == 8
    for name in ("conv2", "fc1", "fc2"):  # nuLSQ-W: nuLSQ weights (signed), LSQ inputs (after a ReLU: unsigned)
        layer = layers[name]
        assert isinstance(layer.weight_quantizer, NuLSQQuantizer) and layer.weight_quantizer.signed
        assert layer.weight_quantizer.bits == 3 and layer.weight_quantizer.steps.numel() == 7
        assert isinstance(layer.input_quantizer, LSQQuantizer) and not layer.input_quantizer.signed
        assert layer.weight_quantizer.num_elements == layer.weight.numel()
    assert first.input_quantizer.signed  # the normalised image is signed
    assert isinstance(first, QATConv2d) and isinstance(last, QATLinear)
    assert torch.equal(first.weight, model.conv1.weight)  # FP weights copied, trainable
    assert first.weight.requires_grad
    fp = prepare_qat(model, "lsq", "nulsq", w_bits=2, a_bits=2, first_last="fp", calib=data)
    assert [n for n, _ in qat_layers(fp)] == ["conv2", "fc1", "fc2"]
    assert isinstance(fp.conv1, nn.Conv2d) and not isinstance(fp.conv1, QATConv2d)


def test_prepared_model_matches_manual_fake_quantization():
    model, data = _lenet(), _data()
    q = prepare_variant(model, "nuLSQ-WA", 2, calib=data).eval()
    x = data.images[:4]
    layer = q.conv2
    captured = {}
    h = layer.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    out = q(x)
    h.remove()
    manual = torch.nn.functional.conv2d(layer.input_quantizer(captured["x"]), layer.weight_quantizer(layer.weight),
                                        layer.bias)
    ref = {}
    h = layer.register_forward_hook(lambda m, a, o: ref.setdefault("y", o))
    assert torch.equal(q(x), out)
    h.remove()
    assert torch.equal(ref["y"], manual)
    levels = layer.weight_quantizer.levels().float()
    assert torch.isin(layer.weight_quantizer(layer.weight).detach(), levels).all()


@pytest.mark.parametrize("act_elements,expect", [("features", 6 * 14 * 14), ("channels", 6)])
def test_activation_gradient_scale_elements(act_elements, expect):
    q = prepare_variant(_lenet(), "LSQ", 4, calib=_data(), act_elements=act_elements)
    assert q.conv2.input_quantizer.num_elements == expect


def test_same_seed_same_history_and_parameters():
    data, test = _data(), _data(40, seed=1)
    runs = []
    for _ in range(2):
        q = prepare_variant(_lenet(), "nuLSQ-WA", 2, calib=data)
        q, hist = train_qat(q, data, test, 2, batch_size=32, seed=3, progress=False)
        runs.append((_state(q), [{k: v for k, v in h.items() if k != "seconds"} for h in hist]))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert len(runs[0][1]) == 2 and set(runs[0][1][0]) == {"epoch", "train_loss", "batch_losses", "test_loss", "test_accuracy", "steps"}
    q0 = prepare_variant(_lenet(), "nuLSQ-WA", 2, calib=data)
    assert not torch.equal(q0.conv2.weight_quantizer.steps, runs[0][0]["conv2.weight_quantizer.steps"])  # it trained


def test_resume_equals_uninterrupted(tmp_path):
    data, test = _data(), _data(40, seed=1)

    def fresh():
        return prepare_variant(_lenet(), "nuLSQ-A", 3, calib=data)

    def flip(x, g):
        return torch.where(torch.rand(len(x), generator=g)[:, None, None, None] < 0.5, x.flip(3), x)

    full, hist_full = train_qat(fresh(), data, test, 3, batch_size=32, seed=5, progress=False, augment=flip)
    ck = tmp_path / "qat.pt"
    _, hist1 = train_qat(fresh(), data, test, 3, batch_size=32, seed=5, progress=False, augment=flip,
                         checkpoint=ck, stop_after=1)
    assert len(hist1) == 1 and load_checkpoint(ck)["epoch"] == 1
    resumed, hist = train_qat(fresh(), data, test, 3, batch_size=32, seed=5, progress=False, augment=flip,
                              checkpoint=ck)
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in hh] for hh in (hist_full, hist)]
    assert strip[0] == strip[1]
    with pytest.raises(ValueError, match="another configuration"):
        train_qat(fresh(), data, test, 3, lr=0.02, batch_size=32, seed=5, progress=False, augment=flip, checkpoint=ck)


def test_corrupt_checkpoint_is_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"epoch": 1, "x": torch.arange(5)})
    assert load_checkpoint(path)["epoch"] == 1
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCacheError, match="delete"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptCacheError):
        load_checkpoint(path)
    data = _data()
    q = prepare_variant(_lenet(), "LSQ", 4, calib=data)
    with pytest.raises(CorruptCacheError):  # a corrupt checkpoint is never used to resume
        train_qat(q, data, data, 1, checkpoint=path, progress=False)


def test_bad_input_errors():
    model, data = _lenet(), _data()
    with pytest.raises(ValueError, match="w_bits"):
        prepare_qat(model, w_bits=1, calib=data)
    with pytest.raises(ValueError, match="a_bits"):
        prepare_qat(model, a_bits=9, calib=data)
    with pytest.raises(ValueError, match="weight quantizer"):
        prepare_qat(model, weights="apot", calib=data)
    with pytest.raises(ValueError, match="first_last"):
        prepare_qat(model, first_last=4, calib=data)
    with pytest.raises(ValueError, match="calib is required"):
        prepare_qat(model)
    with pytest.raises(ValueError, match="shape|channels|input"):
        prepare_qat(model, calib=torch.randn(4, 3, 28, 28))
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prepare_qat(bad, calib=data)
    with pytest.raises(ValueError, match="QAT variant"):
        prepare_variant(model, "nuLSQ-X", 2, calib=data)
    q = prepare_variant(model, "LSQ", 4, calib=data)
    with pytest.raises(ValueError, match="prepare_qat"):
        train_qat(model, data, data, 1)
    with pytest.raises(ValueError, match="epochs"):
        train_qat(q, data, data, 0)
    with pytest.raises(ValueError, match="lr"):
        train_qat(q, data, data, 1, lr=-1.0)
    with pytest.raises(ValueError, match="test_set"):
        train_qat(q, data, TensorImageDataset(data.images[:0], data.labels[:0]), 1)
    with pytest.raises(ValueError, match="device|cuda|GPU"):
        if torch.cuda.is_available():
            raise ValueError("cuda available: skip the no-GPU message check")
        train_qat(q, data, data, 1, device="cuda")


def test_code_entropy_definition():
    assert entropy_bits(torch.tensor([1, 1, 1, 1])) == pytest.approx(2.0)
    assert entropy_bits(torch.tensor([5, 0, 0, 0])) == 0.0
    data = _data()
    q = prepare_variant(_lenet(), "nuLSQ-WA", 2, calib=data)
    ent = code_entropy(q, data)
    assert set(ent) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    layer = q.conv2
    codes = layer.weight_quantizer.codes(layer.weight)
    assert ent["conv2"]["weight"] == pytest.approx(entropy_bits(torch.bincount(codes.reshape(-1), minlength=4)))
    for e in ent.values():
        top = max(e["w_bits"], e["a_bits"])
        assert 0 <= e["weight"] <= e["w_bits"] + 1e-9 and 0 <= e["input"] <= e["a_bits"] + 1e-9 <= top + 1e-9
    with torch.no_grad():  # one step far larger than the rest: fewer codes used, lower entropy
        layer.weight_quantizer.steps.copy_(torch.tensor([10.0, 10.0, 10.0]))
    assert code_entropy(q, data)["conv2"]["weight"] < ent["conv2"]["weight"]


@pytest.mark.skipif(not checkpoint_path("lenet5", "mnist").exists(), reason="needs the committed lenet5-mnist")
def test_torchrun_two_processes(tmp_path):
    """2 CPU processes under torchrun (gloo): identical final parameters on both ranks, and only
    rank 0 writes the checkpoint."""
    ck = tmp_path / "ck" / "qat.pt"
    dump = tmp_path / "params"
    dump.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowbit.lsq",
           "lenet5", "mnist", "--variant", "nuLSQ-WA", "--bits", "2", "--epochs", "2", "--train-n", "512",
           "--test-n", "200", "--batch-size", "32", "--threads", "1", "--checkpoint", str(ck),
           "--dump-params", str(dump)]
    out = subprocess.run(cmd, cwd=project_root(), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "test top-1" in out.stdout
    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert sorted(p.name for p in ck.parent.iterdir()) == ["qat.pt"]  # one file, no per-rank copies
    rec = load_checkpoint(ck)
    assert rec["rank"] == 0 and rec["world_size"] == 2 and rec["epoch"] == 2
    assert all(torch.equal(rec["model"][k], r0[k]) for k in r0)
    assert math.isfinite(rec["history"][-1]["test_accuracy"])
