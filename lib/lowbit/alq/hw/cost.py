"""STLQ's MAC cost in unit gates: two shifters, or one shifter and a second cycle per lane group.

Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*, CVPR 2021
(pp. 742-751). **Our interpretation** (see :mod:`lowbit.alq.hw`).

Cost model (:func:`stlq_mac_cost`, :data:`COST_ASSUMPTIONS`; *our interpretation*)
    Unit gates of :mod:`lowbit.core.gates` and the MUX model ``k (M - 1)`` of SQ's supplement (the
    same model as :mod:`lowbit.sq.hw.cost`, so the two papers' numbers compare). One log word needs
    one *shifter*: a MUX over the ``M = N`` cases (the shifts ``E - 0 .. E - (N-2)`` and the zero
    input) of width ``k = a_bits + E`` (``x << E`` is ``a_bits + E`` bits wide). Two designs:

    (a) *two shifters*: every PE has two shifters, an adder/subtractor of their outputs, the sign and
        the accumulator adder: one cycle per MAC whatever the NZR.
    (b) *one shifter, second cycle*: every PE has one shifter (and a ``w_bits``-wide 2:1 MUX that
        feeds it word 1 or word 2); ``lanes`` PEs run in lockstep on ``lanes`` consecutive weights
        along the input dimension, and the group takes a second cycle when any of its weights has a
        second word. Cycles per MAC ``1 + f``, ``f`` the fraction of two-cycle groups:
        ``f = 1 - (1 - NZR)^lanes`` per element with the second words placed at random,
        ``f = NZR`` per tile with ``tile == lanes`` (a tile is a lane group), or ``f`` measured
        from a real mask with :func:`two_cycle_fraction`.

    Storage per weight: ``b`` bits for the first word, ``NZR * b`` for the stored second words, and
    the flag: one bit per weight per element, ``1 / lanes`` per tile.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ...core.gates import mux2_count, mux_gates, ripple_adder_gates, xor_gates
from ...core.validation import check_bits, check_positive_int
from ..quantizers import MAX_BITS, log_points
from .words import STLQWords


COST_ASSUMPTIONS = {
    "shifter": "one log word = one shifter: a k-bit N-to-1 MUX (shifts E..0 of x plus the zero input), "
               "k = a_bits + E, k (N - 1) 2:1 MUXes of 3 unit gates (SQ supplement's model); constant "
               "shifts are wires",
    "a_adder_gates": "design (a): adder/subtractor of the two k-bit shifter outputs: k full adders (carry-out "
                     "is the (k+1)-th product bit), plus k XORs inverting word 2 when its sign differs from "
                     "word 1's (carry-in = that relative sign; stored relative, 0 without a second word)",
    "a_sign_gates": "design (a): conditional negation of the (k+1)-bit sum by sign1, one XOR per bit, the +1 as "
                    "the accumulator's carry-in (as SQ's MAC)",
    "b_word_select_gates": "design (b): a w_bits-wide 2:1 MUX feeding the shifter word 1 (cycle 1) or word 2 "
                           "(cycle 2)",
    "b_sign_gates": "design (b): conditional negation of the k-bit shifter output by the current word's sign",
    "acc_gates": "accumulator adder, ripple-carry over (k + 1 + guard_bits) bits in both designs: (a) adds "
                 "(k+1)-bit products, (b) adds up to two k-bit terms per weight; guard_bits = ceil(log2 "
                 "fan-in) as in lowbit.sq.hw.cost; the register is excluded",
    "cycles": "(a) 1 per MAC; (b) 1 + f, f = fraction of lane groups (lanes consecutive weights along the "
              "input dimension, in lockstep) holding a second word: 1 - (1 - NZR)^lanes per element with "
              "random placement, NZR per tile with tile == lanes, or given (two_cycle_fraction)",
    "gate_cycles_per_mac": "MAC gates x cycles per MAC: area-time of one MAC",
    "storage_bits_per_weight": "w_bits (first word) + NZR * w_bits (stored second words) + the flag: 1 bit "
                               "per weight per element, 1 / lanes per weight per tile",
}


def two_cycle_fraction(mask, lanes: int) -> float:
    """Measured ``f`` of design (b): the fraction of lane groups (``lanes`` consecutive weights along
    the input dimension of the mask seen as ``(O, K)``) holding at least one second word.

    ``mask``: a bool (or 0/1) tensor, e.g. ``STLQResult.mask``, or :class:`STLQWords` (its ``has2``);
    a 1-D mask is one row. ``K % lanes`` must be 0.
    """
    if isinstance(mask, STLQWords):
        mask = mask.has2
    if not isinstance(mask, torch.Tensor) or mask.ndim < 1 or mask.numel() == 0:
        raise ValueError("mask must be a non-empty tensor of second-word flags (STLQResult.mask)")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask must be bool or 0/1 integers, got {mask.dtype}")
        mask = mask != 0
    lanes = _check_lanes(lanes)
    m = mask.reshape(mask.shape[0] if mask.ndim > 1 else 1, -1)
    if m.shape[1] % lanes:
        raise ValueError(f"lanes={lanes} must divide the input dimension ({m.shape[1]} weights per output "
                         f"channel): lane groups do not cross output channels")
    return float(m.reshape(m.shape[0], -1, lanes).any(-1).double().mean())


def _check_lanes(lanes) -> int:
    return check_positive_int(lanes, "lanes", " (PEs per lockstep group)")


def _check_fraction(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(v)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def stlq_mac_cost(w_bits: int = 4, a_bits: int = 4, nzr: float = 0.15, lanes: int = 8,
                  two_cycle_fraction: float | None = None, guard_bits: int = 10, per_tile: bool = False) -> dict:
    """Unit-gate cost, cycles and storage of one STLQ MAC, designs (a) two shifters and (b) one shifter
    with a second cycle (module docstring; each term in :data:`COST_ASSUMPTIONS`; our interpretation).

    ``nzr``: fraction of weights with a second word; ``lanes``: PEs per lockstep group of design (b);
    ``two_cycle_fraction``: a measured ``f`` (:func:`two_cycle_fraction`), else ``f`` follows from
    ``nzr`` (``1 - (1 - nzr)^lanes`` per element, ``nzr`` with ``per_tile`` and tile == lanes);
    ``per_tile`` also sets the flag storage (``1 / lanes`` bit per weight instead of 1).
    """
    w_bits = check_bits(w_bits, "w_bits", hi=MAX_BITS)
    a_bits = check_bits(a_bits, "a_bits", hi=32, lo=1)
    guard_bits = check_bits(guard_bits, "guard_bits", hi=64, lo=0)
    nzr = _check_fraction(nzr, "nzr")
    lanes = _check_lanes(lanes)
    if not isinstance(per_tile, (bool, np.bool_)):
        raise ValueError(f"per_tile must be True or False, got {per_tile!r}")
    if two_cycle_fraction is not None:
        f, source = _check_fraction(two_cycle_fraction, "two_cycle_fraction"), "given"
    elif per_tile:
        f, source = nzr, "per tile (tile == lanes): f = NZR"
    else:
        f, source = 1.0 - (1.0 - nzr) ** lanes, "per element, random placement: f = 1 - (1 - NZR)^lanes"
    n = len(log_points(w_bits))  # N cases: N - 1 shifts and the zero input
    e = n - 2
    k = a_bits + e
    acc = ripple_adder_gates(k + 1 + guard_bits)
    out = {"w_bits": w_bits, "a_bits": a_bits, "nzr": nzr, "lanes": lanes, "per_tile": bool(per_tile),
           "E": e, "shifter_cases": n, "shifter_width": k, "shifter_mux2": mux2_count(k, n),
           "shifter_gates": mux_gates(k, n), "acc_bits": k + 1 + guard_bits, "acc_gates": acc}
    # design (a): two shifters, adder/subtractor, sign, accumulator
    out["a_shifters_gates"] = 2 * out["shifter_gates"]
    out["a_adder_gates"] = ripple_adder_gates(k) + xor_gates(k)
    out["a_product_bits"] = k + 1
    out["a_sign_gates"] = xor_gates(k + 1)
    out["a_mac_gates"] = out["a_shifters_gates"] + out["a_adder_gates"] + out["a_sign_gates"] + acc
    out["a_cycles_per_mac"] = 1.0
    out["a_gate_cycles_per_mac"] = out["a_mac_gates"] * out["a_cycles_per_mac"]
    # design (b): one shifter fed word 1 then word 2, sign, accumulator
    out["b_word_select_gates"] = mux_gates(w_bits, 2)
    out["b_sign_gates"] = xor_gates(k)
    out["b_mac_gates"] = out["shifter_gates"] + out["b_word_select_gates"] + out["b_sign_gates"] + acc
    out["b_two_cycle_fraction"] = f
    out["b_two_cycle_fraction_source"] = source
    out["b_cycles_per_mac"] = 1.0 + f
    out["b_gate_cycles_per_mac"] = out["b_mac_gates"] * out["b_cycles_per_mac"]
    out["flag_bits_per_weight"] = 1.0 / lanes if per_tile else 1.0
    out["storage_bits_per_weight"] = w_bits + nzr * w_bits + out["flag_bits_per_weight"]
    return out
