"""lowbit's CUDA code paths, checked on a CPU-only machine with a simulated GPU (tests/simulated_cuda.py).

The first tests check the harness itself (it must raise where CUDA raises, allow what CUDA allows
and leave nothing patched behind), so it cannot pass everything silently. The scenario tests then run
each public entry point with ``device="cuda"`` (or on a model already on ``cuda``) on LeNet-5 with
random 1x28x28 inputs, and compare with the same call on the CPU:

* ``simulated``: the simulated device computes on the CPU, so results must be *equal* to the CPU
  run's (quantized weights, outputs, thresholds, losses, accuracies), and every parameter and
  buffer (but 0-dim flags) of a model that should be on CUDA must report ``cuda``;
* ``real`` (only where ``torch.cuda.is_available()`` in an unpatched process): the same scenarios
  on the GPU, where TF32, cuDNN and reduction order change the last bits and, through them, may
  flip a rounding or a grid choice; so only structural properties are asserted: devices, keys,
  lengths, shapes, dtypes, finite values, the number of levels per output channel of each weight
  within ``LEVELS_TOL`` of the CPU run's, accuracies within ``ACCURACY_TOL`` points and losses
  within 5 %.

The CPU runs take lowbit's compiled C kernels where it has them (SQ search and refinement, nuLSQ,
STLQ) and the CUDA runs the torch paths: equality also checks that the two paths agree bit for bit.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from qat_helpers import random_images, seeded_lenet
from simulated_cuda import SimCudaTensor, simulated_cuda

import lowbit.alq as alq
import lowbit.lsq as lsq
import lowbit.qrater as qrater
from lowbit.alq.finetune import finetune
from lowbit.core import ckernel, clipping
from lowbit.evaluate import evaluate
from lowbit.lsq.training import train_qat
from lowbit.sq.ptq import quantize_model
from lowbit.sq.search import search_qps

REAL_GPU = torch.cuda.is_available()  # read at import, before any test patches torch.cuda
ACCURACY_TOL = 5.0  # real GPU: points of accuracy (two of the 48 images; qrater's objective uses 32)
LEVELS_TOL = 2  # real GPU: levels per output channel (a boundary weight may empty or fill a level)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = random_images(48)
X, Y = DATA.images, DATA.labels
CALIB = X[:16]
lenet = seeded_lenet  # LeNet-5, seeded: every call gives the same weights


def on_cpu(obj):
    """``obj`` (nested dicts/lists/tuples) with every tensor detached and copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def devices(module) -> dict:
    """``{name: device type}`` of ``module``'s parameters and buffers; 0-dim buffers (flags such as
    STLQ's ``initialized``, made on the CPU) are left out: CUDA ops accept 0-dim CPU tensors."""
    return {n: t.device.type for n, t in [*module.named_parameters(), *module.named_buffers()] if t.dim() > 0}


# --- the harness ------------------------------------------------------------------------------------

def test_harness_rejects_cpu_tensor_with_dims_in_cuda_op():
    """A CUDA tensor combined with a CPU tensor of >0 dims raises PyTorch's device-mixing error."""
    with simulated_cuda():
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            torch.randn(3, device="cuda") + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.ones(2, 3).to("cuda") @ torch.ones(3, 2)


def test_harness_rejects_numpy_of_cuda_tensor():
    """``np.asarray`` and ``.numpy()`` of a CUDA tensor raise TypeError; ``.cpu()`` first works."""
    with simulated_cuda():
        x = torch.ones(3, device="cuda")
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            np.asarray(x)
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            x.numpy()
        assert np.asarray(x.cpu()).tolist() == [1.0, 1.0, 1.0]


def test_harness_allows_cpu_scalar_tensor_and_computes_the_cpu_values():
    """A 0-dim CPU tensor in a CUDA op is allowed (as on CUDA); the result is on cuda, value exact; CPU-only
    ops inside the context are untouched."""
    with simulated_cuda():
        y = torch.ones(3, device="cuda") * torch.tensor(2.0)
        assert isinstance(y, SimCudaTensor) and y.device.type == "cuda" and y.is_cuda
        assert y.cpu().tolist() == [2.0, 2.0, 2.0] and y.cpu().device.type == "cpu"
        z = torch.ones(3) + torch.ones(3)  # CPU ops inside the context stay plain CPU ops
        assert type(z) is torch.Tensor and z.device.type == "cpu" and np.asarray(z).tolist() == [2.0, 2.0, 2.0]


