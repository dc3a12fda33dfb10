"""lowbit: a reproducible compendium for low-bit, non-uniform quantization.

Papers: Subset Quantization (Oh et al., ECCV 2022), Q-Rater (Kim et al.), nuLSQ
(Gongyo et al.), ALQ/STLQ (Oh et al., CVPR 2021). See README.md.

The public API is listed in ``_EXPORTS`` and imported lazily, so ``import lowbit`` stays
fast and one module's import error does not hide the others.
"""
from __future__ import annotations

import importlib

from .utils import seed_all  # noqa: F401

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # Subset Quantization core (SQ sec. 3.2-3.4)
    "universal_set": "universal",
    "qps_count": "universal",
    "optimal_scale": "scale",
    "global_optimal_scale": "scale",
    "search_qps": "search",
    # model-level PTQ (SQ Tables 2-3)
    "quantize_model": "ptq",
}

_SUBMODULES = ("data", "models", "train", "evaluate", "results", "plotting", "profiles", "paths", "utils",
               "universal", "quantizers", "scale", "search", "ptq", "qrater", "hw", "lsq", "stlq")

__all__ = ["seed_all", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
