"""Frequency groups, penalty weights and per-group mean frequencies on known arrays."""

import numpy as np
import pytest

from mpe.grouping import (
    frequency_groups,
    frequency_order,
    group_counts,
    group_frequencies,
    group_penalty_weights,
    spearman,
    unseen_rows,
)


def test_groups_on_known_array():
    freq = np.array([5, 1, 9, 1, 3, 7, 2, 8, 0, 4])
    # ascending (freq, id): 8(0) 1(1) 3(1) 6(2) 4(3) 9(4) 0(5) 5(7) 7(8) 2(9)
    assert frequency_order(freq).tolist() == [8, 1, 3, 6, 4, 9, 0, 5, 7, 2]
    groups = frequency_groups(freq, num_groups=4)  # ceil(10 / 4) = 3 rows per group
    expected = np.empty(10, dtype=np.int64)
    expected[[8, 1, 3]], expected[[6, 4, 9]], expected[[0, 5, 7]], expected[[2]] = 0, 1, 2, 3
    assert groups.dtype == np.int64 and groups.tolist() == expected.tolist()
    assert group_counts(freq, groups).tolist() == [2, 9, 20, 9]
    assert group_frequencies(freq, groups).tolist() == pytest.approx([2 / 3, 3, 20 / 3, 9])
    # r_g = C_g / min C = C_g / 2 -> weight 2 / C_g
    assert group_penalty_weights(freq, groups).tolist() == pytest.approx([1.0, 2 / 9, 0.1, 2 / 9])


def test_ties_are_deterministic_and_every_row_in_one_group():
    rng = np.random.default_rng(0)
    freq = rng.integers(0, 5, 1000)
    groups = frequency_groups(freq, 128)
    assert np.array_equal(groups, frequency_groups(freq.copy(), 128))
    sizes = np.bincount(groups)
    assert sizes.sum() == 1000 and sizes.min() > 0
    assert len(sizes) == 125  # ceil(1000 / 128) = 8 rows per group, as the reference cuts
    assert np.all(np.diff(group_frequencies(freq, groups)) >= 0)  # rarest group first
    balanced = frequency_groups(freq, 128, balanced=True)
    assert sorted(np.bincount(balanced).tolist()) == [7] * 24 + [8] * 104
    assert balanced.max() == 127


def test_fewer_rows_than_groups():
    freq = np.array([3, 1, 2])
    assert frequency_groups(freq, 128).tolist() == [2, 0, 1]
    assert frequency_groups(freq, 128, balanced=True).tolist() == [2, 0, 1]


def test_zero_count_groups_keep_the_reference_scale():
    # rows 0-3 never seen in training: their groups must not collapse C_min to 1
    freq = np.array([0, 0, 0, 0, 1000, 3000, 2000, 2000])
    groups = frequency_groups(freq, 4)
    assert group_counts(freq, groups).tolist() == [0, 0, 3000, 5000]
    w = group_penalty_weights(freq, groups)
    # seen groups: C_min / C_g with C_min = 3000; unseen groups pay the largest weight, 1
    assert w.tolist() == pytest.approx([1, 1, 1, 0.6])
    assert unseen_rows(freq).tolist() == [True] * 4 + [False] * 4
    assert group_penalty_weights(np.zeros(4), np.array([0, 0, 1, 1])).tolist() == [1, 1]


def test_spearman_on_known_arrays():
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1)
    # ties share their mean rank: ranks x = 0,1,2,3 and y = .5,.5,2,3 -> r = 0.9487
    assert spearman(np.array([1, 2, 3, 4]), np.array([0, 0, 5, 6])) == pytest.approx(0.948683, abs=1e-6)
    assert np.isnan(spearman(np.array([1, 2, 3]), np.array([2, 2, 2])))


def test_bad_input():
    with pytest.raises(ValueError):
        frequency_groups(np.array([]), 4)
    with pytest.raises(ValueError):
        frequency_groups(np.array([1, -1]), 4)
    with pytest.raises(ValueError):
        group_penalty_weights(np.array([1, 2, 3]), np.array([0, 2, 2]))  # group 1 empty
