"""Paper-agnostic unit-gate primitives for the hardware cost models of the paper packages.

The *unit-gate model* (Tyagi 1993; Zimmermann 1997): 2-input AND/OR = 1, XOR = 2, inverter = 0,
hence a 1-bit 2:1 MUX = 3 (AND-OR, the select inverter free), half adder = 3, full adder = 7
(2 XOR + 2 AND + 1 OR). Every count is an upper bound from a textbook structure (ripple-carry
adders, an array multiplier, MUX trees of 2:1 MUXes), no logic optimisation.

The MUX model is the one of SQ's supplementary material (Oh, Sim, Kim, Lee, *Non-Uniform Step
Size Quantization for Accurate Post-Training Quantization*, ECCV 2022, supplement Sec. 1): a
``k``-bit ``M``-to-1 MUX is ``k (M - 1)`` 1-bit 2:1 MUXes. Shared by :mod:`lowbit.sq.hw.cost` and
:mod:`lowbit.alq.hw`, so both papers count gates the same way.
"""
from __future__ import annotations

from .validation import check_bits

# unit-gate model (Tyagi 1993; Zimmermann 1997): cost of each cell in 2-input-gate units
UNIT_GATES = {"and2": 1, "or2": 1, "xor2": 2, "inv": 0, "mux2": 3, "half_adder": 3, "full_adder": 7}

_MAX_WIDTH = 1 << 16  # a sanity bound on datapath widths, far above any real design


def _width(value, what: str, lo: int = 0) -> int:
    return check_bits(value, what, hi=_MAX_WIDTH, lo=lo)


def mux2_count(width: int, cases: int) -> int:
    """Number of 1-bit 2:1 MUXes of a ``width``-bit ``cases``-to-1 MUX: ``k (M - 1)``."""
    return _width(width, "MUX width") * (_width(cases, "MUX cases", lo=1) - 1)


def mux_gates(width: int, cases: int) -> int:
    """Unit gates of a ``width``-bit ``cases``-to-1 MUX: ``k (M - 1)`` 2:1 MUXes of 3 gates each."""
    return mux2_count(width, cases) * UNIT_GATES["mux2"]


def ripple_adder_gates(bits: int) -> int:
    """Unit gates of a ``bits``-bit ripple-carry adder: one full adder (7) per bit."""
    return _width(bits, "adder width") * UNIT_GATES["full_adder"]


def xor_gates(bits: int) -> int:
    """Unit gates of a conditional negation (one's complement) of ``bits`` bits: one XOR (2) per
    bit; the ``+1`` of two's complement goes into a downstream adder's carry-in (free)."""
    return _width(bits, "negation width") * UNIT_GATES["xor2"]


def array_multiplier_gates(m: int, a: int) -> int:
    """Unit gates of an unsigned ``m x a`` array multiplier: ``m a`` AND2 partial products and
    ``(m - 1) a`` full adders (half adders counted as full adders: an upper bound)."""
    m, a = _width(m, "multiplier width", lo=1), _width(a, "multiplicand width", lo=1)
    return m * a * UNIT_GATES["and2"] + (m - 1) * a * UNIT_GATES["full_adder"]
