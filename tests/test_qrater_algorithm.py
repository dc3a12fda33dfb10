"""Tests of Q-Rater's Algorithm 1 (lowbit.qrater.algorithm), its options (QRaterConfig) and plumbing (state)."""
import dataclasses
import re

import pytest
import torch

from lowbit import models, qrater
from lowbit.data import TensorImageDataset
from lowbit.nn import fold_bn, quantizable_layers
from lowbit.qrater.state import PrefixRunner, QuantizedCopy, channel_mean


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- model plumbing
def test_shared_fold_and_forward_order_walk():
    # Q-Rater uses the shared BN folding and forward-order layer walk of lowbit.nn
    torch.manual_seed(0)
    m = _randomize_bn(models.build("resnet20"))
    x = torch.randn(4, 1, 28, 28)
    folded = fold_bn(m)
    assert not any(isinstance(k, torch.nn.BatchNorm2d) for k in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), m(x), atol=1e-4)
    order = [n for n, _ in quantizable_layers(folded, x)]
    assert len(order) == 20 and order[0] == "conv1" and order[-1] == "fc"
    assert order[1:3] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert [n for n, _ in quantizable_layers(models.build("lenet5"), x)] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    quant = QuantizedCopy(m, x)
    assert quant.order == order
    # every layer of the working copy has a bias (zeros where the FP conv had none) and the copy is the FP model
    assert all(quant.modules[n].bias is not None for n in order)
    with torch.no_grad():
        assert torch.allclose(quant.model(x), folded(x), atol=1e-6)


