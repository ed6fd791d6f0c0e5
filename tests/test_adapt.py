"""End to end: the adaptation benchmark on the real Avazu sample (time split = row order)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from experiments import adapt


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_adapt_end_to_end_and_resume(avazu_sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapt"
    argv = ["--dataset", "avazu", "--data", str(avazu_sample), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--seeds", "1", "--ranks", "1", "2",
            "--hidden", "64", "32", "--batch-size", "512", "--adapt-epochs", "1", "--adapt-evals-per-epoch", "1",
            "--adapt-batch-size", "256", "--no-progress"]
    assert adapt.main(argv) == 0
    rows = _rows(out / "results.csv")
    assert list(rows[0]) == list(adapt.COLUMNS)
    keys = [(r["method"], r["setting"], r["seed"]) for r in rows]
    assert keys == [("none", "-", "2022"), ("head", "-", "2022"), ("full", "-", "2022"),
                    ("lora", "r1", "2022"), ("lora", "r2", "2022"),
                    ("genlora", "budget_r1", "2022"), ("genlora", "budget_r2", "2022")]
    by = {(r["method"], r["setting"]): r for r in rows}
    assert by[("none", "-")]["trainable_params"] == "0"
    assert by[("head", "-")]["trainable_params"] == "33"  # head: 32 -> 1
    for r in (1, 2):
        lora, gen = by[("lora", f"r{r}")], by[("genlora", f"budget_r{r}")]
        assert int(lora["trainable_params"]) == int(lora["budget_params"])
        assert int(gen["trainable_params"]) <= int(gen["budget_params"]) == int(lora["budget_params"])
        assert float(gen["effective_rank"]) > 0 and float(lora["effective_rank"]) > 0
    # 900 test rows, 163 clicks: a chance scorer gets AUC 0.5 +- 0.025 (1 sd); measured 0.541 (head)
    # .. 0.543 (none, genlora) .. 0.552 / 0.554 (lora r1 / r2) .. 0.574 (full)
    for r in rows:
        assert float(r["test_auc"]) > 0.53, (r["method"], r["setting"], r["test_auc"])
        assert math.isfinite(float(r["test_logloss"])) and float(r["test_logloss"]) > 0, r  # measured 0.746 .. 0.755
    assert by[("none", "-")]["effective_rank"] == "" and float(by[("full", "-")]["effective_rank"]) > 0
    for name in ("auc_vs_params.png", "rank_vs_params.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| genlora | budget_r2 |" in (out / "results.md").read_text()

    # a rerun skips every row already present and leaves them unchanged
    before = (out / "results.csv").read_text()
    assert adapt.main(argv) == 0
    assert (out / "results.csv").read_text() == before
    # another setting of the same run adds only its own rows
    assert adapt.main([*argv[:-1], "--methods", "lora", "--ranks", "4", "--no-progress"]) == 0
    rows2 = _rows(out / "results.csv")
    assert len(rows2) == len(rows) + 1 and rows2[-1]["setting"] == "r4"
    # a different run configuration in the same directory is refused
    assert adapt.main([*argv, "--group-size", "4"]) == 2


def test_genlora_budget_matching() -> None:
    shapes = [(384, 256), (256, 128), (128, 64), (64, 1)]
    chosen = []
    for r in (1, 2, 4, 8, 16):
        budget = adapt.lora_budget(shapes, r)
        g_rank, g_size = adapt.genlora_for_budget(shapes, budget, 8, 64)
        assert g_rank >= r
        assert sum(adapt.genlora_parameter_count(i, o, g_rank, g_size) for i, o in shapes) <= budget
        chosen.append((g_rank, g_size))
    assert len(set(chosen)) == len(chosen)  # every budget gets its own adapter
    assert chosen[-1] == (64, 32)  # rank capped at 64, the rest of the budget goes to the group size


@pytest.mark.slow
def test_adapt_on_mpe_export_embeddings(tmp_path: Path) -> None:
    """--embedding mpe: adapters on the tower of the model served from MPE's bit-packed export."""
    out = tmp_path / "adapt_mpe"
    argv = ["--dataset", "avazu", "--synthetic", "30000", "--days", "4", "--drift", "0.5",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--embedding", "mpe",
            "--mpe-target-ratio", "10", "--seeds", "1", "--methods", "none", "lora", "--ranks", "2",
            "--hidden", "32", "16", "--batch-size", "1024", "--adapt-epochs", "1",
            "--adapt-evals-per-epoch", "1", "--adapt-batch-size", "512", "--no-progress"]
    assert adapt.main(argv) == 0
    rows = {r["method"]: r for r in _rows(out / "results.csv")}
    assert set(rows) == {"none", "lora"}
    report = json.loads((out / "mpe_seed2022" / "report.json").read_text())
    header = json.loads((out / "mpe_seed2022" / "export" / "header.json").read_text())
    # the MPE run really exported at ~10x: measured 52,350 B of 574,912 B fp32 (10.98x)
    assert report["packed_bytes"] == header["total_bytes"] == sum(f["bytes"] for f in header["files"].values())
    assert report["compression_ratio"] == pytest.approx(report["fp32_bytes"] / report["packed_bytes"])
    assert report["compression_ratio"] >= 9.0, report["compression_ratio"]
    # "none" serves the exported tables unchanged: its AUC is the export's own test AUC (0.7157 measured)
    assert report["test"]["rows"] == 3000 and report["export_test_auc"] == report["test"]["auc"]
    assert float(rows["none"]["test_auc"]) == pytest.approx(report["export_test_auc"], rel=1e-9, abs=1e-12)
    assert int(rows["lora"]["trainable_params"]) > 0 and float(rows["lora"]["effective_rank"]) > 0
    # synthetic data with signal: measured 0.7157 (none), 0.7170 (lora r2)
    assert float(rows["none"]["test_auc"]) > 0.65 and float(rows["lora"]["test_auc"]) > 0.65, rows
    assert "MPE 10x export embeddings" in (out / "results.md").read_text()
