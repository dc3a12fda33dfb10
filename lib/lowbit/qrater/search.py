"""Grid + Bayesian-optimisation search of one tensor's Q-Rater hyper-parameters (Algorithm 1, ``BO``).

Kim, Lee, Ro, Jeon, Kwon, Park, Oh, *Q-Rater: Non-Convex Optimization for Post-Training Uniform
Quantization*, arXiv:2105.01868, sec. 6 and appendix E: every grid point is probed and registered
with a Bayesian optimiser (``bayesian-optimization`` package: GP with a Matern kernel, UCB
acquisition), which then explores further points. The best probe wins; among equal targets the
first one (grid order, then BO order).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np

# the clipping factor's search interval: the paper's (0, 1.0]; gamma_c -> 0 would give a zero step
GAMMA_C_BOUNDS = (0.01, 1.0)
GAMMA_N_BOUNDS = (-1.0, 1.0)
GAMMA_S_BOUNDS = (0.0, 1.0)


def bayes_search(f: Callable[..., float], pbounds: dict, grid: Sequence[dict], n_iter: int,
                 seed: int = 0) -> list[dict]:
    """Grid probes, then ``n_iter`` Bayesian-optimisation probes (Algorithm 1, ``BO.probe``/``BO.run``).

    ``f(**params) -> target`` (maximised). Each grid point is evaluated and registered with
    ``BayesianOptimization.register``; then ``maximize(init_points=0, n_iter=n_iter)`` is seeded
    with ``random_state=seed``, so the same seed gives the same probes. Returns every probe as
    ``{"params": {...}, "target": t, "phase": "grid" | "bo"}`` in the order ``f`` was called (a BO
    suggestion that repeats a known point is not re-evaluated and not listed), so the ``i``-th
    probe is the ``i``-th call of ``f``.
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative int, got {n_iter!r}")
    keys = list(pbounds)
    probes: list[dict] = []
    for p in grid:
        if set(p) != set(keys):
            raise ValueError(f"grid point {p} must have exactly the keys {keys}")
        probes.append({"params": {k: float(p[k]) for k in keys}, "target": float(f(**p)), "phase": "grid"})
    if n_iter == 0:
        return probes
    # imported here, not at module top: bayes_opt pulls in scikit-learn (about 2 s), and only BO needs it
    from bayes_opt import BayesianOptimization

    def wrapped(**p):
        t = float(f(**p))
        probes.append({"params": {k: float(p[k]) for k in keys}, "target": t, "phase": "bo"})
        return t

    opt = BayesianOptimization(f=wrapped, pbounds={k: tuple(map(float, v)) for k, v in pbounds.items()},
                               random_state=int(seed), verbose=0)
    for p in probes:
        opt.register(params=p["params"], target=p["target"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn GP convergence chatter
        opt.maximize(init_points=0, n_iter=int(n_iter))
    return probes


def best_probe(probes: list[dict]) -> dict:
    """The first probe with the highest target (grid order first, then BO order)."""
    if not probes:
        raise ValueError("no probes to choose from: the search grid is empty")
    return max(probes, key=lambda p: p["target"])  # max keeps the first of equals


def clip_space(clip_grid: Sequence[float]) -> tuple[dict, list[dict]]:
    """Bounds and grid points of the clipping search (``gamma_c``)."""
    return {"gamma_c": GAMMA_C_BOUNDS}, [{"gamma_c": g} for g in clip_grid]


def round_space(order: int, gamma_n_grid: Sequence[float], gamma_s_grid: Sequence[float]) -> tuple[dict, list[dict]]:
    """Bounds and grid points of the rounding search: ``gamma_n`` (order 1) or ``gamma_n x gamma_s`` (order 2)."""
    if order == 1:
        return {"gamma_n": GAMMA_N_BOUNDS}, [{"gamma_n": g} for g in gamma_n_grid]
    return ({"gamma_n": GAMMA_N_BOUNDS, "gamma_s": GAMMA_S_BOUNDS},
            [{"gamma_n": gn, "gamma_s": gs} for gn in gamma_n_grid for gs in gamma_s_grid])


def search_params(measure: Callable[..., float], space: tuple[dict, list[dict]], n_bo: int, seed: int) -> dict:
    """The best params of a grid + ``n_bo``-step BO search (:func:`bayes_search`) of ``measure``.

    ``measure(phase, **params) -> target`` is told whether it is a ``"grid"`` or a ``"bo"``
    probe (the grid points are the first ``len(grid)`` calls), so it can log each evaluation.
    """
    bounds, grid = space
    calls = [0]

    def f(**params):
        phase = "grid" if calls[0] < len(grid) else "bo"
        calls[0] += 1
        return measure(phase, **params)

    return best_probe(bayes_search(f, bounds, grid, n_bo, seed))["params"]
