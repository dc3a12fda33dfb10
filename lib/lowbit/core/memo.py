"""A bounded memo of results computed from weight tensors.

A fit that depends only on a weight tensor and a few settings (SQ's QPS search, Oh et al., "Non-uniform
step size quantization for accurate post-training quantization", ECCV 2022, Algorithm 1; STLQ's scale,
Oh et al., "Automated log-scale quantization for low-cost deep neural networks", CVPR 2021) is keyed by
the tensor's bytes (SHA-256), shape and dtype with those settings, so the same weights fit once per
process and a changed weight never reuses an old result.
"""
from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import torch


def tensor_digest(t: torch.Tensor) -> tuple:
    """``(sha256 of the bytes, shape, dtype)`` of ``t`` (read on the CPU): equal only for equal tensors."""
    w = t.detach().cpu().contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest(), tuple(w.shape), str(w.dtype)


class TensorMemo:
    """Least-recently-used memo of at most ``max_size`` results; stores and returns deep copies, so a
    caller that changes what it got changes nothing here."""

    def __init__(self, max_size: int = 512):
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        self.max_size = max_size
        self._items: OrderedDict[tuple, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: tuple) -> bool:
        return key in self._items

    def get(self, key: tuple):
        """A copy of the result stored under ``key`` (``None`` when there is none); marks it recently used."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return copy.deepcopy(self._items[key])

    def put(self, key: tuple, value) -> None:
        """Store a copy of ``value`` under ``key``, dropping the least recently used beyond ``max_size``."""
        self._items[key] = copy.deepcopy(value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)
