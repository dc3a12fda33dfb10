"""SQ's final optimisation: per-layer output reconstruction with the layer's own QPS.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(SQ, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), sec. 4.1 "final optimization" (supplement Table 2 last row): with the calibration
set, re-fit each layer's per-channel scales (weights re-map to other points of the *same* QPS)
to minimise the reconstruction error of the layer's output, then choose per weight between its
two neighbouring QPS points (AdaRound-style up/down rounding, Nagel, Amjad, van Baalen, Louizos,
Blankevoort, *Up or Down? Adaptive Rounding for Post-Training Quantization*, ICML 2020) by exact
coordinate descent on the same quadratic. Layers are processed in order and each sees the inputs
produced by the already-quantized layers before it (as in AdaRound/BRECQ).

For output channel ``c`` with FP weight row ``w`` and quantized row ``q``, inputs ``X_q``
(quantized network) and ``X`` (FP network), unfolded to rows:
``||X_q q - X w||^2 = q^T G q - 2 q^T C w + const`` with ``G = X_q^T X_q``, ``C = X_q^T X``.
Output channels decouple, so every channel's scale and rounding are optimised exactly against
these two Gram matrices, accumulated once per layer (:func:`gram`; plain reference
:func:`gram_reference`, tested equal).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..core.points import points_tensor, quantize_rows, quantize_to_points, sgn
from ..nn.calibration import layer_inputs
from ..nn.im2col import layer_rows, n_rows, rows_at
from ..core import ckernel
from . import refine_kernel

REFINE_MODES = ("scale", "scale+round")


@torch.no_grad()
def gram(qmodel, qlayer, fp_model, fp_layer, x, max_rows: int, seed: int, batch_size: int, fp_inputs=None):
    """``G = X_q^T X_q`` and ``C = X_q^T X_fp`` (float64) over (subsampled) input rows.

    ``fp_inputs``: the FP layer's input batches if already captured (:func:`lowbit.nn.calibration.all_layer_inputs`);
    rows are subsampled by gathering them (:func:`lowbit.nn.im2col.rows_at`), same rows as ``layer_rows(..)[idx]``.
    """
    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, -(-len(x) // batch_size))
    per_batch = max(1, max_rows // n_batches)
    g = c = None
    rows_used = 0
    fp_iter = iter(fp_inputs) if fp_inputs is not None else layer_inputs(fp_model, fp_layer, x, batch_size)
    for xq, xf in zip(layer_inputs(qmodel, qlayer, x, batch_size), fp_iter):
        n = n_rows(qlayer, xq)
        if n > per_batch:
            idx = torch.randperm(n, generator=gen)[:per_batch]
            rq, rf = rows_at(qlayer, xq, idx), rows_at(fp_layer, xf, idx)
        else:
            rq, rf = layer_rows(qlayer, xq), layer_rows(fp_layer, xf)
        gb, cb = (rq.T @ rq).double(), (rq.T @ rf).double()  # float32 products, float64 sums
        g = gb if g is None else g + gb
        c = cb if c is None else c + cb
        rows_used += len(rq)
    return g / rows_used, c / rows_used, rows_used


@torch.no_grad()
def gram_reference(qmodel, qlayer, fp_model, fp_layer, x, max_rows: int, seed: int, batch_size: int):
    """Plain reference of :func:`gram`: full im2col of both inputs, then subsample the rows."""
    gen = torch.Generator().manual_seed(seed)
    n_batches = max(1, -(-len(x) // batch_size))
    per_batch = max(1, max_rows // n_batches)
    g = c = None
    rows_used = 0
    for xq, xf in zip(layer_inputs(qmodel, qlayer, x, batch_size), layer_inputs(fp_model, fp_layer, x, batch_size)):
        rq, rf = layer_rows(qlayer, xq), layer_rows(fp_layer, xf)
        if len(rq) > per_batch:
            idx = torch.randperm(len(rq), generator=gen)[:per_batch].to(rq.device)
            rq, rf = rq[idx], rf[idx]
        gb, cb = (rq.T @ rq).double(), (rq.T @ rf).double()
        g = gb if g is None else g + gb
        c = cb if c is None else c + cb
        rows_used += len(rq)
    return g / rows_used, c / rows_used, rows_used


def _recon_loss(q: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ``q^T G q - 2 q^T b`` for rows ``q`` (C, K), ``b = W C^T`` (C, K)."""
    return ((q @ g) * q).sum(1) - 2 * (q * b).sum(1)


