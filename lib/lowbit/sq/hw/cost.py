"""Hardware cost of SQ's shift-add multiplier and MAC, and of a uniform-weight MAC.

SQ's supplementary material (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate
Post-Training Quantization*, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 1 and Fig. 2: the
multiplier of SQ minus its adder ("the shifters part") is two MUXes, one per term set A and B of Table 1, whose inputs
are constant-shifted copies of the activation x (wires, no gates) plus a constant zero.
Cost model: a k-bit M-to-1 MUX costs ``k (M - 1)`` (the number of 1-bit 2-to-1 MUXes);
M is the number of cases including zero; k is the width of x plus that shifter's largest
shift. With 4-bit x this gives 45, 51, 80, 108, 45 for options 1..5 (supplement Table 2).

Shift amounts are measured from the unshifted input ``x * 2**0`` (the convention that
reproduces the 45/51/80/108/45 row): a term ``2**e`` is a shift by ``|e|`` positions. For
a user-defined set with terms above one, the width grows on both sides, so in general
``k = input_bits + max(0, max e) - min(0, min e)``.

:func:`cost_table` extends the model to whole MACs in the *unit-gate model* (Tyagi 1993;
Zimmermann 1997): 2-input AND/OR = 1, XOR = 2, inverter = 0, hence 2:1 MUX = 3,
full adder = 7 (2 XOR + 2 AND + 1 OR). Every count is an upper bound from textbook
structures (ripple-carry adders, array multiplier), no logic optimisation, as in the
supplement's own model. :data:`ASSUMPTIONS` states each one next to the column it feeds.
The unit-gate primitives (``UNIT_GATES``, the MUX, adder, negation and array-multiplier counts)
live in :mod:`lowbit.core.gates`, shared with ALQ's cost model; ``UNIT_GATES`` is re-exported here.
"""
from __future__ import annotations

import math

from ...core.gates import UNIT_GATES, array_multiplier_gates, mux2_count, ripple_adder_gates, xor_gates
from ...core.validation import check_bits
from .terms import TermSet, universal_terms

ASSUMPTIONS = {
    "sq_shifters_mux2": "supplement model k(M-1) per MUX, one MUX per term set; constant shifts are wires",
    "sq_shifters_gates": "each 1-bit 2:1 MUX = 3 unit gates (AND-OR, select inverter free)",
    "sq_adder_gates": "ripple-carry adder of the two MUX outputs, one full adder (7) per aligned bit "
                      "(input bits + span of shifts from 2**0), carry-out is the product MSB",
    "sq_mult_gates": "shifters + adder: SQ's whole multiplier (Fig. 4a)",
    "sq_product_bits": "adder width + 1 carry bit",
    "sign_gates": "conditional negation of the product: one XOR (2) per product bit, +1 as the "
                  "accumulator's carry-in (free)",
    "acc_gates": "accumulator adder: ripple-carry full adders over product bits + guard bits "
                 "(guard_bits = ceil(log2 fan-in)); the accumulator register is excluded (both designs "
                 "need one, its width follows the adder's)",
    "sq_decoder_register_bits": "N x (select bits of A + select bits of B): the per-layer QPS register "
                                "(16 bits for 3-bit option 5, Sec. 3.5); storage shared by the layer, no gates",
    "sq_decoder_mux_gates": "(select bits) x (N-1) 2:1 MUXes turning an index into select lines; "
                            "shareable among MACs (Sec. 3.5), so NOT included in sq_mac_gates",
    "uniform_mult_gates": "sign-magnitude weight (1 sign + m = bits-1 magnitude bits, the same storage as SQ) "
                          "times unsigned a-bit activation in an m x a array multiplier: m*a AND2 + (m-1)*a "
                          "full adders (half adders counted as full adders: upper bound)",
    "uniform_product_bits": "m + a",
    "equiv_weight_bits": "uniform weight bits whose integer grid holds every point of S_U at SQ's arithmetic "
                         "precision: 1 + ceil(log2(max(p) * 2**-e_min + 1)) (7 for option 5)",
    "equiv_mac_gates": "uniform MAC (same formulas) at equiv_weight_bits: a multiplier that can multiply by "
                       "any S_U value, which is what SQ's shift-add MAC replaces",
    "mac_gates": "multiplier + sign + accumulator adder",
}


# supplement Table 2, "Relative HW cost (4-bit input)": for comparison only, never used in a computation
PAPER_HW_COST_4BIT = {1: 45, 2: 51, 3: 80, 4: 108, 5: 45}


