"""Universal sets and QPS counts (SQ Table 1; supplement Table 2)."""
import itertools
import math

import numpy as np
import pytest

import lowbit
from lowbit.sq import universal as U


@pytest.mark.parametrize("option,size", sorted(U.PAPER_SET_SIZE.items()))
def test_set_sizes_match_supplement_table2(option, size):
    s = lowbit.universal_set(option)
    assert s.dtype == np.float64 and s.ndim == 1
    assert s.size == size
    assert np.all(np.diff(s) > 0)  # sorted, distinct


@pytest.mark.parametrize("option,count", sorted(U.PAPER_QPS_COUNT_4BIT.items()))
def test_qps_counts_at_4_bits_match_supplement(option, count):
    assert lowbit.qps_count(option, 4) == count


def test_qps_counts_at_3_and_2_bits():
    assert [lowbit.qps_count(o, 3) for o in range(1, 6)] == [495, 1820, 2380, 8855, 1365]
    assert [lowbit.qps_count(o, 2) for o in range(1, 6)] == [66, 120, 136, 253, 105]


def test_option5_values_and_the_double_counted_one():
    s = lowbit.universal_set(5)
    expected = sorted({a + b for a in (1, .5, .125, 0) for b in (1, .25, .0625, 0)})
    assert s.tolist() == expected and s.max() == 2.0  # unnormalized
    mult = U.sum_multiplicity(5)
    assert sum(len(v) for v in mult.values()) == 16
    assert {k: v for k, v in mult.items() if len(v) > 1} == {1.0: [(1.0, 0.0), (0.0, 1.0)]}


def test_user_defined_pair():
    s = lowbit.universal_set(([0, 1, 2], (0, 4)))
    assert s.tolist() == [0, 1, 2, 4, 5, 6]
    assert lowbit.qps_count(([0, 1, 2], (0, 4)), 2) == 15  # C(6, 2)


def test_qps_enumeration_order_and_content():
    idx = U.qps_indices(1, 4)
    assert idx.shape == (495, 8)
    assert [tuple(r) for r in idx[:3]] == list(itertools.islice(itertools.combinations(range(12), 8), 3))
    pts = U.enumerate_qps(5, 3)
    assert pts.shape == (math.comb(15, 4), 4)
    assert np.all(np.diff(pts, axis=1) > 0)
    assert np.isin(pts, lowbit.universal_set(5)).all()


@pytest.mark.parametrize("bad", [0, 6, -1, "5", None, 2.0, True, (1, 2, 3)])
def test_unknown_options_raise(bad):
    with pytest.raises((ValueError, TypeError), match="option|A must|B must"):
        lowbit.universal_set(bad)


def test_bad_terms_raise():
    with pytest.raises(ValueError, match="non-negative"):
        lowbit.universal_set(([-1, 0], [0]))
    with pytest.raises(ValueError, match="non-empty"):
        lowbit.universal_set(([], [0]))
    with pytest.raises(ValueError, match="non-negative"):
        lowbit.universal_set(([np.nan], [0]))


def test_bits_errors_name_largest_width():
    for bits in (0, 1, -3):  # the one bits rule (check_bits): an int >= 2
        with pytest.raises(ValueError, match="SQ bits must be between 2"):
            lowbit.qps_count(5, bits)
        with pytest.raises(ValueError, match="SQ bits must be between 2"):
            U.qps_indices(5, bits)
    assert lowbit.qps_count(5, 2) == 105  # the smallest width: N = 2 points
    with pytest.raises(ValueError, match="use bits <= 4"):
        lowbit.qps_count(5, 5)  # N = 16 > 15
    assert U.max_bits(5) == 4 and U.max_bits(4) == 5
    with pytest.raises(TypeError):
        lowbit.qps_count(5, 2.5)


def test_single_point_universal_set_has_no_qps():
    with pytest.raises(ValueError, match="only .S_U. = 1 point"):
        lowbit.qps_count(([0.5], [0.0]), 2)
    assert lowbit.qps_count(([0.5], [0.0, 0.25]), 2) == 1  # two points: exactly one 2-bit QPS
