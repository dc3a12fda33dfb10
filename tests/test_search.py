"""QPS search (SQ Algorithm 1): the fast path agrees with the plain reference."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
from lowbit.sq.scale import eq10_update

# small layers: (channels, weights per channel); dyadic values make exact ties likely
dyadic = st.integers(-24, 24).map(lambda k: k / 8)
floats = st.floats(-3, 3, allow_nan=False, width=32)


@st.composite
def layers(draw):
    c = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    elems = draw(st.sampled_from([dyadic, floats]))
    w = draw(hnp.arrays(np.float64, (c, n), elements=elems))
    kind = draw(st.sampled_from(["plain", "zero_channel", "constant_channel"]))
    if kind == "zero_channel":
        w[draw(st.integers(0, c - 1))] = 0.0
    elif kind == "constant_channel":
        w[draw(st.integers(0, c - 1))] = draw(st.sampled_from([0.5, -1.25, 0.3]))
    return w


BACKENDS = ["torch"] + (["c"] if lowbit.sq.search._c_kernel() is not None else [])


def assert_agree(w, bits, option, granularity):
    ref = lowbit.search_qps(w, bits, option, granularity, method="reference")
    for backend in BACKENDS[:-1]:
        other = lowbit.search_qps(w, bits, option, granularity, method="fast", backend=backend, prune=False)
        assert other.index == ref.index and other.iterations == ref.iterations
        assert np.allclose(other.losses, ref.losses, rtol=1e-9, atol=1e-12 * float(np.sum(w * w)) + 1e-300)
    fast = lowbit.search_qps(w, bits, option, granularity, method="fast", backend=BACKENDS[-1], prune=False)
    energy = float(np.sum(w * w))
    assert fast.index == ref.index
    assert np.array_equal(fast.points, ref.points)
    assert fast.loss == pytest.approx(ref.loss, rel=1e-9, abs=1e-12 * energy + 1e-300)
    assert np.allclose(fast.losses, ref.losses, rtol=1e-9, atol=1e-12 * energy + 1e-300)
    assert np.allclose(fast.scale, ref.scale, rtol=1e-9)
    assert fast.iterations == ref.iterations
    assert fast.candidates == ref.candidates == lowbit.qps_count(option, bits)
    if BACKENDS[-1] == "c":
        assert_pruned_agrees(w, bits, option, granularity, ref)
    return ref, fast


def assert_pruned_agrees(w, bits, option, granularity, ref):
    """Branch and bound over channels: same winner, loss and scale; dropped losses are bounds."""
    energy = float(np.sum(w * w))
    pruned = lowbit.search_qps(w, bits, option, granularity, method="fast", backend="c", prune=True)
    assert pruned.index == ref.index
    assert np.array_equal(pruned.points, ref.points)
    assert pruned.loss == pytest.approx(ref.loss, rel=1e-9, abs=1e-12 * energy + 1e-300)
    assert np.allclose(pruned.scale, ref.scale, rtol=1e-9)
    exact = np.ones(ref.candidates, bool) if pruned.exact is None else pruned.exact
    assert np.allclose(pruned.losses[exact], ref.losses[exact], rtol=1e-9, atol=1e-12 * energy + 1e-300)
    # a dropped candidate's entry is a lower bound of its loss, and above the minimum
    assert np.all(pruned.losses[~exact] <= ref.losses[~exact] * (1 + 1e-9) + 1e-12 * energy + 1e-300)
    assert np.all(pruned.losses[~exact] > ref.loss)
    assert pruned.pairs <= ref.pairs


@settings(max_examples=20, deadline=None)
@given(layers(), st.sampled_from([(1, 5), (2, 5), (3, 5), (2, 3), (4, 1)]),
       st.sampled_from(["channel", "layer"]))
def test_fast_equals_reference(w, bits_option, granularity):
    bits, option = bits_option
    ref, fast = assert_agree(w, bits, option, granularity)
    # the winner is no worse than any candidate (Algorithm 1's argmin)
    assert ref.loss <= ref.losses.min() + 1e-12 * float(np.sum(w * w)) + 1e-300
    # every quantized value lies in {+-scale * p}, per channel
    q = fast.quantize(torch.as_tensor(w)).numpy()
    scales = np.full(w.shape[0], fast.scale) if granularity == "layer" else fast.scale
    for c in range(w.shape[0]):
        allowed = np.concatenate([scales[c] * fast.points, -scales[c] * fast.points, [0.0]])
        assert np.isclose(q[c][:, None], allowed[None, :], rtol=0, atol=1e-12).any(1).all()
    assert fast.loss == pytest.approx(float(np.sum((w - q) ** 2)), rel=1e-12, abs=1e-300)


@pytest.mark.skipif("c" not in BACKENDS, reason="no C compiler")
@settings(max_examples=25, deadline=None)
@given(layers(), st.sampled_from([(2, 5), (3, 5), (2, 3), (2, 1)]), st.integers(1, 3), st.integers(1, 4),
       st.booleans())
def test_pruned_search_equals_reference_when_pruning_is_active(w, bits_option, sample_rows, incumbents, superset):
    # tiny sample and incumbent counts so that the bound really drops candidates on small layers,
    # with and without the S_U superset bound of the channels still to come
    from unittest import mock

    bits, option = bits_option
    ref = lowbit.search_qps(w, bits, option, "channel", method="reference")
    with mock.patch.object(lowbit.search, "PRUNE_SAMPLE_ROWS", min(sample_rows, w.shape[0] - 1) or 1), \
            mock.patch.object(lowbit.search, "PRUNE_INCUMBENTS", incumbents), \
            mock.patch.object(lowbit.search, "PRUNE_SUPERSET_MIN_CANDIDATES", 1 if superset else 10**12):
        assert_pruned_agrees(w, bits, option, "channel", ref)


@pytest.mark.skipif("c" not in BACKENDS, reason="no C compiler")
def test_pruning_drops_work_on_a_real_sized_layer():
    from unittest import mock

    # 64 channels x 72 weights, 3-bit option 4 (C(23, 4) = 8855 QPS): the plain kernel is the oracle
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 8, 3, 3, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, 64).view(-1, 1, 1, 1)
    plain = lowbit.search_qps(w, 3, 4, prune=False)
    with mock.patch.object(lowbit.search, "PRUNE_SUPERSET_MIN_CANDIDATES", 1):  # superset bound on
        pruned = lowbit.search_qps(w, 3, 4, prune=True)
    assert pruned.index == plain.index and pruned.loss == pytest.approx(plain.loss, rel=1e-12)
    assert np.allclose(pruned.scale, plain.scale, rtol=1e-12)
    assert pruned.exact is not None and pruned.exact.sum() >= 1 and pruned.exact[pruned.index]
    assert np.allclose(pruned.losses[pruned.exact], plain.losses[pruned.exact], rtol=1e-12)
    assert np.all(pruned.losses[~pruned.exact] <= plain.losses[~pruned.exact] * (1 + 1e-12))
    assert pruned.pairs < 0.6 * plain.pairs  # the bound must actually save work here
    assert plain.pairs == plain.candidates * 64


def test_exact_ties_first_subset_wins():
    # a constant channel is quantized exactly by every QPS: all losses are 0
    w = np.full((2, 5), 0.75)
    ref, fast = assert_agree(w, 2, 5, "channel")
    assert ref.loss == 0.0 and fast.index == 0


def test_returned_scales_are_fixed_points_of_eq10():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 30)) * np.array([[0.1], [1], [2], [0.5], [3], [0.01]])
    res = lowbit.search_qps(torch.as_tensor(w, dtype=torch.float32), 3, 5)
    assert res.scale.shape == (6,)
    for c in range(6):
        s0 = np.abs(w[c]).max() / res.points.max()
        wc = torch.as_tensor(w, dtype=torch.float32)[c].double().numpy()
        assert abs(eq10_update(wc, res.points, res.scale[c]) - res.scale[c]) <= 2e-5 * s0


def test_channel_search_beats_layer_search_and_4d_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 3, 3, generator=g) * torch.linspace(0.1, 2, 8).reshape(8, 1, 1, 1)
    ch = lowbit.search_qps(w, 3, 5, "channel")
    la = lowbit.search_qps(w, 3, 5, "layer")
    assert isinstance(la.scale, float)
    assert ch.loss < la.loss
    assert ch.quantize(w).shape == w.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "bits must be >= 1"),
    (dict(bits=5), "use bits <= 4"),
    (dict(bits=3, universal=7), "unknown universal-set option"),
    (dict(bits=3, granularity="tensor"), "granularity"),
    (dict(bits=3, method="slow"), "method"),
    (dict(bits=3, backend="gpu"), "backend"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.search_qps(torch.randn(2, 3), **kwargs)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or inf"),
    (torch.empty(0, 3), "empty"),
    (torch.tensor(1.0), "scalar"),
])
def test_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        lowbit.search_qps(bad, 2)
    with pytest.raises(TypeError):
        lowbit.search_qps([[1.0, 2.0]], 2)


def test_global_scale_losses_bound_fixed_point_losses():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 20, generator=g, dtype=torch.float64)
    fixed = lowbit.search_qps(w, 2, 5)
    glob = lowbit.sq.search.candidate_losses_global(w, 2, 5)
    assert glob.shape == fixed.losses.shape
    assert np.all(glob <= fixed.losses * (1 + 1e-12) + 1e-12)


def test_search_model_is_cached_with_its_measured_seconds(out_dir):
    model = lowbit.models.build("lenet5")
    first = lowbit.sq.model_search.search_model(model, 2, 1, tag="lenet5-test")
    again = lowbit.sq.model_search.search_model(model, 2, 1, tag="lenet5-test")
    assert [f["layer"] for f in first] == ["conv2", "fc1", "fc2"]
    assert first == again  # loaded, not recomputed
    assert list(out_dir.glob("derived/sq_search_model-*.json"))