def _fmt_terms(terms: TermSet) -> str:
    return "{" + ", ".join("0" if e is None else ("1" if e == 0 else f"2^{e}") for e in terms.exponents) + "}"


def supp_table2_hw_rows(input_bits: int = 4, options=(1, 2, 3, 4, 5)) -> list[dict]:
    """Supplement Table 2's "Relative HW cost" row, recomputed: one row per option with
    the MUX sizes, our cost and the paper's (4-bit input only)."""
    rows = []
    for o in options:
        A, B = universal_terms(o)
        rows.append({"option": o, "A": _fmt_terms(A), "B": _fmt_terms(B),
                     "M_A": A.cases, "k_A": mux_width(A, input_bits), "M_B": B.cases, "k_B": mux_width(B, input_bits),
                     "hw_cost": shifter_cost(o, input_bits),
                     "hw_cost_paper": PAPER_HW_COST_4BIT.get(o) if input_bits == 4 else None})
    return rows


def mux_width(terms: TermSet, input_bits: int) -> int:
    """k of one shifter: input width plus its largest shift measured from 2**0."""
    exps = terms.nonzero_exponents
    if not exps:
        return int(input_bits)
    return int(input_bits) + max(0, max(exps)) - min(0, min(exps))


def mux_cost(terms: TermSet, input_bits: int) -> int:
    """Supplement's model of one shifter: a k-bit M-to-1 MUX costs k (M - 1)."""
    return mux2_count(mux_width(terms, input_bits), terms.cases)


def shifter_cost(option, input_bits: int = 4) -> int:
    """Relative HW cost of the shifters part of SQ's multiplier (supplement Sec. 1, Table 2).

    ``option`` is 1..5 (SQ Table 1) or a user-defined ``(A, B)`` pair of term lists (zeros and
    powers of two). Sum over MUX A and MUX B of ``k (M - 1)``. Options 1..5 at 4-bit input
    give 45, 51, 80, 108, 45.
    """
    input_bits = check_bits(input_bits, "input_bits", hi=32, lo=1)
    A, B = universal_terms(option)
    return mux_cost(A, input_bits) + mux_cost(B, input_bits)


def shifter_design(option, input_bits: int = 4) -> list[dict]:
    """Supplement Fig. 2 as a table: one row per MUX input (case), with its shift and cost.

    ``shift`` is the constant shift applied to ``x`` on that input (``x >> 3`` for 2**-3,
    ``x << 1`` for 2**1, ``0`` for the zero input); ``k``, ``M`` and ``mux_cost`` repeat the
    MUX-level numbers of the cost model on each of its rows.
    """
    input_bits = check_bits(input_bits, "input_bits", hi=32, lo=1)
    rows = []
    for name, terms in zip(("A", "B"), universal_terms(option)):
        k, cost = mux_width(terms, input_bits), mux_cost(terms, input_bits)
        for sel, e in enumerate(terms.exponents):
            if e is None:
                term, shift = "0", "constant 0"
            else:
                term = "1" if e == 0 else f"2^{e}"
                shift = "x" if e == 0 else (f"x >> {-e}" if e < 0 else f"x << {e}")
            rows.append({"mux": name, "select": sel, "term": term, "input": shift,
                         "M": terms.cases, "k": k, "mux_cost": cost})
    return rows


def _adder_bits(A: TermSet, B: TermSet, input_bits: int) -> int:
    exps = A.nonzero_exponents + B.nonzero_exponents
    if not exps:
        return int(input_bits)
    return int(input_bits) + max(0, max(exps)) - min(0, min(exps))


def sq_mac_cost(option=5, weight_bits: int = 4, act_bits: int = 4, guard_bits: int = 10) -> dict:
    """Unit-gate cost of one SQ MAC (Fig. 4a): two MUXes, adder, sign, accumulator adder.

    See :data:`ASSUMPTIONS` for each term. ``weight_bits`` (sign + index) only sets the
    decoder (register and index MUX); the datapath depends on the term sets and ``act_bits``.
    """
    weight_bits = check_bits(weight_bits, "weight_bits", hi=16, lo=2)
    act_bits = check_bits(act_bits, "act_bits", hi=32, lo=1)
    guard_bits = check_bits(guard_bits, "guard_bits", hi=64, lo=0)
    A, B = universal_terms(option)
    g = UNIT_GATES
    mux2 = mux_cost(A, act_bits) + mux_cost(B, act_bits)
    adder_bits = _adder_bits(A, B, act_bits)
    product_bits = adder_bits + 1
    n_points = 2 ** (weight_bits - 1)
    select_bits = A.select_bits + B.select_bits
    out = {
        "sq_shifters_mux2": mux2,
        "sq_shifters_gates": mux2 * g["mux2"],
        "sq_adder_gates": ripple_adder_gates(adder_bits),
        "sq_product_bits": product_bits,
        "sq_sign_gates": xor_gates(product_bits),
        "sq_acc_gates": ripple_adder_gates(product_bits + guard_bits),
        "sq_decoder_register_bits": n_points * select_bits,
        "sq_decoder_mux_gates": select_bits * (n_points - 1) * g["mux2"],
    }
    out["sq_mult_gates"] = out["sq_shifters_gates"] + out["sq_adder_gates"]
    out["sq_mac_gates"] = out["sq_mult_gates"] + out["sq_sign_gates"] + out["sq_acc_gates"]
    return out


