"""LSQ / nuLSQ quantizers: fast path = reference (forward and every gradient), the stated
gradients, equal steps = LSQ, outputs on the level grid, initialisation and bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.lsq import kernel
from lowbit.lsq import (LSQQuantizer, NuLSQQuantizer, initial_step, lsq_levels, lsq_quantize, lsq_quantize_reference,
                        nulsq_levels, nulsq_quantize, nulsq_quantize_reference, qrange)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BITS = (2, 3, 4, 8)


def _run(fn, x, step, bits, signed, weights, **kw):
    """``(y, dL/dx, dL/dstep)`` of ``L = sum(weights * fn(x, step))``."""
    x = x.clone().requires_grad_()
    step = step.clone().requires_grad_()
    y = fn(x, step, bits, signed, **kw)
    (y * weights).sum().backward()
    return y.detach(), x.grad, step.grad


def _inputs(seed: int, bits: int, signed: bool, steps: torch.Tensor) -> torch.Tensor:
    """Random values over and beyond the range, plus every threshold, level and segment end exactly."""
    g = torch.Generator().manual_seed(seed)
    qn, qp = qrange(bits, signed)
    pos = torch.cumsum(steps[qn:], 0)
    neg = torch.cumsum(steps[:qn], 0) if qn else steps.new_zeros(0)
    top = float(pos[-1]) * 1.3
    x = (torch.rand(400, generator=g, dtype=torch.float64) * 2 - (1 if signed else 0.3)) * top
    low = torch.cat([steps.new_zeros(1), pos[:-1]])
    special = [pos, low + steps[qn:] / 2, torch.zeros(1, dtype=steps.dtype), pos[-1:] * 2]
    if qn:
        nlow = torch.cat([steps.new_zeros(1), neg[:-1]])
        special += [-neg, -(nlow + steps[:qn] / 2), -neg[-1:] * 2]
    return torch.cat([x, *special])


def _random_steps(seed, bits, signed, dyadic=False):
    g = torch.Generator().manual_seed(seed + 1000)
    qn, qp = qrange(bits, signed)
    if dyadic:  # multiples of 1/64: sums and halves are exact in float64
        return torch.randint(4, 40, (qn + qp,), generator=g).double() / 64
    return torch.rand(qn + qp, generator=g, dtype=torch.float64) * 0.9 + 0.1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from(BITS), signed=st.booleans(),
       grad_scale=st.sampled_from(["lsq", None, 0.37]))
def test_nulsq_fast_path_equals_reference(seed, bits, signed, grad_scale):
    steps = _random_steps(seed, bits, signed)
    x = _inputs(seed, bits, signed, steps)
    w = torch.randn(len(x), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fast = _run(nulsq_quantize, x, steps, bits, signed, w, grad_scale=grad_scale, num_elements=777)
    ref = _run(nulsq_quantize_reference, x, steps, bits, signed, w, grad_scale=grad_scale, num_elements=777)
    assert torch.equal(fast[0], ref[0])
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-10, atol=1e-12)


def test_segment_sums_are_exact_and_order_free():
    """The fixed-point per-segment sums do not depend on the order of the elements, and are within
    their stated bound of the float64 sum; a NaN gradient propagates."""
    from lowbit.lsq import segments
    g = torch.Generator().manual_seed(5)
    n, count = 7, 5000
    grad = torch.randn(count, generator=g) * 1e-3
    k = torch.randint(0, n + 1, (count,), generator=g)
    levels = torch.linspace(0, 1.4, n + 1)
    z = (levels[k] + (torch.rand(count, generator=g) - 0.5) * 0.2).clamp(min=-0.1)
    y = levels[k]
    perm = torch.randperm(count, generator=g)
    a = segments.segment_sums(grad, z, y, k, n, 1.4)
    b = segments.segment_sums(grad[perm], z[perm], y[perm], k[perm], n, 1.4)
    assert torch.equal(a, b)
    seg, v = segments.segment_terms(grad.double(), z.double(), y.double(), k, n)
    exact = torch.zeros(n + 2, dtype=torch.float64).index_add_(0, seg, v)
    bound = 2.0 ** -49 * count ** 2 * float(grad.abs().max()) * 1.4
    assert float((a.double() - exact).abs().max()) <= bound + float(exact.abs().max()) * 2 ** -24
    assert float(a[0]) == 0.0  # at or below zero nothing
    d = segments.segment_sums(grad.double(), z.double(), y.double(), k, n, 1.4)  # float64: a second word
    assert float((d - exact).abs().max()) <= 1e-15 * float(exact.abs().max())
    grad[3] = float("nan")
    assert torch.isnan(segments.segment_sums(grad, z, y, k, n, 1.4)).any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from(BITS), signed=st.booleans(),
       grad_scale=st.sampled_from(["lsq", None, 0.37]))
def test_lsq_fast_path_equals_reference(seed, bits, signed, grad_scale):
    step = torch.tensor(0.05 + (seed % 97) / 97.0, dtype=torch.float64)
    qn, qp = qrange(bits, signed)
    x = _inputs(seed, bits, signed, step.expand(qn + qp).clone())
    w = torch.randn(len(x), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fast = _run(lsq_quantize, x, step, bits, signed, w, grad_scale=grad_scale)
    ref = _run(lsq_quantize_reference, x, step, bits, signed, w, grad_scale=grad_scale)
    assert torch.equal(fast[0], ref[0])
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-12, atol=1e-12)  # the reference's x/s*s is 1 +- 1 ulp
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_gradients_are_the_stated_ones(bits, signed):
    """dy/dx = 1 on [-Qn s, Qp s]; dy/ds = round(v) - v inside, -Qn below, +Qp above; g = 1/sqrt(n Qp)."""
    s = 0.25
    qn, qp = qrange(bits, signed)
    v = torch.tensor([-qn - 3.0, -qn, -1.3, -0.5, 0.0, 0.5, 0.7, 1.5, qp, qp + 0.1, qp + 4.0], dtype=torch.float64)
    if not signed:
        v = v[v >= 0]
    x = (v * s).requires_grad_()
    step = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    lsq_quantize(x, step, bits, signed, num_elements=10).sum().backward()
    r = torch.sign(v) * torch.ceil(v.abs() - 0.5)
    expect_ds = torch.where(v < -qn, -float(qn), torch.where(v > qp, float(qp), r - v))
    assert torch.equal(x.grad, ((v >= -qn) & (v <= qp)).double())
    assert math.isclose(float(step.grad), float(expect_ds.sum()) / math.sqrt(10 * qp), rel_tol=1e-12)


def test_nulsq_unsigned_gradient_by_hand():
    """Steps (1, 2, 4): levels 0, 1, 3, 7; only s_n of x's segment gets round(u) - u, above all get +1."""
    steps = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    x = torch.tensor([-1.0, 0.0, 0.4, 0.5, 1.0, 2.2, 3.0, 5.0, 7.0, 9.0], dtype=torch.float64)
    y, dx, ds = _run(nulsq_quantize, x, steps, 2, False, torch.ones_like(x), grad_scale=None)
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 7.0, 7.0]  # 0.5 and 5.0 are ties: down
    assert dx.tolist() == [0.0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    # s1: x=0.4 -> 0-0.4, 0.5 -> 0-0.5, 1.0 -> 0; s2: 2.2 -> u=0.6 -> 0.4, 3.0 -> 0; s3: 5.0 -> u=0.5 -> -0.5,
    # 7.0 -> 0; x=9 > c_N: +1 each
    torch.testing.assert_close(ds, torch.tensor([-0.9 + 1, 0.4 + 1, -0.5 + 1], dtype=torch.float64))
    g = 1 / math.sqrt(10 * 3)
    _, _, ds_scaled = _run(nulsq_quantize, x, steps, 2, False, torch.ones_like(x))
    torch.testing.assert_close(ds_scaled, ds * g)


def test_nulsq_signed_layout_and_gradient_scale():
    """Signed 2 bits: steps [n1, n2 | p1]; levels -(n1+n2), -n1, 0, p1; the negative half is the
    unsigned rule on -x with flipped signs, scaled 2/sqrt(n Qn) and 2/sqrt(n Qp)."""
    steps = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert nulsq_levels(steps, 2, True).tolist() == [-3.0, -1.0, 0.0, 0.5]
    x = torch.tensor([-5.0, -2.5, -0.3, 0.3, 0.9], dtype=torch.float64)
    y, dx, ds = _run(nulsq_quantize, x, steps, 2, True, torch.ones_like(x), grad_scale=None)
    assert y.tolist() == [-3.0, -3.0, 0.0, 0.5, 0.5]
    assert dx.tolist() == [0.0, 1, 1, 1, 0]
    # x=-5: below -> -1 to both negative steps; -2.5: segment 2 of -x, u=0.75 -> -(1-0.75); -0.3: segment 1,
    # u=0.3 -> -(0-0.3); 0.3: p1 u=0.6 -> 1-0.6; 0.9 above -> +1
    torch.testing.assert_close(ds, torch.tensor([-1 + 0.3, -1 - 0.25, 0.4 + 1], dtype=torch.float64))
    _, _, dsg = _run(nulsq_quantize, x, steps, 2, True, torch.ones_like(x), num_elements=5)
    torch.testing.assert_close(dsg, ds * torch.tensor([2 / math.sqrt(5 * 2)] * 2 + [2 / math.sqrt(5 * 1)],
                                                      dtype=torch.float64))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_equal_steps_are_lsq(bits, signed):
    """All steps equal to s: nuLSQ's forward, dL/dx and summed step gradient are LSQ's (exactly,
    dyadic values; unsigned with the gradient scale, signed with g = 1), ties included."""
    qn, qp = qrange(bits, signed)
    s = torch.tensor(0.375, dtype=torch.float64)
    steps = s.expand(qn + qp).clone()
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randint(-16 * (qn + 2), 16 * (qp + 2), (500,), generator=g).double() / 16 * s,
                   s * torch.arange(-2 * qn - 2, 2 * qp + 3, dtype=torch.float64) / 2])  # every half-step tie
    w = torch.randn(len(x), generator=g, dtype=torch.float64)
    scale = None if signed else "lsq"
    a = _run(lsq_quantize, x, s, bits, signed, w, grad_scale=scale)
    b = _run(nulsq_quantize, x, steps, bits, signed, w, grad_scale=scale)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2].sum(), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from(BITS), signed=st.booleans())
