"""Q-Rater: layer-by-layer non-convex search of clipping, rounding and selective bias correction.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868.

=============================  ================================================================
:func:`round_values`           1st-order (eqs. 3-4, ``gamma_n``) and 2nd-order rounding (eqs.
                               5-6, ``gamma_n``, ``gamma_s``); ``gamma_n = 0`` is RTN
                               (:mod:`.rounding`).
:func:`range_division`         how the rounding divides the range into levels (Figs. 5, 9, 10).
:func:`clip_threshold`         Q-Rater clipping ``Th_c = gamma_c * max|x|`` (sec. 5.2); the step
                               ``Th_c / (2^(q-1) - 1)`` is :func:`lowbit.core.uniform.uniform_step`.
:func:`baseline_threshold`     the clipping baselines of Table 1 (``"mse"``, ``"aciq"``, ``"kl"``),
                               from :mod:`lowbit.core.clipping`.
:func:`bayes_search`           grid probes registered in a seeded Bayesian optimiser, then more
                               probes (sec. 6; :mod:`.search`).
:class:`QRaterConfig`          every option of a run, validated up front (:mod:`.config`).
:func:`run`                    Algorithm 1 (appendix E): layer by layer in forward order, earlier
                               layers frozen: ``WeightQuant``, ``ActQuant``, ``BiasCorr`` (eq. 7)
                               (:mod:`.algorithm`).
:func:`apply`                  rebuild a quantized model from :func:`run`'s per-layer settings
                               (e.g. only the first ``k`` layers, for the incremental curves).
:func:`experiment`             one run on a committed checkpoint, and the tables,
                               figure data and claims of notebook 05 (:mod:`.experiments`;
                               drawing in :mod:`.plots`).
=============================  ================================================================

Quantization is **layer-wise and symmetric** for weights and activations, as in the paper
(sec. 5). Weights are signed, ``levels = -(2^(q-1)-1) .. 2^(q-1)-1``, step
``Th_c / (2^(q-1)-1)``. The input activations of a layer are quantized by a forward pre-hook;
when they are non-negative on the calibration set (after a ReLU) they use the unsigned range
``0 .. 2^q - 1`` with step ``Th_c / (2^q - 1)``, else the signed one.
"""
import importlib

from ..core.clipping import CLIP_RULES, aciq_coefficient, baseline_threshold  # noqa: F401
from .algorithm import (QRaterResult, QRaterState, act_quant, apply, bias_corr, incremental_accuracy,  # noqa: F401
                        run, weight_quant)
from .config import (ALL_BUT_FIRST, BIAS_MODES, GRIDS, OBJECTIVES, OPS, PAPER_BO_STEPS, PAPER_CLIP_GRID,  # noqa: F401
                     PAPER_GAMMA_N_GRID, PAPER_GAMMA_S_GRID, SEARCHES, TARGETS, QRaterConfig, search_grids)
from .rounding import (ActRounding, clip_round_activation, clip_round_weight, clip_threshold,  # noqa: F401
                       range_division, round_values, round_values_reference)
from .search import GAMMA_C_BOUNDS, bayes_search, best_probe  # noqa: F401

# notebook 05's experiments (a higher layer than the algorithm): reachable as lowbit.qrater.<name>,
# imported on first use so that the paper layer does not import its experiments at import time
_EXPERIMENTS = ("PAPER_RESNET18_TABLE1", "PAPER_RESNET18_TABLE2", "TABLE1_VARIANTS", "balanced_subset", "bo_claims", "cached_experiment", "cached_experiments", "claim_lines", "experiment",
                "experiment_curve", "figure6_runs", "figure7_runs", "figure8_runs", "figure_claims", "figure_runs", "objective_rows", "probe_ties", "SEARCHED", "TABLE1_RESNET20", "sweep",
                "table1_claims", "table1_rows", "table1_runs", "table2_rows")


def __getattr__(name: str):
    if name in _EXPERIMENTS:
        return getattr(importlib.import_module(".experiments", __name__), name)
    raise AttributeError(f"module 'lowbit.qrater' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPERIMENTS))
