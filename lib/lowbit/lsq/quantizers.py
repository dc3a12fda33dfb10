"""LSQ and nuLSQ fake quantizers: forward, straight-through backward, fast path and reference.

* **LSQ**: Esser, McKinstry, Bablani, Appuswamy, Modha, *Learned Step Size Quantization*, ICLR 2020
  (arXiv:1902.08153), eqs. 1-3 and the gradient scale of sec. 2.2.
* **nuLSQ**: Gongyo, Liang, Ambai, Kawakami, Sato, *Learning Non-Uniform Step Sizes for Neural
  Network Quantization*, ACCV 2024 (code: github.com/DensoITLab/nuLSQ), the poster's forward
  ``Q(x) = sum_n s_n * sigma(x - (sum_{m<n} s_m + s_n / 2))`` with straight-through gradients.

Conventions (those of the authors' public code, restated):

* Signed: ``Qn = 2^(b-1)`` negative and ``Qp = 2^(b-1) - 1`` positive levels; unsigned: ``Qn = 0``,
  ``Qp = 2^b - 1``.
* LSQ: ``y = s * round(clamp(x / s, -Qn, Qp))``; ``dy/dx = 1`` on ``[-Qn s, Qp s]``, else 0;
  ``dy/ds = round(x/s) - x/s`` inside, ``-Qn`` below, ``+Qp`` above, times the gradient scale
  ``g = 1 / sqrt(num_elements * Qp)`` (``grad_scale="lsq"``; ``None``: 1; a float: that ``g``).
* nuLSQ unsigned: ``N = 2^b - 1`` steps, levels ``0, c_1, .., c_N`` with ``c_n = s_1 + .. + s_n``; ``x``
  goes to the nearer neighbouring level (threshold ``c_{n-1} + s_n / 2``), clamped to ``[0, c_N]``.
  In segment ``n`` (``c_{n-1} < x <= c_n``) only ``s_n`` receives ``round(u) - u``,
  ``u = (x - c_{n-1}) / s_n``; above ``c_N`` every step receives +1; below 0 none;
  ``dy/dx = 1`` on ``[0, c_N]``. Step gradients times ``g = 1 / sqrt(num_elements * (2^b - 1))``.
* nuLSQ signed: ``2^b - 1`` independent steps laid out ``[Qn negative steps from zero outwards,
  Qp positive steps from zero outwards]``; ``x >= 0`` takes the unsigned rule with the positive
  steps, ``x < 0`` the unsigned rule applied to ``-x`` with the negative steps and the sign of the
  output and the step gradients flipped. Gradient scale ``2 / sqrt(num_elements * Qn)`` for the
  negative and ``2 / sqrt(num_elements * Qp)`` for the positive steps.

**Ties** (our choice, stated): the poster's unit step ``sigma(z)`` is 1 for ``z > 0`` and 0 at
``z = 0``, so an input exactly on a threshold goes to the level nearer zero. LSQ's ``round`` here
is the same rule, round half toward zero, so the unit-step sums and the identity "nuLSQ with
equal steps is LSQ" hold exactly, ties included. (The authors' code uses ``torch.round``, half to
even; the two differ only on exact half-step ties.)

Steps are clamped to at least :data:`MIN_STEP` in the forward (a learned step that crosses zero is
a failure users of LSQ implementations report); the gradient still flows to the raw parameter.
Fast paths are one ``autograd.Function`` each (for nuLSQ: ``torch.bucketize`` over the cumulative
thresholds and one weighted histogram); for CPU float32 both run the same operations fused in the
compiled kernel :mod:`lowbit.lsq.kernel`, bit-identical. ``*_reference`` follow the formulas literally:
LSQ as the paper's ``detach`` trick under autograd, nuLSQ as the poster's sum over unit steps with its
backward written segment by segment.
"""
from __future__ import annotations

import math

import torch

from ..core.validation import check_bits
from . import kernel, segments

