"""Every method at one W/A on one network, read from the cached runs of notebooks 03, 05, 06 and 07.

One row per method: top-1 mean and sample std over its seeds, its test images, the seconds one run
cost (PTQ, or QAT with its evaluation) and the relative MAC cost of :mod:`.cost`. Nothing is re-run
here: a row exists only where its notebook's cached record does, and the row says which cache it
came from (``source``). The methods:

* notebook 03 (``sq_ptq_run``, SQ: Oh, Sim, Kim, Lee, ECCV 2022, Tables 2-3): uniform RTN, one-word
  log, two-word log, APoT, SQ (universal set option 5), each with and without AdaRound-style refine;
* notebook 05 (``qrater_run``, Kim et al., *Q-Rater*, arXiv:2105.01868): Q-Rater with all three
  operations, grid search, the notebook's accuracy objective;
* notebook 06 (``lsq_run``, Esser et al., *LSQ*, ICLR 2020; Gongyo et al., *nuLSQ*, ACCV 2024): LSQ and
  the best of nuLSQ-A/W/WA by mean top-1 (named in the row);
* notebook 07 (``alq_ptq``, ``alq_run``, Oh, Sim, Lee, Lee, CVPR 2021): STLQ PTQ and fine-tuned STLQ at
  select ratio :data:`STLQ_RATIO` (per element), their MAC-weighted NZR and two-cycle fraction;
* notebook 08's own peer runs (``peer_run``, :mod:`.peer_runs`, weight-only): AIMET AdaRound at each
  cached iteration count and Brevitas GPTQ, on notebook 03's calibration draws and test images.

Records are matched on their whole setting (model, data set, bits, the notebooks' defaults named
below); a record of another setting is never mixed in.
"""
from __future__ import annotations

import numpy as np

from ..lsq.experiments.runs import _std
from ..models import imagenet_key
from ..results import records
from .cost import relative_mac_cost
from .peer_runs import group_order, peer_groups, peer_label

STLQ_RATIO = 0.15  # notebook 07's default select ratio
SQ_UNIVERSAL = 5
QRATER_OPS = ["clip", "round", "bias"]


def _row(method: str, source: str, accs, seconds, test_n, w_bits, a_bits, **measured) -> dict:
    return {"method": method, "source": source, "top-1": float(np.mean(accs)), "std": _std(np.asarray(accs, dtype=np.float64)),
            "seeds": len(accs), "test images": test_n, "seconds": float(np.mean(seconds)),
            "relative MAC cost": relative_mac_cost(method, w_bits, 8 if a_bits is None else a_bits, **measured)}


def _groups(name: str, match, key, value, model: str, dataset: str):
    """``{key: [value, ...]}`` over the ``name`` records that ``match`` and, for an ImageNet network,
    were run on this process's weights and ImageNet folder (:func:`lowbit.models.imagenet_key`)."""
    identity = imagenet_key(model, dataset).items()
    out: dict = {}
    for rec in records(name):
        c, p = rec["config"], rec["payload"]
        if match(c, p) and all(c.get(k) == v for k, v in identity):
            out.setdefault(key(c, p), []).append(value(c, p))
    return out


def sq_rows(model: str, dataset: str, w_bits: int, a_bits: int | None) -> list[dict]:
    """Notebook 03's PTQ cells (every method, option 5 for SQ), mean over seeds."""
    def match(c, p):
        return ((c.get("model"), c.get("dataset"), c.get("w_bits"), c.get("a_bits")) == (model, dataset, w_bits, a_bits)
                and c.get("universal") in (None, SQ_UNIVERSAL))

    groups = _groups("sq_ptq_run", match, lambda c, p: (c["method"] + (" + refine" if c["refine"] else ""),
                                                        c.get("test_size")),
                     lambda c, p: (p["accuracy"], p["seconds"]), model, dataset)
    return [_row(m, "notebook 03 (sq_ptq_run)", [a for a, _ in v], [s for _, s in v], n or "all", w_bits, a_bits)
            for (m, n), v in sorted(groups.items(), key=str)]


