"""The MAC each method needs, in one unit-gate model: the cost axis of notebook 08.

Every method is put on the datapath its paper (or the field) builds for it, with the unit-gate
counts of :mod:`lowbit.core.gates` (2:1 MUX = 3, full adder = 7, ...), and divided by the cost of
a uniform-weight MAC at the same W/A (a sign-magnitude array multiplier, :func:`lowbit.sq.hw.uniform_mac_cost`):

* uniform weights (RTN, + refine, Q-Rater, LSQ, and the peers AIMET AdaRound and Brevitas GPTQ /
  learned round, whose 2^b-level signed grid needs the same b-bit multiplier): the uniform MAC itself (1.00).
* SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training
  Quantization*, ECCV 2022), Fig. 4a: two MUX shifters (term sets A and B of universal-set option 5),
  an adder, sign and accumulator (:func:`lowbit.sq.hw.sq_mac_cost`).
* one-word log, two-word log (SQ eqs. 5-6) and APoT (Li, Dong, Wang, *Additive Powers-of-Two
  Quantization*, ICLR 2020): *our interpretation*, SQ's Fig. 4a datapath with that method's own
  term sets (log: A = the log set, B = {0}; two-word log: A = B = the log set; APoT: its two
  additive term lists), since each of their points is a sum of at most two powers of two.
* STLQ (Oh, Sim, Lee, Lee, *Automated Log-Scale Quantization for Low-Cost Deep Neural Networks*,
  CVPR 2021): design (b) of :func:`lowbit.alq.hw.stlq_mac_cost` (one shifter, a second cycle for
  a lockstep group with a second word), as gate-cycles per MAC at the measured two-cycle fraction.
* nuLSQ (Gongyo et al., ACCV 2024): its learned non-uniform levels need a level table in front of
  the multiplier, which no model here costs; shown at the uniform MAC's cost, a lower bound.
"""
from __future__ import annotations

from ..alq.hw import stlq_mac_cost
from ..core.validation import check_bits
from ..sq.hw import sq_mac_cost, uniform_mac_cost
from ..sq.quantizers import apot_terms, log2_points

UNIFORM_DATAPATH = ("uniform", "uniform + refine", "Q-Rater", "LSQ", "nuLSQ", "AIMET AdaRound", "Brevitas GPTQ",
                    "Brevitas learned round")
SHIFT_ADD = ("log2", "two_word_log", "apot", "sq", "sq + refine")
STLQ = ("STLQ", "STLQ fine-tuned")
SQ_OPTION = 5  # notebook 03's universal set
LANES = 8  # STLQ's lockstep group (lowbit.alq.experiments.runs.LANES)


def term_sets(method: str, w_bits: int) -> tuple[list, list]:
    """The two shift-add term lists ``(A, B)`` of a fixed-QPS method at ``w_bits`` (our interpretation)."""
    if method == "log2":
        return list(log2_points(w_bits)), [0.0]
    if method == "two_word_log":
        return list(log2_points(w_bits)), list(log2_points(w_bits))
    if method == "apot":
        a, b, c = apot_terms(w_bits)
        if any(c):
            raise ValueError(f"APoT at {w_bits} bits has a third term: no two-term shift-add datapath costs it")
        return a, b
    raise ValueError(f"no term sets for {method!r}: use one of ('log2', 'two_word_log', 'apot')")


def mac_gates(method: str, w_bits: int, a_bits: int, two_cycle_fraction: float | None = None,
              nzr: float | None = None) -> float:
    """Unit gates (gate-cycles for STLQ) of one MAC of ``method`` at W/A ``w_bits``/``a_bits``;
    STLQ needs its measured ``two_cycle_fraction`` and ``nzr``."""
    w_bits, a_bits = check_bits(w_bits, "w_bits"), check_bits(a_bits, "a_bits", hi=32, lo=1)
    family = method.split(" (")[0]
    if family in UNIFORM_DATAPATH or family.startswith("nuLSQ"):
        return float(uniform_mac_cost(w_bits, a_bits)["uniform_mac_gates"])
    if family in ("sq", "sq + refine"):
        return float(sq_mac_cost(SQ_OPTION, w_bits, a_bits)["sq_mac_gates"])
    if family in SHIFT_ADD:
        return float(sq_mac_cost(term_sets(family, w_bits), w_bits, a_bits)["sq_mac_gates"])
    if family in STLQ:
        if two_cycle_fraction is None or nzr is None:
            raise ValueError("STLQ's MAC cost needs its measured two_cycle_fraction and nzr")
        return float(stlq_mac_cost(w_bits, a_bits, nzr, LANES, two_cycle_fraction)["b_gate_cycles_per_mac"])
    raise ValueError(f"no MAC model for method {method!r}: use one of "
                     f"{UNIFORM_DATAPATH + SHIFT_ADD + STLQ} or a nuLSQ variant")


def relative_mac_cost(method: str, w_bits: int, a_bits: int, **measured) -> float:
    """:func:`mac_gates` divided by the uniform MAC's at the same W/A."""
    return mac_gates(method, w_bits, a_bits, **measured) / mac_gates("uniform", w_bits, a_bits)
