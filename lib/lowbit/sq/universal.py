"""Universal sets S_U = {a + b : a in A, b in B} and the quantization point sets (QPS) in them.

Oh, Sim, Kim, Lee, *Non-Uniform Step Size Quantization for Accurate Post-Training Quantization*
(Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.2 eq. 7 (a QPS is
any N-subset of S_U) and section 3.4 Table 1 (the five (A, B) design options); its supplementary
material, section 1, Table 2 (|S_U| = 12, 16, 17, 23, 15 and QPS counts 495, 12870, 24310, 490314,
6435 at 4 bits).

A QPS holds the N = 2**(bits-1) non-negative points of a ``bits``-bit quantizer (the sign bit
mirrors them, eq. 5-7), so the number of candidate QPS is C(|S_U|, N) (Algorithm 1). Bit widths
follow the one rule of :func:`lowbit.core.validation.check_bits`: an int >= 2 (a 1-bit QPS would
be a single point); the upper bound is the universal set's (:func:`check_fits`).

Sets are returned *unnormalized* (option 5 reaches 1 + 1 = 2): the scale factor absorbs any
normalization (section 3.4: "the sets are equivalent to their scaled versions").

Note on option 5: the distinct sums are 15 values (supplement Table 2); the main text's "16"
counts the value 1 twice, as 1 + 0 and 0 + 1 (:func:`sum_multiplicity` shows it).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np

from ..core.validation import check_bits

# SQ Table 1: option -> (A, B); powers of two are exact in float64, so sums are exact.
OPTIONS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((2**-1, 2**-2, 2**-3, 0.0), (2**-1, 2**-2, 2**-4, 0.0)),
    2: ((1.0, 2**-2, 2**-4, 0.0), (2**-1, 2**-3, 2**-5, 0.0)),
    3: ((1.0, 2**-1, 2**-2, 2**-3, 2**-4, 0.0), (1.0, 2**-1, 2**-2, 2**-3, 2**-4, 0.0)),
    4: ((1.0, 2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 0.0), (1.0, 2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 0.0)),
    5: ((1.0, 2**-1, 2**-3, 0.0), (1.0, 2**-2, 2**-4, 0.0)),
}
CHOSEN_OPTION = 5  # the paper's choice (section 3.4)

# supplement Table 2, for comparison in notebooks and tests (not used by any computation)
PAPER_SET_SIZE = {1: 12, 2: 16, 3: 17, 4: 23, 5: 15}
PAPER_QPS_COUNT_4BIT = {1: 495, 2: 12870, 3: 24310, 4: 490314, 5: 6435}


def _as_terms(values, name: str) -> np.ndarray:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of non-negative numbers, got {type(values).__name__}")
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty flat list of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must hold finite non-negative numbers (the QPS is mirrored for "
                         f"negative weights), got {arr.tolist()}")
    return arr


def option_terms(option) -> tuple[np.ndarray, np.ndarray]:
    """The term sets ``(A, B)`` of ``option`` (1..5 of SQ Table 1, or a user pair ``(A, B)``)."""
    if isinstance(option, (bool, np.bool_)):
        raise TypeError("option must be an int 1..5 or a pair (A, B) of iterables, got a bool")
    if isinstance(option, (int, np.integer)):
        if int(option) not in OPTIONS:
            raise ValueError(f"unknown universal-set option {option!r}: use 1..5 (SQ Table 1) "
                             "or a user-defined pair (A, B)")
        a, b = OPTIONS[int(option)]
        return np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if isinstance(option, (tuple, list)) and len(option) == 2:
        return _as_terms(option[0], "A"), _as_terms(option[1], "B")
    raise ValueError(f"unknown universal-set option {option!r}: use 1..5 (SQ Table 1) or a pair "
                     "(A, B) of iterables of non-negative numbers")


def universal_set(option=CHOSEN_OPTION) -> np.ndarray:
    """S_U = {a + b : a in A, b in B} as a sorted 1-D float64 array of distinct values (API).

    ``option`` is 1..5 (SQ Table 1, section 3.4) or a user pair ``(A, B)`` of iterables.
    Unnormalized: option 5 gives 15 values from 0 to 2.
    """
    a, b = option_terms(option)
    sums = np.unique((a[:, None] + b[None, :]).ravel())  # sorted, distinct
    return sums.astype(np.float64)


def sum_multiplicity(option=CHOSEN_OPTION) -> dict[float, list[tuple[float, float]]]:
    """Every value of S_U with the (a, b) pairs that produce it.

    Shows why SQ's main text counts 16 elements for option 5 while only 15 are distinct:
    ``1.0`` arises as ``1 + 0`` and ``0 + 1``.
    """
    a, b = option_terms(option)
    out: dict[float, list[tuple[float, float]]] = {}
    for x in a:
        for y in b:
            out.setdefault(float(x + y), []).append((float(x), float(y)))
    return dict(sorted(out.items()))


def set_size(option=CHOSEN_OPTION) -> int:
    """|S_U|, the number of distinct points (supplement Table 2 row 1)."""
    return int(universal_set(option).size)


def max_bits(option=CHOSEN_OPTION) -> int:
    """The largest bit width whose N = 2**(bits-1) points fit in S_U."""
    return int(math.floor(math.log2(set_size(option)))) + 1


def qps_size(bits: int) -> int:
    """N = 2**(bits-1): non-negative points in a ``bits``-bit QPS (sign bit included; bits >= 2)."""
    return 2 ** (check_bits(bits, "SQ bits", hi=64) - 1)


def check_fits(option, bits: int) -> int:
    """N for ``bits`` after checking that N <= |S_U|; the error names the largest usable width."""
    n_points = qps_size(bits)
    size = set_size(option)
    if size < 2:
        raise ValueError(f"this universal set has only |S_U| = {size} point: even a 2-bit QPS needs N = 2; "
                         "use a larger universal set")
    if n_points > size:
        raise ValueError(f"{bits}-bit QPS needs N = 2**({bits}-1) = {n_points} points but this "
                         f"universal set has only |S_U| = {size}: use bits <= {max_bits(option)} "
                         "or a larger universal set")
    return n_points


def qps_count(option=CHOSEN_OPTION, bits: int = 4) -> int:
    """C(|S_U|, 2**(bits-1)): the number of candidate QPS Algorithm 1 searches (API)."""
    n_points = check_fits(option, bits)
    return math.comb(set_size(option), n_points)


def qps_indices(option=CHOSEN_OPTION, bits: int = 4) -> np.ndarray:
    """Every QPS as a ``(K, N)`` int64 array of indices into :func:`universal_set`.

    Rows are in ``itertools.combinations`` (lexicographic) order, the order in which both
    searches break exact ties (first subset wins).
    """
    n_points = check_fits(option, bits)
    size = set_size(option)
    k = math.comb(size, n_points)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(size), n_points)),
                       dtype=np.int64, count=k * n_points)
    return flat.reshape(k, n_points)


def enumerate_qps(option=CHOSEN_OPTION, bits: int = 4) -> np.ndarray:
    """Every QPS as a ``(K, N)`` float64 array of points (rows sorted ascending)."""
    return universal_set(option)[qps_indices(option, bits)]
