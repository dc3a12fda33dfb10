"""Model-level PTQ: BN folding, first/last-layer precision, activation quantization, SQ's final
optimisation (refinement), input model untouched, 8-bit sanity on resnet20, bad input."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit import models
from lowbit.sq.quantizers import qps


def _randomise_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return _randomise_bn(models.build("resnet20"))


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return models.build("lenet5").eval()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- BN folding
def test_fold_bn_preserves_fp_outputs(resnet20):
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = _params(resnet20)
    folded = lowbit.nn.fold_bn(resnet20)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), resnet20(x), atol=1e-5, rtol=1e-5)
    after = _params(resnet20)
    assert all(torch.equal(before[k], after[k]) for k in before)  # input model untouched


def test_fold_bn_registration_fallback_matches_fx(resnet20):
    from lowbit.nn.fold_bn import _pairs_fx, _pairs_registration

    assert _pairs_fx(resnet20) == _pairs_registration(resnet20)
    assert len(_pairs_fx(resnet20)) == 19  # conv1 + 18 block convs each have a BN


def test_quantizable_layers_forward_order(resnet20, lenet):
    names = [n for n, _ in lowbit.nn.quantizable_layers(resnet20)]
    assert names[0] == "conv1" and names[-1] == "fc" and len(names) == 20
    assert [n for n, _ in lowbit.nn.quantizable_layers(lenet)] == ["conv1", "conv2", "fc1", "fc2", "fc3"]


# ----------------------------------------------------------------------------- quantize_model
@pytest.mark.parametrize("method", ["uniform", "log2", "two_word_log", "apot"])
def test_first_last_layers_at_first_last_bits(lenet, method):
    q = lowbit.quantize_model(lenet, method, 3, first_last_bits=6)
    layers = lowbit.nn.quantized_layers(q)
    for name, layer in layers:
        fq = layer.quantizer
        if name in ("conv1", "fc3"):
            assert (fq.method, fq.bits) == ("uniform", 6)
            # per output channel at most 2 * 2^(6-1) - 1 = 63 distinct levels, all on the 6-bit grid
            w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
            s = torch.as_tensor(fq.scale).reshape(-1, 1)
            codes = w / s * (len(qps("uniform", 6)) - 1)
            assert torch.allclose(codes, codes.round(), atol=1e-4)
            assert codes.abs().max() <= 31 + 1e-6
        else:
            assert (fq.method, fq.bits) == (method, 3)


def test_input_model_unchanged_and_output_is_new_module(lenet):
    before = _params(lenet)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    q = lowbit.quantize_model(lenet, "apot", 3, a_bits=4, calib=x, refine=True)
    after = _params(lenet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert q is not lenet and not any(isinstance(m, lowbit.nn.ActQuantizer) for m in lenet.modules())
    assert all(p.requires_grad for p in lenet.parameters())


def test_activation_quantizers_unsigned_and_calibrated(lenet):
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    q = lowbit.quantize_model(lenet, "uniform", 4, a_bits=3, calib=x)
    acts = [(n, m) for n, m in q.named_modules() if isinstance(m, lowbit.nn.ActQuantizer)]
    assert [n for n, _ in acts] == ["relu1.act", "relu2.act", "relu3.act", "relu4.act"]
    assert [m.bits for _, m in acts] == [3, 3, 3, 8]  # the ReLU feeding the classifier at 8 bits
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o)) for n, m in acts]
    with torch.no_grad():
        q(x[:16])
    for h in hooks:
        h.remove()
    for n, m in acts:
        codes = seen[n] / m.step
        assert (codes >= 0).all() and (codes <= 2 ** m.bits - 1 + 1e-4).all()
        assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_act_quantizer_mse_step_beats_max_step():
    a = lowbit.nn.ActQuantizer(3)
    x = torch.relu(torch.randn(10_000, generator=torch.Generator().manual_seed(4))) ** 2
    step = a.calibrate(x)
    max_step = float(x.max()) / 7
    mse = lambda s: float(((a.quantize(x, s) - x) ** 2).mean())  # noqa: E731
    assert step < max_step and mse(step) <= mse(max_step)


def test_refine_lowers_layer_reconstruction_error(lenet):
    x = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    plain = lowbit.quantize_model(lenet, "uniform", 2)
    refined = lowbit.quantize_model(lenet, "uniform", 2, calib=x, refine=True)
    fp = lowbit.nn.fold_bn(lenet)
    with torch.no_grad():
        err = lambda m: float(((m(x) - fp(x)) ** 2).mean())  # noqa: E731
        assert err(refined) < err(plain)
    for name, layer in lowbit.nn.quantized_layers(refined):
        assert layer.refine_info["loss_drop"] >= 0
        # refined weights still lie in the layer's QPS times its (new) scales
        fq = layer.quantizer
        w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        s = torch.as_tensor(fq.scale, dtype=torch.float64).reshape(-1, 1, 1)
        levels = torch.as_tensor(np.asarray(fq.points))
        assert ((w.abs().unsqueeze(-1) - s * levels).abs().amin(-1) <= 1e-5 * s[:, :, 0]).all()


def test_refine_rounding_is_a_local_optimum_and_never_worse():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    g, cw = x.T @ x / 200, w @ (x.T @ x / 200).T
    p, s = qps("uniform", 2 + 1), torch.full((3,), 0.6, dtype=torch.float64)
    loss = lambda q: ((q @ g) * q).sum(1) - 2 * (q * cw).sum(1)  # noqa: E731
    nearest = lowbit.core.points.quantize_to_points(w, p, s, dim=0)
    q = lowbit.sq.refine.refine_rounding(w, p, s, g, cw, sweeps=10)
    assert (loss(q) <= loss(nearest) + 1e-12).all()
    # reference check: no single entry can move to its other QPS neighbour and lower the loss
    for c in range(3):
        for k in range(5):
            u = abs(float(w[c, k])) / 0.6
            lo = max(v for v in p if v <= u + 1e-12) if u >= p[0] else p[0]
            hi = min((v for v in p if v > lo), default=lo)
            for alt in (lo, hi):
                q2 = q.clone()
                q2[c, k] = np.sign(float(w[c, k])) * 0.6 * alt
                assert float(loss(q2)[c]) >= float(loss(q)[c]) - 1e-12


def test_calib_accepts_tensor_dataset_and_loader(lenet):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    ds = TensorDataset(x, torch.zeros(32, dtype=torch.long))
    for calib in (x, ds, DataLoader(ds, batch_size=8)):
        assert torch.equal(lowbit.nn.calibration_tensor(calib), x)
    q = lowbit.quantize_model(lenet, "log2", 4, a_bits=8, calib=DataLoader(ds, batch_size=8))
    assert torch.isfinite(q(x)).all()


def test_summary_table(lenet):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    table = lowbit.sq.ptq.summary(lowbit.quantize_model(lenet, "apot", 4, a_bits=4, calib=x))
    assert {"layer", "method", "bits", "qps", "scale_min", "scale_max", "weight_mse"} <= set(table.columns)
    weights = table[table.kind != "ActQuantizer"]
    assert list(weights.method) == ["uniform", "apot", "apot", "apot", "uniform"]
    assert (weights.weight_mse > 0).all() and (weights.scale_min <= weights.scale_max).all()
    assert len(table) == 5 + 4


def test_torchvision_resnet18_random_init():
    torch.manual_seed(0)
    r18 = _randomise_bn(models.build("resnet18"))
    q = lowbit.quantize_model(r18, "log2", 4, granularity="layer")  # per-layer scales: fast on 11M weights
    layers = lowbit.nn.quantized_layers(q)
    assert len(layers) == 21 and layers[0][1].quantizer.bits == 8 and layers[-1][1].quantizer.bits == 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.isfinite(q(x)).all() and q(x).shape == (2, 10)  # lowbit.models.build: 10 classes


def test_resnet20_w8a8_within_half_a_point_of_fp():
    try:
        fp = models.load_pretrained("resnet20", "fashion-mnist")
    except FileNotFoundError:
        pytest.skip("resnet20-fashion-mnist.pt not trained yet (make baselines)")
    from lowbit import data, evaluate

    test = data.load_dataset("fashion-mnist", "test")
    test = data.TensorImageDataset(test.images[:1000], test.labels[:1000])
    calib = data.calibration_subset(data.load_dataset("fashion-mnist", "train"), 128, seed=0)
    q = lowbit.quantize_model(fp, "uniform", 8, a_bits=8, calib=calib)
    assert abs(evaluate.accuracy(q, test) - evaluate.accuracy(fp, test)) <= 0.5


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"method": "ternary", "w_bits": 4}, "unknown method"),
    ({"method": "uniform", "w_bits": 1}, "w_bits"),
    ({"method": "uniform", "w_bits": "4"}, "w_bits"),
    ({"method": "sq", "w_bits": 6}, "SQ bits"),
    ({"method": "uniform", "w_bits": 4, "a_bits": 4}, "calib"),
    ({"method": "uniform", "w_bits": 4, "refine": True}, "calib"),
    ({"method": "uniform", "w_bits": 4, "refine": "adaround", "calib": torch.zeros(2, 1, 28, 28)}, "refine"),
    ({"method": "uniform", "w_bits": 4, "first_last_bits": 0}, "first_last_bits"),
    ({"method": "uniform", "w_bits": 4, "granularity": "tensor"}, "granularity"),
])
def test_bad_arguments_raise_valueerror(lenet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.quantize_model(lenet, **kwargs)


# ----------------------------------------------------------------------------- fast paths vs references
@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1),
    nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
    nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(3, 4, 1),
])
def test_rows_at_gathers_the_same_rows_as_im2col(conv):
    x = torch.randn(5, 3, 9, 8, generator=torch.Generator().manual_seed(2))
    full = lowbit.nn.im2col.layer_rows(conv, x)
    assert lowbit.nn.im2col.n_rows(conv, x) == len(full)
    idx = torch.randperm(len(full), generator=torch.Generator().manual_seed(3))[:57]
    assert torch.equal(lowbit.nn.im2col.rows_at(conv, x, idx), full[idx])
    fc, xf = nn.Linear(6, 2), torch.randn(4, 6)
    assert torch.equal(lowbit.nn.im2col.rows_at(fc, xf, torch.tensor([3, 0, 2])), lowbit.nn.im2col.layer_rows(fc, xf)[[3, 0, 2]])


def test_gram_fast_path_equals_reference(resnet20):
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    q = lowbit.quantize_model(resnet20, "uniform", 3, a_bits=4, calib=x)
    fp = lowbit.nn.fold_bn(resnet20)
    names = [n for n, _ in lowbit.nn.quantized_layers(q)]
    store = lowbit.nn.all_layer_inputs(fp, names, x, batch_size=16)
    assert lowbit.nn.all_layer_inputs(fp, names, x, batch_size=16, max_bytes=1000) is None  # over budget
    for j, name in enumerate(names[:3] + names[-2:]):
        ql, fl = q.get_submodule(name), fp.get_submodule(name)
        ref = lowbit.sq.refine.gram_reference(q, ql, fp, fl, x, 3000, j, 16)  # subsamples rows of every conv
        for inputs in (store[name], None):
            fast = lowbit.sq.refine.gram(q, ql, fp, fl, x, 3000, j, 16, inputs)
            assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1]) and fast[2] == ref[2]


def test_act_quantize_in_place_equals_reference():
    aq = lowbit.nn.ActQuantizer(3)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5)).abs() * 3
    for step in (0.1, 0.37, torch.tensor(0.05)):
        assert torch.equal(aq.quantize(x, step), aq.quantize_reference(x, step))
    xg = x.clone().requires_grad_(True)
    aq.quantize(xg, 0.2).sum().backward()  # autograd path (no in-place ops) still works
    assert xg.grad is not None


def test_prime_sq_gives_the_same_quantizer_as_fit_quantizer(lenet):
    fresh = lowbit.quantize_model(lenet, "sq", 2, universal=1)  # its own FitCache: nothing shared
    fits = lowbit.sq.FitCache()
    assert fits.prime_sq(lenet, 2, universal=1, tag=None) == 3  # conv2, fc1, fc2
    assert len(fits) == 3
    primed = lowbit.quantize_model(lenet, "sq", 2, universal=1, fits=fits)
    assert len(fits) == 5  # + first and last (8-bit uniform) fitted on demand
    for (name, a), (_, b) in zip(lowbit.nn.quantized_layers(fresh), lowbit.nn.quantized_layers(primed)):
        assert np.array_equal(a.quantizer.points, b.quantizer.points), name
        assert torch.equal(torch.as_tensor(a.quantizer.scale), torch.as_tensor(b.quantizer.scale)), name
        assert torch.equal(a.weight, b.weight), name


def test_config_and_keyword_forms_agree(lenet):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    a = lowbit.quantize_model(lenet, "uniform", 3, a_bits=4, calib=x)
    b = lowbit.quantize_model(lenet, config=lowbit.PTQConfig("uniform", 3, a_bits=4), calib=x)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(TypeError, match="either config"):
        lowbit.quantize_model(lenet, "uniform", 3, config=lowbit.PTQConfig("uniform", 3))
    with pytest.raises(TypeError, match="unknown quantize_model option"):
        lowbit.quantize_model(lenet, "uniform", 3, refien=True)


def test_refine_is_deterministic_for_a_seed(lenet):
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    a = lowbit.quantize_model(lenet, "uniform", 3, a_bits=4, calib=x, refine=True, seed=2, max_rows=500)
    b = lowbit.quantize_model(lenet, "uniform", 3, a_bits=4, calib=x, refine=True, seed=2, max_rows=500)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_quantize_model_reproduces_the_search_loss_on_degenerate_channels():
    # issue 10 defect 1: all-zero, constant and single-weight output channels; the quantized model's
    # weights give back the SQ search's loss exactly (float64 model: no cast in between)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 4 * 4, 3)).double()
    with torch.no_grad():
        w = model[2].weight
        w[0] = 0.0  # all-zero channel
        w[1] = 0.37  # constant channel
        w[2] = 0.0
        w[2, 1, 1, 1] = -0.8  # a single non-zero weight
        w[3, 0, 0, 0] = 0.0  # an exact zero in an ordinary channel
    q = lowbit.quantize_model(model, "sq", 2, fold=False)
    body = dict(lowbit.nn.quantized_layers(q))["2"]
    err = ((body.weight - body.weight_fp) ** 2).reshape(5, -1).sum(1)
    res = lowbit.search_qps(model[2].weight.detach(), 2)
    assert torch.allclose(err, torch.as_tensor(res.channel_losses), rtol=1e-12, atol=0)
    assert float(err.sum()) == pytest.approx(body.quantizer.info["search_loss"], rel=1e-12)
    assert float(err[0]) == 0.0 and float(torch.as_tensor(body.quantizer.scale)[0]) == 0.0
    assert torch.all(body.weight[0] == 0)


def _refine_problem(seed: int, c: int, k: int):
    """A layer's reconstruction problem as refine_layer builds it: correlated inputs, FP rows near the QPS."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(4 * k, k, generator=gen, dtype=torch.float64) @ mix
    xq = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)  # the quantized network's inputs
    g, cmat = xq.T @ xq / len(x), xq.T @ x / len(x)
    w = torch.randn(c, k, generator=gen, dtype=torch.float64) * torch.rand(c, 1, generator=gen, dtype=torch.float64)
    return w, g, w @ cmat.T