def test_harness_index_rules():
    """CUDA tensors may be indexed by CPU index tensors; a CPU tensor indexed by CUDA indices raises."""
    with simulated_cuda():
        x = torch.arange(5.0).to("cuda")
        assert x[torch.tensor([0, 3])].cpu().tolist() == [0.0, 3.0]
        assert x[torch.tensor([True, False, True, False, False])].device.type == "cuda"
        with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
            torch.arange(5.0)[torch.tensor([1], device="cuda")]


def test_harness_rejects_cpu_generator_and_cross_device_searchsorted():
    """A CPU generator for CUDA random numbers, and searchsorted/bucketize across devices, raise."""
    with simulated_cuda():
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
        bounds = torch.tensor([0.0, 1.0, 2.0], device="cuda")
        with pytest.raises(RuntimeError, match="boundaries and input value tensors should have same device"):
            torch.searchsorted(bounds, torch.tensor([0.5]))
        with pytest.raises(RuntimeError, match="same device type"):
            torch.bucketize(torch.tensor(0.5), bounds)  # 0-dim values too
        assert torch.bucketize(torch.tensor([0.5], device="cuda"), bounds).cpu().tolist() == [1]


def test_harness_rejects_cuda_tensor_in_c_kernel():
    """``tensor_ptr`` (the C kernels' pointer) of a CUDA tensor raises; of a CPU tensor it works."""
    with simulated_cuda():
        with pytest.raises(RuntimeError, match="C kernel"):
            ckernel.tensor_ptr(torch.ones(3, device="cuda"))
        assert ckernel.tensor_ptr(torch.ones(3)) is not None


def test_harness_module_to_cuda_trains_like_cpu():
    """``module.to("cuda")`` gives cuda parameters; forward, backward and an SGD step equal the CPU's."""
    def step(device):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 26 * 26, 10)).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        loss = torch.nn.functional.cross_entropy(net(X[:4].to(device)), Y[:4].to(device))
        loss.backward()
        opt.step()
        return set(devices(net).values()), {p.grad.device.type for p in net.parameters()}, on_cpu(net.state_dict())

    cpu = step("cpu")
    with simulated_cuda():
        sim = step("cuda")
    assert sim[0] == sim[1] == {"cuda"}
    assert all(torch.equal(cpu[2][k], sim[2][k]) for k in cpu[2])


def test_harness_restores_everything_on_exit():
    """After the context (also one left by an exception) torch is as before: no patch, no mode."""
    available, to, tensor, ptr = torch.cuda.is_available(), torch.Tensor.to, torch.tensor, ckernel.tensor_ptr
    with pytest.raises(ValueError):
        with simulated_cuda():
            assert torch.cuda.is_available() and torch.cuda.device_count() == 1
            raise ValueError("leave by an exception")
    assert torch.cuda.is_available() == available and torch.Tensor.to is to and torch.tensor is tensor
    assert ckernel.tensor_ptr is ptr and torch.is_grad_enabled()
    assert "to" not in vars(torch.Tensor) and "cuda" not in vars(torch.Tensor)
    y = torch.ones(3) + torch.ones(3)
    assert type(y) is torch.Tensor and y.device.type == "cpu" and y.tolist() == [2.0, 2.0, 2.0]
    assert np.asarray(y).sum() == 6.0


# --- the scenarios: simulated (equal to the CPU) and real (structurally like the CPU) -----------------

@pytest.fixture(params=["simulated", "real"])
def cuda(request):
    """``(context manager, exact)``: simulated CUDA (exact comparison) or the real GPU (structural)."""
    if request.param == "real":
        if not REAL_GPU:
            pytest.skip("no CUDA GPU on this machine")
        return contextlib.nullcontext, False
    return simulated_cuda, True


def levels_per_channel(w: torch.Tensor) -> np.ndarray:
    return np.array([len(torch.unique(row)) for row in w.reshape(len(w), -1)])


