"""Fix one bit-width per group from the learned distributions p_g over the candidates.

All selectors return int64 [G] bit VALUES (not candidate indices).

- ``select_threshold``: the paper / reference rule: the highest b with p_gb >= 1/(2|B|).
- ``select_argmax``: the most probable b.
- ``select_budgeted``: draw assignments from the p_g, evaluate those within a byte budget
  and keep the best validation AUC (the threshold and argmax assignments compete too).

Groups are assumed to be numbered rarest first (as ``mpe.grouping.frequency_groups``
numbers them); the budget fallback lowers bits from group 0 upwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from mpe.bitwidths import threshold_probability, validate_candidates


def _probs(probs: np.ndarray | torch.Tensor, num_candidates: int | None = None) -> np.ndarray:
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    p = p.astype(np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be [G, |B|] with G >= 1, got shape {p.shape}")
    if num_candidates is not None and p.shape[1] != num_candidates:
        raise ValueError(f"probs has {p.shape[1]} columns for {num_candidates} candidates")
    if np.any(~np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probabilities must be finite and non-negative")
    return p


def select_threshold(probs: np.ndarray | torch.Tensor, candidates: Sequence[int]) -> np.ndarray:
    """int64 [G]: per group the highest candidate b with p_gb >= 1/(2|B|).

    ``probs`` [G, |B|] in candidate order. A group with no probability above the threshold
    (impossible for a normalised distribution) gets its most probable candidate.
    """
    cands = np.asarray(validate_candidates(candidates), dtype=np.int64)
    p = _probs(probs, cands.size)
    above = p >= threshold_probability(cands.tolist())
    highest = cands.size - 1 - np.argmax(above[:, ::-1], axis=1)
    idx = np.where(above.any(axis=1), highest, np.argmax(p, axis=1))
    return cands[idx]


def select_argmax(probs: np.ndarray | torch.Tensor, candidates: Sequence[int]) -> np.ndarray:
    """int64 [G]: per group the most probable candidate (ties: the lower bit-width)."""
    cands = np.asarray(validate_candidates(candidates), dtype=np.int64)
    return cands[np.argmax(_probs(probs, cands.size), axis=1)]


def sample_assignments(
    probs: np.ndarray | torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """LongTensor[n, G]: n independent assignments, candidate index of group g drawn from p_g.

    Deterministic given ``generator`` or ``seed`` (``seed`` is used when no generator is
    given; with neither, torch's global RNG is used).
    """
    p = torch.as_tensor(_probs(probs))
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return torch.zeros((0, p.shape[0]), dtype=torch.int64)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.multinomial(p, n, replacement=True, generator=generator).t().contiguous()


def lower_to_fit(
    bits: np.ndarray,
    candidates: Sequence[int],
    size_of: Callable[[np.ndarray], int],
    budget_bytes: int,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, int, int]:
    """Lower bits group by group until ``size_of(bits) <= budget_bytes``.

    Groups are visited in ``order`` (default 0, 1, ... = rarest first); each visited group
    is lowered one candidate at a time, down to the smallest candidate, before the next
    group is touched. Returns (bits, size, number of lowering steps); the size may still
    exceed the budget when every group is at the smallest candidate.
    """
    cands = list(validate_candidates(candidates))
    bits = np.asarray(bits, dtype=np.int64).copy()
    order = np.arange(bits.size) if order is None else np.asarray(order)
    size, steps = int(size_of(bits)), 0
    for g in order.tolist():
        while size > budget_bytes and bits[g] > cands[0]:
            bits[g] = max(c for c in cands if c < bits[g])
            size, steps = int(size_of(bits)), steps + 1
        if size <= budget_bytes:
            break
    return bits, size, steps


def select_budgeted(
    probs: np.ndarray | torch.Tensor,
    candidates: Sequence[int],
    evaluate: Callable[[np.ndarray], float],
    size_of: Callable[[np.ndarray], int],
    budget_bytes: int,
    n_samples: int,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Best-AUC assignment within ``budget_bytes`` among threshold, argmax and sampled ones.

    Args:
        probs: [G, |B|] learned distributions.
        candidates: the candidate bit-widths B.
        evaluate: bits per group (int64 [G], values) -> validation AUC (called only for
            assignments that fit, once per distinct assignment).
        size_of: bits per group -> export bytes.
        budget_bytes: the size budget.
        n_samples: assignments drawn from the p_g (seed ``seed``).

    Ties in AUC go to the smaller size, then to the earlier candidate (threshold, argmax,
    samples in order). If nothing fits, the threshold assignment is lowered greedily on
    the least frequent groups (``lower_to_fit``) and evaluated; ``info["fallback"]`` says
    so and ``info["fits"]`` is False if even all-minimum bits exceed the budget.

    Returns (int64 [G] bits per group, info dict: chosen source, auc, size_bytes, fits,
    fallback, evaluated = [{source, size_bytes, auc or None}], n_distinct).
    """
    cands = np.asarray(validate_candidates(candidates), dtype=np.int64)
    p = _probs(probs, cands.size)
    pool: list[tuple[str, np.ndarray]] = [
        ("threshold", select_threshold(p, cands.tolist())),
        ("argmax", select_argmax(p, cands.tolist())),
    ]
    drawn = sample_assignments(p, n_samples, seed=seed).numpy()
    pool += [(f"sample_{i}", cands[row]) for i, row in enumerate(drawn)]

    seen: dict[bytes, dict] = {}
    evaluated: list[dict] = []
    best: tuple[float, int, int] | None = None
    best_bits: np.ndarray | None = None
    best_source = ""
    for order, (source, bits) in enumerate(pool):
        key = bits.tobytes()
        if key in seen:
            evaluated.append({**seen[key], "source": source, "duplicate_of": seen[key]["source"]})
            continue
        size = int(size_of(bits))
        entry: dict = {"source": source, "size_bytes": size, "auc": None}
        if size <= budget_bytes:
            entry["auc"] = float(evaluate(bits))
            rank = (-entry["auc"], size, order)
            if best is None or rank < best:
                best, best_bits, best_source = rank, bits, source
        seen[key] = entry
        evaluated.append(entry)

    info: dict = {"n_distinct": len(seen), "evaluated": evaluated, "budget_bytes": int(budget_bytes)}
    if best_bits is not None and best is not None:
        info.update(chosen=best_source, auc=-best[0], size_bytes=best[1], fits=True, fallback=None)
        return best_bits.astype(np.int64), info

    bits, size, steps = lower_to_fit(pool[0][1], cands.tolist(), size_of, budget_bytes)
    auc = float(evaluate(bits))
    info.update(
        chosen="threshold_lowered",
        auc=auc,
        size_bytes=size,
        fits=size <= budget_bytes,
        fallback=(
            f"no assignment fit the budget of {int(budget_bytes)} bytes; lowered the threshold "
            f"assignment on the least frequent groups ({steps} steps) to {size} bytes"
            + ("" if size <= budget_bytes else ", still over budget at the smallest bit-width")
        ),
    )
    return bits.astype(np.int64), info