def test_outputs_are_the_nearest_level(seed, bits, signed):
    steps = _random_steps(seed, bits, signed, dyadic=True)
    x = _inputs(seed, bits, signed, steps)
    levels = nulsq_levels(steps, bits, signed)
    y = nulsq_quantize(x, steps, bits, signed)
    assert torch.isin(y, levels).all()
    dist = (x[:, None] - levels[None]).abs()
    assert torch.equal((x - y).abs(), dist.min(1).values)  # nearest (ties: either neighbour is nearest)
    s = steps[0]
    yl = lsq_quantize(x, s, bits, signed)
    assert torch.isin(yl, lsq_levels(s, bits, signed).to(x.dtype)).all()


def test_steps_kept_positive_and_gradient_flows():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    step = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    y = lsq_quantize(x, step, 4, True)
    assert torch.isfinite(y).all()
    steps = torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64, requires_grad=True)
    y = nulsq_quantize(x, steps, 2, False)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(steps.grad).all()


@pytest.mark.parametrize("init", ["lsq", "mse"])
def test_initialisation(init):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4000, generator=g)
    q = NuLSQQuantizer(3, True, init=init).initialize(w)
    assert torch.all(q.steps.detach() == q.steps[0].detach())  # all steps start equal
    if init == "lsq":
        assert math.isclose(float(q.steps[0].detach()), 2 * float(w.abs().mean()) / math.sqrt(3), rel_tol=1e-6)
    else:  # the chosen step has the smallest MSE among the grid, and beats the LSQ init
        def mse(s):
            return float(((lsq_quantize(w, torch.tensor(s), 3, True) - w) ** 2).mean())
        best = float(q.steps[0].detach())
        assert mse(best) <= mse(initial_step(w, 3, True, "lsq")) + 1e-9
        assert mse(best) <= min(mse(best * 0.97), mse(best * 1.03)) + 1e-9
    lq = LSQQuantizer(3, True, init=init).initialize(w)
    assert torch.equal(lq(w), q(w))  # a fresh nuLSQ quantizer is the LSQ quantizer of the same init


