"""QPS search (SQ Algorithm 1): the fast paths agree with the plain reference, the result reproduces
its own loss channel by channel, and the compiled kernel is built from the shipped kernel.c."""
import importlib.resources
import tomllib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit
from lowbit.core.points import quantize_to_points
from lowbit.core import ckernel
from lowbit.sq import kernel
from lowbit.sq.scale import eq10_update, optimal_scale

ROOT = Path(__file__).resolve().parents[1]

# small layers: (channels, weights per channel); dyadic values make exact ties likely
dyadic = st.integers(-24, 24).map(lambda k: k / 8)
floats = st.floats(-3, 3, allow_nan=False, width=32)
SPECIAL = ["zero_channel", "constant_channel", "single_weight"]


@st.composite
def layers(draw, min_channels=1, max_channels=4, max_weights=12):
    """(C, n) weights; some draws get an all-zero channel, a constant channel or a channel with a
    single non-zero weight (or several of these)."""
    c = draw(st.integers(min_channels, max_channels))
    n = draw(st.integers(1, max_weights))
    elems = draw(st.sampled_from([dyadic, floats]))
    w = draw(hnp.arrays(np.float64, (c, n), elements=elems))
    for kind in draw(st.lists(st.sampled_from(SPECIAL), max_size=3)):
        row = draw(st.integers(0, c - 1))
        # dyadic specials: mixed with dyadic weights every sum stays exact, so the fast path's
        # grouped sums equal the reference's term by term even on exact ties (see lowbit.sq.search)
        if kind == "zero_channel":
            w[row] = 0.0
        elif kind == "constant_channel":
            w[row] = draw(st.sampled_from([0.5, -1.25, 0.375, 2.0 ** -10]))
        else:
            w[row] = 0.0
            w[row, draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.625, -2.0, 2.0 ** -10]))
    return w


BACKENDS = ["torch"] + (["c"] if kernel.load() is not None else [])
needs_c = pytest.mark.skipif("c" not in BACKENDS, reason="no C compiler")
# every (method, backend, prune) combination, on CPU
VARIANTS = [dict(method="reference"), dict(backend="torch", device="cpu")] + (
    [dict(backend="c", prune=False), dict(backend="c", prune=True)] if "c" in BACKENDS else [])


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
    return pruned


def assert_reproduces_own_loss(w, res):
    """The returned QPS and scales reproduce ``channel_losses`` and ``loss`` (float64 eq. 3), and
    each channel's loss is the eq. 9 loss of the scale iteration on that channel."""
    scales = np.full(w.shape[0], res.scale) if res.granularity == "layer" else res.scale
    assert np.all(np.isfinite(scales)) and np.all(scales >= 0)
    rows = w.reshape(1, -1) if res.granularity == "layer" else w.reshape(w.shape[0], -1)
    for c, row in enumerate(rows):  # an all-zero channel (or layer) gets its exact minimiser, scale 0
        assert (scales[c] == 0) == (not np.any(row))
    assert res.channel_losses.shape == (rows.shape[0],)
    for c in range(rows.shape[0]):
        wc = torch.as_tensor(rows[c])
        mine = float(((wc - quantize_to_points(wc, res.points, float(scales[c]))) ** 2).sum())
        assert mine == pytest.approx(res.channel_losses[c], rel=1e-12, abs=1e-300)
        own = optimal_scale(rows[c], res.points).loss  # the search's own per-channel loss at this QPS
        assert own == pytest.approx(mine, rel=1e-9, abs=1e-12 * float(np.sum(rows[c] ** 2)) + 1e-300)
        if not np.any(rows[c]):
            assert mine == 0.0
    assert float(np.sum(res.channel_losses)) == pytest.approx(res.loss, rel=1e-12, abs=1e-300)
    q = res.quantize(torch.as_tensor(w)).numpy()
    assert float(np.sum((w - q) ** 2)) == pytest.approx(res.loss, rel=1e-12, abs=1e-300)
    energy = float(np.sum(w * w))
    if res.exact is None or res.exact[res.index]:
        assert abs(res.losses[res.index] - res.loss) <= 1e-12 * energy + 1e-300


