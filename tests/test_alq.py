"""ALQ / STLQ: the one- and two-word log quantizers, the select tensor, NZR, per-tile selection,
the r1 penalty, STLQWeight, prepare_stlq and finetune (determinism, penalty effect, bad input)."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.alq import (R1Penalty, STLQWeight, finetune, fit_stlq_scale, in_two_word_set, log_points, log_quantize, nzr,
                        prepare_stlq, r1_penalty, select_second_words,
                        select_second_words_reference, set_deploy, stlq_quantize,
                        stlq_quantize_reference, two_word_log_points)
from lowbit.lsq import LSQQuantizer, qat_layers, train_qat

from qat_helpers import random_images, seeded_lenet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _w(shape=(8, 4, 3, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 0.1


def test_log_points_are_eq5():
    assert log_points(2).tolist() == [0.0, 1.0]
    assert log_points(4).tolist() == [0.0] + [2.0 ** -i for i in range(6, -1, -1)]
    p = log_points(3)
    assert set(two_word_log_points(3).tolist()) == {abs(a + b) for a in np.r_[-p, p] for b in np.r_[-p, p]}


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_log_quantize_is_the_nearest_level(bits):
    w = _w((4, 50))
    q = log_quantize(w, 0.3, bits)
    levels = torch.tensor(np.r_[-log_points(bits), log_points(bits)] * 0.3, dtype=torch.float64)
    d = (w.unsqueeze(-1) - levels).abs()
    assert torch.allclose((w - q).abs(), d.min(-1).values, atol=0, rtol=0)
    assert torch.isin(q, levels).all()


def test_log_quantize_ties_go_to_the_smaller_magnitude():
    x = torch.tensor([0.75, -0.75, 0.375, 0.0], dtype=torch.float64)  # midway between 1 and 0.5, etc.
    assert log_quantize(x, 1.0, 4).tolist() == [0.5, -0.5, 0.25, 0.0]


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 5), ratio=st.sampled_from([0.0, 0.05, 0.15, 0.5, 1.0]), tile=st.sampled_from([None, 4, 12]),
       seed=st.integers(0, 10_000), scale=st.floats(0.05, 0.5))
def test_stlq_equals_the_reference(bits, ratio, tile, seed, scale):
    w = _w((6, 4, 3, 1), seed)
    res = stlq_quantize(w, scale, bits, ratio, tile)
    ref = stlq_quantize_reference(w, scale, bits, ratio, tile)
    assert torch.equal(res.values, ref)
    # every output lies in SQ eq. 6's two-word log set, and the first word in eq. 5's
    mags = torch.tensor(two_word_log_points(bits)) * torch.tensor(scale, dtype=torch.float64)
    assert torch.isin(res.values.abs(), mags).all()
    assert torch.isin(res.first.abs(), torch.tensor(log_points(bits)) * torch.tensor(scale, dtype=torch.float64)).all()
    assert not (res.mask & ~res.selected).any()
    assert res.nzr == pytest.approx(float(res.mask.double().mean()))


def test_nzr_is_exactly_the_top_k_count_and_the_largest_errors_are_chosen():
    w = _w((16, 72))
    n = w.numel()
    for ratio in (0.05, 0.1, 0.15, 0.3):
        res = stlq_quantize(w, 0.25, 5, ratio)
        k = int(round(ratio * n))
        assert int(res.selected.sum()) == k and int(res.mask.sum()) == k  # 5-bit residuals never round to 0 here
        assert res.nzr == k / n
        err = (w - res.first).abs()
        assert err[res.selected].min() >= err[~res.selected].max()


def test_per_tile_masks_are_constant_within_a_tile():
    w = _w((8, 4, 3, 3))
    res = stlq_quantize(w, 0.2, 4, 0.25, tile=12)
    sel = res.selected.reshape(8, -1, 12)
    assert (sel.all(-1) | ~sel.any(-1)).all()
    assert int(sel.all(-1).sum()) == round(0.25 * 8 * 3)
    tiles_err = (w - res.first).abs().reshape(8, -1, 12).sum(-1)
    assert tiles_err[sel.all(-1)].min() >= tiles_err[~sel.all(-1)].max()


def test_select_ratio_zero_and_one_are_one_and_two_word_log():
    w = _w()
    assert torch.equal(stlq_quantize(w, 0.2, 4, 0.0).values, log_quantize(w, 0.2, 4))
    first = log_quantize(w, 0.2, 4)
    assert torch.equal(stlq_quantize(w, 0.2, 4, 1.0).values, first + log_quantize(w - first, 0.2, 4))


def test_ties_in_the_selection_go_to_the_lower_index():
    e = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert select_second_words(e, 0.4).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("kernel", [True, False], ids=["quickselect", "kthvalue"])
@pytest.mark.parametrize("tile", [None, 4])
def test_fast_selection_is_the_stable_sort(tile, kernel, monkeypatch):
    """The k-th largest (the compiled quickselect, or torch.kthvalue without the kernel) + first ties by
    index == the first k of a stable descending sort, for every k, on values with many ties (small
    integers, +-0.0) and on continuous ones, in float64 and float32."""
    from lowbit.alq import stlq_kernel

    if kernel and stlq_kernel.load() is None:
        pytest.skip("no C compiler")
    calls = []
    real = stlq_kernel.top_k_mask
    monkeypatch.setattr(stlq_kernel, "top_k_mask", lambda u, k: calls.append(k) or real(u, k))
    if not kernel:
        monkeypatch.setattr(stlq_kernel, "usable", lambda *t: False)
    g = torch.Generator().manual_seed(3)
    sign = torch.where(torch.rand(6, 16, generator=g) < 0.3, -1.0, 1.0).double()
    tied = torch.randint(0, 4, (6, 16), generator=g).double() * sign  # 0 * -1 = -0.0: both zeros occur
    assert (tied == 0).any() and torch.signbit(tied[tied == 0]).any()
    smooth = torch.rand(6, 16, generator=g, dtype=torch.float64)
    for e in (tied, smooth, tied.float(), smooth.float()):
        units = e.numel() if tile is None else e.numel() // tile
        for k in range(units + 1):
            r = k / units
            assert torch.equal(select_second_words(e, r, tile), select_second_words_reference(e, r, tile)), (k, tile)
    assert bool(calls) == kernel


def test_quickselect_on_a_large_tensor_with_ties_is_the_stable_sort():
    """The compiled top-k on a million values drawn from 50 levels (every partition full of ties)."""
    from lowbit.alq import stlq_kernel

    if stlq_kernel.load() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(5)
    e = torch.randint(0, 50, (1000, 1000), generator=g).float()
    for r in (0.01, 0.15, 0.999):
        assert torch.equal(select_second_words(e, r), select_second_words_reference(e, r))
    with pytest.raises(ValueError, match="0 < k"):
        stlq_kernel.top_k_mask(e.reshape(-1), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_fit_kernel_gives_the_torch_mse_and_scale(dtype):
    """The compiled STLQ words: each grid point's MSE of fit_stlq_scale equals the torch path's bit for
    bit, so the chosen scale is the same, and stlq_quantize's words, values and masks are the torch
    path's (signs of zeros included), for bits 2-8, select ratios 0 / 0.15 / 1, per element and per
    tile, per channel and per layer, conv, linear and 1-D weights with exact zeros."""
    from lowbit.alq import quantizers as qz, stlq_kernel

    if stlq_kernel.load() is None:
        pytest.skip("no C compiler")
    for shape, tiles in (((16, 8, 3, 3), (None, 4)), ((10, 12), (None, 3)), ((33,), (None,))):
        w = _w(shape, seed=len(shape), dtype=dtype)
        w.reshape(-1)[:5] = 0.0
        for bits in (2, 3, 5, 8):
            for ratio in (0.0, 0.15, 1.0):
                for tile in tiles:
                    for per_channel in (True, False):
                        got = qz.fit_stlq_scale_uncached(w, bits, ratio, tile, per_channel, backend="kernel")
                        want = qz.fit_stlq_scale_uncached(w, bits, ratio, tile, per_channel, backend="torch")
                        assert torch.equal(got, want), (shape, bits, ratio, tile, per_channel)
                        s = qz.check_scale(want * 0.83, w)
                        torch_path = qz._stlq(w, s, bits, ratio, tile, words=qz.two_words_torch)
                        assert qz._stlq_mse_kernel(w, s, bits, ratio, tile) == qz._mse(torch_path, w)
                        on_kernel = qz._stlq(w, s, bits, ratio, tile)
                        for field in ("values", "first", "second", "mask", "selected"):
                            assert torch.equal(getattr(on_kernel, field), getattr(torch_path, field)), field
                        words = zip(qz.two_words(w, s, bits), qz.two_words_torch(w, s, bits))
                        assert all(torch.equal(a, b) and torch.equal(a.signbit(), b.signbit()) for a, b in words)
    assert qz.fit_stlq_scale_uncached(w, 4, 0.15).dtype == dtype
    with pytest.raises(ValueError, match="backend must be one of"):
        qz.fit_stlq_scale_uncached(w, 4, 0.15, backend="gpu")
    with pytest.raises(ValueError, match="float32 or float64 weights on the CPU"):
        qz.fit_stlq_scale_uncached(w.half(), 4, 0.15, backend="kernel")


@pytest.mark.parametrize("tile", [None, 4])
def test_second_word_only_where_selected_is_every_residual_masked(tile):
    """stlq_quantize computes the second word on the selected entries only; with per-channel scales
    that equals quantizing every residual and masking (the plain form)."""
    w = _w((16, 36))
    s = fit_stlq_scale(w, 3, 0.2, tile)
    got = stlq_quantize(w, s, 3, 0.2, tile)
    first = log_quantize(w, s, 3)
    err = w - first
    plain = torch.where(got.selected, log_quantize(err, s, 3), torch.zeros_like(w))
    assert got.selected.sum() > 0 and torch.equal(got.second, plain) and torch.equal(got.values, first + plain)


def test_per_channel_scale_and_fit():
    w = _w((8, 36))
    s = fit_stlq_scale(w, 4, 0.15)
    assert s.shape == (8,) and (s > 0).all()
    best = float(((stlq_quantize(w, s, 4, 0.15).values - w) ** 2).mean())
    assert best <= float(((stlq_quantize(w, s * 1.3, 4, 0.15).values - w) ** 2).mean())
    assert best < float(((log_quantize(w, s, 4) - w) ** 2).mean())


def test_scale_fit_is_memoised_on_the_weight_bytes_and_settings(monkeypatch):
    """fit_stlq_scale fits the same weights and settings once (the runs of notebook 07 that start from one
    network); the memo's answer equals a fresh fit, a changed weight or setting is fitted afresh, and a
    caller changing its copy changes nothing."""
    from lowbit.alq import quantizers as qz

    calls = []
    real = qz.fit_stlq_scale_uncached
    monkeypatch.setattr(qz, "fit_stlq_scale_uncached", lambda *a: calls.append(a[1:]) or real(*a))
    w = _w((8, 36)) * 1.01  # a tensor no other test fits
    first = fit_stlq_scale(w, 4, 0.15)
    assert torch.equal(first, real(w, 4, 0.15, None, True)) and len(calls) == 1
    first.mul_(0)  # the caller's copy
    again = fit_stlq_scale(w.clone(), 4, 0.15)
    assert len(calls) == 1 and torch.equal(again, real(w, 4, 0.15, None, True))
    fit_stlq_scale(w, 4, 0.15, 4)
    fit_stlq_scale(w, 3, 0.15)
    changed = w.clone()
    changed[0, 0] += 1e-3
    assert torch.equal(fit_stlq_scale(changed, 4, 0.15), real(changed, 4, 0.15, None, True))
    assert calls == [(4, 0.15, None, True), (4, 0.15, 4, True), (3, 0.15, None, True), (4, 0.15, None, True)]


def test_bad_input_raises_clear_errors():
    w = _w()
    for ratio in (-0.1, 1.5, "a", True):
        with pytest.raises(ValueError, match="select_ratio"):
            stlq_quantize(w, 0.2, 4, ratio)
    with pytest.raises(ValueError, match="tile"):
        stlq_quantize(w, 0.2, 4, 0.1, tile=5)
    with pytest.raises(ValueError, match="bits"):
        stlq_quantize(w, 0.2, 1, 0.1)
    bad = w.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stlq_quantize(bad, 0.2, 4, 0.1)
    with pytest.raises(ValueError, match="scale"):
        stlq_quantize(w, -1.0, 4, 0.1)


# ----------------------------------------------------------------------------- STLQWeight and the penalty
def test_stlq_weight_forward_forms_and_straight_through_gradient():
    w = _w((8, 36), dtype=torch.float32).requires_grad_()
    q = STLQWeight(4, 0.15).initialize(w.detach())
    y = q(w)
    first = log_quantize(w.detach(), q.scale, 4)
    assert torch.equal(y, first + log_quantize(w.detach() - first, q.scale, 4))  # training: every second word
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q.deploy = True
    assert torch.equal(q(w), stlq_quantize(w.detach(), q.scale, 4, 0.15).values)


def test_penalty_is_the_l2_norm_outside_the_selection_and_zero_exactly_when_none_remains():
    w = _w((8, 36), dtype=torch.float32)
    q = STLQWeight(3, 0.2).initialize(w)
    on_grid = log_quantize(w, q.scale, 3).requires_grad_()
    q(on_grid)
    assert float(q.penalty(select=False)) == 0.0
    q.penalty(select=False).backward()
    assert torch.equal(on_grid.grad, torch.zeros_like(on_grid))
    ww = w.clone().requires_grad_()
    q(ww)
    r1 = q._r1.detach()
    outside = torch.where(q._selected, torch.zeros_like(r1), r1)
    assert float(q.penalty(True)) == pytest.approx(float(outside.norm()), rel=1e-6)
    assert float(q.penalty(False)) == pytest.approx(float(r1.norm()), rel=1e-6)
    q.penalty(True).backward()
    assert torch.allclose(ww.grad, outside / outside.norm(), atol=1e-7)
    # only selected weights off the grid: the select penalty is exactly zero
    first = log_quantize(w, q.scale, 3)
    mixed = torch.where(q._selected, w, first)
    q(mixed)
    assert float(q.penalty(True)) == 0.0 and float(q.penalty(False)) > 0


def _data(n=64, seed=0):
    return random_images(n, seed)


def _lenet(seed=0):
    return seeded_lenet(seed)


def test_prepare_stlq_leaves_input_untouched_and_quantizes_the_body():
    model, data = _lenet(), _data()
    before = copy.deepcopy(model.state_dict())
    q = prepare_stlq(model, 4, 4, 0.15, tile=5, calib=data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    roles = {n: (m.role, type(m.weight_quantizer).__name__, m.input_quantizer.bits) for n, m in qat_layers(q)}
    assert roles["conv1"] == ("first", "LSQQuantizer", 8) and roles["fc3"] == ("last", "LSQQuantizer", 8)
    for n in ("conv2", "fc1", "fc2"):
        assert roles[n] == ("body", "STLQWeight", 4)
    q(data.images[:4])
    assert 0 < nzr(q) <= 1 and float(r1_penalty(q)) > 0
    assert isinstance(q.fc3.weight_quantizer, LSQQuantizer)


def _finetune(lam, select=True, seed=0):
    data = _data()
    return finetune(_lenet(), data, _data(32, 1), w_bits=3, a_bits=3, select_ratio=0.2, lam=lam, tile=None,
                    select=select, epochs=2, batch_size=16, seed=seed, record_every=2, progress=False,
                    deploy_ratios=[0.1, 0.2])


def test_finetune_same_seed_same_curves_and_the_penalty_lowers_nzr():
    _, h1 = _finetune(3.0)
    _, h2 = _finetune(3.0)
    r1 = [r for e in h1 for r in e["records"]]
    assert r1 == [r for e in h2 for r in e["records"]]
    assert [r["iteration"] for r in r1] == [0, 2, 4, 6, 8]
    assert set(r1[0]["deployed"]) == {"0.1", "0.2"}
    _, h0 = _finetune(0.0)
    z0 = [r for e in h0 for r in e["records"]][-1]["nzr"]
    _, hn = _finetune(3.0, select=False)
    zn = [r for e in hn for r in e["records"]][-1]["nzr"]
    assert r1[-1]["nzr"] < z0  # the penalty drives second words to zero
    assert zn < r1[-1]["nzr"]  # and without the select tensor, further


def test_set_deploy_keeps_at_most_the_select_ratio():
    q = prepare_stlq(_lenet(), 4, 4, 0.15, calib=_data())
    q(_data().images[:2])
    full = nzr(q)
    set_deploy(q, True, 0.05)
    q(_data().images[:2])
    assert nzr(q) <= 0.05 + 1e-9 < full


def test_train_qat_hook_arguments_are_checked():
    q = prepare_stlq(_lenet(), 4, 4, 0.15, calib=_data())
    with pytest.raises(ValueError, match="record_every"):
        train_qat(q, _data(), _data(), 1, recorder=lambda m: {}, progress=False)
    with pytest.raises(ValueError, match="record_every"):
        train_qat(q, _data(), _data(), 1, recorder=lambda m: {}, record_every=0, progress=False)
    with pytest.raises(TypeError, match="penalty"):
        train_qat(q, _data(), _data(), 1, penalty=3.0, progress=False)
    with pytest.raises(ValueError, match="lam"):
        R1Penalty(-1.0)


def test_integer_network_is_bit_exact_on_a_deployed_lenet():
    from lowbit.alq.experiments.runs import integer_network_check
    data = _data()
    q = set_deploy(prepare_stlq(_lenet(), 4, 4, 0.15, calib=data), True)
    chk = integer_network_check(q, data.images[:16])
    assert [r["layer"] for r in chk["layers"]] == ["conv2", "fc1", "fc2"]
    assert all(r["exact"] for r in chk["layers"])
    assert max(r["max_abs_diff"] for r in chk["layers"]) < 1e-4
    assert chk["same_prediction"] == 1.0


def test_in_two_word_set_detects_an_off_grid_value():
    w = _w((8, 36))
    res = stlq_quantize(w, fit_stlq_scale(w, 4, 0.15), 4, 0.15)
    assert in_two_word_set(res)
    res.second[0, 0] = res.second[0, 0] + 1e-3
    res.values[0, 0] = res.first[0, 0] + res.second[0, 0]
    assert not in_two_word_set(res)


def test_claim_lines_without_an_nzr_crossing():
    from lowbit.alq.experiments.runs import claim_lines

    def rec(nzrs, acc=90.0):
        return {"records": [{"iteration": 10 * i, "accuracy": acc, "nzr": z, "deployed": {}} for i, z in enumerate(nzrs)],
                "deployed": {"0.15": {"accuracy": acc, "nzr": nzrs[-1]}, "0.05": {"accuracy": acc, "nzr": nzrs[-1]}},
                "fp_test_accuracy": 90.5}
    c = {"ratios": [0.05, 0.15], "tile": 8}
    runs = {(3, 0.05, True, None, 0): rec([0.3, 0.05]), (3, 0.15, True, None, 0): rec([0.3, 0.1]),
            (3, 0.15, False, None, 0): rec([0.3, 0.2], 89.0), (3, 0.15, True, 8, 0): rec([0.3, 0.15])}
    lines = claim_lines(runs, [3], c, [0])
    assert lines[0].startswith("False") and "never reaches" in lines[0]
    assert lines[1].startswith("True") and lines[2].startswith("True")