def uniform_mac_cost(weight_bits: int = 4, act_bits: int = 4, guard_bits: int = 10) -> dict:
    """Unit-gate cost of one uniform-weight MAC: sign-magnitude array multiplier + sign + accumulator."""
    weight_bits = check_bits(weight_bits, "weight_bits", hi=16, lo=2)
    act_bits = check_bits(act_bits, "act_bits", hi=32, lo=1)
    guard_bits = check_bits(guard_bits, "guard_bits", hi=64, lo=0)
    m = weight_bits - 1  # magnitude bits
    product_bits = m + act_bits
    out = {
        "uniform_mult_gates": array_multiplier_gates(m, act_bits),
        "uniform_product_bits": product_bits,
        "uniform_sign_gates": xor_gates(product_bits),
        "uniform_acc_gates": ripple_adder_gates(product_bits + guard_bits),
    }
    out["uniform_mac_gates"] = out["uniform_mult_gates"] + out["uniform_sign_gates"] + out["uniform_acc_gates"]
    return out


def equivalent_uniform_bits(option=5) -> int:
    """Bits of a sign-magnitude uniform weight whose integer grid contains all of S_U.

    Every point is ``(2**sa + 2**sb) * 2**e_min``; the largest integer ``max(p) * 2**-e_min``
    needs ``ceil(log2(. + 1))`` magnitude bits, plus a sign bit.
    """
    A, B = universal_terms(option)
    exps = A.nonzero_exponents + B.nonzero_exponents
    if not exps:
        raise ValueError("term sets hold only zeros: there is no multiplier to compare with")
    e_min = min(exps)
    top = max((2.0 ** e for e in A.nonzero_exponents), default=0.0) + \
        max((2.0 ** e for e in B.nonzero_exponents), default=0.0)
    return 1 + math.ceil(math.log2(int(top / 2.0 ** e_min) + 1))


def guard_bits_for(fan_in: int) -> int:
    """Accumulator guard bits so that ``fan_in`` products cannot overflow: ceil(log2 fan_in)."""
    if int(fan_in) < 1:
        raise ValueError(f"fan_in must be a positive number of products, got {fan_in}")
    return max(0, math.ceil(math.log2(int(fan_in))))


def cost_table(weight_bits=(2, 3, 4), act_bits=(4, 8), option=5, fan_in: int = 576) -> list[dict]:
    """SQ's MAC vs a uniform-weight MAC in the unit-gate model, one row per (weight, act) bits.

    ``fan_in`` sets the accumulator guard bits (576 = 64 x 3 x 3, the largest fan-in of our
    ResNet-20). Columns are explained in :data:`ASSUMPTIONS`; ``ratio_*`` are SQ / uniform.
    """
    if isinstance(weight_bits, int):
        weight_bits = (weight_bits,)
    if isinstance(act_bits, int):
        act_bits = (act_bits,)
    guard = guard_bits_for(fan_in)
    rows = []
    for wb in weight_bits:
        for ab in act_bits:
            sq = sq_mac_cost(option, wb, ab, guard)
            un = uniform_mac_cost(wb, ab, guard)
            row = {"weight_bits": int(wb), "act_bits": int(ab)}
            row.update(sq)
            row.update(un)
            row["ratio_mult"] = sq["sq_mult_gates"] / un["uniform_mult_gates"]
            row["ratio_mac"] = sq["sq_mac_gates"] / un["uniform_mac_gates"]
            eq_bits = equivalent_uniform_bits(option)
            row["equiv_weight_bits"] = eq_bits
            row["equiv_mac_gates"] = uniform_mac_cost(eq_bits, ab, guard)["uniform_mac_gates"]
            row["ratio_mac_equiv"] = sq["sq_mac_gates"] / row["equiv_mac_gates"]
            rows.append(row)
    return rows