class _Reordered(torch.nn.Module):
    """Layers registered in the opposite order to the one they run in."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(6, 3)
        self.body = torch.nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_quantizable_layers_example_gives_forward_order():
    m = _Reordered()
    assert [n for n, _ in quantizable_layers(m)] == ["head", "body"]  # registration order
    assert [n for n, _ in quantizable_layers(m, torch.randn(2, 4))] == ["body", "head"]  # forward order
    assert QuantizedCopy(m, torch.randn(2, 4)).order == ["body", "head"]


def test_prefix_cache_agrees_with_full_forward():
    torch.manual_seed(0)
    m = fold_bn(_randomize_bn(models.build("resnet20")))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    runner = PrefixRunner(m, x, y, batch_size=4)
    full = runner.evaluate(use_cache=False)
    for layer in ("layer3.0.conv1", "fc"):
        runner.freeze_before(layer)
        assert runner.frozen  # something was cached
        assert runner.evaluate() == full
        assert runner.evaluate(use_cache=False) == full
    # changing the target layer changes the cached evaluation exactly like the full one
    with torch.no_grad():
        dict(m.named_modules())["fc"].weight.mul_(-1)
    assert runner.evaluate() == runner.evaluate(use_cache=False) != full
    runner.release()
    assert "forward" not in vars(dict(m.named_modules())["layer1"])


def _fp_labelled(name, n=12, seed=0):
    """A BN-randomised ``name`` and ``n`` random images labelled with its own FP predictions."""
    torch.manual_seed(seed)
    m = _randomize_bn(models.build(name))
    x = torch.randn(n, 1, 28, 28)
    with torch.no_grad():
        y = m(x).argmax(1)
    return m, x, y


def _plain_capture(runner, layer, output=False):
    """The inputs (outputs) of ``layer`` per batch in a full forward pass: the reference of ``capture``."""
    got = []
    mod = runner.modules[layer]
    if output:
        h = mod.register_forward_hook(lambda m, i, o: got.append(o.clone()))
    else:
        h = mod.register_forward_pre_hook(lambda m, i: got.append(i[0].clone()), prepend=True)
    for _ in runner.forward_all(use_cache=False):
        pass
    h.remove()
    return got


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("name", ["resnet20", "lenet5"])
def test_cached_probe_runs_from_the_target_on_and_equals_the_full_forward_at_every_layer(name):
    # Algorithm 1's walk: at each layer, weight probes, the target's input captured, an input
    # quantizer, bias correction; every probe of the cached path equals the full forward exactly
    m, x, y = _fp_labelled(name)
    quant = QuantizedCopy(m, x)
    runner = PrefixRunner(quant.model, x, y, batch_size=5)  # batches of 5, 5, 2: replays per batch
    values = []
    for i, layer in enumerate(quant.order):
        runner.freeze_before(layer, reuse=True)
        called = []
        handles = [quant.modules[n].register_forward_hook(lambda mod, inp, out, n=n: called.append(n))
                   for n in quant.order]
        runner.evaluate()
        for h in handles:
            h.remove()
        assert called == quant.order[i:] * 3  # per batch, a cached probe runs the target and what follows only
        w = quant.fp_weight(layer)
        for gamma_c in (1.0, 0.4):
            quant.set_weight(layer, qrater.clip_round_weight(w, gamma_c * float(w.abs().max()), 3, 0.5, 0.5))
            values.append(runner.evaluate())
            assert values[-1] == runner.evaluate(use_cache=False)
        xs = runner.capture(layer)
        assert _same(xs, _plain_capture(runner, layer)) and len(xs) == 3
        signed = min(float(t.min()) for t in xs) < 0
        quant.act[layer] = qrater.ActRounding.at(0.7 * max(float(t.abs().max()) for t in xs), 3, signed, -0.5, 0.5)
        values.append(runner.evaluate())
        assert values[-1] == runner.evaluate(use_cache=False)
        outs = runner.capture(layer, output=True)
        assert _same(outs, _plain_capture(runner, layer, output=True))
        quant.set_bias(layer, quant.fp_bias(layer) - 0.1 * channel_mean(outs))
        values.append(runner.evaluate())
        assert values[-1] == runner.evaluate(use_cache=False)
    assert len(set(values)) > len(quant.order)  # the probes really differ from each other
    # a frozen layer is captured by a plain pass; a backward step falls back to a plain caching pass
    assert _same(runner.capture(quant.order[1], output=True), _plain_capture(runner, quant.order[1], output=True))
    runner.freeze_before(quant.order[2], reuse=True)
    assert runner.evaluate() == runner.evaluate(use_cache=False) == values[-1]
    runner.release()
    assert all(a is b for a, b in zip(dict(quant.model.named_modules()).values(), quant.modules.values()))
    assert runner.evaluate() == values[-1]


@pytest.mark.parametrize("name, layers", [("lenet5", None), ("resnet20", [1, 2, 7, 8, 19])])
def test_run_is_identical_without_the_prefix_cache(name, layers, monkeypatch):
    # the reference: every probe and capture a full forward pass (nothing is ever frozen)
    m, x, y = _fp_labelled(name, n=16)
    kw = dict(search="grid", ops=("clip", "round", "bias"), layers=layers, batch_size=10, clip_grid=[0.5, 1.0],
              gamma_n_grid=[-0.5, 0.5], gamma_s_grid=[0.5])
    fast = qrater.run(m, 3, 3, (x, y), **kw)
    monkeypatch.setattr(PrefixRunner, "freeze_before", lambda self, layer, reuse=False: None)
    plain = qrater.run(m, 3, 3, (x, y), **kw)
    assert fast.probes == plain.probes and fast.layers == plain.layers and fast.fp_objective == plain.fp_objective
    assert len({(p["accuracy"], p["loss"]) for p in fast.probes}) > 10
    for (n, p), (_, q) in zip(fast.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- Algorithm 1
class Tiny(torch.nn.Module):
    """A small conv net on 1x8x8 inputs, so the Algorithm-1 tests run in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.flatten = torch.nn.Flatten()
        self.fc1 = torch.nn.Linear(24, 16)
        self.relu3 = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(self.flatten(self.pool(x)))))


def _tiny_problem():
    torch.manual_seed(0)
    m = _randomize_bn(Tiny())
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        y = m(x).argmax(1)  # labels the FP model gets right
    return m, (x, y)