def assert_like(cpu, dev, exact: bool, key: str = ""):
    """``dev`` (a CUDA run's results, copied to the CPU) equals ``cpu`` when ``exact``; else it has the
    structure of the module docstring (same keys, lengths, shapes, dtypes, strings; finite values)."""
    if isinstance(cpu, dict):
        assert cpu.keys() == dev.keys(), key
        for k in cpu:
            assert_like(cpu[k], dev[k], exact, f"{key}.{k}")
    elif isinstance(cpu, (list, tuple)):
        assert len(cpu) == len(dev), key
        for i, (a, b) in enumerate(zip(cpu, dev)):
            assert_like(a, b, exact, f"{key}[{i}]")
    elif isinstance(cpu, torch.Tensor):
        assert isinstance(dev, torch.Tensor) and dev.device.type == "cpu", key
        assert cpu.shape == dev.shape and cpu.dtype == dev.dtype, key
        if exact:
            assert torch.equal(cpu, dev), key
        elif dev.is_floating_point():
            assert torch.isfinite(dev).all(), key
            if key.endswith("weight") and dev.ndim > 1:  # quantized: the same grid size, per output channel
                assert np.abs(levels_per_channel(dev) - levels_per_channel(cpu)).max() <= LEVELS_TOL, key
    elif exact:
        assert type(cpu) is type(dev), key
        if isinstance(cpu, np.ndarray):
            assert np.array_equal(cpu, dev), key
        else:
            assert cpu == dev or cpu != cpu and dev != dev, key  # NaN: equal here
    elif isinstance(cpu, np.ndarray):
        assert cpu.shape == np.shape(dev) and np.isfinite(dev).all(), key
    elif isinstance(cpu, float):
        assert math.isfinite(dev), key
        if "accuracy" in key:
            assert abs(cpu - dev) <= ACCURACY_TOL, key
        elif "loss" in key:
            assert abs(cpu - dev) <= 0.05 * abs(cpu), key
    else:
        assert type(cpu) is type(dev) and (cpu == dev or not isinstance(cpu, str)), key


def compare(scenario, cuda, *args):
    """Run ``scenario(device, *args)`` on the CPU and on CUDA; compare; return both results."""
    context, exact = cuda
    cpu = scenario("cpu", *args)
    with context():
        dev = scenario("cuda", *args)
    for result, device in ((cpu, "cpu"), (dev, "cuda")):
        elsewhere = {name: d for name, d in result.pop("devices", {}).items() if d != device}
        assert not elsewhere, f"not on {device}: {elsewhere}"
    assert_like(cpu, dev, exact)
    return cpu, dev


PTQ_CASES = {
    "uniform-w4": dict(method="uniform", w_bits=4),
    "sq-w3": dict(method="sq", w_bits=3),
    "uniform-w4a4": dict(method="uniform", w_bits=4, a_bits=4),
    "sq-w3a4": dict(method="sq", w_bits=3, a_bits=4),
    "sq-w3-refine": dict(method="sq", w_bits=3, refine=True),
    "uniform-w4a4-refine": dict(method="uniform", w_bits=4, a_bits=4, refine=True),
    "sq-w3a4-refine": dict(method="sq", w_bits=3, a_bits=4, refine=True),
}


def ptq(device, case, where):
    model = lenet()
    options = dict(PTQ_CASES[case], calib=CALIB, max_rows=256, batch_size=16)
    if where == "device=":
        q = quantize_model(model, device=device, **options)
    else:  # the model is already on the device
        q = quantize_model(model.to(device), **options)
    return {"devices": devices(q), "state": on_cpu(q.state_dict()), "output": on_cpu(q(X[:8].to(device)))}


@pytest.mark.parametrize("case, where", [(case, "device=") for case in PTQ_CASES] + [
    (case, "model on device") for case in ("sq-w3", "uniform-w4a4", "sq-w3a4-refine")])
def test_quantize_model_on_cuda_matches_cpu(cuda, case, where):
    """``quantize_model`` on CUDA (``device="cuda"`` or a cuda model) runs and quantizes every weight and
    activation step as on the CPU; the quantized model lives on cuda and its outputs match."""
    compare(ptq, cuda, case, where)


def evaluate_scenario(device):
    model = lenet()
    result = evaluate(model, DATA, batch_size=20, device=device)
    return {"devices": devices(model), "result": result}


def test_evaluate_cpu_model_on_cuda_matches_cpu(cuda):
    """``evaluate(cpu model, data, device="cuda")`` moves the model to cuda; accuracy and loss as on the CPU."""
    compare(evaluate_scenario, cuda)