@pytest.mark.parametrize("method,bits", [("uniform", 3), ("log2", 3), ("apot", 4)])
@pytest.mark.parametrize("backend", ["torch", "kernel"])
def test_refine_scales_fast_path_chooses_the_reference_scales_and_loss(method, bits, backend):
    points = qps(method, bits)
    for seed, (c, k) in enumerate([(6, 9), (16, 72), (32, 144)]):
        w, g, cw = _refine_problem(seed, c, k)
        scale = w.abs().amax(1) / max(points)
        for multipliers in (None, [1.3, 0.7, 0.9, 1.1, 0.55]):  # unsorted, without 1: the reference still starts at 1
            s_ref, l_ref = lowbit.sq.refine.refine_scales_reference(w, points, scale, g, cw, multipliers)
            s_fast, l_fast = lowbit.sq.refine.refine_scales(w, points, scale, g, cw, multipliers, backend=backend)
            assert torch.equal(s_fast, s_ref) and torch.equal(l_fast, l_ref)
        assert not torch.equal(s_ref, scale)  # the search moved some scale: the comparison is not vacuous
    with pytest.raises(ValueError, match="multipliers must be a non-empty list"):
        lowbit.sq.refine.refine_scales(w, points, scale, g, cw, [1.0, -0.5], backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        lowbit.sq.refine.refine_scales(w, points, scale, g, cw, backend="gpu")
    with pytest.raises(ValueError, match="needs float64 CPU tensors"):
        lowbit.sq.refine.refine_scales(w.float(), points, scale.float(), g.float(), cw.float(), backend="kernel")


@pytest.mark.parametrize("threads,block", [(1, 2048), (1, 7), (3, 2048), (3, 1)])
def test_scale_walk_kernel_walks_the_torch_indices_and_losses(threads, block):
    """The compiled walk of refine_scales (rows split over threads, z @ G updated by column blocks) ends on
    the torch walk's point indices and gives its losses at every multiplier up to summation order."""
    from lowbit.sq import refine, refine_kernel

    w, g, cw = _refine_problem(7, 20, 90)
    points = qps("apot", 4)
    p = torch.as_tensor(np.unique(points), dtype=torch.float64)
    mids, s = (p[1:] + p[:-1]) / 2, w.abs().amax(1) / max(points)
    s[3] = 0.0  # an all-zero scale maps its row to index 0 at every multiplier
    tried = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.5, 1.5, 51, dtype=torch.float64)])
    order = torch.argsort(tried, stable=True)
    want = refine._scale_walk_torch(w.abs(), lowbit.core.points.sgn(w), p, mids, s, tried, order, g, cw)
    walk = tried[order]
    idx = refine._point_index(w.abs(), mids, (s * walk[0]).reshape(-1, 1)).to(torch.int32)
    gz = (lowbit.core.points.sgn(w) * p[idx.long()]) @ g
    got = refine_kernel.scale_walk(w.abs(), lowbit.core.points.sgn(w), p, mids, s, walk, g, cw, idx, gz,
                                   threads=threads, block=block)
    assert torch.allclose(got, want[order], rtol=1e-12, atol=1e-12)
    assert torch.equal(idx.long(), refine._point_index(w.abs(), mids, (s * walk[-1]).reshape(-1, 1)))
    wrong = idx.clone()
    wrong[0, 0] += 1
    with pytest.raises(RuntimeError, match="differ from torch's"):
        refine_kernel.scale_walk(w.abs(), lowbit.core.points.sgn(w), p, mids, s, walk, g, cw, wrong,
                                 gz.clone(), threads=threads, block=block)


