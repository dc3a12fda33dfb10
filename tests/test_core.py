"""lowbit.core: one bits rule, the uniform grid, MSE clipping against its plain reference, devices."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.core import clipping, uniform, validation


def laplace(n: int, seed: int) -> torch.Tensor:
    """Seeded Laplace(0, 1) samples (inverse CDF)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.4999999))).float()


@pytest.mark.parametrize("bad", [1, 0, -3, 17])
def test_one_bits_rule_rejects_out_of_range_everywhere(bad):
    # the same rule in every package: SQ search, PTQ, Q-Rater rounding, activation quantizers, uniform grid
    w = torch.randn(4, 9, dtype=torch.float64)
    calls = [lambda: lowbit.search_qps(w, bad), lambda: lowbit.quantize_model(torch.nn.Linear(9, 4), "uniform", bad),
             lambda: uniform.uniform_levels(bad), lambda: lowbit.nn.ActQuantizer(bad)]
    for call in calls:
        with pytest.raises(ValueError, match="bits"):
            call()


@pytest.mark.parametrize("bad", [2.5, True, "4", None])
def test_bits_of_the_wrong_type_are_both_type_and_value_errors(bad):
    with pytest.raises(TypeError, match="int number of bits"):
        validation.check_bits(bad)
    with pytest.raises(ValueError, match="int number of bits"):
        validation.check_bits(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4", None])
def test_check_positive_int_rejects_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match=r"nproc must be a positive int \(GPUs per node\), got"):
        validation.check_positive_int(bad, "nproc", " (GPUs per node)")


def test_check_positive_int_returns_a_python_int():
    got = validation.check_positive_int(np.int64(7), "n")
    assert got == 7 and type(got) is int


def test_check_bits_accepts_and_bounds():
    assert validation.check_bits(np.int64(3)) == 3
    assert validation.check_bits(None, allow_none=True) is None
    with pytest.raises(ValueError, match="between 2 and 4"):
        validation.check_bits(5, hi=4)


def test_uniform_levels_and_points():
    assert uniform.uniform_levels(4, signed=True) == (-7, 7)
    assert uniform.uniform_levels(4, signed=False) == (0, 15)
    assert uniform.uniform_step(7.0, 4) == 1.0
    np.testing.assert_array_equal(uniform.uniform_points(3), [0, 1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match="positive"):
        uniform.uniform_step(0.0, 4)


def test_round_to_grid_equals_reference_and_keeps_autograd():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 3
    for step in (0.1, 0.37, torch.tensor(0.05)):
        assert torch.equal(uniform.round_to_grid(x.clone(), step, -7, 7), uniform.round_to_grid_reference(x, step, -7, 7))
    xg = x.clone().requires_grad_(True)
    uniform.round_to_grid(xg, 0.2, -7, 7).sum().backward()
    assert xg.grad is not None


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 300), bits=st.integers(2, 6), signed=st.booleans(), tie=st.sampled_from(["up", "even"]),
       seed=st.integers(0, 10_000))
def test_mse_step_index_equals_plain_loop(n, bits, signed, tie, seed):
    g = torch.Generator().manual_seed(seed)
    xs = laplace(n, seed) if signed else torch.rand(n, generator=g) ** 3
    lo, hi = uniform.uniform_levels(bits, signed)
    steps = torch.linspace(1.0, 0.05, 37) * float(xs.abs().max()) / hi
    assert clipping.mse_step_index(xs, lo, hi, steps, tie=tie, chunk=5) == \
        clipping.mse_step_index_reference(xs, lo, hi, steps, tie=tie)


def test_mse_threshold_is_the_best_candidate():
    xs = laplace(5000, 11)
    th = clipping.mse_threshold(xs, 3, True, grid=50)
    amax = float(xs.abs().max())
    assert 0 < th < amax  # heavy tails: clipping beats max|x| at 3 bits

    def err(t):
        s = t / 3
        return float(((xs - torch.floor(xs.clamp(-t, t) / s + 0.5).clamp(-3, 3) * s) ** 2).mean())

    cands = [amax * k / 50 for k in range(1, 51)]
    assert err(th) <= min(err(t) for t in cands) * (1 + 1e-5)


def test_baseline_threshold_rules_and_errors():
    xs = laplace(4000, 12)
    amax = float(xs.abs().max())
    assert clipping.baseline_threshold(xs, 4, "max") == pytest.approx(amax)
    for rule in ("mse", "aciq", "kl"):
        assert 0 < clipping.baseline_threshold(xs, 4, rule) <= amax
    with pytest.raises(ValueError, match="clipping rule"):
        clipping.baseline_threshold(xs, 4, "l1")
    with pytest.raises(ValueError, match="all zeros"):
        clipping.baseline_threshold(torch.zeros(10), 4, "mse")


def test_resolve_device():
    assert validation.resolve_device(None) == torch.device("cpu")
    assert validation.resolve_device(None, default=torch.device("cpu")).type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        validation.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            validation.resolve_device("cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            lowbit.quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), "uniform", 4,
                                  device="cuda")


def test_tensor_memo_keeps_copies_and_drops_the_least_recently_used():
    from lowbit.core.memo import TensorMemo, tensor_digest

    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(3, 2)
    assert tensor_digest(a) != tensor_digest(b) and tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.double())
    memo = TensorMemo(2)
    memo.put(("a",), a)
    memo.get(("a",)).mul_(0)  # a caller's copy
    assert torch.equal(memo.get(("a",)), torch.arange(6.0).reshape(2, 3))
    memo.put(("b",), b)
    memo.get(("a",))  # "a" is now the most recently used
    memo.put(("c",), a)
    assert len(memo) == 2 and ("b",) not in memo and ("a",) in memo and memo.get(("b",)) is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_size must be a positive int"):
            TensorMemo(bad)
