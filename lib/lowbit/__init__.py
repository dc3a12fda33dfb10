"""lowbit: a reproducible compendium for low-bit, non-uniform quantization.

Papers: Subset Quantization (Oh et al., ECCV 2022), Q-Rater (Kim et al.), nuLSQ
(Gongyo et al.), ALQ/STLQ (Oh et al., CVPR 2021). See README.md.
"""
from . import data, evaluate, models, paths, profiles, results  # noqa: F401
from .utils import seed_all  # noqa: F401

__version__ = "0.1.0"