MIN_STEP = 1e-8
MAX_QAT_BITS = 8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Qn, Qp)``: ``(2^(b-1), 2^(b-1) - 1)`` signed, ``(0, 2^b - 1)`` unsigned (b in 2..8)."""
    b = check_bits(bits, hi=MAX_QAT_BITS)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be True or False, got {signed!r}")
    return (2 ** (b - 1), 2 ** (b - 1) - 1) if signed else (0, 2 ** b - 1)


def _num_elements(x: torch.Tensor, num_elements) -> int:
    n = x.numel() if num_elements is None else num_elements
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_elements must be a positive int (or None for x.numel()), got {num_elements!r}")
    return n


def gradient_scale(grad_scale, num_elements: int, levels: int, factor: float = 1.0) -> float:
    """The step-gradient multiplier: ``factor / sqrt(num_elements * levels)`` for ``"lsq"``,
    1 for ``None``, ``grad_scale`` itself for a positive float."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, str):
        if grad_scale != "lsq":
            raise ValueError(f"grad_scale must be 'lsq', None or a positive float, got {grad_scale!r}")
        return factor / math.sqrt(num_elements * max(levels, 1))
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not grad_scale > 0:
        raise ValueError(f"grad_scale must be 'lsq', None or a positive float, got {grad_scale!r}")
    return float(grad_scale)


def round_half_toward_zero(v: torch.Tensor) -> torch.Tensor:
    """Nearest integer, exact halves toward zero (the poster's ``sigma(0) = 0``)."""
    return torch.sign(v) * torch.ceil(v.abs() - 0.5)


def _check_input(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {type(x).__name__}")


def _positive(step: torch.Tensor) -> torch.Tensor:
    return step.clamp_min(MIN_STEP)


# ----------------------------------------------------------------------------- LSQ
class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, g: float):
        s = _positive(step)
        ctx.qn, ctx.qp, ctx.g, ctx.step_shape = qn, qp, g, step.shape
        ctx.compiled = kernel.usable(x, s)
        if ctx.compiled:  # the same operations fused (lowbit.lsq.kernel), bit-identical
            ctx.save_for_backward(x, s)
            return kernel.lsq_forward(x, float(s), qn, qp)
        v = x / s
        q = round_half_toward_zero(v.clamp(-qn, qp))
        ctx.save_for_backward(v, q)
        return q * s

    @staticmethod
    def backward(ctx, grad):
        if ctx.compiled:
            x, s = ctx.saved_tensors
            dx, prod = kernel.lsq_backward(grad, x, float(s), ctx.qn, ctx.qp)
        else:
            v, q = ctx.saved_tensors
            below, above = v < -ctx.qn, v > ctx.qp
            inside = ~(below | above)
            dx = grad * inside
            prod = grad * torch.where(inside, q - v, torch.where(below, -float(ctx.qn), float(ctx.qp)))
        dstep = prod.sum().mul(ctx.g).reshape(ctx.step_shape)
        return dx, dstep, None, None, None


def _lsq_args(x, step, bits, signed, grad_scale, num_elements):
    _check_input(x)
    step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if step.numel() != 1:
        raise ValueError(f"LSQ has one step size, got a step tensor of shape {tuple(step.shape)}")
    qn, qp = qrange(bits, signed)
    return step, qn, qp, gradient_scale(grad_scale, _num_elements(x, num_elements), qp)


def lsq_quantize(x: torch.Tensor, step, bits: int, signed: bool, grad_scale="lsq",
                 num_elements: int | None = None) -> torch.Tensor:
    """LSQ fake quantization ``s * round(clamp(x / s, -Qn, Qp))`` with the LSQ gradients (fast path:
    one autograd Function). ``num_elements`` defaults to ``x.numel()``."""
    step, qn, qp, g = _lsq_args(x, step, bits, signed, grad_scale, num_elements)
    return _LSQFunction.apply(x, step, qn, qp, g)


def lsq_quantize_reference(x: torch.Tensor, step, bits: int, signed: bool, grad_scale="lsq",
                           num_elements: int | None = None) -> torch.Tensor:
    """Reference of :func:`lsq_quantize`: the LSQ paper's formulation under plain autograd,
    ``s' = s.detach() + g (s - s.detach())``, ``y = s' * round_ste(clamp(x / s', -Qn, Qp))``, the clamp
    passing the gradient on ``[-Qn, Qp]`` including its end points."""
    step, qn, qp, g = _lsq_args(x, step, bits, signed, grad_scale, num_elements)
    s = _positive(step)
    s = s.detach() + (s - s.detach()) * g  # exactly s in value, gradient times g
    v = x / s  # clamp written out: the gradient passes on the end points too (torch.clamp's does not)
    v = torch.where(v < -qn, v.detach().clamp(min=-qn), torch.where(v > qp, v.detach().clamp(max=qp), v))
    v = v + (round_half_toward_zero(v) - v).detach()
    return v * s


