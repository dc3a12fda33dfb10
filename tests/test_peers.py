"""Peer-library baselines (lowbit.peers): AIMET AdaRound, Brevitas GPTQ and learned round really run on a tiny
LeNet-5; the returned plain torch model has per-channel weights on a 2^b grid (8 bits for the first and last
layer, lowbit's PTQ rule), the input model is bit-identical afterwards, the output is finite and evaluates; bad
input raises ValueError before any library runs. The libraries come from `make peers` (requirements-peers.txt)."""
import importlib
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit import models
from lowbit.evaluate import accuracy
from lowbit.nn.graph import quantizable_layers
from lowbit.peers import METHODS, aimet_adaround, brevitas_gptq, brevitas_learned_round, layer_bits, quantize_with_peer
from lowbit.peers.common import require, seeded

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:fast_hadamard_transform package not found")]

# method -> (w_bits, options, library module): few iterations, so each run takes seconds on 2 cores
RUNS = {"aimet-adaround": (3, {"iterations": 20}, "aimet_torch"),
        "brevitas-gptq": (2, {}, "brevitas"),
        "brevitas-learned-round": (4, {"iterations": 20}, "brevitas_examples")}


def _lenet():
    torch.manual_seed(0)
    return models.build("lenet5").eval()


def _images(n, seed=1, channels=1):
    return torch.randn(n, channels, 28, 28, generator=torch.Generator().manual_seed(seed))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _grid_steps(row: torch.Tensor) -> float:
    """How many grid steps the distinct values of ``row`` span, or ``inf`` when they are not on one
    uniform grid (every value an integer number of the smallest gap away from the minimum)."""
    v = torch.unique(row.detach().double())
    if len(v) == 1:
        return 0.0
    step = float((v[1:] - v[:-1]).min())
    k = ((v - v[0]) / step).numpy()
    return float(k[-1]) if np.allclose(k, np.round(k), atol=1e-3) else float("inf")


@pytest.fixture(scope="module", params=list(RUNS))
def run(request):
    method = request.param
    w_bits, options, module = RUNS[method]
    try:
        importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is not installed: run `make peers` (requirements-peers.txt) first")
    model = _lenet()
    before = _state(model)
    x = _images(48)
    qmodel, info = quantize_with_peer(model, method, x, w_bits, **options)
    return {"method": method, "w_bits": w_bits, "model": model, "before": before, "x": x, "qmodel": qmodel,
            "info": info}


def test_weights_on_a_2b_grid_per_channel_first_last_at_8_bits(run):
    w_bits, qmodel, model = run["w_bits"], run["qmodel"], run["model"]
    expected = {"conv1": 8, "conv2": w_bits, "fc1": w_bits, "fc2": w_bits, "fc3": 8}
    assert run["info"]["layers"] == expected == layer_bits(model, w_bits)
    for name, layer in quantizable_layers(qmodel):
        bits = expected[name]
        rows = layer.weight.detach().flatten(1)  # (C_out, fan_in)
        levels = [len(torch.unique(r)) for r in rows]
        steps = [_grid_steps(r) for r in rows]
        assert max(levels) <= 2 ** bits, (name, max(levels))
        assert max(steps) <= (2 ** bits - 1) * (1 + 1e-4), (name, max(steps))  # one uniform grid of at most 2^b levels
        fp_steps = [_grid_steps(r) for r in model.get_submodule(name).weight.detach().flatten(1)]
        assert min(fp_steps) > 2 ** bits  # the FP weights were not on such a grid: really quantized
        if bits == w_bits and w_bits <= 3:
            assert max(levels) > 2 ** (w_bits - 1)  # the low-bit layers use their 2^b levels, not fewer bits


def test_input_model_bit_identical_and_output_a_plain_evaluable_model(run):
    model, qmodel, x = run["model"], run["qmodel"], run["x"]
    after = model.state_dict()
    assert set(after) == set(run["before"]) and all(torch.equal(run["before"][k], after[k]) for k in after)
    assert qmodel is not model and type(qmodel) is type(model)
    assert not any(type(m).__module__.split(".")[0] in ("aimet_torch", "brevitas") for m in qmodel.modules())
    with torch.no_grad():
        out = qmodel(x)
    assert out.shape == (len(x), 10) and torch.isfinite(out).all()
    labels = out.argmax(1)
    assert accuracy(qmodel, DataLoader(TensorDataset(x, labels), batch_size=16)) == 100.0  # evaluates
    assert not torch.equal(out, model(x).detach())  # the weights did change


