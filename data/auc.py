"""ROC AUC of large label / score arrays in low memory (the oracle AUC of the synthetic files)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC with midrank ties (equals ``sklearn.metrics.roc_auc_score``), low memory.

    Sorts the positive and the negative scores separately and counts, for each positive, the
    negatives below it (ties count one half). NaN when one class is absent.
    """
    y = np.asarray(labels).astype(bool)
    pos, neg = np.sort(scores[y]), np.sort(scores[~y])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    below = 0.0
    for s in range(0, len(pos), 1 << 22):
        p = pos[s:s + (1 << 22)]
        lo = np.searchsorted(neg, p, side="left")
        hi = np.searchsorted(neg, p, side="right")
        below += float(lo.sum(dtype=np.int64)) + 0.5 * float((hi - lo).sum(dtype=np.int64))
    return below / (len(pos) * len(neg))


def click_summary(labels: np.ndarray, probs: np.ndarray, bounds: np.ndarray) -> dict[str, object]:
    """Click rate and oracle AUC of a synthetic file, overall and per day (rows
    ``bounds[d]:bounds[d + 1]`` are day d): the metadata keys both generators write."""
    days = range(len(bounds) - 1)
    slices = [slice(int(bounds[d]), int(bounds[d + 1])) for d in days]
    return {
        "click_rate": float(labels.mean()),
        "click_rate_per_day": {str(d): float(labels[sl].mean()) for d, sl in zip(days, slices, strict=True)},
        "oracle_auc": auc(labels, probs),
        "oracle_auc_per_day": {str(d): auc(labels[sl], probs[sl]) for d, sl in zip(days, slices, strict=True)},
    }
