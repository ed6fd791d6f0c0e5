"""experiments.bench_scale: ratios and extrapolation are computed from the measured rows,
and a tiny run writes consistent files (never a timing assertion)."""

from __future__ import annotations

import csv
import json

import pytest

from experiments import bench_scale


def _row(rows, features, procs, job, step, rss):
    return {"rows": rows, "features": features, "processes": procs, "job": job, "step_seconds": step,
            "peak_rss_mb": rss}


def test_ratios_are_within_the_same_rows_and_processes():
    rows = [_row(10, 5, 1, "fp32", 0.1, 100), _row(10, 5, 1, "mpe", 0.15, 120),
            _row(10, 5, 2, "fp32", 0.08, 90), _row(10, 5, 2, "mpe", 0.1, 95)]
    bench_scale.add_ratios(rows)
    assert rows[1]["step_vs_fp32"] == pytest.approx(1.5)
    assert rows[3]["step_vs_fp32"] == pytest.approx(1.25)
    assert rows[2]["step_vs_1_process"] == pytest.approx(0.8)
    assert rows[3]["step_vs_1_process"] == pytest.approx(0.1 / 0.15)


def test_extrapolation_recovers_a_linear_cost_model():
    args = bench_scale.build_parser().parse_args([])
    dim = 16
    pts = []
    for rows, features in ((100_000, 40_000), (1_000_000, 250_000), (4_000_000, 800_000)):
        step = 0.05 + 2e-7 * features
        rss = (300 * 2**20 + 1.5 * rows * (bench_scale.FIELDS + 1) * 4 + 6 * features * dim * 4) / 2**20
        pts.append(_row(rows, features, 1, "fp32", step, rss))
    ex = bench_scale.extrapolate(pts, args)["fp32"]
    fits = ex["fits"]
    assert fits["step_seconds"]["a"] == pytest.approx(0.05, rel=1e-6)
    assert fits["step_seconds"]["b_per_table_row"] == pytest.approx(2e-7, rel=1e-6)
    assert fits["peak_rss_bytes"]["per_table_byte"] == pytest.approx(6, rel=1e-4)
    kaggle = ex["targets"][0]
    assert kaggle["name"] == "Criteo Kaggle" and kaggle["steps_per_epoch"] == -(-int(45_840_617 * 0.8) // 4096)
    assert kaggle["step_seconds"] == pytest.approx(0.05 + 2e-7 * 6_780_382)
    assert kaggle["epoch_hours"] == pytest.approx(kaggle["steps_per_epoch"] * kaggle["step_seconds"] / 3600)
    assert kaggle["fp32_table_gb"] == pytest.approx(6_780_382 * 64 / 1e9)


@pytest.mark.slow
def test_tiny_bench_scale_run_writes_consistent_files(tmp_path):
    out = tmp_path / "out"
    rc = bench_scale.main(["--rows", "3000", "6000", "--processes", "1", "--jobs", "fp32", "--hidden", "8",
                           "--batch-size", "500", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                           "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench_scale.json").read_text())
    assert [(r["rows"], r["processes"], r["job"]) for r in res["rows"]] == [(3000, 1, "fp32"), (6000, 1, "fp32")]
    for r in res["rows"]:
        report = json.loads((out / "runs" / f"fp32_{r['rows']}rows_1p" / "report.json").read_text())
        assert r["step_seconds"] == report["step_seconds"] and r["test_auc"] == report["test"]["auc"]
        assert r["peak_rss_mb"] > 50 and r["wall_seconds"] > 0 and r["step_vs_fp32"] == 1.0
    with open(out / "bench_scale.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (out / "extrapolation.md").read_text().count("| fp32 |") == 2
