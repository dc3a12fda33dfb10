"""QPS quantizers (SQ eqs. 3-7, APoT): exact point sets, QPS membership, symmetry, idempotence,
scale fitting against its reference, bad input."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.sq import quantizers as Q
from lowbit.core.points import quantize_to_points

FIXED = ("uniform", "log2", "two_word_log", "apot")


# ----------------------------------------------------------------------------- exact point sets
def test_uniform_points_eq4_symmetric():
    assert np.allclose(Q.qps("uniform", 3), [0, 1 / 3, 2 / 3, 1])
    assert len(Q.qps("uniform", 8)) == 128


def test_log2_points_eq5():
    assert np.allclose(Q.qps("log2", 3), [0, 0.25, 0.5, 1])
    assert np.allclose(Q.qps("log2", 4), [0] + [2.0 ** -i for i in range(6, -1, -1)])


def test_two_word_log_points_eq6():
    # {a + b : a, b in {0, 1, 1/2}} / 2 at 2 bits S_log = {0, 1}: {0, 1, 2} / 2
    assert np.allclose(Q.qps("two_word_log", 2), [0, 0.5, 1])
    # 4 bits: 8 singles + the new double 2 + C(7, 2) = 21 distinct pairs = 30 points
    assert len(Q.qps("two_word_log", 4)) == 30
    s = Q.qps("log2", 3)
    expect = np.unique((s[:, None] + s[None, :]).ravel())
    assert np.allclose(Q.qps("two_word_log", 3), expect / expect.max())


def test_apot_points_match_official_construction():
    # build_power_value(B=3): a in {0, 1/2, 1/4, 1/16}, b in {0, 1/8}, normalised by 5/8
    assert np.allclose(Q.qps("apot", 4), [0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0])
    assert np.allclose(Q.qps("apot", 3), [0, 0.25, 0.5, 1.0])  # B = 2
    assert np.allclose(Q.qps("apot", 2), [0, 1.0])  # B = 1: ternary
    for bits in range(2, 8):
        assert len(Q.qps("apot", bits)) == 2 ** (bits - 1)


# ----------------------------------------------------------------------------- properties
def _in_qps(q: torch.Tensor, fq: Q.FittedQuantizer) -> bool:
    """Every entry of q is +-scale_c * p for a point p of the QPS (or 0)."""
    p = torch.as_tensor(np.asarray(fq.points, dtype=np.float64))
    s = torch.as_tensor(fq.scale, dtype=torch.float64)
    rows = q.to(torch.float64).reshape(q.shape[0], -1) if s.ndim else q.to(torch.float64).reshape(1, -1)
    s = s.reshape(-1, 1) if s.ndim else s.reshape(1, 1)
    levels = torch.cat([torch.zeros(1, dtype=torch.float64), p])
    dist = (rows.abs().unsqueeze(-1) - s.unsqueeze(-1) * levels).abs().amin(-1)
    return bool((dist <= 1e-9 * s).all())


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(FIXED), bits=st.integers(2, 4), granularity=st.sampled_from(["channel", "layer"]),
       seed=st.integers(0, 10_000), channels=st.integers(1, 5), k=st.integers(1, 20))
def test_fixed_quantizers_in_qps_symmetric_idempotent(method, bits, granularity, seed, channels, k):
    w = torch.randn(channels, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fq = Q.fit_quantizer(w, method, bits, granularity)
    q = fq(w)
    assert _in_qps(q, fq)
    assert torch.equal(fq(-w), -q)  # symmetric
    assert torch.equal(fq(q), q)  # idempotent
    assert (torch.as_tensor(fq.scale) > 0).all()


@settings(max_examples=8, deadline=None)
@given(bits=st.integers(2, 3), seed=st.integers(0, 10_000))
def test_sq_quantizer_in_qps_symmetric_idempotent(bits, seed):
    w = torch.randn(3, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fq = Q.fit_quantizer(w, "sq", bits)
    assert len(fq.points) == 2 ** (bits - 1)
    q = fq(w)
    assert _in_qps(q, fq)
    assert torch.equal(fq(-w), -q)
    assert torch.equal(fq(q), q)


def test_sq_no_worse_than_uniform_on_gaussian_weights():
    # the SQ universal set (option 5) contains no uniform 8-point grid, but its searched QPS
    # should beat the symmetric uniform grid's MSE on bell-shaped weights at 3 bits
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert Q.fit_quantizer(w, "sq", 3).mse(w) < Q.fit_quantizer(w, "uniform", 3).mse(w)


def test_quantize_rows_agrees_with_shared_quantizer():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    scale = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    for method in FIXED:
        p = Q.qps(method, 4)
        assert torch.allclose(lowbit.core.points.quantize_rows(rows, p, scale), quantize_to_points(rows, p, scale, dim=0))


@pytest.mark.parametrize("method", FIXED)
def test_fit_scale_matches_dense_grid_reference(method):
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    p = Q.qps(method, 3)
    fast, ref = Q.fit_scale(w, p), Q.fit_scale_reference(w, p, grid=400)
    rows = w.reshape(4, -1)
    for c in range(4):
        mse_fast = float(((rows[c] - quantize_to_points(rows[c], p, fast[c])) ** 2).mean())
        mse_ref = float(((rows[c] - quantize_to_points(rows[c], p, ref[c])) ** 2).mean())
        assert mse_fast <= mse_ref * 1.01 + 1e-15


def test_uniform_clipping_beats_max_scaling_with_outliers():
    w = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w[0, 0] = 20.0  # one outlier: MSE clipping should cut it
    fq = Q.fit_quantizer(w, "uniform", 3)
    assert float(fq.scale) < 20.0
    naive = Q.FittedQuantizer("uniform", 3, Q.qps("uniform", 3), torch.tensor([20.0], dtype=torch.float64))
    assert fq.mse(w) < naive.mse(w)


def test_layer_granularity_has_one_scale_and_zero_rows_are_safe():
    w = torch.zeros(3, 4, dtype=torch.float64)
    w[1] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    fq = Q.fit_quantizer(w, "log2", 3, "layer")
    assert torch.as_tensor(fq.scale).ndim == 0
    fq = Q.fit_quantizer(w, "uniform", 3, "channel")
    assert torch.isfinite(fq(w)).all() and torch.equal(fq(w)[0], torch.zeros(4, dtype=torch.float64))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,bits", [("nope", 4), ("uniform", 1), ("apot", 8), ("sq", 5), ("log2", 0)])
def test_bad_method_or_bits_raise_valueerror(method, bits):
    with pytest.raises(ValueError):
        Q.fit_quantizer(torch.randn(2, 3), method, bits)


def test_bad_types_raise():
    with pytest.raises(TypeError):
        Q.fit_quantizer(torch.randn(2, 3), "uniform", 4.0)
    with pytest.raises(ValueError, match="granularity"):
        Q.fit_quantizer(torch.randn(2, 3), "uniform", 4, granularity="tensor")
    with pytest.raises(ValueError, match="searched per layer"):
        Q.qps("sq", 4)
