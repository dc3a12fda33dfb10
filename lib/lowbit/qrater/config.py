"""The options of one Q-Rater run (Algorithm 1 of appendix E), checked once, up front.

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868. The paper's search resolutions (sec. 5.4, sec. 6) are the
defaults: ``gamma_c`` 0.1..1.0 by 0.1, ``gamma_n`` -1..1 by 0.1, ``gamma_s`` 0..1 by 0.25, and
50 Bayesian-optimisation probes after each grid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..core.clipping import CLIP_RULES
from ..core.validation import check_bits, check_choice, check_positive_int, resolve_device
from .rounding import check_gamma, check_order

OPS = ("clip", "round", "bias")
SEARCHES = ("grid", "bo")
BIAS_MODES = ("never", "always", "selective")
TARGETS = ("weight", "activation")
OBJECTIVES = ("accuracy", "loss")
ALL_BUT_FIRST = "all-but-first"  # ``layers``: every quantizable layer after the first

PAPER_CLIP_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))
PAPER_GAMMA_N_GRID = tuple(round(-1.0 + 0.1 * i, 10) for i in range(21))
PAPER_GAMMA_S_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_BO_STEPS = 50  # sec. 6: "BO explores additional 50 hyper-parameter sets"
CE_TIE_BREAK = 1e-3  # target = accuracy % - 1e-3 * cross-entropy (200 images give 0.5 % steps)


GRIDS = ("paper", "coarse")


def search_grids(name: str = "paper") -> dict:
    """The ``clip_grid``, ``gamma_n_grid``, ``gamma_s_grid`` and ``bo_steps`` of a search: ``"paper"``,
    the paper's resolutions (sec. 5.4: ``gamma_c`` and ``gamma_n`` by 0.1, ``gamma_s`` by 0.25) and 50
    BO probes (sec. 6); ``"coarse"``, two to three values per parameter and 2 BO probes (a quick check
    of a pipeline, not a result)."""
    check_choice(name, GRIDS, "grid")
    if name == "paper":
        return dict(clip_grid=list(PAPER_CLIP_GRID), gamma_n_grid=list(PAPER_GAMMA_N_GRID),
                    gamma_s_grid=list(PAPER_GAMMA_S_GRID), bo_steps=PAPER_BO_STEPS)
    return dict(clip_grid=[0.5, 1.0], gamma_n_grid=[-0.5, 0.0, 0.5], gamma_s_grid=[0.5], bo_steps=2)


@dataclass(frozen=True)
class QRaterConfig:
    """Every option of :func:`lowbit.qrater.run` (API); invalid values raise at construction.

    ``w_bits``/``a_bits``: bit widths of weights / input activations (``None`` keeps that tensor
    FP). ``search``: ``"grid"`` or ``"bo"`` (the grid, then ``bo_steps`` BO probes per search).
    ``ops``: the Q-Rater operations used, a subset of ``("clip", "round", "bias")``; without
    ``"clip"`` the threshold is ``clip_rule``'s baseline, without ``"round"`` rounding is RTN.
    ``seed``: seeds the BO and the baselines' value samples. ``order``: rounding order (1: eq. 4,
    2: eq. 6). ``bias_mode``: ``"selective"`` (Algorithm 1's ``BiasCorr``), ``"always"`` or
    ``"never"``; ``None`` means selective if ``"bias"`` is in ``ops``, else never. ``targets``:
    which tensors get the clip/round search (the other keeps baseline + RTN). ``layers``: indices
    or names of the quantizable layers to quantize (all if ``None``, every one after the first for
    ``"all-but-first"``). ``objective``: top-1
    accuracy on the calibration set, ties broken by lower cross-entropy, or ``"loss"`` (minus the
    cross-entropy). ``batch_size``: calibration batch of each forward pass; ``stat_batch``: the
    batch over which ``max|x|`` of an activation is taken (then averaged). ``device``: where the
    run happens (``None``: the model's device; ``"cuda"`` without a GPU raises ``ValueError``).
    """

    w_bits: int | None
    a_bits: int | None
    search: str = "bo"
    ops: Sequence[str] = OPS
    seed: int = 0
    order: int = 2
    clip_rule: str = "mse"
    bias_mode: str | None = None
    targets: Sequence[str] = TARGETS
    layers: Sequence | None = None
    clip_grid: Sequence[float] = PAPER_CLIP_GRID
    gamma_n_grid: Sequence[float] = PAPER_GAMMA_N_GRID
    gamma_s_grid: Sequence[float] = PAPER_GAMMA_S_GRID
    bo_steps: int = PAPER_BO_STEPS
    objective: str = "accuracy"
    batch_size: int = 200
    stat_batch: int = 50
    progress: bool = False
    device: str | torch.device | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        check_choice(self.search, SEARCHES, "search")
        put("ops", tuple(self.ops))
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise ValueError(f"unknown ops {bad}: use a subset of {OPS}")
        put("targets", tuple(self.targets))
        if not set(self.targets) <= set(TARGETS):
            raise ValueError(f"targets must be a subset of {TARGETS}, got {self.targets!r}")
        check_choice(self.clip_rule, CLIP_RULES, "clip_rule")
        if self.bias_mode is None:
            put("bias_mode", "selective" if "bias" in self.ops else "never")
        check_choice(self.bias_mode, BIAS_MODES, "bias_mode")
        check_choice(self.objective, OBJECTIVES, "objective")
        check_order(self.order)
        put("w_bits", check_bits(self.w_bits, "w_bits", allow_none=True))
        put("a_bits", check_bits(self.a_bits, "a_bits", allow_none=True))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name, lo, hi, open_lo in (("clip_grid", 0.0, 1.0, True), ("gamma_n_grid", -1.0, 1.0, False),
                                      ("gamma_s_grid", 0.0, 1.0, False)):
            put(name, tuple(getattr(self, name)))
            for g in getattr(self, name):
                check_gamma(g, lo, hi, f"{name} value", open_lo=open_lo)
        if isinstance(self.bo_steps, bool) or not isinstance(self.bo_steps, (int, np.integer)) or self.bo_steps < 0:
            raise ValueError(f"bo_steps must be a non-negative int, got {self.bo_steps!r}")
        if isinstance(self.layers, str) and self.layers != ALL_BUT_FIRST:
            raise ValueError(f"layers must be None, {ALL_BUT_FIRST!r} or a list of layer indices / names, "
                             f"got {self.layers!r}")
        if self.layers is not None and self.layers != ALL_BUT_FIRST:
            put("layers", tuple(self.layers))
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.stat_batch, "stat_batch")
        if self.device is not None:
            resolve_device(self.device)  # an unknown or missing accelerator fails here, not mid-run

    @property
    def n_bo(self) -> int:
        """BO probes per search: ``bo_steps`` for ``search="bo"``, else 0."""
        return int(self.bo_steps) if self.search == "bo" else 0

    def target(self, accuracy: float, loss: float) -> float:
        """The maximised objective of one probe."""
        return accuracy - CE_TIE_BREAK * loss if self.objective == "accuracy" else -loss

    def record(self, layers: list[str], n_calib: int) -> dict:
        """The JSON-able summary stored with a run (``QRaterResult.config``)."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "search": self.search, "ops": list(self.ops),
                "seed": self.seed, "order": self.order, "clip_rule": self.clip_rule, "bias_mode": self.bias_mode,
                "targets": list(self.targets), "layers": layers, "clip_grid": list(self.clip_grid),
                "gamma_n_grid": list(self.gamma_n_grid), "gamma_s_grid": list(self.gamma_s_grid),
                "bo_steps": self.n_bo, "objective": self.objective, "n_calib": n_calib}


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(QRaterConfig))