def test_codes_index_the_levels():
    q = NuLSQQuantizer(2, False).initialize(torch.rand(100))
    q.set_steps(torch.tensor([0.1, 0.3, 0.2]))
    x = torch.tensor([-1.0, 0.04, 0.06, 0.2, 0.3, 0.45, 2.0])
    assert q.codes(x).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert q.levels().tolist() == pytest.approx([0.0, 0.1, 0.4, 0.6])


@pytest.mark.parametrize("bad", [1, 9, 2.5, True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        NuLSQQuantizer(bad, True)
    with pytest.raises(ValueError, match="bits"):
        lsq_quantize(torch.ones(3), 1.0, bad, True)


def test_bad_steps_and_options():
    with pytest.raises(ValueError, match="needs a 1-D tensor of 3 steps"):
        nulsq_quantize(torch.ones(3), torch.ones(4), 2, False)
    with pytest.raises(ValueError, match="one step size"):
        lsq_quantize(torch.ones(3), torch.ones(2), 2, False)
    q = NuLSQQuantizer(2, False)
    with pytest.raises(ValueError, match="positive"):
        q.set_steps(torch.tensor([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="needs 3 step"):
        q.set_steps(torch.ones(5))
    with pytest.raises(ValueError, match="init"):
        LSQQuantizer(4, True, init="gauss")
    with pytest.raises(ValueError, match="grad_scale"):
        lsq_quantize(torch.ones(3), 1.0, 4, True, grad_scale="sqrt")
    with pytest.raises(ValueError, match="NaN"):
        initial_step(torch.tensor([1.0, float("nan")]), 4, True)
    with pytest.raises(ValueError, match="all-zero"):
        initial_step(torch.zeros(10), 4, True)
    with pytest.raises(TypeError, match="floating-point"):
        lsq_quantize(torch.ones(3, dtype=torch.long), 1.0, 4, True)
    assert np.isfinite(initial_step(torch.ones(10), 2, False, "mse"))


KERNEL = pytest.mark.skipif(kernel.load() is None, reason="no C compiler for lowbit/lsq/kernel.c")


@KERNEL
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from(BITS), signed=st.booleans(), threads=st.sampled_from([1, 2]))
def test_compiled_kernel_is_bit_identical_to_the_torch_path(seed, bits, signed, threads):
    """CPU float32 goes through lowbit/lsq/kernel.c (nuLSQ and LSQ); LOWBIT_NO_KERNEL=1 forces the torch
    path: same bits, forward and every gradient, thresholds and segment ends included, split over threads or not."""
    steps = _random_steps(seed, bits, signed).float()
    x = _inputs(seed, bits, signed, steps.double()).float()
    x = torch.cat([x, torch.randn(70_000 * threads, generator=torch.Generator().manual_seed(seed))])
    w = torch.randn(len(x), generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for flag in ("0", "1"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("LOWBIT_NO_KERNEL", flag)
                assert (kernel.load() is None) == (flag == "1")
                out[flag] = _run(nulsq_quantize, x, steps, bits, signed, w, num_elements=999)
                out["lsq" + flag] = _run(lsq_quantize, x, steps[0], bits, signed, w, num_elements=999)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out["0"], out["1"]))
    assert all(torch.equal(a, b) for a, b in zip(out["lsq0"], out["lsq1"]))  # LSQ's kernel too


@KERNEL
@pytest.mark.parametrize("signed", [False, True])
def test_float32_fast_path_close_to_reference(signed):
    steps = _random_steps(7, 3, signed).float()
    x = _inputs(7, 3, signed, steps.double()).float()
    w = torch.randn(len(x), generator=torch.Generator().manual_seed(3))
    fast = _run(nulsq_quantize, x, steps, 3, signed, w)
    ref = _run(nulsq_quantize_reference, x, steps, 3, signed, w)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-5)