@pytest.mark.parametrize("block,backend", [(1, "torch"), (5, "torch"), (64, "torch"), (1000, "torch"), (1, "kernel"),
                                           (5, "kernel"), (64, "kernel"), (1000, "kernel")])
def test_refine_rounding_fast_path_gives_the_reference_rows(block, backend):
    for seed, (c, k, method, bits) in enumerate([(8, 27, "uniform", 3), (24, 144, "apot", 4), (16, 200, "uniform", 2)]):
        w, g, cw = _refine_problem(10 + seed, c, k)
        points = qps(method, bits)
        scale = w.abs().amax(1) / max(points) * 0.8
        ref = lowbit.sq.refine.refine_rounding_reference(w, points, scale, g, cw, sweeps=4)
        fast = lowbit.sq.refine.refine_rounding(w, points, scale, g, cw, sweeps=4, block=block, backend=backend)
        assert torch.equal(fast, ref)
        assert not torch.equal(ref, lowbit.core.points.quantize_to_points(w, points, scale, dim=0))  # it moved weights
    with pytest.raises(ValueError, match="block must be an integer >= 1"):
        lowbit.sq.refine.refine_rounding(w, points, scale, g, cw, block=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        lowbit.sq.refine.refine_rounding(w, points, scale, g, cw, backend="gpu")
    with pytest.raises(ValueError, match="needs float64 CPU tensors"):
        lowbit.sq.refine.refine_rounding(w.float(), points, scale.float(), g.float(), cw.float(), backend="kernel")
