"""lowbit.alq.hw: STLQ's fixed-point words, the bit-exact shift MAC and its cost model (ALQ, CVPR 2021)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.alq import hw
from lowbit.alq.quantizers import log_points, stlq_quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stlq(shape, bits, per_channel, tile, seed=0, ratio=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g, dtype=dtype)
    top = w.abs().reshape(shape[0], -1).amax(1) if per_channel else w.abs().max()
    return stlq_quantize(w, top * 0.7, bits, ratio, tile)


def _words(shape, bits=4, per_channel=True, tile=None, seed=0, ratio=0.3):
    r = _stlq(shape, bits, per_channel, tile, seed, ratio)
    return hw.encode_stlq(r.first, r.second, r.scale, bits), r


def _scale_view(words):
    return words.scale if words.scale.ndim == 0 else words.scale.reshape(-1, *([1] * (len(words.shape) - 1)))


# ----------------------------------------------------------------------------- words
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("tile", [None, 8])
def test_encode_decode_round_trip_and_integer_weights(bits, per_channel, tile):
    r = _stlq((6, 4, 2, 2), bits, per_channel, tile, seed=bits)
    words = hw.encode_stlq(r.first, r.second, r.scale, bits)
    exact = r.first.double() + r.second.double()
    assert words.E == 2 ** (bits - 1) - 2 and words.shape == r.first.shape
    assert torch.equal(hw.decode_stlq(words), exact)
    assert torch.equal(words.has2, r.mask)
    w_int = hw.integer_weights(words)
    assert w_int.dtype == torch.int64
    assert torch.equal(_scale_view(words) * w_int.double() * 2.0 ** -words.E, exact)
    # the words are the grid indices: |first| = scale * 2^(shift1 - E), sign included
    sv = _scale_view(words)
    p1 = torch.where(words.shift1 >= 0, 2.0 ** (words.shift1 - words.E).double(), torch.zeros((), dtype=torch.float64))
    assert torch.equal(words.sign1 * sv * p1, r.first.double())


def test_word_fields_by_hand():
    # bits 3: N = 4, E = 2, p in {0, 1/4, 1/2, 1}: shifts 0, 1, 2 and -1 for zero
    s = 0.5
    first = torch.tensor([[s, -s / 2, s / 4, 0.0]])
    second = torch.tensor([[s / 4, 0.0, -s / 4, 0.0]])
    words = hw.encode_stlq(first, second, s, 3)
    assert words.shift1.tolist() == [[2, 1, 0, -1]] and words.sign1.tolist() == [[1, -1, 1, 1]]
    assert words.shift2.tolist() == [[0, -1, 0, -1]] and words.sign2.tolist() == [[1, 1, -1, 1]]
    assert words.has2.tolist() == [[True, False, True, False]]
    assert hw.integer_weights(words).tolist() == [[4 + 1, -2, 1 - 1, 0]]
    walk = hw.stlq_product(3, words, (0, 0))
    assert (walk["word1"], walk["word2"], walk["product"], walk["w_int"]) == (12, 3, 15, 5)
    assert hw.stlq_product(-3, words, 1)["product"] == 6  # flat index, signed activation


def test_encode_rejects_off_grid_values_and_names_the_first():
    s = 1.0
    first = torch.tensor([[1.0, 0.5, 0.3, 0.7]])
    with pytest.raises(ValueError, match=r"first\[0, 2\] = 0\.3"):
        hw.encode_stlq(first, torch.zeros_like(first), s, 4)
    with pytest.raises(ValueError, match="second"):  # 2^-7 is below bits 4's smallest point 2^-6
        hw.encode_stlq(torch.ones(1, 2), torch.tensor([[0.0, 2.0 ** -7]]), s, 4)
    with pytest.raises(ValueError):  # 2 * scale is above the largest point
        hw.encode_stlq(torch.tensor([[2.0]]), torch.zeros(1, 1), s, 4)
    with pytest.raises(ValueError):  # the right grid but the wrong scale
        hw.encode_stlq(torch.tensor([[0.5]]), torch.zeros(1, 1), 0.7, 4)


@pytest.mark.parametrize("bad", [
    dict(bits=1), dict(bits=9), dict(bits=2.5),
    dict(first=torch.tensor([[float("nan")]])),
    dict(second=torch.zeros(1, 2)),
    dict(scale=torch.ones(3)), dict(scale=0.0), dict(scale=float("nan")),
])
def test_encode_rejects_bad_input(bad):
    args = dict(first=torch.tensor([[0.5]]), second=torch.zeros(1, 1), scale=1.0, bits=4) | bad
    with pytest.raises(ValueError):
        hw.encode_stlq(**args)


def test_encode_rejects_non_float_words():
    with pytest.raises(TypeError):
        hw.encode_stlq(torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, 1), 1.0, 4)
    with pytest.raises(TypeError):
        hw.encode_stlq([[0.5]], torch.zeros(1, 1), 1.0, 4)


def test_words_are_checked_on_construction():
    words, _ = _words((2, 8))
    with pytest.raises(ValueError):  # has2 inconsistent with shift2
        hw.STLQWords(words.sign1, words.shift1, words.sign2, words.shift2, ~words.has2, 4, words.scale, words.E)
    with pytest.raises(ValueError):  # E must be N - 2
        hw.STLQWords(words.sign1, words.shift1, words.sign2, words.shift2, words.has2, 4, words.scale, 7)
    with pytest.raises(ValueError):  # shift above E
        hw.STLQWords(words.sign1, words.shift1 + 7, words.sign2, words.shift2, words.has2, 4, words.scale, words.E)


def test_integer_weights_refuses_what_int64_cannot_hold():
    first = torch.ones(1, 2, dtype=torch.float64)
    words = hw.encode_stlq(first, first, 1.0, 8)  # 2^126 + 2^126
    with pytest.raises(ValueError, match="int64"):
        hw.integer_weights(words)
    assert torch.equal(hw.decode_stlq(words), 2 * first)
    with pytest.raises(ValueError, match="overflow"):
        hw.stlq_mac_linear(torch.ones(1, 2, dtype=torch.int64), words)


# ----------------------------------------------------------------------------- MAC
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 5), per_channel=st.booleans(),
       b=st.integers(1, 3), o=st.integers(1, 4), k=st.integers(1, 12), signed=st.booleans())
def test_mac_linear_equals_reference_and_matmul(seed, bits, per_channel, b, o, k, signed):
    words, _ = _words((o, k), bits, per_channel, seed=seed, ratio=0.5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128 if signed else 0, 256, (b, k), generator=g)
    out = hw.stlq_mac_linear(x, words)
    assert out.dtype == torch.int64 and out.shape == (b, o)
    assert torch.equal(out, hw.stlq_mac_linear_reference(x, words))
    assert torch.equal(out, x @ hw.integer_weights(words).T)
    assert torch.equal(hw.stlq_mac_linear(x, words, max_elements=7), out)  # chunked over rows and channels


@pytest.mark.parametrize("stride,padding,pad_value", [(1, 0, 0), (2, 1, 0), ((1, 2), (2, 0), 0), (1, 1, 5)])
@pytest.mark.parametrize("tile", [None, 9])
def test_mac_conv2d_equals_reference_and_conv2d(stride, padding, pad_value, tile):
    words, _ = _words((3, 2, 3, 3), 4, True, tile, seed=7, ratio=0.4)
    x = torch.randint(0, 16, (2, 2, 6, 5), generator=torch.Generator().manual_seed(1))
    out = hw.stlq_mac_conv2d(x, words, stride, padding, pad_value)
    assert torch.equal(out, hw.stlq_mac_conv2d_reference(x, words, stride, padding, pad_value))
    assert torch.equal(hw.stlq_mac_conv2d(x, words, stride, padding, pad_value, max_elements=40), out)
    xp = F.pad(x.double(), (padding[1], padding[1], padding[0], padding[0]) if isinstance(padding, tuple)
               else (padding,) * 4, value=float(pad_value))
    assert torch.equal(out.double(), F.conv2d(xp, hw.integer_weights(words).double(), stride=stride))


def test_mac_output_dequantizes_to_the_float_layer():
    words, r = _words((4, 3, 3, 3), 5, True, None, seed=3)
    x = torch.randint(0, 16, (1, 3, 5, 5), generator=torch.Generator().manual_seed(2))
    acc = hw.stlq_mac_conv2d(x, words, padding=1)
    ref = F.conv2d(x.double(), r.first.double() + r.second.double(), padding=1)
    got = acc.double() * words.scale.reshape(1, -1, 1, 1) * 2.0 ** -words.E
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_mac_rejects_bad_input():
    words, _ = _words((3, 8))
    with pytest.raises(ValueError, match="integers"):
        hw.stlq_mac_linear(torch.ones(2, 8), words)
    with pytest.raises(ValueError):
        hw.stlq_mac_linear(torch.ones(2, 7, dtype=torch.int64), words)
    with pytest.raises(ValueError):
        hw.stlq_mac_conv2d(torch.ones(1, 3, 4, 4, dtype=torch.int64), words)  # linear words
    conv, _ = _words((2, 3, 3, 3))
    with pytest.raises(ValueError):
        hw.stlq_mac_conv2d(torch.ones(1, 2, 4, 4, dtype=torch.int64), conv)  # channels
    with pytest.raises(ValueError):
        hw.stlq_mac_conv2d(torch.ones(1, 3, 2, 2, dtype=torch.int64), conv)  # kernel larger than input
    with pytest.raises(ValueError):
        hw.stlq_mac_conv2d(torch.ones(1, 3, 4, 4, dtype=torch.int64), conv, stride=0)
    with pytest.raises(TypeError):
        hw.stlq_mac_linear(torch.ones(2, 8, dtype=torch.int64), "words")
    with pytest.raises(ValueError):
        hw.stlq_product(1.5, words, 0)
    with pytest.raises(ValueError):
        hw.stlq_product(1, words, 24)


# ----------------------------------------------------------------------------- cost model
def test_two_cycle_fraction_by_hand():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0],
                         [0, 0, 0, 0, 0, 0, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert hw.two_cycle_fraction(mask, 4) == 2 / 6  # groups: [1,0], [0,1], [0,0]
    assert hw.two_cycle_fraction(mask, 2) == 2 / 12
    assert hw.two_cycle_fraction(mask, 8) == 2 / 3
    assert hw.two_cycle_fraction(mask, 1) == float(mask.double().mean())
    assert hw.two_cycle_fraction(mask.reshape(3, 2, 2, 2), 4) == 2 / 6  # conv weights: (O, K) view
    with pytest.raises(ValueError):
        hw.two_cycle_fraction(mask, 3)
    with pytest.raises(ValueError):
        hw.two_cycle_fraction(mask, 0)


def test_per_tile_fraction_is_the_nzr_of_selected_tiles():
    r = _stlq((8, 4, 2, 2), 4, True, 8, seed=5, ratio=0.25)
    f_selected = hw.two_cycle_fraction(r.selected, 8)
    assert f_selected == float(r.selected.double().mean()) == 0.25  # tile == lanes: f = NZR exactly
    f_mask = hw.two_cycle_fraction(r.mask, 8)  # a selected residual may round to 0: NZR <= f
    assert r.nzr <= f_mask <= f_selected
    assert hw.stlq_mac_cost(nzr=0.25, lanes=8, per_tile=True)["b_two_cycle_fraction"] == 0.25


def test_random_placement_fraction_is_close_to_the_formula():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(256, 512, generator=g) < 0.1
    f = hw.two_cycle_fraction(mask, 8)
    assert abs(f - hw.stlq_mac_cost(nzr=0.1, lanes=8)["b_two_cycle_fraction"]) < 0.01


def test_cost_formulas():
    c = hw.stlq_mac_cost(w_bits=4, a_bits=4, nzr=0.0, lanes=8, guard_bits=10)
    # 4 bits: N = 8 cases (shifts 6..0 and zero), k = 4 + 6 = 10: 10 * 7 2:1 MUXes of 3 gates
    assert (c["E"], c["shifter_cases"], c["shifter_width"], c["shifter_mux2"]) == (6, 8, 10, 70)
    assert c["shifter_gates"] == 210 and c["a_shifters_gates"] == 420
    assert c["acc_gates"] == (10 + 1 + 10) * 7
    assert c["a_mac_gates"] == 420 + (10 * 7 + 10 * 2) + 11 * 2 + c["acc_gates"]
    assert c["b_mac_gates"] == 210 + 4 * 3 + 10 * 2 + c["acc_gates"]
    assert c["a_mac_gates"] > c["b_mac_gates"]
    assert c["b_cycles_per_mac"] == 1.0 and c["a_cycles_per_mac"] == 1.0
    assert c["b_gate_cycles_per_mac"] == c["b_mac_gates"]
    assert c["storage_bits_per_weight"] == 4 + 1
    c = hw.stlq_mac_cost(nzr=0.1, lanes=4, per_tile=True)
    assert c["flag_bits_per_weight"] == 0.25 and math.isclose(c["storage_bits_per_weight"], 4 + 0.4 + 0.25)
    c = hw.stlq_mac_cost(nzr=0.1, lanes=4)
    assert math.isclose(c["b_cycles_per_mac"], 1 + 1 - 0.9 ** 4)
    assert hw.stlq_mac_cost(two_cycle_fraction=0.3)["b_cycles_per_mac"] == 1.3


def test_cost_grows_with_nzr_and_two_shifters_cost_more_gates():
    for wb in (2, 3, 4, 5):
        for ab in (4, 8):
            cyc = [hw.stlq_mac_cost(wb, ab, nzr)["b_cycles_per_mac"] for nzr in (0.0, 0.05, 0.15, 0.3, 1.0)]
            assert cyc[0] == 1.0 and cyc[-1] == 2.0 and all(a < b for a, b in zip(cyc, cyc[1:]))
            tile = [hw.stlq_mac_cost(wb, ab, nzr, per_tile=True)["b_cycles_per_mac"] for nzr in (0.0, 0.15, 0.3)]
            assert tile == [1.0, 1.15, 1.3]
            c = hw.stlq_mac_cost(wb, ab, 0.15)
            assert c["a_mac_gates"] > c["b_mac_gates"]
            assert c["a_gate_cycles_per_mac"] == c["a_mac_gates"]
            assert c["shifter_cases"] == len(log_points(wb))


@pytest.mark.parametrize("bad", [dict(w_bits=1), dict(w_bits=9), dict(a_bits=0), dict(nzr=-0.1), dict(nzr=1.5),
                                 dict(nzr=float("nan")), dict(lanes=0), dict(lanes=2.0),
                                 dict(two_cycle_fraction=2.0), dict(guard_bits=-1), dict(per_tile="yes")])
def test_cost_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        hw.stlq_mac_cost(**bad)
