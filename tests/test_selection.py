"""Bit-width selection from hand-made distributions, sampling and the budgeted search."""

import numpy as np
import pytest
import torch

from mpe.selection import (
    lower_to_fit,
    sample_assignments,
    select_argmax,
    select_budgeted,
    select_threshold,
)

CANDS = (0, 1, 2, 3, 4, 5, 6)  # threshold 1/14 ~ 0.0714
PROBS = np.array(
    [
        [0.90, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01],  # only 0 bits above the threshold
        [0.40, 0.05, 0.05, 0.05, 0.30, 0.08, 0.07],  # 5 bits (0.08) is the highest above
        [0.10, 0.10, 0.50, 0.10, 0.10, 0.05, 0.05],  # 4 bits; argmax 2
        [0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 1.00],
    ]
)


def test_threshold_and_argmax():
    assert select_threshold(PROBS, CANDS).tolist() == [0, 5, 4, 6]
    assert select_argmax(PROBS, CANDS).tolist() == [0, 0, 2, 6]
    assert select_threshold(torch.tensor(PROBS), CANDS).dtype == np.int64
    # candidate values, not indices
    assert select_argmax(np.array([[0.2, 0.8]]), (0, 4)).tolist() == [4]
    with pytest.raises(ValueError):
        select_threshold(PROBS, (0, 1, 2))


def test_sample_assignments():
    s = sample_assignments(PROBS, 2000, seed=3)
    assert s.shape == (2000, 4) and s.dtype == torch.int64
    assert torch.equal(s, sample_assignments(PROBS, 2000, generator=torch.Generator().manual_seed(3)))
    assert torch.all(s[:, 3] == 6)
    freq = torch.bincount(s[:, 2], minlength=7).float() / 2000
    assert torch.allclose(freq, torch.tensor(PROBS[2], dtype=torch.float32), atol=0.04)
    assert sample_assignments(PROBS, 0).shape == (0, 4)


def fake_eval(bits: np.ndarray) -> float:
    """AUC grows with bits, more so for frequent (later) groups."""
    return 0.7 + 0.001 * float(np.dot(bits, np.arange(1, bits.size + 1)))


def size_of(bits: np.ndarray) -> int:
    return 100 + 10 * int(np.sum(bits))


def test_budgeted_keeps_best_auc_within_budget():
    calls = []

    def evaluate(bits):
        calls.append(bits.tolist())
        return fake_eval(bits)

    bits, info = select_budgeted(PROBS, CANDS, evaluate, size_of, budget_bytes=100 + 10 * 15, n_samples=40, seed=0)
    assert info["fits"] and info["fallback"] is None
    assert size_of(bits) <= 250 and info["size_bytes"] == size_of(bits)
    fitting = [e for e in info["evaluated"] if e.get("auc") is not None and "duplicate_of" not in e]
    assert info["auc"] == max(e["auc"] for e in fitting) == fake_eval(bits)
    assert len(calls) == len({tuple(c) for c in calls})  # each distinct assignment once
    assert all(size_of(np.array(c)) <= 250 for c in calls)  # only fitting ones evaluated
    again, info2 = select_budgeted(PROBS, CANDS, fake_eval, size_of, 250, 40, seed=0)
    assert np.array_equal(bits, again) and info2["chosen"] == info["chosen"]


def test_budgeted_threshold_wins_when_it_fits_and_is_best():
    probs = np.tile([[0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.88]], (3, 1))
    bits, info = select_budgeted(probs, CANDS, fake_eval, size_of, 10_000, n_samples=5, seed=1)
    assert bits.tolist() == [6, 6, 6] and info["chosen"] == "threshold"


def test_budgeted_fallback_lowers_rarest_groups_first():
    # every candidate assignment has >= 6 bits in group 3 -> size >= 160; budget 150
    bits, info = select_budgeted(PROBS, CANDS, fake_eval, size_of, budget_bytes=150, n_samples=10, seed=0)
    assert info["chosen"] == "threshold_lowered" and info["fits"] and "lowered" in info["fallback"]
    # threshold [0, 5, 4, 6] = 15 bits -> needs <= 5 bits: group 1 to 0, group 2 to 0, group 3 to 5
    assert bits.tolist() == [0, 0, 0, 5] and info["size_bytes"] == 150
    bits, info = select_budgeted(PROBS, CANDS, fake_eval, size_of, budget_bytes=50, n_samples=3, seed=0)
    assert bits.tolist() == [0, 0, 0, 0] and not info["fits"] and "still over budget" in info["fallback"]


def test_lower_to_fit_custom_order():
    bits, size, steps = lower_to_fit(np.array([2, 2, 2]), (0, 1, 2), size_of, 140, order=np.array([2, 1, 0]))
    assert bits.tolist() == [2, 2, 0] and size == 140 and steps == 2