def _multipliers(multipliers) -> torch.Tensor:
    if multipliers is None:
        return torch.linspace(0.5, 1.5, 51, dtype=torch.float64)
    m = torch.as_tensor(multipliers, dtype=torch.float64).reshape(-1)
    if len(m) == 0 or not torch.isfinite(m).all() or (m <= 0).any():
        raise ValueError(f"scale multipliers must be a non-empty list of finite numbers > 0, got {m.tolist()}")
    return m


def _point_index(absw: torch.Tensor, mids: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The QPS point index of each weight as :func:`quantize_rows` finds it (``|w| / s`` among the mid-points)."""
    pos = s > 0
    u = torch.where(pos, absw / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(absw))
    return torch.bucketize(u, mids, right=False)


def _on_kernel(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` runs on ``refine.c`` for these tensors (:func:`lowbit.core.ckernel.use_kernel`)."""
    return ckernel.use_kernel(backend, lambda: refine_kernel.usable(*tensors),
                              "float64 CPU tensors and a C compiler ($CC, cc or gcc)")


def refine_scales(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                  multipliers=None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale search minimising the output reconstruction error (SQ final opt.).

    ``w`` (C, K) FP rows, ``scale`` (C,), ``cw = w @ C^T``. Each channel tries
    ``scale * m`` for every multiplier ``m`` (default ``0.5 .. 1.5``, 51 values, incl. 1) with
    nearest-point rounding and keeps the best: the same choice as :func:`refine_scales_reference`
    (tested). Returns ``(scale, loss)`` (C,), the loss recomputed from the chosen scales exactly as
    the reference computes it.

    Fast path: with codes ``z = sgn(w) p[idx]`` (``sgn(0) = 1``, so ``z`` changes exactly where ``idx`` does) and ``q = s m z`` the loss is
    ``(s m)^2 z^T G z - 2 s m z^T b``. Walking the multipliers in increasing order, a weight's
    code changes only when ``|w| / (s m)`` crosses a mid-point of the QPS (a few times per weight
    over the whole range), so ``z @ G`` is updated by the sparse code changes instead of recomputed:
    about ``C K^2`` multiply-adds in all instead of one ``C K^2`` product per multiplier.
    ``backend="kernel"``: the walk in the compiled ``refine.c`` (:func:`lowbit.sq.refine_kernel.scale_walk`,
    column blocks of ``z @ G`` and ``G`` kept in cache, rows over ``torch.get_num_threads()`` threads);
    ``"torch"``: sparse COO updates (``torch.sparse.addmm``); ``"auto"``: the kernel for float64 CPU
    tensors when a C compiler is there. Both walk the same indices; their intermediate losses differ
    only by summation order.
    """
    ckernel.check_backend(backend)
    m_all = _multipliers(multipliers).to(w.device)
    p = points_tensor(points, w.dtype, w.device)
    s = torch.as_tensor(scale, dtype=w.dtype, device=w.device).reshape(-1)
    tried = torch.cat([torch.ones(1, dtype=torch.float64, device=w.device), m_all])  # m = 1 first: the reference's start
    order = torch.argsort(tried, stable=True)
    absw, sign, mids = w.abs(), sgn(w), (p[1:] + p[:-1]) / 2
    if _on_kernel(backend, w, g, cw, s):
        walk = tried.to(w.dtype)[order]
        idx = _point_index(absw, mids, (s * walk[0]).reshape(-1, 1))
        gz = ((sign * p[idx]) @ g).contiguous()
        walked = refine_kernel.scale_walk(absw.contiguous(), sign.contiguous(), p, mids.contiguous(), s.contiguous(),
                                          walk, g.contiguous(), cw.contiguous(), idx.to(torch.int32).contiguous(), gz,
                                          threads=torch.get_num_threads())
        losses = torch.empty_like(walked)
        losses[order] = walked.to(w.dtype)
    else:
        losses = _scale_walk_torch(absw, sign, p, mids, s, tried, order, g, cw)
    # the first strict minimum in the reference's order (m = 1, then the multipliers as given)
    best = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)
    best_l = losses[0].clone()
    for i in range(1, len(tried)):
        better = losses[i] < best_l
        best, best_l = torch.where(better, i, best), torch.where(better, losses[i], best_l)
    best_s = s * tried.to(w.dtype)[best]
    return best_s, _recon_loss(quantize_rows(w, points, best_s), g, cw)


def _scale_walk_torch(absw, sign, p, mids, s, tried, order, g, cw) -> torch.Tensor:
    """The losses ``(len(tried), C)`` of :func:`refine_scales`'s walk in torch (sparse COO updates of ``z @ G``)."""
    losses = torch.empty(len(tried), absw.shape[0], dtype=absw.dtype, device=absw.device)
    idx = gz = None
    for i in order.tolist():
        sm = (s * tried[i].to(absw.dtype)).reshape(-1, 1)
        idx_new = _point_index(absw, mids, sm)
        if idx is None:
            gz = (sign * p[idx_new]) @ g
        else:
            rows, cols = torch.nonzero(idx_new != idx, as_tuple=True)  # row-major order: already coalesced
            if len(rows):
                d = sign[rows, cols] * (p[idx_new[rows, cols]] - p[idx[rows, cols]])  # = z_new - z exactly
                dz = torch.sparse_coo_tensor(torch.stack([rows, cols]), d, absw.shape, check_invariants=False,
                                             is_coalesced=True)
                gz = torch.sparse.addmm(gz, dz, g)
        idx = idx_new
        z = sign * p[idx]
        losses[i] = sm[:, 0] ** 2 * (z * gz).sum(1) - 2 * sm[:, 0] * (z * cw).sum(1)
    return losses


def _rounding_start(w: torch.Tensor, points, scale: torch.Tensor):
    """``(q, lo, hi)``: nearest rounding of ``w`` and each weight's two QPS neighbours ``+-scale_c p``."""
    p = points_tensor(points, w.dtype, w.device)
    s = scale.reshape(-1, 1)
    u = w.abs() / s  # (C, K)
    lo_idx = (torch.searchsorted(p, u.contiguous(), right=True) - 1).clamp(0, len(p) - 1)
    hi_idx = (lo_idx + 1).clamp(max=len(p) - 1)
    sign = torch.sign(w)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return quantize_to_points(w, p, scale, dim=0), sign * s * p[lo_idx], sign * s * p[hi_idx]


def _round_block_torch(q, lo, hi, cw, diag, s2, g_blk, gq_blk, d_blk, k0: int) -> int:
    """One block of the rounding descent in torch, all rows at once (what ``refine.c`` does row by row)."""
    changed = 0
    for j in range(g_blk.shape[0]):
        k = k0 + j
        cur = q[:, k]
        alt = torch.where(cur == lo[:, k], hi[:, k], lo[:, k])
        d = alt - cur
        delta = d * d * diag[k] + 2 * d * (gq_blk[:, j] - cw[:, k])
        take = (delta < -1e-12 * diag[k] * s2) & (d != 0)
        if take.any():
            d = torch.where(take, d, torch.zeros_like(d))
            q[:, k] = cur + d
            d_blk[:, j] = d
            gq_blk += d[:, None] * g_blk[j][None, :]
            changed += int(take.sum())
    return changed


def refine_rounding(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                    sweeps: int = 3, block: int = 128, backend: str = "auto") -> torch.Tensor:
    """Choose each weight's point among its two QPS neighbours to minimise the layer loss.

    AdaRound's up/down choice (Nagel et al. 2020) generalised to any QPS and solved by exact
    coordinate descent on ``q^T G q - 2 q^T C w`` (all channels at once, ``sweeps`` passes
    over the K inputs). Starts from nearest rounding; the loss never increases. Returns the
    quantized rows (C, K), every entry in ``{+-scale_c * p}``.

    Fast path of :func:`refine_rounding_reference` (the same visits in the same order, tested to
    give the same rows): within a block of ``block`` inputs only the block's columns of ``q @ G``
    are kept current (rank-1 updates of ``C x block``); the rest of ``q @ G`` is brought up to date
    once per block by one ``(C, block) @ (block, K)`` product (GPTQ's lazy batch updates, Frantar
    et al., ICLR 2023, applied to this coordinate descent). Inside a block: ``backend="kernel"`` the
    compiled ``refine.c`` (:mod:`lowbit.sq.refine_kernel`), ``"torch"`` a torch loop over the
    block's inputs, ``"auto"`` the kernel for float64 CPU tensors when a C compiler is there; all
    give the same rows (tested).
    """
    if int(block) < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    ckernel.check_backend(backend)
    q, cand_lo, cand_hi = _rounding_start(w, points, scale)
    cw = cw.contiguous()
    gq = q @ g  # (C, K)
    diag = torch.diagonal(g).contiguous()
    s2 = scale.reshape(-1) ** 2
    round_block = refine_kernel.round_block if _on_kernel(backend, q, cand_lo, cand_hi, cw, diag, s2, g) \
        else _round_block_torch
    n_in = w.shape[1]
    for _ in range(sweeps):
        changed = 0
        for k0 in range(0, n_in, int(block)):
            k1 = min(k0 + int(block), n_in)
            gq_blk = gq[:, k0:k1].clone(memory_format=torch.contiguous_format)  # kept current inside the block
            d_blk = torch.zeros(w.shape[0], k1 - k0, dtype=w.dtype, device=w.device)
            moved = round_block(q, cand_lo, cand_hi, cw, diag, s2, g[k0:k1, k0:k1].contiguous(), gq_blk, d_blk, k0)
            if moved:
                gq += d_blk @ g[k0:k1]
                changed += moved
        if changed == 0:
            break
    return q


def refine_scales_reference(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                  multipliers=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference of :func:`refine_scales`: one full ``q @ G`` product per multiplier.

    ``w`` (C, K) FP rows, ``scale`` (C,), ``cw = w @ C^T``. Each channel tries
    ``scale * m`` for every multiplier ``m`` (default ``0.5 .. 1.5``, 51 values, incl. 1) with
    nearest-point rounding and keeps the best (the first strict minimum, starting from ``m = 1``).
    Returns ``(scale, loss)`` (C,).
    """
    if multipliers is None:
        multipliers = torch.linspace(0.5, 1.5, 51, dtype=torch.float64)
    best_s = scale.clone()
    best_l = _recon_loss(quantize_rows(w, points, best_s), g, cw)
    for m in multipliers:
        s = scale * m
        loss = _recon_loss(quantize_rows(w, points, s), g, cw)
        better = loss < best_l
        best_s, best_l = torch.where(better, s, best_s), torch.where(better, loss, best_l)
    return best_s, best_l


def refine_rounding_reference(w: torch.Tensor, points, scale: torch.Tensor, g: torch.Tensor, cw: torch.Tensor,
                    sweeps: int = 3) -> torch.Tensor:
    """Plain reference of :func:`refine_rounding`: a rank-1 update of all of ``q @ G`` per changed input.

    Chooses each weight's point among its two QPS neighbours to minimise the layer loss.

    AdaRound's up/down choice (Nagel et al. 2020) generalised to any QPS and solved by exact
    coordinate descent on ``q^T G q - 2 q^T C w`` (all channels at once, ``sweeps`` passes
    over the K inputs). Starts from nearest rounding; the loss never increases. Returns the
    quantized rows (C, K), every entry in ``{+-scale_c * p}``.
    """
    s = scale.reshape(-1, 1)
    q, cand_lo, cand_hi = _rounding_start(w, points, scale)
    gq = q @ g  # (C, K)
    diag = torch.diagonal(g)
    for _ in range(sweeps):
        changed = 0
        for k in range(w.shape[1]):
            cur = q[:, k]
            alt = torch.where(cur == cand_lo[:, k], cand_hi[:, k], cand_lo[:, k])
            d = alt - cur
            delta = d * d * diag[k] + 2 * d * (gq[:, k] - cw[:, k])
            take = (delta < -1e-12 * diag[k] * s[:, 0] ** 2) & (d != 0)
            if take.any():
                d = torch.where(take, d, torch.zeros_like(d))
                q[:, k] = cur + d
                gq += d[:, None] * g[k][None, :]
                changed += int(take.sum())
        if changed == 0:
            break
    return q


@torch.no_grad()
def refine_layer(qmodel: nn.Module, name: str, fp_model: nn.Module, x: torch.Tensor,
                 mode: str = "scale+round", max_rows: int = 16384, seed: int = 0,
                 batch_size: int = 256, fp_inputs=None) -> dict:
    """SQ's final optimisation for one quantized layer ``name`` of ``qmodel`` (in place).

    Inputs come from ``qmodel`` (earlier layers already quantized), targets from the FP
    folded ``fp_model`` (or ``fp_inputs``, the FP layer's input batches from
    :func:`all_layer_inputs`). Returns ``{"loss_drop", "rows", "mode"}``: how much the summed
    per-channel output reconstruction error (mean over the ``rows`` input rows) went down.
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")
    layer = qmodel.get_submodule(name)
    fp_layer = fp_model.get_submodule(name)
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return {"skipped": "grouped convolution"}
    g, c, rows = gram(qmodel, layer, fp_model, fp_layer, x, max_rows, seed, batch_size, fp_inputs)
    w = layer.weight_fp.double().reshape(layer.weight_fp.shape[0], -1)  # (C, K)
    fq = layer.quantizer
    points = np.asarray(fq.points, dtype=np.float64)
    scale = torch.as_tensor(fq.scale, dtype=torch.float64, device=w.device)
    per_layer = scale.ndim == 0
    scale_c = scale.expand(w.shape[0]).clone() if per_layer else scale.clone()
    cw = w @ c.T  # (C, K)
    q0 = layer.weight.double().reshape(w.shape)
    before = _recon_loss(q0, g, cw)
    if per_layer:  # one scale for the layer: search on the summed loss
        best = (float(before.sum()), scale_c[0].clone())
        for m in torch.linspace(0.5, 1.5, 51, dtype=torch.float64):
            s = scale_c[0] * m
            loss = float(_recon_loss(quantize_rows(w, points, s.expand(w.shape[0])), g, cw).sum())
            if loss < best[0]:
                best = (loss, s)
        scale_c = best[1].expand(w.shape[0]).clone()
    else:
        scale_c, _ = refine_scales(w, points, scale_c, g, cw)
    q = quantize_to_points(w, points, scale_c, dim=0)
    if mode == "scale+round":
        q = refine_rounding(w, points, scale_c, g, cw)
    after = _recon_loss(q, g, cw)
    if after.sum() > before.sum():  # keep the better of the two (never make it worse)
        q, after = q0, before
    else:
        fq.scale = (scale_c[0].clone() if per_layer else scale_c).cpu()  # fitted quantizers keep CPU scales
    layer.set_quantized_weight(q.to(layer.weight_fp.dtype))
    # the objective is known up to a per-channel constant (w^T X^T X w): report the drop
    info = {"loss_drop": float((before - after).sum()), "rows": rows, "mode": mode}
    layer.refine_info = info
    return info