def test_info_names_library_version_iterations_and_time(run):
    info = run["info"]
    assert info["method"] == run["method"] and info["library"] in ("aimet-torch", "brevitas")
    assert info["version"] == importlib.metadata.version(info["library"])
    assert info["seconds"] > 0 and info["calib_images"] == 48 and info["w_bits"] == run["w_bits"]
    assert info["iterations"] == RUNS[run["method"]][1].get("iterations")
    assert run["qmodel"].quant_config["first_last_bits"] == 8


def test_first_last_rule_is_the_ptq_rule():
    model = models.build("resnet20")
    qmodel = lowbit.quantize_model(model, "uniform", 4)
    roles = {name: layer.role for name, layer in lowbit.nn.layers.quantized_layers(qmodel)}
    bits = layer_bits(lowbit.nn.fold_bn(model), 4)
    assert list(bits) == list(roles) and len(bits) == 20
    assert {n for n, b in bits.items() if b == 8} == {n for n, r in roles.items() if r != "body"} == {"conv1", "fc"}


def test_aimet_on_resnet20_with_its_parameter_free_shortcut():
    """AIMET has no quantized definition of ResNet-20's option-A shortcut: the adapter tells it to ignore it."""
    torch.manual_seed(0)
    model = models.build("resnet20").eval()
    before = _state(model)
    qmodel, info = aimet_adaround(model, _images(8), 4, iterations=2, batch_size=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())  # BN folded, as in our PTQ
    assert info["layers"]["conv1"] == info["layers"]["fc"] == 8 and info["layers"]["layer2.0.conv1"] == 4
    for name, layer in quantizable_layers(qmodel):
        assert max(len(torch.unique(r)) for r in layer.weight.flatten(1)) <= 2 ** info["layers"][name]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(qmodel(_images(4))).all()


# ----------------------------------------------------------------------------- bad input, before any library runs
ADAPTERS = [(aimet_adaround, {"iterations": 5}), (brevitas_gptq, {}), (brevitas_learned_round, {"iterations": 5})]


@pytest.mark.parametrize("adapter,options", ADAPTERS)
@pytest.mark.parametrize("bits", [1, 9, 16, 2.5, "4", True])
def test_bits_out_of_range_raise(adapter, options, bits):
    with pytest.raises(ValueError, match="w_bits"):
        adapter(_lenet(), _images(4), bits, **options)


@pytest.mark.parametrize("adapter,options", ADAPTERS)
def test_bad_calibration_raises(adapter, options):
    with pytest.raises(ValueError, match=r"shape \(4, 3, 28, 28\)"):
        adapter(_lenet(), _images(4, channels=3), 4, **options)
    with pytest.raises(ValueError, match="shape"):
        adapter(_lenet(), torch.zeros(0, 1, 28, 28), 4, **options)
    bad = _images(4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapter(_lenet(), bad, 4, **options)


@pytest.mark.parametrize("adapter,options", ADAPTERS)
def test_nan_weights_raise(adapter, options):
    model = _lenet()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc1.weight'.*NaN"):
        adapter(model, _images(4), 4, **options)


@pytest.mark.parametrize("adapter", [aimet_adaround, brevitas_learned_round])
@pytest.mark.parametrize("iterations", [0, -3, 2.5, True])
def test_iterations_must_be_a_positive_int(adapter, iterations):
    with pytest.raises(ValueError, match="iterations"):
        adapter(_lenet(), _images(4), 4, iterations=iterations)
    with pytest.raises(TypeError, match="iterations"):
        adapter(_lenet(), _images(4), 4)  # explicit: AIMET's own default is 15,000 per layer


def test_unknown_method_and_bad_model_raise():
    with pytest.raises(ValueError, match="unknown peer method 'gptq'.*brevitas-gptq"):
        quantize_with_peer(_lenet(), "gptq", _images(4), 4)
    assert METHODS == ("aimet-adaround", "brevitas-gptq", "brevitas-learned-round")
    with pytest.raises(TypeError, match="nn.Module"):
        brevitas_gptq({"conv1.weight": torch.zeros(1)}, _images(4), 4)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        brevitas_gptq(nn.Sequential(nn.Flatten(), nn.ReLU()), _images(4), 4)


def test_a_missing_library_names_make_peers(monkeypatch):
    with pytest.raises(ValueError, match=r"run `make peers`"):
        require("lowbit_no_such_peer_library", "A peer method")
    for adapter, options in ADAPTERS:
        module = "aimet_torch" if adapter is aimet_adaround else "brevitas"
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # what an uninstalled library looks like to import
            with pytest.raises(ValueError, match=rf"{module}.*run `make peers`"):
                adapter(_lenet(), _images(4), 4, **options)


def test_seeded_restores_the_callers_rng():
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    with seeded(0):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    with seeded(0):
        assert torch.equal(torch.rand(3), inside)
