"""One validation of the arguments every quantizer shares: bit widths, weights, points, tolerances.

Every package of lowbit checks these through this module, so a bit width, a NaN weight or a bad
tolerance gets the same rule and the same message everywhere (``ValueError``/``TypeError`` that
says what was wrong and how to fix it).

Bit widths include the sign bit where the quantizer is signed. One rule everywhere: a bit width
is an ``int`` of at least ``MIN_BITS = 2`` (a 1-bit signed quantizer has no magnitude levels:
SQ's ``N = 2^(bits-1)`` would be a single point, Q-Rater's ``2^(q-1) - 1`` would be 0); each
quantizer sets its own upper bound (``hi``).
"""
from __future__ import annotations

import numpy as np
import torch

MIN_BITS = 2
MAX_BITS = 16


class BitWidthTypeError(TypeError, ValueError):
    """A bit width that is not an int (e.g. ``2.5``, ``True``, ``"4"``): both a ``TypeError`` and a
    ``ValueError``, so callers that catch either one see it."""


def check_bits(bits, what: str = "bits", hi: int = MAX_BITS, lo: int = MIN_BITS, allow_none: bool = False):
    """``bits`` as an ``int`` in ``[lo, hi]`` (``None`` passes through with ``allow_none``)."""
    if bits is None and allow_none:
        return None
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        none = " or None" if allow_none else ""
        raise BitWidthTypeError(f"{what} must be an int number of bits (e.g. 4){none}, got {bits!r}")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"{what} must be between {lo} and {hi} bits (the sign bit included), got {bits}")
    return int(bits)


def check_tol(tol, max_iter) -> None:
    """A fixed-point iteration's stopping rule: ``tol >= 0`` finite, ``max_iter >= 1`` an int."""
    if not (isinstance(tol, (int, float, np.floating)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")


def as_weights(w, name: str = "w") -> np.ndarray:
    """``w`` (torch tensor, numpy array or list) as a flat float64 array; checks it is usable."""
    if isinstance(w, torch.Tensor):
        arr = w.detach().to("cpu", torch.float64).numpy()
    elif isinstance(w, (np.ndarray, list, tuple)) or np.isscalar(w):
        try:
            arr = np.asarray(w, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must hold real numbers: {err}") from err
    else:
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(w).__name__}")
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: pass at least one weight")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf: clean the weights (e.g. torch.nan_to_num) first")
    return arr


def as_points(points) -> np.ndarray:
    """A QPS as a sorted array of distinct, finite, non-negative float64 points."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    try:
        p = np.asarray(points, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TypeError(f"points must be numbers: {err}") from err
    if p.size == 0:
        raise ValueError("points is empty: a QPS needs at least one non-negative point")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("points must be finite and non-negative (the QPS is mirrored for negative weights)")
    return np.unique(p)


def check_positive_int(value, what: str, hint: str = "") -> int:
    """``int(value)`` if it is an int (not a bool) ``>= 1``, else a ``ValueError`` naming ``what``
    (``hint``, e.g. ``" (GPUs per node)"``, says what the number counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int{hint}, got {value!r}")
    return int(value)


def check_choice(value, choices, what: str) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}: use one of {tuple(choices)}")
    return value


def device_key(device) -> dict:
    """``{"device": "cuda:0"}`` for a device other than the CPU, else ``{}``: what a cache key adds, so
    a GPU run is cached apart from the CPU runs and the keys of CPU runs stay as they were."""
    return {} if device is None or str(device) == "cpu" else {"device": str(device)}


def resolve_device(device, default=None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: ``default``, else CPU); a ``ValueError`` when
    it names an accelerator this machine does not have (instead of torch's driver error)."""
    if device is None:
        device = default if default is not None else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but this machine has no CUDA GPU (torch.cuda.is_available() "
                             "is False): pass device='cpu' or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type not in ("cpu", "mps", "meta"):
        raise ValueError(f"device type {dev.type!r} is not supported here: use 'cpu' or 'cuda'")
    return dev
