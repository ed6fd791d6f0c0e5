"""The budget multiplier (``mpe.multiplier``): lambda adapted in one search to meet ``--target-ratio``."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mpe import search
from mpe.config import SearchConfig, auto_multiplier_rate
from mpe.multiplier import TRACE_POINTS, SizeMultiplier

SMALL = ["--hidden", "64", "32", "--batch-size", "1000", "--groups", "16", "--no-progress"]


def multiplier(**kw) -> SizeMultiplier:
    args = {"lam": 1e-3, "budget_bytes": 1000, "rate": 0.1, "kept_rows": np.array([10, 20])} | kw
    return SizeMultiplier(**args)


def test_lambda_grows_over_budget_and_shrinks_under_it_by_at_most_the_rate():
    m = multiplier()
    m.update(5000.0)  # 5x over: the step is clipped to the rate
    assert m.lam == pytest.approx(1e-3 * math.exp(0.1))
    m.update(1000.0 * math.exp(-0.5))  # under: half a clipped step down
    assert m.lam == pytest.approx(1e-3 * math.exp(0.1 - 0.05))
    m.set_other_bytes(1000)  # the non-code bytes alone fill the budget
    before = m.lam
    m.update(100.0)
    assert m.lam > before


def test_a_restored_multiplier_continues_exactly():
    a = multiplier()
    for b in (4000.0, 3000.0, 800.0):
        a.update(b)
    b = multiplier()
    b.load_state_dict(a.state_dict())
    for x in (1200.0, 900.0):
        assert a.update(x) == b.update(x)
    assert a.history() == b.history()


def test_the_trace_spans_the_whole_search_in_bounded_space():
    m = multiplier(trace_every=1)
    for _ in range(3 * TRACE_POINTS):
        m.update(2000.0)
    updates = [p["update"] for p in m.history()]
    assert len(updates) <= TRACE_POINTS
    assert updates[0] == 0 and updates[-1] >= 2 * TRACE_POINTS
    assert updates == sorted(updates)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lambda"):
        multiplier(lam=0.0)
    with pytest.raises(ValueError, match="budget"):
        multiplier(budget_bytes=0)
    with pytest.raises(ValueError, match="budget method"):
        SearchConfig(budget="magic")
    with pytest.raises(ValueError, match="multiplier-rate"):
        SearchConfig(multiplier_rate=-1.0)


def test_the_automatic_rate_scales_with_the_search_length():
    assert auto_multiplier_rate(100) == 0.1
    assert auto_multiplier_rate(1000) == pytest.approx(0.02)
    assert auto_multiplier_rate(10**6) == 0.01


def run(out: Path, cache: Path, *extra: str) -> dict:
    rc = search.main(["--dataset", "criteo", "--synthetic", "30000", "--out", str(out), "--cache-dir", str(cache),
                      "--target-ratio", "50", "--epochs", "2", "--no-fp32-baseline", *SMALL, *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_one_search_lands_within_ten_percent_of_the_target_deterministically(tmp_path):
    first = run(tmp_path / "a", tmp_path / "cache")
    again = run(tmp_path / "b", tmp_path / "cache")
    assert 50 * 0.9 <= first["compression_ratio"] <= 50 * 1.1, first["compression_ratio"]
    assert first["lambda_trials"] == []  # no bisection
    record = first["budget_multiplier"]
    assert record["lambda_end"] > record["lambda_start"]  # the default lambda is far too weak for 50x
    assert first["config"]["lambda"] == record["lambda_end"]
    assert again["bits_per_group"] == first["bits_per_group"]
    assert again["budget_multiplier"] == record
    assert again["test"] == first["test"]
