"""lowbit.hw: SQ's shift-add MAC simulator and cost model (SQ Sec. 3.5, Fig. 4; supplement Sec. 1)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
import lowbit.sq.hw as hw
from lowbit.sq.hw import network
from lowbit.core.points import quantize_to_points

PAPER_HW_COST = {1: 45, 2: 51, 3: 80, 4: 108, 5: 45}  # supplement Table 2, 4-bit input


# ----------------------------------------------------------------------------- cost model
def test_relative_hw_cost_row_of_supplement_table2():
    assert {o: hw.shifter_cost(o, input_bits=4) for o in hw.OPTIONS} == PAPER_HW_COST


def test_shifter_cost_by_hand_and_user_sets():
    # option 5 at 8-bit input: MUX A k = 8 + 3, MUX B k = 8 + 4, both 4-to-1
    assert hw.shifter_cost(5, 8) == 11 * 3 + 12 * 3
    # user-defined pair equal to option 2, in any order, with duplicates
    assert hw.shifter_cost(([2**-4, 1, 0, 2**-2, 1], [0, 2**-1, 2**-3, 2**-5])) == 51
    # terms above one widen the shifter on the other side: A = {2, 1/2, 0}: k = 4 + 1 + 1, M = 3
    assert hw.shifter_cost(([2, 0.5, 0], [0])) == 6 * 2
    # a MUX with a single case is a wire
    assert hw.shifter_cost(([1], [0.25])) == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_shifter_cost_rejects_bad_input_bits(bad):
    with pytest.raises(ValueError):
        hw.shifter_cost(5, bad)


@pytest.mark.parametrize("bad", [([3.0, 0], [1]), ([0.3], [1]), ([-0.5], [1]), ([], [1])])
def test_terms_must_be_zero_or_powers_of_two(bad):
    with pytest.raises(ValueError):
        hw.shifter_cost(bad)


def test_bad_option():
    with pytest.raises(ValueError):
        hw.universal_terms(6)
    with pytest.raises(TypeError):
        hw.universal_terms("five")


@pytest.mark.parametrize("option", hw.OPTIONS)
def test_term_sets_agree_with_lowbit_universal(option):
    assert np.array_equal(hw.universal_values(option), lowbit.universal_set(option))


def test_shifter_design_rows_match_the_cost():
    for option in hw.OPTIONS:
        rows = hw.shifter_design(option)
        per_mux = {r["mux"]: r["mux_cost"] for r in rows}
        assert sum(per_mux.values()) == hw.shifter_cost(option)
        for mux in "AB":
            cases = [r for r in rows if r["mux"] == mux]
            assert len(cases) == cases[0]["M"] and cases[-1]["term"] == "0"
    opt5 = [r["input"] for r in hw.shifter_design(5) if r["mux"] == "A"]
    assert opt5 == ["x", "x >> 1", "x >> 3", "constant 0"]


def test_cost_table_structure_and_numbers():
    rows = hw.cost_table(weight_bits=(2, 3, 4), act_bits=(4, 8))
    assert [(r["weight_bits"], r["act_bits"]) for r in rows] == [(w, a) for w in (2, 3, 4) for a in (4, 8)]
    r = rows[2]  # 3-bit weights, 4-bit activations
    assert r["sq_shifters_mux2"] == 45 and r["sq_decoder_register_bits"] == 16  # Sec. 3.5's 16-bit register
    assert r["sq_mac_gates"] == r["sq_shifters_gates"] + r["sq_adder_gates"] + r["sq_sign_gates"] + r["sq_acc_gates"]
    # uniform 3-bit: 2x4 array multiplier = 8 AND + 4 full adders
    assert r["uniform_mult_gates"] == 8 * 1 + 4 * 7
    assert r["equiv_weight_bits"] == 7  # max integer point of option 5 is 32 = 2**5 -> 6 magnitude bits
    for col in ("sq_shifters_mux2", "uniform_mult_gates", "acc_gates"):
        assert col in hw.ASSUMPTIONS
    with pytest.raises(ValueError):
        hw.cost_table(weight_bits=(1,))
    with pytest.raises(ValueError):
        hw.cost_table(act_bits=(0,))


# ----------------------------------------------------------------------------- encode / decode
def _random_qps(rng, option, n):
    s_u = lowbit.universal_set(option)
    return np.sort(rng.choice(s_u, size=n, replace=False))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), option=st.sampled_from(hw.OPTIONS), bits=st.sampled_from([2, 3, 4]),
       per_channel=st.booleans())
def test_encode_decode_round_trip(seed, option, bits, per_channel):
    rng = np.random.default_rng(seed)
    o = int(rng.integers(1, 5))
    w = torch.as_tensor(rng.normal(size=(o, 3, 2, 2)))
    w[0, 0, 0, 0] = 0.0  # an exact zero
    n = 2 ** (bits - 1)
    pts = np.stack([_random_qps(rng, option, n) for _ in range(o)]) if per_channel else _random_qps(rng, option, n)
    scale = torch.as_tensor(rng.uniform(0.2, 2.0, size=o))
    codes, dec = hw.encode_sq(w, pts, scale, option)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits and dec.bits == bits
    decoded = hw.decode_sq(codes, dec)
    if per_channel:
        expect = torch.stack([quantize_to_points(w[i], pts[i], scale[i]) for i in range(o)])
    else:
        expect = quantize_to_points(w, pts, scale)
    nonzero = w != 0
    assert torch.equal(decoded[nonzero], expect[nonzero])
    if (np.asarray(pts) == 0).all(-1).any() or (np.asarray(pts).min(-1) == 0).all():
        assert torch.equal(decoded, expect)
    # decoding then encoding again gives the same codes, except -0 / +0 twins (sign of a zero point)
    again, _ = hw.encode_sq(decoded, pts, scale, option)
    assert torch.equal(hw.decode_sq(again, dec), decoded)
    # the decoder's select lines reproduce every point as a + b, and int points are exact
    for g in range(dec.groups):
        a = dec.A.values[dec.sel_a[g]]
        b = dec.B.values[dec.sel_b[g]]
        assert np.array_equal(a + b, dec.points[g])
        assert np.array_equal(dec.int_points[g] * dec.unit, dec.points[g])


def test_decoder_register_3bit_option5():
    pts = np.array([0.0, 0.25, 1.0, 2.0])  # 0+0, 0+1/4, 1+0, 1+1
    codes, dec = hw.encode_sq(torch.tensor([[0.3, -1.1, 2.0, -0.01]]), pts, 1.0, 5)
    assert dec.register_bits == 16
    assert codes.tolist() == [[1, 6, 3, 0]]  # 0.3 -> 0.25; -1.1 -> -1 (sign 1, index 2); 2 -> 2; -0.01 -> +0
    assert dec.sel_a[0].tolist() == [3, 3, 0, 0] and dec.sel_b[0].tolist() == [3, 1, 3, 0]
    # index i at bits 4i..4i+3 as (sel_a << 2) | sel_b
    assert dec.register() == (0xF << 0) | (0xD << 4) | (0x3 << 8) | (0x0 << 12)
    table = dec.table()
    assert len(table) == 8 and table[6]["point"] == -1.0 and table[6]["code"] == "110"


def test_encode_rejects_bad_input():
    w = torch.randn(2, 3)
    s_u = lowbit.universal_set(5)
    with pytest.raises(ValueError, match="2\\*\\*\\(bits-1\\)"):
        hw.encode_sq(w, s_u[:3], 1.0)  # N = 3 is not a power of two
    with pytest.raises(ValueError, match="universal set"):
        hw.encode_sq(w, [0.0, 0.3], 1.0)  # 0.3 is not a + b
    with pytest.raises(ValueError, match="distinct"):
        hw.encode_sq(w, [0.25, 0.25], 1.0)
    with pytest.raises(ValueError):
        hw.encode_sq(w, [0.0, 1.0], -1.0)
    with pytest.raises(TypeError):
        hw.encode_sq(torch.ones(2, 3, dtype=torch.int64), [0.0, 1.0], 1.0)
    codes, dec = hw.encode_sq(w, [0.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        hw.decode_sq(codes + 4, dec)  # codes beyond 2 bits


# ----------------------------------------------------------------------------- MAC
def _random_layer(rng, option, bits, o, c, kh, kw, per_channel=False):
    n = 2 ** (bits - 1)
    pts = np.stack([_random_qps(rng, option, n) for _ in range(o)]) if per_channel else _random_qps(rng, option, n)
    w = torch.as_tensor(rng.normal(size=(o, c, kh, kw)))
    scale = torch.as_tensor(rng.uniform(0.1, 1.0, size=o))
    return w, pts, scale


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), option=st.sampled_from(hw.OPTIONS), bits=st.sampled_from([2, 3, 4]),
       stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1, 2]), act_bits=st.sampled_from([1, 4, 8]),
       per_channel=st.booleans(), pad_value=st.sampled_from([0, 1]))
def test_mac_conv2d_matches_reference_datapath(seed, option, bits, stride, padding, act_bits, per_channel,
                                               pad_value):
    rng = np.random.default_rng(seed)
    w, pts, scale = _random_layer(rng, option, bits, o=int(rng.integers(1, 4)), c=int(rng.integers(1, 3)),
                                  kh=int(rng.integers(1, 4)), kw=int(rng.integers(1, 4)), per_channel=per_channel)
    codes, dec = hw.encode_sq(w, pts, scale, option)
    x = torch.as_tensor(rng.integers(0, 2 ** act_bits, size=(2, w.shape[1], 5, 4)))
    ref = hw.mac_conv2d_reference(x, codes, dec, stride, padding, pad_value)
    for engine in hw.mac.ENGINES:
        got = hw.mac_conv2d(x, codes, dec, stride, padding, pad_value, engine=engine)
        assert got.dtype == torch.int64 and torch.equal(got, ref), engine


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), option=st.sampled_from(hw.OPTIONS), bits=st.sampled_from([2, 3, 4]))
def test_mac_linear_matches_reference_and_float(seed, option, bits):
    rng = np.random.default_rng(seed)
    w, pts, scale = _random_layer(rng, option, bits, o=3, c=7, kh=1, kw=1)
    w = w[:, :, 0, 0]
    codes, dec = hw.encode_sq(w, pts, scale, option)
    x = torch.as_tensor(rng.integers(0, 256, size=(4, 7)), dtype=torch.uint8)
    acc = hw.mac_linear(x, codes, dec)
    assert torch.equal(acc, hw.mac_linear_reference(x, codes, dec))
    act_scale = 0.037
    out = acc.double() * act_scale * scale * dec.unit
    expect = F.linear(x.double() * act_scale, hw.decode_sq(codes, dec))
    assert torch.allclose(out, expect, rtol=1e-12, atol=1e-12 * float(expect.abs().max() + 1))


def test_zero_codes_negative_weights_and_padding_are_exact():
    rng = np.random.default_rng(0)
    pts = np.array([0.0, 0.0625, 0.5, 2.0])  # includes 0: zero codes
    w = torch.as_tensor(rng.normal(size=(4, 3, 3, 3)))
    w[0] = 0.0  # a whole channel of zero codes
    w[1] = -w[1].abs()  # a channel of negative weights
    scale = torch.full((4,), 0.5, dtype=torch.float64)
    codes, dec = hw.encode_sq(w, pts, scale, 5)
    assert (codes[0] == 0).all() and ((codes[1] >> dec.index_bits) == 1).any()
    x = torch.as_tensor(rng.integers(0, 16, size=(2, 3, 6, 6)))
    acc = hw.mac_conv2d(x, codes, dec, stride=1, padding=1)
    assert torch.equal(acc, hw.mac_conv2d_reference(x, codes, dec, 1, 1))
    assert (acc[:, 0] == 0).all() and (acc[:, 1] <= 0).all()
    a_scale = 0.1
    out = acc.double() * a_scale * scale.view(1, -1, 1, 1) * dec.unit
    expect = F.conv2d(x.double() * a_scale, hw.decode_sq(codes, dec), padding=1)
    assert torch.allclose(out, expect, rtol=1e-12, atol=1e-12)


def test_shift_add_product_trace():
    pts = np.array([0.0, 0.1875, 1.125, 2.0])  # 1/8 + 1/16, 1 + 1/8 ... option 5
    codes, dec = hw.encode_sq(torch.tensor([[-1.1]]), pts, 1.0, 5)
    t = hw.shift_add_product(13, int(codes[0, 0]), dec)
    assert t["sign"] == 1 and t["index"] == 2
    # 1.125 = 1/8 (A, 2**-3 -> shift 1 from e_min = -4) + 1 (B, 2**0 -> shift 4): 1/8 is not in B
    assert t["mux_a"] == 13 << 1 and t["mux_b"] == 13 << 4
    assert t["product"] == -(13 * 18) and t["product"] * dec.unit == -13 * 1.125
    with pytest.raises(ValueError):
        hw.shift_add_product(-1, 0, dec)


@pytest.mark.parametrize("x", [torch.rand(1, 2, 4, 4), torch.ones(1, 2, 4, 4, dtype=torch.bool),
                               -torch.ones(1, 2, 4, 4, dtype=torch.int64)])
def test_mac_rejects_activations_that_are_not_unsigned_integers(x):
    codes, dec = hw.encode_sq(torch.randn(3, 2, 3, 3), [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="unsigned"):
        hw.mac_conv2d(x, codes, dec)
    with pytest.raises(ValueError, match="unsigned"):
        hw.mac_linear(x.reshape(1, -1)[:, :18], codes.reshape(3, -1), dec)


def test_activation_quantizer():
    with pytest.raises(ValueError):
        hw.activation_codes(torch.ones(3), 0, 1.0)
    with pytest.raises(ValueError):
        hw.activation_codes(torch.ones(3), 4.0, 1.0)
    with pytest.raises(ValueError):
        hw.activation_codes(torch.ones(3), 4, 0.0)
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    scale, zp = hw.activation_qparams(x, 8)
    q = hw.activation_codes(x, 8, scale, zp)
    assert q.dtype == torch.int64 and int(q.min()) == 0 and int(q.max()) == 255
    assert torch.allclose(hw.dequantize_activation(q, scale, zp), x.double(), atol=scale)
    assert hw.activation_qparams(torch.tensor([0.0, 1.5]), 4) == (0.1, 0)


# ----------------------------------------------------------------------------- real layers and a network
def _fixed_qps(points):
    def fn(w, bits, option):
        return points, w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12) / points.max()
    return fn


def test_real_layer_with_searched_qps_is_bit_exact():
    """A trained LeNet-5 conv on real MNIST-like digits: searched QPS, zero-point input with padding."""
    from lowbit.data import load_dataset

    torch.manual_seed(0)
    model = lowbit.models.build("lenet5")
    try:
        model = lowbit.models.load_pretrained("lenet5", "mnist")
    except (FileNotFoundError, ValueError):
        pass
    w = model.conv1.weight.detach().double()  # (6, 1, 5, 5)
    res = lowbit.search_qps(w, 3, universal=5, granularity="channel")
    codes, dec = hw.encode_sq(w, res.points, res.scale, 5)
    x = load_dataset("digits", "test").images[:3].double()  # normalized: has negative values
    scale, zp = hw.activation_qparams(x, 8)
    assert zp > 0
    x_int = hw.activation_codes(x, 8, scale, zp)
    acc = hw.mac_conv2d(x_int, codes, dec, 1, 2, pad_value=zp)
    corr = hw.mac_linear(torch.full((1, 25), zp), codes.reshape(6, -1), dec)[0]
    out = (acc - corr.view(1, -1, 1, 1)).double() * scale * torch.as_tensor(res.scale).view(1, -1, 1, 1) * dec.unit
    expect = F.conv2d(hw.dequantize_activation(x_int, scale, zp), res.quantize(w), padding=2)
    assert torch.allclose(out, expect, rtol=1e-12, atol=1e-12 * float(expect.abs().max()))
    small = x_int[:1, :, :9, :9]
    assert torch.equal(hw.mac_conv2d(small, codes, dec, 1, 2, zp), hw.mac_conv2d_reference(small, codes, dec, 1, 2, zp))


def test_resnet20_pipeline_int_equals_fake_quant():
    """Every layer of ResNet-20 (random init, BN folded) and its logits: integer MAC vs fake-quant float."""
    from lowbit.data import load_dataset

    torch.manual_seed(0)
    model = lowbit.models.build("resnet20").eval()
    images = load_dataset("digits", "test").images[:6]
    images = F.interpolate(images, size=(12, 12))  # small, fast; resnet20 is size-agnostic
    pts = lowbit.universal_set(5)[[0, 1, 2, 4, 6, 9, 12, 14]]
    hw_model, report = network.to_shift_add(model, images, weight_bits=4, act_bits=8, qps_fn=_fixed_qps(pts))
    assert len(report) == 20 and report[0]["act_zero_point"] > 0 and report[1]["act_zero_point"] == 0
    rows = network.layer_exactness(hw_model, images)
    assert len(rows) == 20
    for r in rows:
        assert r["exact_acc"], r
        assert r["max_abs_diff"] <= 1e-12 * max(1.0, r["max_abs_output"]), r
    cmp = network.compare_logits(hw_model, images, batch=4)
    assert cmp["same_prediction"] == 6 and cmp["max_abs_logit_diff"] <= 1e-11 * max(1.0, cmp["max_abs_logit"])
    with pytest.raises(ValueError):
        network.set_mode(hw_model, "float")
    trace = network.walk_weight(hw_model, "layer1.0.conv1", 37)
    assert trace["product_dequantized"] == pytest.approx(trace["check_x_times_weight"], rel=1e-15)


def test_shift_sum_in_int64_equals_float_shift_sum():
    """Both branches of the vectorised accumulation (float ldexp shifts vs int64 shifts) agree."""
    from lowbit.sq.hw.mac import _accumulate, _select_matrices

    rng = np.random.default_rng(3)
    w, pts, scale = _random_layer(rng, 4, 4, o=5, c=6, kh=1, kw=1)
    codes, dec = hw.encode_sq(w[:, :, 0, 0], pts, scale, 4)
    cols = torch.as_tensor(rng.integers(0, 256, size=(9, 6)))
    T, shifts = _select_matrices(codes, dec)
    a = _accumulate(cols, T, shifts, torch.float32, True)
    b = _accumulate(cols, T, shifts, torch.float32, False)
    c = _accumulate(cols, T, shifts, torch.int64, False)
    assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(c, hw.mac_linear_reference(cols, codes, dec))


def test_search_model_qps_feeds_the_integer_network():
    """Per-layer Algorithm 1 results (a JSON-able mapping) build the same network as the search itself."""
    torch.manual_seed(1)
    model = lowbit.models.build("lenet5").eval()
    qps = network.search_model_qps(model, weight_bits=2, option=5)
    assert list(qps) == [n for n, _ in lowbit.nn.quantizable_layers(model)]
    images = torch.randn(4, 1, 28, 28)
    hw_a, rep_a = network.to_shift_add(model, images, weight_bits=2, qps_fn=qps)
    hw_b, rep_b = network.to_shift_add(model, images, weight_bits=2)  # searches again
    assert [r["points"] for r in rep_a] == [r["points"] for r in rep_b]
    network.set_mode(hw_a, "int")
    network.set_mode(hw_b, "int")
    with torch.no_grad():
        assert torch.allclose(hw_a(images.double()), hw_b(images.double()), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no entry"):
        network.to_shift_add(model, images, weight_bits=2, qps_fn={"conv1": qps["conv1"]})
