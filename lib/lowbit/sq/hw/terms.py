"""Term sets A and B of SQ's universal set, as the hardware sees them.

SQ (Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*,
ECCV 2022, doi:10.1007/978-3-031-20083-0_39), Sec. 3.4 and Table 1:
``S_U = {a + b : a in A, b in B}`` where every term is zero or a power of two. In hardware (Sec. 3.5, Fig. 4;
supplementary Fig. 2) term set A is the list of inputs of MUX A and term set B
the inputs of MUX B; each non-zero input is a constant-shifted copy of the activation (wires)
and the zero input is a constant 0.

Case order (the MUX select value): the non-zero terms in decreasing order, then zero, which
is Table 1's own listing order, e.g. option 5: A = (1, 2^-1, 2^-3, 0), B = (1, 2^-2, 2^-4, 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# SQ Table 1, as exponents of two; None is the zero term. Listed in MUX-case order.
TABLE1_EXPONENTS = {
    1: ((-1, -2, -3, None), (-1, -2, -4, None)),
    2: ((0, -2, -4, None), (-1, -3, -5, None)),
    3: ((0, -1, -2, -3, -4, None), (0, -1, -2, -3, -4, None)),
    4: ((0, -1, -2, -3, -4, -5, None), (0, -1, -2, -3, -4, -5, None)),
    5: ((0, -1, -3, None), (0, -2, -4, None)),
}
OPTIONS = tuple(TABLE1_EXPONENTS)


@dataclass(frozen=True)
class TermSet:
    """One MUX's cases: ``exponents[i]`` is the power of two of case ``i`` (``None`` = zero)."""

    exponents: tuple

    @property
    def values(self) -> np.ndarray:
        """The terms as float64, in case order (0.0 for the zero case)."""
        return np.array([0.0 if e is None else 2.0 ** e for e in self.exponents])

    @property
    def cases(self) -> int:
        """M, the number of MUX inputs including the zero input."""
        return len(self.exponents)

    @property
    def nonzero_exponents(self) -> tuple:
        return tuple(e for e in self.exponents if e is not None)

    @property
    def select_bits(self) -> int:
        """Width of this MUX's select line: ceil(log2 M) (0 for a single case)."""
        return max(0, math.ceil(math.log2(self.cases)))


def _exponent_of(value) -> int | None:
    v = float(value)
    if v == 0.0:
        return None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"term {value!r} is not zero or a positive power of two: every term of "
                         "A and B must be 0 or 2**k (SQ Table 1)")
    mant, exp = math.frexp(v)  # v = mant * 2**exp, mant in [0.5, 1)
    if mant != 0.5:
        raise ValueError(f"term {value!r} is not a power of two: every term of A and B must be "
                         "0 or 2**k (SQ Table 1)")
    return exp - 1


def _term_set(values, name: str) -> TermSet:
    vals = np.asarray(values, dtype=np.float64).ravel()
    if vals.size == 0:
        raise ValueError(f"term set {name} is empty: give at least one term (0 or 2**k)")
    exps = {_exponent_of(v) for v in vals}
    nonzero = sorted((e for e in exps if e is not None), reverse=True)
    ordered = tuple(nonzero) + ((None,) if None in exps else ())
    return TermSet(ordered)


def universal_terms(option) -> tuple[TermSet, TermSet]:
    """Term sets ``(A, B)`` of SQ Table 1 option 1..5, or of a user-defined ``(A, B)`` pair.

    User-defined sets are iterables of zeros and powers of two; duplicates are merged and the
    cases are put in MUX order (non-zero terms decreasing, then zero).
    """
    if isinstance(option, (int, np.integer)) and not isinstance(option, bool):
        if int(option) not in TABLE1_EXPONENTS:
            raise ValueError(f"universal-set option must be one of {OPTIONS} (SQ Table 1) or an "
                             f"(A, B) pair of term lists, got {option!r}")
        a, b = TABLE1_EXPONENTS[int(option)]
        return TermSet(a), TermSet(b)
    if isinstance(option, (tuple, list)) and len(option) == 2:
        return _term_set(option[0], "A"), _term_set(option[1], "B")
    raise TypeError(f"option must be an int 1..5 (SQ Table 1) or an (A, B) pair of term lists, "
                    f"got {type(option).__name__}")


def universal_values(option) -> np.ndarray:
    """Sorted distinct ``{a + b}`` of the term sets (the universal set S_U), float64."""
    A, B = universal_terms(option)
    return np.unique(np.add.outer(A.values, B.values).ravel())
