"""lambda as a Lagrange multiplier: the size budget of ``--target-ratio`` met in one search.

The search minimises ``BCE + lambda * sum_g w_g E_p[bits_g]`` (the paper's penalty, its
shape unchanged). With a byte budget ``B`` the size becomes a constraint
``E[export bytes] <= B`` and lambda its multiplier, updated after every step by dual
ascent in log space:

    log lambda += rate * clip(log(E[bytes] / B), -1, 1)

Over budget, lambda grows (the penalty pushes groups to fewer bits); under it, lambda
shrinks (bits come back where they pay in loss). ``E[bytes]`` is the expected code bytes
``dim / 8 * sum_g kept_rows_g * E_p[bits_g]`` plus the rest of the export (steps, offset,
id map, file headers), taken exactly from the current most likely assignment every
``refresh_every`` updates. Selection and ``mpe.pipeline.adjust_to_ratio`` then land the
export on the budget, as after a bisection.

All state is in buffers, so a checkpoint of the search resumes the controller too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

TRACE_POINTS = 256  # (update, lambda, expected bytes) samples kept for the report


class SizeMultiplier(nn.Module):
    """The adaptive lambda of a budgeted search.

    Args:
        lam: the starting lambda (> 0).
        budget_bytes: the export's byte budget B (fp32 bytes / R).
        kept_rows: int [G] rows of every group that the export stores (not pruned by construction).
        rate: largest change of log(lambda) per update (at >= e x over or under budget).
        refresh_every: updates between two exact recounts of the non-code bytes.
        trace_every: updates between two samples of the trace.
    """

    def __init__(self, lam: float, budget_bytes: int, rate: float, kept_rows: np.ndarray, refresh_every: int = 50, trace_every: int = 10):
        super().__init__()
        if not lam > 0:
            raise ValueError(f"the starting lambda of a budgeted search must be > 0, got {lam}")
        if budget_bytes < 1:
            raise ValueError(f"the byte budget must be >= 1, got {budget_bytes}")
        if not rate > 0:
            raise ValueError(f"the multiplier's rate must be > 0, got {rate}")
        self.rate, self.refresh_every = float(rate), int(refresh_every)
        self.register_buffer("log_lam", torch.tensor(math.log(lam), dtype=torch.float64))
        self.register_buffer("budget_bytes", torch.tensor(float(budget_bytes), dtype=torch.float64))
        self.register_buffer("kept_rows", torch.as_tensor(np.asarray(kept_rows), dtype=torch.float64))
        self.register_buffer("other_bytes", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("trace", torch.zeros(TRACE_POINTS, 3, dtype=torch.float64))
        self.register_buffer("trace_len", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("trace_every", torch.tensor(int(trace_every), dtype=torch.int64))

    @property
    def lam(self) -> float:
        return math.exp(float(self.log_lam))

    def needs_refresh(self) -> bool:
        """Whether the non-code bytes should be recounted before this update."""
        return int(self.updates) % self.refresh_every == 0

    def set_other_bytes(self, nbytes: int) -> None:
        self.other_bytes.fill_(float(nbytes))

    def update(self, code_bytes: float) -> float:
        """One dual-ascent step from the expected code bytes; returns the new lambda."""
        expected = max(1.0, code_bytes + float(self.other_bytes))
        gap = math.log(expected / float(self.budget_bytes))
        self.log_lam += self.rate * max(-1.0, min(1.0, gap))
        n = int(self.updates)
        if n % int(self.trace_every) == 0:
            # keep every other sample when full: the trace spans the whole search
            if int(self.trace_len) == TRACE_POINTS:
                self.trace[: TRACE_POINTS // 2] = self.trace[::2].clone()
                self.trace[TRACE_POINTS // 2 :] = 0
                self.trace_len.fill_(TRACE_POINTS // 2)
                self.trace_every *= 2
            self.trace[int(self.trace_len)] = torch.tensor([n, self.lam, expected], dtype=torch.float64)
            self.trace_len += 1
        self.updates += 1
        return self.lam

    def history(self) -> list[dict]:
        """The sampled trace: ``[{"update", "lambda", "expected_bytes"}]``."""
        return [{"update": int(u), "lambda": float(lam), "expected_bytes": float(b)}
                for u, lam, b in self.trace[: int(self.trace_len)].tolist()]