def search_scenario(device):
    w = lenet().conv2.weight.detach().to(device)
    found = search_qps(w, 3, device=device)  # CPU: the C kernel (pruned search); CUDA: the torch path
    q = found.quantize(w)
    return {"devices": {"quantized": q.device.type}, "points": found.points, "scale": np.asarray(found.scale),
            "loss": float(found.loss), "quantized.weight": on_cpu(q)}


def test_search_qps_and_quantize_on_cuda_match_cpu(cuda):
    """``search_qps(cuda weight, device="cuda")`` finds the CPU's QPS, scales and loss (there: the C kernel);
    ``SearchResult.quantize(cuda weight)`` gives the same quantized weight, on cuda."""
    compare(search_scenario, cuda)


def qrater_scenario(device):
    result = qrater.run(lenet(), 3, 3, (X[:32], Y[:32]), device=device, search="grid", clip_grid=[0.5, 1.0],
                        gamma_n_grid=[-0.5, 0.0], gamma_s_grid=[0.5], batch_size=32, stat_batch=16)
    probes = [{k: p[k] for k in ("layer", "stage", "accuracy", "loss")} for p in result.probes]
    return {"devices": devices(result.model), "layers": on_cpu(result.layers), "probes": probes,
            "state": on_cpu(result.model.state_dict())}


def test_qrater_run_on_cuda_matches_cpu(cuda):
    """Q-Rater's ``run(..., device="cuda")`` (tiny grids) picks the CPU's settings, probe for probe."""
    compare(qrater_scenario, cuda)


def qat_results(prepared, model, history, **extra) -> dict:
    """What the LSQ and ALQ scenarios compare: a prepared model, the history (wall times left out)
    and the trained model of one run, and where both models' tensors are."""
    return {"devices": {**devices(prepared), **{"trained." + n: d for n, d in devices(model).items()}},
            "prepared": on_cpu(prepared.state_dict()), "trained": on_cpu(model.state_dict()),
            "history": on_cpu([{k: v for k, v in h.items() if k != "seconds"} for h in history]), **extra}


def lsq_scenario(device, variant):
    prepared = lsq.prepare_variant(lenet().to(device), variant, 3, calib=CALIB, init="mse")
    model, history = train_qat(lsq.prepare_variant(lenet(), variant, 3, calib=CALIB, init="mse"), DATA, DATA, 1,
                               batch_size=24, device=device, progress=False)
    return qat_results(prepared, model, history)


@pytest.mark.parametrize("variant", ["LSQ", "nuLSQ-WA"])
def test_lsq_prepare_and_train_on_cuda_match_cpu(cuda, variant):
    """LSQ/nuLSQ: ``prepare_variant`` of a cuda model (MSE init) and one epoch of ``train_qat(device="cuda")``
    give the CPU's step sizes, losses, accuracy and trained weights."""
    compare(lsq_scenario, cuda, variant)


def alq_scenario(device):
    prepared = alq.prepare_stlq(lenet().to(device), calib=CALIB)
    output = prepared(X[:8].to(device))
    model, history = finetune(lenet(), DATA, DATA, epochs=1, batch_size=24, device=device, progress=False,
                              calib=CALIB, record_every=1)
    return qat_results(prepared, model, history, output=on_cpu(output))


def test_alq_prepare_and_finetune_on_cuda_match_cpu(cuda):
    """ALQ: ``prepare_stlq`` of a cuda model (its STLQ scales on cuda too, also when the same weights were fitted
    on the CPU before: the fit is memoised) and one epoch of ``finetune(device="cuda")`` match the CPU."""
    compare(alq_scenario, cuda)


def clipping_scenario(device, rule):
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1)).to(device)
    return {"signed": float(clipping.baseline_threshold(x, 3, rule)),
            "unsigned": float(clipping.baseline_threshold(x.abs(), 3, rule))}


@pytest.mark.parametrize("rule", clipping.CLIP_RULES)
def test_baseline_threshold_of_cuda_tensor_matches_cpu(cuda, rule):
    """``baseline_threshold(cuda tensor, 3, rule)`` returns the CPU's threshold for every rule."""
    compare(clipping_scenario, cuda, rule)
