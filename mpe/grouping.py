"""Frequency groups of the global embedding table and their size-penalty weights.

Rows are sorted by frequency ascending (rarest first; ties broken by ascending row id so
the result is deterministic) and cut into consecutive groups of ``ceil(N / G)`` rows, as
the reference code does (``optfp_get_groups``). Group 0 holds the rarest rows, the last
group the most frequent ones. With that layout the number of non-empty groups is
``ceil(N / ceil(N / G))``, which can be below G when G does not divide N nicely
(N = 1000, G = 128: groups of 8 rows, 125 groups) and is N when N < G.
``balanced=True`` instead splits into exactly ``min(N, G)`` groups whose sizes differ by
at most one.

The counts should come from the training split only (the reference counts over
train + val + test, which leaks the evaluation data's frequencies into the model).
"""

from __future__ import annotations

import numpy as np


def _check_freq(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq)
    if freq.ndim != 1 or freq.size == 0:
        raise ValueError(f"freq must be a non-empty 1-D array, got shape {freq.shape}")
    if not np.issubdtype(freq.dtype, np.number) or np.any(~np.isfinite(freq)) or np.any(freq < 0):
        raise ValueError("frequencies must be finite and non-negative")
    return freq


def frequency_order(freq: np.ndarray) -> np.ndarray:
    """int64 [N]: row ids sorted by (frequency, id) ascending: rarest first."""
    return np.argsort(_check_freq(freq), kind="stable").astype(np.int64)


def frequency_groups(freq: np.ndarray, num_groups: int = 128, balanced: bool = False) -> np.ndarray:
    """int64 [N] group id of every row; group 0 = rarest rows.

    Args:
        freq: [N] non-negative count of every global row (training split).
        num_groups: G, the requested number of groups.
        balanced: False (default, the reference): groups of ``ceil(N / G)`` rows, the
            last one shorter; True: exactly ``min(N, G)`` groups of near-equal size.

    Group ids are contiguous from 0 and every group is non-empty.
    """
    order = frequency_order(freq)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    n = order.size
    rank = np.arange(n, dtype=np.int64)
    if balanced:
        g = min(n, num_groups)
        group_of_rank = rank * g // n
    else:
        size = -(-n // num_groups)
        group_of_rank = rank // size
    out = np.empty(n, dtype=np.int64)
    out[order] = group_of_rank
    return out


def _check_groups(freq: np.ndarray, group_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    freq = _check_freq(freq)
    groups = np.asarray(group_of_row)
    if groups.shape != freq.shape:
        raise ValueError(f"group_of_row has shape {groups.shape}, freq has {freq.shape}")
    if not np.issubdtype(groups.dtype, np.integer) or groups.min() < 0:
        raise ValueError("group ids must be non-negative integers")
    num = int(groups.max()) + 1
    if np.bincount(groups, minlength=num).min() == 0:
        raise ValueError("group ids must be contiguous from 0 with no empty group")
    return freq.astype(np.float64), groups.astype(np.int64), num


def group_counts(freq: np.ndarray, group_of_row: np.ndarray) -> np.ndarray:
    """float64 [G]: C_g, the total count of every group."""
    freq, groups, num = _check_groups(freq, group_of_row)
    return np.bincount(groups, weights=freq, minlength=num)


def group_penalty_weights(freq: np.ndarray, group_of_row: np.ndarray) -> np.ndarray:
    """float64 [G]: 1 / r_g with r_g = C_g / min_h C_h (the rarest group pays 1, frequent
    groups pay less per bit).

    Guard: a group whose rows were never seen (C_g = 0, possible when counting over the
    training split only) is given C_g = 1, i.e. ``C = max(C, 1)``; groups with counts keep
    their exact ratios. Without it min_h C_h = 0 and every ratio is undefined (the
    reference divides by zero there).
    """
    counts = np.maximum(group_counts(freq, group_of_row), 1.0)
    return counts.min() / counts


def group_frequencies(freq: np.ndarray, group_of_row: np.ndarray) -> np.ndarray:
    """float64 [G]: mean count per row of every group (for bits-vs-frequency plots)."""
    freq, groups, num = _check_groups(freq, group_of_row)
    return np.bincount(groups, weights=freq, minlength=num) / np.bincount(groups, minlength=num)