@settings(max_examples=20, deadline=None)
@given(layers(), st.sampled_from([(2, 5), (3, 5), (2, 3), (4, 1), (2, 1)]),
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


def test_reported_zero_channel_example_reproduces_its_loss():
    # issue 10: 4 channels x 50 weights, three Student-t channels and one all-zero channel, 2-bit,
    # option 5; the returned QPS and scales must give back .loss channel by channel, in every variant
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_t(3, size=(2, 50)), np.zeros((1, 50)), rng.standard_t(3, size=(1, 50))])
    results = []
    for kw in VARIANTS:
        res = lowbit.search_qps(w, 2, 5, **kw)
        assert_reproduces_own_loss(w, res)
        assert res.channel_losses[2] == 0.0 and res.scale[2] == 0.0  # scale 0: the exact minimiser
        assert np.all(res.quantize(torch.as_tensor(w))[2].numpy() == 0.0)
        # the MAC sees the same weights: eq. 3 has no zero level when 0 is not in the QPS, and the
        # hardware codes a zero weight as +p_min; with scale 0 the channel still decodes to 0
        codes, decoder = lowbit.hw.encode_sq(torch.as_tensor(w), res.points, torch.as_tensor(res.scale), 5)
        hw_w = lowbit.hw.decode_sq(codes, decoder).numpy()
        assert np.array_equal(hw_w, res.quantize(torch.as_tensor(w)).numpy())
        assert float(((w - hw_w) ** 2).sum()) == pytest.approx(res.loss, rel=1e-12)
        results.append(res)
    ref = results[0]
    for res in results[1:]:
        assert res.index == ref.index
        assert np.allclose(res.channel_losses, ref.channel_losses, rtol=1e-12, atol=0)
    assert ref.loss == pytest.approx(sum(optimal_scale(w[c], ref.points).loss for c in range(4)), rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(layers(max_channels=6), st.sampled_from([(2, 5), (3, 1), (2, 3), (2, 1)]), st.sampled_from(range(len(VARIANTS))),
       st.sampled_from([None, (1,), (2,)]), st.sampled_from(["channel", "layer"]))
def test_result_reproduces_its_loss_channel_by_channel(w, bits_option, variant, extra_dims, granularity):
    # any shape (C, n) or (C, a, b), zero / constant / single-weight channels, every variant;
    # pruning forced on small layers so that the pruned path is exercised too
    bits, option = bits_option
    if extra_dims is not None and w.shape[1] % extra_dims[0] == 0:
        w = w.reshape(w.shape[0], extra_dims[0], -1)
    with mock.patch.object(kernel, "PRUNE_SAMPLE_ROWS", 1), mock.patch.object(kernel, "PRUNE_INCUMBENTS", 2):
        res = lowbit.search_qps(w, bits, option, granularity, **VARIANTS[variant])
    assert_reproduces_own_loss(w, res)


@needs_c
@settings(max_examples=25, deadline=None)
@given(layers(min_channels=2), st.sampled_from([(2, 5), (3, 5), (2, 3), (2, 1)]), st.integers(1, 3),
       st.integers(1, 4), st.booleans())
def test_pruned_search_equals_reference_when_pruning_is_active(w, bits_option, sample_rows, incumbents, superset):
    # tiny sample and incumbent counts so that the branch and bound runs on small layers (at least
    # 2 channels: more than the sample), with and without the S_U superset bound of the channels to come
    bits, option = bits_option
    ref = lowbit.search_qps(w, bits, option, "channel", method="reference")
    with mock.patch.object(kernel, "PRUNE_SAMPLE_ROWS", min(sample_rows, w.shape[0] - 1)), \
            mock.patch.object(kernel, "PRUNE_INCUMBENTS", incumbents), \
            mock.patch.object(kernel, "PRUNE_SUPERSET_MIN_CANDIDATES", 1 if superset else 10**12):
        pruned = assert_pruned_agrees(w, bits, option, "channel", ref)
    assert pruned.exact is not None  # the branch and bound ran (not the unpruned fallback)
    assert_reproduces_own_loss(w, pruned)


@needs_c
@settings(max_examples=15, deadline=None)
@given(hnp.arrays(np.float64, (3, 10), elements=st.floats(-1, 1, allow_nan=False, width=32)),
       st.sampled_from([(2, 5), (3, 5), (2, 3)]))
def test_pruning_drops_candidates_on_a_layer_built_for_it(small, bits_option):
    # one dominant channel (fixed, 12 spread magnitudes) and three tiny ones: with one sample row and
    # one incumbent, every QPS whose loss on the dominant channel alone exceeds the incumbent's total
    # must be dropped after that channel. The precondition is checked, then that pruning happened.
    bits, option = bits_option
    big = np.array([0.1, -0.35, 0.5, 0.8, -1.0, 0.2, 0.65, -0.9, 0.05, 0.42, -0.77, 0.3]) * 10
    w = np.zeros((4, 12))
    w[0], w[1:, :10] = big, small * 1e-3
    energy = float(np.sum(w * w))
    plain = lowbit.search_qps(w, bits, option, backend="c", prune=False)
    first = lowbit.search_qps(w[:1], bits, option, backend="c", prune=False).losses  # dominant channel only
    incumbent_total = plain.losses[int(np.argmin(first))]
    # (twice the kernel's margin: its sums run in another channel order)
    must_drop = first > incumbent_total * (1 + 2 * kernel.PRUNE_REL) + 2e-12 * energy
    assert must_drop.sum() >= 1  # the construction works
    with mock.patch.object(kernel, "PRUNE_SAMPLE_ROWS", 1), mock.patch.object(kernel, "PRUNE_INCUMBENTS", 1):
        pruned = lowbit.search_qps(w, bits, option, backend="c", prune=True)
    assert pruned.exact is not None
    assert not np.any(pruned.exact[must_drop])  # every one of them was dropped
    assert pruned.pairs <= plain.pairs - 3 * int(must_drop.sum())  # 3 channels not run for each
    assert pruned.index == plain.index and np.allclose(pruned.scale, plain.scale, rtol=1e-12)
    assert_reproduces_own_loss(w, pruned)


@needs_c
def test_pruning_drops_work_on_a_real_sized_layer():
    # 64 channels x 72 weights, 3-bit option 4 (C(23, 4) = 8855 QPS): the plain kernel is the oracle
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 8, 3, 3, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2, 64).view(-1, 1, 1, 1)
    plain = lowbit.search_qps(w, 3, 4, prune=False)
    with mock.patch.object(kernel, "PRUNE_SUPERSET_MIN_CANDIDATES", 1):  # superset bound on
        pruned = lowbit.search_qps(w, 3, 4, prune=True)
    assert pruned.index == plain.index and pruned.loss == pytest.approx(plain.loss, rel=1e-12)
    assert np.allclose(pruned.scale, plain.scale, rtol=1e-12)
    assert pruned.exact is not None and pruned.exact.sum() >= 1 and pruned.exact[pruned.index]
    assert (~pruned.exact).sum() > 0
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
    assert isinstance(la.scale, float) and la.channel_losses.shape == (1,)
    assert ch.loss < la.loss
    assert ch.quantize(w).shape == w.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "between 2 and"),
    (dict(bits=1), "between 2 and"),  # one rule: check_bits (a 1-point QPS is not a quantizer)
    (dict(bits=5), "use bits <= 4"),
    (dict(bits=3, universal=7), "unknown universal-set option"),
    (dict(bits=3, granularity="tensor"), "granularity"),
    (dict(bits=3, method="slow"), "method"),
    (dict(bits=3, backend="gpu"), "backend"),
    (dict(bits=3, threads=0), "threads"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.search_qps(torch.randn(2, 3), **kwargs)


def test_one_bit_is_rejected_by_every_entry_point():
    for call in (lambda: lowbit.search_qps(torch.randn(2, 3), 1), lambda: lowbit.qps_count(5, 1),
                 lambda: lowbit.search_qps(torch.randn(2, 3), 1, method="reference")):
        with pytest.raises(ValueError, match="SQ bits must be between 2"):
            call()


def test_1d_weight_needs_layer_granularity():
    w = torch.randn(10)
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*output channels on dim 0.*granularity='layer'"):
        lowbit.search_qps(w, 2)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        lowbit.search_qps(w, 2, method="reference")
    res = lowbit.search_qps(w, 2, granularity="layer")  # one scale for the tensor: accepted
    assert res.loss > 0 and isinstance(res.scale, float)
    assert res.loss == pytest.approx(lowbit.search_qps(w.reshape(1, -1), 2).loss, rel=1e-12)


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


@needs_c
def test_kernel_library_is_tagged_by_the_source_bytes_and_flags():
    source = kernel.SOURCE.read_bytes()
    cc = kernel.compiler()
    tags = {kernel.cache_tag(source, cc, flags) for flags in kernel.FLAG_SETS}
    assert len(tags) == len(kernel.FLAG_SETS)  # the flags are part of the tag
    assert kernel.cache_tag(source + b"\n", cc, kernel.FLAG_SETS[0]) not in tags  # so are the bytes
    assert kernel.cache_tag(source, "clang", kernel.FLAG_SETS[0]) not in tags  # and the compiler
    loaded = Path(kernel.load()._name).name
    assert loaded in {f"sq_kernel_{t}.so" for t in tags}


@needs_c
def test_kernel_rebuilds_for_changed_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL_DIR", str(tmp_path))
    cc, flags = kernel.compiler(), kernel.BASE_FLAGS
    edited = kernel.SOURCE.read_bytes() + b"\n/* edited */\n"
    lib = kernel.build(cc, flags, edited)
    assert lib.name == f"sq_kernel_{kernel.cache_tag(edited, cc, flags)}.so" and lib.parent == tmp_path
    stamp = lib.stat().st_mtime_ns
    assert kernel.build(cc, flags, edited) == lib and lib.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert kernel.build(cc, flags) != lib  # the shipped source has another tag
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".so", ".so"]  # no leftover sources