GRIDS = dict(clip_grid=[0.5, 1.0], gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.0, 1.0])


def test_run_grid_log_replay_and_rtn_equivalence():
    m, calib = _tiny_problem()
    res = qrater.run(m, 3, 3, calib, search="grid", ops=("clip", "round", "bias"), seed=0,
                     layers=[1, 2, 3], **GRIDS)
    model, probes = res  # unpacks as (model, probes)
    assert [r["name"] for r in res.layers] == ["conv2", "fc1", "fc2"]
    assert {p["phase"] for p in probes} <= {"grid", "off", "on"}
    per_layer = {s: sum(p["stage"] == s and p["layer"] == "fc1" for p in probes)
                 for s in ("w_clip", "w_round", "a_clip", "a_round", "bias")}
    assert per_layer == {"w_clip": 2, "w_round": 6, "a_clip": 2, "a_round": 6, "bias": 2}
    for rec in res.layers:
        assert rec["a_signed"] is False  # inputs of conv2/fc1/fc2 follow ReLUs
        best = max((p for p in probes if p["layer"] == rec["name"] and p["stage"] == "w_round"),
                   key=lambda p: p["target"])
        assert (rec["w_gamma_n"], rec["w_gamma_s"]) == (best["params"]["gamma_n"], best["params"]["gamma_s"])
        on_off = [p for p in probes if p["layer"] == rec["name"] and p["stage"] == "bias"]
        assert rec["bias_corrected"] == (on_off[1]["target"] >= on_off[0]["target"])
        assert rec["w_threshold"] == rec["w_gamma_c"] * rec["w_max"]
        assert rec["w_step"] == pytest.approx(rec["w_threshold"] / 3)  # 3 bits: Th / (2^2 - 1)
        assert rec["a_step"] == pytest.approx(rec["a_threshold"] / 7)  # unsigned 3 bits: Th / (2^3 - 1)
    x = calib[0]
    with torch.no_grad():
        assert torch.equal(qrater.apply(m, res.layers, example=x)(x), model(x))
        # quantized weights sit on the layer's grid
        w = dict(model.named_modules())["fc1"].weight
        rec = res.layers[1]
        k = w / rec["w_step"]
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 3
    # the target is accuracy minus 1e-3 x cross-entropy
    assert all(p["target"] == pytest.approx(p["accuracy"] - 1e-3 * p["loss"]) for p in probes)
    # RTN-only run: every gamma_n is 0 and no search probes are made
    rtn_res = qrater.run(m, 3, 3, calib, search="grid", ops=(), layers=[1, 2, 3], **GRIDS)
    assert all(r["w_gamma_n"] == 0 and r["a_gamma_n"] == 0 and not r["bias_corrected"] for r in rtn_res.layers)
    assert {p["stage"] for p in rtn_res.probes} == {"bias"}
    assert res.config["ops"] == ["clip", "round", "bias"] and res.config["layers"] == ["conv2", "fc1", "fc2"]
    assert res.config["bias_mode"] == "selective" and rtn_res.config["bias_mode"] == "never"


def test_keyword_and_config_forms_give_identical_runs():
    m, calib = _tiny_problem()
    kw = dict(search="bo", ops=("clip", "round", "bias"), seed=2, layers=[2, 3], bo_steps=1, **GRIDS)
    a = qrater.run(m, 3, 4, calib, **kw)
    b = qrater.run(m, calib=calib, config=qrater.QRaterConfig(w_bits=3, a_bits=4, **kw))
    c = qrater.run(m, 3, 4, calib, device="cpu", **kw)
    for other in (b, c):
        assert other.layers == a.layers and other.probes == a.probes and other.fp_objective == a.fp_objective
        assert other.config == a.config
        for (n, p), (_, q) in zip(a.model.state_dict().items(), other.model.state_dict().items()):
            assert torch.equal(p, q), n
    assert any(p["phase"] == "bo" for p in a.probes)


