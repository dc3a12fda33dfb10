"""lowbit.nn: inputs checked against the model up front, layer graph order, module surgery, ActQuantizer."""
import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit import models
from lowbit.nn import calibration, graph


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return models.build("lenet5").eval()


@pytest.mark.parametrize("shape, match", [
    ((8, 3, 32, 32), r"shape \(8, 3, 32, 32\) but the model expects \(N, 1, H, W\) images"),
    ((8, 784), r"shape \(8, 784\) but the model expects \(N, 1, H, W\) images"),
    ((8, 1, 5, 5), r"the model failed on them"),  # right channels, too small for LeNet-5's convs + pools
])
def test_wrong_calibration_shapes_get_our_message(lenet, shape, match):
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        calibration.check_inputs(lenet, x)
    with pytest.raises(ValueError, match=match):  # and quantize_model checks before any work
        lowbit.quantize_model(lenet, "uniform", 4, a_bits=4, calib=x)


def test_labels_are_checked_against_the_model_outputs(lenet):
    x = torch.randn(6, 1, 28, 28)
    calibration.check_inputs(lenet, x, torch.tensor([0, 1, 2, 3, 4, 9]))
    with pytest.raises(ValueError, match=r"labels must lie in 0..9 \(the model has 10 outputs\), got 0..10"):
        calibration.check_inputs(lenet, x, torch.tensor([0, 1, 2, 3, 4, 10]))
    with pytest.raises(ValueError, match="one integer class per input"):
        calibration.check_inputs(lenet, x, torch.zeros(6))
    with pytest.raises(ValueError, match="one integer class per input"):
        calibration.check_inputs(lenet, x, torch.zeros(5, dtype=torch.long))


def test_non_finite_or_integer_inputs_are_rejected(lenet):
    x = torch.randn(4, 1, 28, 28)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        calibration.check_inputs(lenet, x)
    with pytest.raises(TypeError, match="floating-point"):
        calibration.check_inputs(lenet, torch.zeros(4, 1, 28, 28, dtype=torch.uint8))


def test_linear_first_layer_names_its_features():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    calibration.check_inputs(mlp, torch.randn(3, 1, 28, 28))  # flattened by the model: fine
    with pytest.raises(ValueError, match="784 features"):
        calibration.check_inputs(mlp, torch.randn(3, 100))


class _Reordered(nn.Module):
    """Registration order differs from forward order: ``late`` is registered first, runs last."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(4, 2)
        self.early = nn.Linear(3, 4)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_quantizable_layers_registration_and_forward_order():
    m = _Reordered()
    assert [n for n, _ in graph.quantizable_layers(m)] == ["late", "early"]
    assert [n for n, _ in graph.quantizable_layers(m, torch.randn(2, 3))] == ["early", "late"]


def test_set_module_replaces_nested_modules(lenet):
    m = models.build("resnet20")
    graph.set_module(m, "layer1.0.conv1", nn.Identity())
    assert isinstance(m.get_submodule("layer1.0.conv1"), nn.Identity)
    assert graph.model_device(m) == torch.device("cpu")
    assert graph.model_device(nn.ReLU()) == torch.device("cpu")


def test_act_quantizer_calibrate_picks_the_best_candidate_step():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(20000, generator=g) ** 4 * 6  # long right tail: clipping pays at 3 bits
    aq = lowbit.nn.ActQuantizer(3, signed=False)
    step = aq.calibrate(x, grid=60)
    amax, hi = float(x.max()), 7
    cands = [float(r * amax / hi) for r in torch.linspace(1.0, 0.02, 60).double().tolist()]

    def mse(s):
        return float(((torch.clamp(torch.round(x / s), 0, hi) * s - x) ** 2).mean())

    assert step < amax / hi  # clipped
    assert mse(step) <= min(mse(s) for s in cands) * (1 + 1e-6)
    assert float(aq.step) == pytest.approx(step)