def test_without_a_compiler_the_torch_backend_is_used(monkeypatch):
    monkeypatch.setattr(kernel, "_LIB", None)  # not loaded yet in this "process"
    monkeypatch.setattr(ckernel, "compiler", lambda: None)  # where every kernel finds its compiler
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    res = lowbit.search_qps(w, 2, 5, device="cpu")
    assert kernel.load() is None and res.backend == "torch"
    assert res.loss == pytest.approx(lowbit.search_qps(w, 2, 5, method="reference").loss, rel=1e-9)
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        lowbit.search_qps(w, 2, 5, backend="c")


def test_kernel_source_ships_with_the_package():
    assert importlib.resources.files("lowbit.sq").joinpath("kernel.c").is_file()
    assert kernel.SOURCE.is_file() and b"sq_search_pruned" in kernel.SOURCE.read_bytes()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "kernel.c" in config["tool"]["setuptools"]["package-data"]["lowbit.sq"]
    assert "kernel.c" in config["tool"]["setuptools"]["package-data"]["lowbit.lsq"]  # nuLSQ's kernel too
    assert importlib.resources.files("lowbit.lsq").joinpath("kernel.c").is_file()


def test_search_model_is_cached_with_its_measured_seconds(out_dir):
    model = lowbit.models.build("lenet5")
    first = lowbit.sq.model_search.search_model(model, 2, 1, tag="lenet5-test")
    again = lowbit.sq.model_search.search_model(model, 2, 1, tag="lenet5-test")
    assert [f["layer"] for f in first] == ["conv2", "fc1", "fc2"]
    assert first == again  # loaded, not recomputed
    assert list(out_dir.glob("derived/sq_search_model-*.json"))