# ----------------------------------------------------------------------------- nuLSQ
def split_steps(steps: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(negative steps, positive steps)`` of a nuLSQ step vector (the negative part empty
    when unsigned), each ordered from zero outwards; checks the count ``2^b - 1``."""
    qn, qp = qrange(bits, signed)
    if steps.ndim != 1 or steps.numel() != qn + qp:
        raise ValueError(f"nuLSQ at {bits} bits ({'signed' if signed else 'unsigned'}) needs a 1-D tensor of "
                         f"{qn + qp} steps ([{qn} negative, {qp} positive] from zero outwards), "
                         f"got shape {tuple(steps.shape)}")
    return steps[:qn], steps[qn:]


def _half_forward(z: torch.Tensor, s: torch.Tensor):
    """The unsigned rule on ``z`` with (positive) steps ``s``: ``(y, k)``, ``y = c_k`` the nearer
    neighbouring level (an exact tie goes down), ``k`` the level index, 0 for ``z <= 0`` (uint8 from
    the compiled kernel on CPU float32, else int64 from ``torch.bucketize``; the same values)."""
    c = torch.cumsum(s, 0)  # (N,) c_1..c_N
    levels = torch.cat([c.new_zeros(1), c])  # (N+1,) c_0 = 0, c_1..c_N
    thresholds = levels[:-1] + s / 2
    if kernel.usable(z, s):
        return kernel.forward(z, thresholds, levels)
    k = torch.bucketize(z, thresholds)  # thresholds strictly below z
    return levels[k], k


def _half_backward(grad: torch.Tensor, z: torch.Tensor, y: torch.Tensor, k: torch.Tensor, s: torch.Tensor):
    """``(dL/dz, per-step gradient)`` of the unsigned rule. ``z`` lies in segment ``k`` when
    ``z <= y = c_k`` and in segment ``k + 1`` when ``z > y``; there ``round(u) - u = (y - z) / s_n``,
    so one weighted histogram over the segments gives every step's gradient; above ``c_N`` each step
    receives +1, ``z <= 0`` nothing; ``dL/dz = grad`` on ``[0, c_N]``. The histogram is an exact
    fixed-point sum (:mod:`lowbit.lsq.segments`), independent of the order of the elements."""
    n = len(s)
    c_n = torch.cumsum(s, 0)[-1]
    if k.dtype == torch.uint8:  # from the compiled kernel: the same operations, fused
        dz, sums = kernel.backward(grad, z, y, k, c_n, n)
    else:
        sums = segments.segment_sums(grad, z, y, k, n, float(c_n))
        dz = grad * ((z >= 0) & ~(z > c_n))
    return dz, sums[1:n + 1] / s + sums[n + 1]


class _NuLSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, qn: int, g_neg: float, g_pos: float):
        s = _positive(steps)
        ctx.qn, ctx.g = qn, (g_neg, g_pos)
        if not qn:
            y, k = _half_forward(x, s)
            ctx.save_for_backward(x, y, k, s)
            return y
        xp, xn = x.clamp(min=0), (-x).clamp(min=0)
        (yp, kp), (yn, kn) = _half_forward(xp, s[qn:]), _half_forward(xn, s[:qn])
        ctx.save_for_backward(x, yp, kp, yn, kn, s)
        return yp - yn

    @staticmethod
    def backward(ctx, grad):
        qn = ctx.qn
        if not qn:
            x, y, k, s = ctx.saved_tensors
            dx, dsteps = _half_backward(grad, x, y, k, s)
            return dx, dsteps * ctx.g[1], None, None, None
        x, yp, kp, yn, kn, s = ctx.saved_tensors
        dx_p, d_pos = _half_backward(grad, x.clamp(min=0), yp, kp, s[qn:])
        dx_n, d_neg = _half_backward(grad, (-x).clamp(min=0), yn, kn, s[:qn])
        dx = torch.where(x >= 0, dx_p, dx_n)
        return dx, torch.cat([-d_neg * ctx.g[0], d_pos * ctx.g[1]]), None, None, None


def _nulsq_args(x, steps, bits, signed, grad_scale, num_elements):
    _check_input(x)
    if not isinstance(steps, torch.Tensor):
        raise TypeError(f"steps must be a 1-D tensor, got {type(steps).__name__}")
    qn, qp = qrange(bits, signed)
    split_steps(steps, bits, signed)
    n = _num_elements(x, num_elements)
    if signed:
        return qn, gradient_scale(grad_scale, n, qn, 2.0), gradient_scale(grad_scale, n, qp, 2.0)
    return qn, 1.0, gradient_scale(grad_scale, n, qp)


def nulsq_quantize(x: torch.Tensor, steps: torch.Tensor, bits: int, signed: bool, grad_scale="lsq",
                   num_elements: int | None = None) -> torch.Tensor:
    """nuLSQ fake quantization with learned non-uniform ``steps`` (fast path: one autograd Function,
    ``torch.bucketize`` over the cumulative thresholds). See the module docstring for the layout."""
    qn, g_neg, g_pos = _nulsq_args(x, steps, bits, signed, grad_scale, num_elements)
    return _NuLSQFunction.apply(x, steps.to(x.dtype), qn, g_neg, g_pos)


def _partial_sums(half: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``[(s_n, c_{n-1}, c_n), ...]`` with ``c_n = s_1 + ... + s_n`` added one term at a time in float64
    and rounded to the steps' dtype (what ``torch.cumsum`` computes for float32: a float64
    accumulator), so float32 sums agree with the fast path to the last bit."""
    out, total = [], torch.zeros((), dtype=torch.float64)
    for s_n in half:
        lower = total.to(half.dtype)
        total = total + s_n.double()
        out.append((s_n, lower, total.to(half.dtype)))
    return out


class _NuLSQReferenceFunction(torch.autograd.Function):
    """The poster's unit-step sum, literally, and its straight-through backward segment by segment."""

    @staticmethod
    def forward(ctx, x, steps, qn: int, g_neg: float, g_pos: float):
        s = _positive(steps)
        neg, pos = s[:qn], s[qn:]

        def unit_step_sum(z, half):  # sum_n s_n * sigma(z - (sum_{m<n} s_m + s_n / 2)), sigma(0) = 0
            out = torch.zeros_like(z, dtype=torch.float64)
            for s_n, lower, _ in _partial_sums(half):
                out = out + s_n.double() * (z - (lower + s_n / 2) > 0).double()
            return out.to(z.dtype)

        y = torch.where(x >= 0, unit_step_sum(x, pos), -unit_step_sum(-x, neg)) if qn else unit_step_sum(x, pos)
        ctx.save_for_backward(x, s)
        ctx.qn, ctx.g = qn, (g_neg, g_pos)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        qn = ctx.qn

        def half_backward(z, go, half):  # the unsigned rule on z >= 0: (dy/dz mask, per-step grads)
            grads, top = [], z.new_zeros(())
            for s_n, lower, top in _partial_sums(half):
                seg = (z > lower) & (z <= top)
                u = (z - lower) / s_n
                up = (z - (lower + s_n / 2) > 0).to(z.dtype)  # round(u), decided as the forward's sigma
                grads.append((go * (up - u) * seg).sum())
            above = (go * (z > top)).sum()
            return (z >= 0) & (z <= top), torch.stack([g_n + above for g_n in grads])

        pos_mask = x >= 0
        keep_p, d_pos = half_backward(x, grad * pos_mask, s[qn:])
        if qn:
            keep_n, d_neg = half_backward(-x, grad * ~pos_mask, s[:qn])
            dx = grad * torch.where(pos_mask, keep_p, keep_n)
            dsteps = torch.cat([-d_neg * ctx.g[0], d_pos * ctx.g[1]])
        else:
            dx = grad * keep_p
            dsteps = d_pos * ctx.g[1]
        return dx, dsteps, None, None, None


def nulsq_quantize_reference(x: torch.Tensor, steps: torch.Tensor, bits: int, signed: bool, grad_scale="lsq",
                             num_elements: int | None = None) -> torch.Tensor:
    """Reference of :func:`nulsq_quantize`: a Python loop over the unit steps of the poster's sum
    and over the segments in the backward."""
    qn, g_neg, g_pos = _nulsq_args(x, steps, bits, signed, grad_scale, num_elements)
    return _NuLSQReferenceFunction.apply(x, steps.to(x.dtype), qn, g_neg, g_pos)


def nulsq_levels(steps: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The sorted output levels of a nuLSQ quantizer: ``-c^-_{Qn} .. 0 .. c^+_{Qp}`` (``2^b`` values)."""
    neg, pos = split_steps(torch.as_tensor(steps).detach(), bits, signed)
    neg, pos = _positive(neg), _positive(pos)
    zero = pos.new_zeros(1)
    return torch.cat([-torch.cumsum(neg, 0).flip(0), zero, torch.cumsum(pos, 0)])


def lsq_levels(step, bits: int, signed: bool) -> torch.Tensor:
    """The output levels of an LSQ quantizer: ``s * (-Qn .. Qp)``."""
    qn, qp = qrange(bits, signed)
    s = float(torch.as_tensor(step).detach().clamp_min(MIN_STEP))
    return torch.arange(-qn, qp + 1, dtype=torch.float64) * s
