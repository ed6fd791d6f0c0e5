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