def test_zero_weights_take_the_nearest_level_when_the_qps_has_no_zero():
    # eq. 3 over S_Q = {+-s p}: a zero weight goes to +s * p_min (the tie with -s * p_min goes to +), in
    # the quantizer, the reference iteration, every search backend and the MAC encoder alike
    w = np.array([[0.0, 0.9, -1.1, 2.0, 0.0, -0.3], [1.0, 0.0, 0.5, -0.25, 0.75, 0.0]])
    ref = lowbit.search_qps(w, 2, 5, method="reference")
    p_min = float(np.min(ref.points))
    assert p_min > 0  # this layer's best 2-bit QPS of option 5 drops 0
    q = ref.quantize(torch.as_tensor(w)).numpy()
    assert np.allclose(q[w == 0], (np.asarray(ref.scale)[:, None] * p_min * np.ones_like(w))[w == 0])
    for kw in VARIANTS[1:]:
        res = lowbit.search_qps(w, 2, 5, **kw)
        assert res.index == ref.index and np.allclose(res.scale, ref.scale, rtol=1e-12)
        assert res.loss == pytest.approx(ref.loss, rel=1e-12)
    assert ref.loss == pytest.approx(float(((w - q) ** 2).sum()), rel=1e-12)
    codes, decoder = lowbit.hw.encode_sq(torch.as_tensor(w), ref.points, torch.as_tensor(ref.scale), 5)
    assert np.array_equal(lowbit.hw.decode_sq(codes, decoder).numpy(), q)
