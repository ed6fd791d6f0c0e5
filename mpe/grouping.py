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
train + val + test, which leaks the evaluation data's frequencies into the model). Rows
with no training count (``unseen_rows``) are pruned by construction (0 bits); their groups
pay the largest penalty weight, so they cannot make the seen groups' bits cheaper.
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
    """float64 [G]: 1 / r_g with r_g = C_g / C_min, C_min = min of C_h over the groups seen in
    training (C_h > 0): the rarest seen group pays 1, frequent groups pay less per bit.

    A group never seen in training (C_g = 0, possible when counting over the training split
    only) pays the largest weight, 1: never cheaper than the rarest seen group. Its rows
    carry no learned signal and are pruned anyway (``unseen_rows``). With no group seen at
    all every weight is 1.
    """
    counts = group_counts(freq, group_of_row)
    seen = counts > 0
    if not seen.any():
        return np.ones_like(counts)
    c_min = counts[seen].min()
    return np.where(seen, c_min / np.where(seen, counts, 1.0), 1.0)


def unseen_rows(freq: np.ndarray) -> np.ndarray:
    """bool [N]: rows with zero training count (values met only in val/test, or never)."""
    return _check_freq(freq) == 0


def group_frequencies(freq: np.ndarray, group_of_row: np.ndarray) -> np.ndarray:
    """float64 [G]: mean count per row of every group (for bits-vs-frequency plots)."""
    freq, groups, num = _check_groups(freq, group_of_row)
    return np.bincount(groups, weights=freq, minlength=num) / np.bincount(groups, minlength=num)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (ties share their mean rank); NaN when
    either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    rx, ry = _mean_ranks(x), _mean_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _mean_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="stable")
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.arange(a.size, dtype=np.float64)
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]
