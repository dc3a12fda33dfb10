"""lowbit: a reproducible compendium for low-bit, non-uniform quantization.

Papers implemented: Subset Quantization (Oh, Sim, Kim, Lee, ECCV 2022) in ``lowbit.sq``,
Q-Rater (Kim, Lee et al., arXiv:2105.01868) in ``lowbit.qrater`` and nuLSQ (Gongyo, Liang, Ambai,
Kawakami, Sato, ACCV 2024) with its baseline LSQ (Esser et al., ICLR 2020) in ``lowbit.lsq``;
ALQ/STLQ (Oh, Sim, Lee, Lee, CVPR 2021) is planned. See README.md and docs/ARCHITECTURE.md.

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
    "universal_set": "sq.universal",
    "qps_count": "sq.universal",
    "optimal_scale": "sq.scale",
    "global_optimal_scale": "sq.scale",
    "search_qps": "sq.search",
    # model-level PTQ (SQ Tables 2-3)
    "quantize_model": "sq.ptq",
    "PTQConfig": "sq.ptq",
}

# packages (core <- nn <- papers <- experiments) and the top-level modules
_SUBMODULES = ("core", "nn", "sq", "qrater", "lsq", "alq", "peers", "compare", "data", "models", "train", "evaluate",
               "results", "plotting", "profiles", "paths", "utils", "reproduce")
# the SQ modules people reach as lowbit.<name> (one-line aliases of their home in lowbit.sq)
_ALIASES = {"hw": "sq.hw", "universal": "sq.universal", "scale": "sq.scale", "search": "sq.search"}

__all__ = ["seed_all", *_EXPORTS, *_SUBMODULES, *_ALIASES]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _ALIASES:
        return importlib.import_module(f".{_ALIASES[name]}", __name__)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