def qrater_rows(model: str, dataset: str, w_bits: int, a_bits: int | None, objective: str = "accuracy",
                per_class: int | None = None) -> list[dict]:
    """Q-Rater's (1)+(2)+(3) grid-search run (every searched layer) with ``objective`` on ``per_class``
    training images per class (``None``: any): notebook 05's Table 1 run (``"accuracy"``) or notebook
    08's objective study (``"loss"``, named in the row)."""
    def match(c, p):
        return ((c.get("model_name"), c.get("dataset"), c.get("w_bits"), c.get("a_bits")) == (model, dataset, w_bits, a_bits)
                and c.get("ops") == QRATER_OPS and c.get("search") == "grid" and c.get("objective", "accuracy") == objective
                and per_class in (None, c.get("per_class")) and not {"targets", "order", "bias_mode"} & set(c))

    groups = _groups("qrater_run", match, lambda c, p: (p["test_n"], c.get("per_class"), _probes_per_tensor(c)),
                     lambda c, p: (p["test_accuracy"], p["seconds"]), model, dataset)
    method, source = ("Q-Rater", "notebook 05 (qrater_run)") if objective == "accuracy" else \
        (f"Q-Rater ({objective}, {{}}/class)", "notebook 08 (qrater_run)")
    grids = {g for _, _, g in groups}  # runs on different grids are never averaged as if they were seeds
    return [_row(method.format(k) + (f" ({g[0]}+{g[1]} probes per tensor)" if len(grids) > 1 else ""), source,
                 [a for a, _ in v], [s for _, s in v], n, w_bits, a_bits)
            for (n, k, g), v in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2]))]


def _probes_per_tensor(config: dict) -> tuple:
    """``(clipping, rounding)`` grid probes per tensor of a ``qrater_run`` config (its grid's size)."""
    n_round = len(config.get("gamma_n_grid", ())) * (len(config.get("gamma_s_grid", ())) if config.get("order", 2) == 2 else 1)
    return len(config.get("clip_grid", ())), n_round


def lsq_rows(model: str, dataset: str, bits: int) -> list[dict]:
    """Notebook 06's LSQ and its best nuLSQ variant at W/A ``bits``/``bits``."""
    groups = _groups("lsq_run", lambda c, p: (c.get("model_name"), c.get("dataset"), c.get("bits")) == (model, dataset, bits),
                     lambda c, p: c["variant"], lambda c, p: (p["test_accuracy"], p["seconds"], p["test_n"]), model, dataset)
    rows = {v: _row(v, "notebook 06 (lsq_run)", [a for a, _, _ in r], [s for _, s, _ in r], r[0][2], bits, bits)
            for v, r in groups.items()}
    nulsq = [r for v, r in rows.items() if v.startswith("nuLSQ")]
    out = [rows["LSQ"]] if "LSQ" in rows else []
    if nulsq:
        out.append(dict(max(nulsq, key=lambda r: r["top-1"]), method=f"nuLSQ (best: {max(nulsq, key=lambda r: r['top-1'])['method']})"))
    return out


def _mac_weighted(layers: dict, field: str) -> float:
    macs = np.array([v["macs"] for v in layers.values()], dtype=np.float64)
    return float(np.dot(macs, [v[field] for v in layers.values()]) / macs.sum())


def stlq_rows(model: str, dataset: str, bits: int) -> list[dict]:
    """Notebook 07's STLQ PTQ cell and fine-tuned runs (select ratio :data:`STLQ_RATIO`, per element)."""
    out = []
    ptq = _groups("alq_ptq", lambda c, p: ((c.get("model_name"), c.get("dataset"), c.get("bits")) == (model, dataset, bits)
                                            and c.get("select_ratio") == STLQ_RATIO and c.get("tile") is None),
                  lambda c, p: p["test_n"], lambda c, p: p, model, dataset)
    for n, ps in sorted(ptq.items()):
        out.append(_row("STLQ", "notebook 07 (alq_ptq)", [p["accuracy"] for p in ps], [p["seconds"] for p in ps], n,
                        bits, bits, two_cycle_fraction=ps[0]["mac_two_cycle_fraction"], nzr=ps[0]["mac_nzr"]))
    key = str(STLQ_RATIO)
    ft = _groups("alq_run", lambda c, p: ((c.get("model_name"), c.get("dataset"), c.get("bits")) == (model, dataset, bits)
                                           and c.get("select_ratio") == STLQ_RATIO and c.get("select") is True
                                           and c.get("tile") is None and key in (p.get("deployed") or {})),
                 lambda c, p: p["test_n"], lambda c, p: p["deployed"][key] | {"seconds": p["seconds"]}, model, dataset)
    for n, ds in sorted(ft.items()):
        f = float(np.mean([_mac_weighted(d["layers"], "two_cycle_fraction") for d in ds]))
        z = float(np.mean([_mac_weighted(d["layers"], "nzr") for d in ds]))
        out.append(_row("STLQ fine-tuned", "notebook 07 (alq_run)", [d["accuracy"] for d in ds],
                        [d["seconds"] for d in ds], n, bits, bits, two_cycle_fraction=f, nzr=z))
    return out