def test_step_functions_follow_algorithm_1():
    # weight_quant / act_quant / bias_corr are Algorithm 1's WeightQuant / ActQuant / BiasCorr on one layer
    m, (x, y) = _tiny_problem()
    cfg = qrater.QRaterConfig(3, 3, search="grid", ops=("clip", "round", "bias"), **GRIDS)
    quant = QuantizedCopy(m, x)
    runner = PrefixRunner(quant.model, x, y, 200)
    fp_means = {"fc1": channel_mean(PrefixRunner(quant.fp, x, y, 200).capture("fc1", output=True))}
    state = qrater.QRaterState(quant, runner, fp_means)
    runner.freeze_before("fc1")
    w = qrater.weight_quant(state, "fc1", cfg)
    assert [p["stage"] for p in state.probes] == ["w_clip"] * 2 + ["w_round"] * 6
    assert torch.equal(quant.modules["fc1"].weight, qrater.clip_round_weight(
        quant.fp_weight("fc1"), w["w_threshold"], 3, w["w_gamma_n"], w["w_gamma_s"]))
    a = qrater.act_quant(state, "fc1", cfg)
    assert quant.act["fc1"] == qrater.ActRounding.at(a["a_threshold"], 3, a["a_signed"], a["a_gamma_n"],
                                                     a["a_gamma_s"])
    b = qrater.bias_corr(state, "fc1", cfg)
    kept = state.probes[-1] if b["bias_corrected"] else state.probes[-2]
    assert (b["calib_accuracy"], b["calib_loss"]) == (kept["accuracy"], kept["loss"])
    expected_bias = quant.fp_bias("fc1") + (torch.tensor(b["bias_delta"]) if b["bias_corrected"] else 0)
    assert torch.allclose(quant.modules["fc1"].bias, expected_bias)
    runner.release()


def test_run_bo_is_seeded_and_validates():
    m, calib = _tiny_problem()
    kw = dict(ops=("clip",), layers=[3], clip_grid=[0.5, 1.0], bo_steps=1)
    a = qrater.run(m, 3, None, calib, search="bo", seed=3, **kw)
    b = qrater.run(m, 3, None, calib, search="bo", seed=3, **kw)
    assert [p["params"] for p in a.probes] == [p["params"] for p in b.probes]
    assert any(p["phase"] == "bo" for p in a.probes)
    assert "a_bits" not in a.layers[0]  # a_bits=None keeps activations FP
    for bad in [dict(w_bits=1), dict(search="random"), dict(ops=("clip", "prune")), dict(gamma_n_grid=[-2.0, 0.0]),
                dict(clip_grid=[0.0, 0.5]), dict(order=3), dict(bias_mode="sometimes"), dict(bo_steps=-1),
                dict(batch_size=0), dict(targets=["bias"]), dict(objective="top5")]:
        with pytest.raises(ValueError):
            qrater.run(m, **{"w_bits": 3, "a_bits": 3, **bad}, calib=calib)
    with pytest.raises(TypeError):
        qrater.run(m, 3, 3, calib, gamma=0.5)  # unknown option
    with pytest.raises(TypeError):
        qrater.run(m, calib=calib, config=qrater.QRaterConfig(3, 3), seed=1)  # both forms at once
    with pytest.raises(TypeError):
        qrater.run(m, calib=calib)  # no bit widths
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3)  # no calibration set