def peer_rows(model: str, dataset: str, w_bits: int, calib_size: int = 1024) -> list[dict]:
    """Notebook 08's cached peer-library runs (weight-only), one row per ``(method, iterations)``."""
    return [_row(peer_label(method, it), "notebook 08 (peer_run)", [p["accuracy"] for p in ps],
                 [p["seconds"] for p in ps], n or "all", w_bits, None)
            for (method, it, n), ps in sorted(peer_groups(model, dataset, w_bits, calib_size).items(), key=group_order)]


def cross_paper_rows(model: str, dataset: str, w_bits: int, a_bits: int | None,
                     qrater: tuple = ("accuracy", None), peer_calib_size: int = 1024) -> list[dict]:
    """Every cached method at W/A ``w_bits``/``a_bits`` (``a_bits=None``: weight-only, activations FP;
    costed with 8-bit activations), each row with ``W/A``, ``network`` and ``pareto`` (on the front of
    accuracy vs relative MAC cost among these rows). ``qrater``: ``(objective, per_class)`` of the
    Q-Rater row (:func:`qrater_rows`); ``peer_calib_size``: the calibration size of the peer rows."""
    rows = sq_rows(model, dataset, w_bits, a_bits) + qrater_rows(model, dataset, w_bits, a_bits, *qrater)
    if a_bits is None:
        rows += peer_rows(model, dataset, w_bits, peer_calib_size)
    if a_bits == w_bits:
        rows += lsq_rows(model, dataset, w_bits) + stlq_rows(model, dataset, w_bits)
    wa = f"{w_bits}/{'FP' if a_bits is None else a_bits}"
    front = pareto_front([(r["relative MAC cost"], r["top-1"]) for r in rows])
    return [dict(r, network=f"{model}/{dataset}", **{"W/A": wa, "pareto": i in front}) for i, r in enumerate(rows)]


def pareto_front(points) -> set:
    """Indices of the ``(cost, accuracy)`` points no other point dominates (cost <= and accuracy >=,
    one of them strictly)."""
    pts = list(points)
    return {i for i, (c, a) in enumerate(pts)
            if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in pts)}


def front_lines(rows: list[dict]) -> list[str]:
    """Per ``W/A``, the methods on the front from cheapest to most accurate, with their numbers."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["W/A"], []).append(r)
    out = []
    for wa, rs in groups.items():
        front = sorted((r for r in rs if r["pareto"]), key=lambda r: r["relative MAC cost"])
        best = max(rs, key=lambda r: r["top-1"])
        spread = float(np.ptp([r["top-1"] for r in rs]))
        out.append(f"W/A {wa}: front " + " -> ".join(
            f"{r['method']} ({r['top-1']:.2f} +- {r['std']:.2f} at {r['relative MAC cost']:.2f}x)" for r in front)
            + f"; most accurate {best['method']}; spread over {len(rs)} methods {spread:.2f} points")
    return out


COLUMNS = ("network", "W/A", "method", "top-1", "std", "seeds", "test images", "relative MAC cost", "seconds",
           "pareto", "source")


def table_rows(settings, qrater: tuple = ("accuracy", None), peer_calib_size: int = 1024) -> list[dict]:
    """:func:`cross_paper_rows` of every ``(model, dataset, w_bits, a_bits)`` in ``settings``, in
    :data:`COLUMNS` order (notebook 08's tables)."""
    return [{k: r[k] for k in COLUMNS} for s in settings
            for r in cross_paper_rows(*s, qrater=qrater, peer_calib_size=peer_calib_size)]