def test_config_is_frozen_and_resolves_defaults():
    cfg = qrater.QRaterConfig(4, None, ops=["clip", "bias"], layers=[1, "fc"])
    assert cfg.ops == ("clip", "bias") and cfg.layers == (1, "fc") and cfg.bias_mode == "selective"
    assert qrater.QRaterConfig(4, 4, ops=("round",)).bias_mode == "never"
    assert cfg.n_bo == qrater.PAPER_BO_STEPS and qrater.QRaterConfig(4, 4, search="grid").n_bo == 0
    assert cfg.target(90.0, 0.5) == pytest.approx(90.0 - 5e-4)
    assert qrater.QRaterConfig(4, 4, objective="loss").target(90.0, 0.5) == -0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.w_bits = 2
    with pytest.raises(TypeError):
        qrater.QRaterConfig(2.5, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_gpu_is_our_value_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        qrater.QRaterConfig(3, 3, device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        qrater.QRaterConfig(3, 3, device="tpu:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_on_cuda_matches_cpu_settings():
    m, calib = _tiny_problem()
    kw = dict(search="grid", ops=("clip", "round", "bias"), layers=[1, 2, 3], **GRIDS)
    cpu = qrater.run(m, 3, 3, calib, **kw)
    gpu = qrater.run(m, 3, 3, calib, device="cuda", **kw)
    assert next(gpu.model.parameters()).device.type == "cuda"
    assert [r["name"] for r in gpu.layers] == [r["name"] for r in cpu.layers]
    # the objective is measured on the same images; cuDNN sums differ in the last bits only
    assert gpu.fp_objective["accuracy"] == cpu.fp_objective["accuracy"]
    assert gpu.layers[-1]["calib_accuracy"] == pytest.approx(cpu.layers[-1]["calib_accuracy"], abs=5.0)
    x = calib[0].to("cuda")
    with torch.no_grad():
        replay = qrater.apply(m.to("cuda"), gpu.layers, example=x)(x)
        assert torch.allclose(replay, gpu.model(x), atol=1e-5)


# ----------------------------------------------------------------------------- calibration checks
@pytest.mark.parametrize("shape, expected", [((4, 3, 32, 32), "(N, 1, H, W)"), ((4, 784), "(N, 1, H, W)")])
def test_run_rejects_calibration_images_of_the_wrong_shape(shape, expected):
    m = models.build("lenet5")  # 1x28x28 inputs
    x, y = torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"shape {tuple(shape)}")) as err:
        qrater.run(m, 3, 3, (x, y), search="grid")
    assert expected in str(err.value)


def test_run_rejects_labels_outside_the_class_range_and_bad_pairs():
    m = models.build("lenet5")
    x = torch.randn(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        qrater.run(m, 3, 3, (x, torch.tensor([0, 1, 2, 10])), search="grid")
    with pytest.raises(ValueError, match=r"0\.\.9"):
        qrater.run(m, 3, 3, (x, torch.tensor([0, -1, 2, 3])), search="grid")
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, (x, torch.tensor([0.0, 1.0, 2.0, 3.0])), search="grid")  # float labels
    with pytest.raises(ValueError):
        qrater.run(m, 3, 3, (x, torch.tensor([0, 1])), search="grid")  # lengths differ
    # a data set of the right shape is accepted (and checked the same way)
    data = TensorImageDataset(torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5]), "t", "train")
    res = qrater.run(m, 3, 3, data, search="grid", ops=(), layers=[4])
    assert res.config["n_calib"] == 6


def test_incremental_accuracy_counts_are_a_subset_of_the_full_curve():
    m, (x, y) = _tiny_problem()
    res = qrater.run(m, 2, 2, (x, y), search="grid", ops=("round",), layers=[1, 2, 3],
                     gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.0])
    data = TensorImageDataset(x, y, "tiny", "test")
    full = qrater.incremental_accuracy(m, res.layers, data, example=x[:2])
    assert len(full) == len(res.layers) + 1
    assert qrater.incremental_accuracy(m, res.layers, data, example=x[:2], counts=[0, 2, 3]) == [full[0], full[2],
                                                                                                   full[3]]
    assert full[0] == 100.0  # labels are the FP model's predictions
    with torch.no_grad():
        assert full[-1] == 100.0 * float((res.model(x).argmax(1) == y).float().mean())  # all layers = run's model
    with pytest.raises(ValueError):
        qrater.incremental_accuracy(m, res.layers, data, counts=[4])
