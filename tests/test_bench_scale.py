"""experiments.bench_scale: ratios and extrapolation are computed from the measured rows,
and a tiny run writes consistent files (never a timing assertion). Full-size mode: the
checks, stage-by-stage resume (fake stages, then a tiny real run), the disk refusal."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

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


# --- full-size mode -------------------------------------------------------------------------
def _stage_row(stage, rows, wall=10.0, rss=1000.0, step=None):
    row = {"rows": rows, "stage": stage, "cached": False, "wall_seconds": wall, "peak_rss_mb": rss}
    if step is not None:
        row.update(step_seconds=step, test_auc=0.7, steps=5, train_seconds=wall / 2)
    return row


def test_full_size_checks_compare_the_largest_point_within_the_run():
    mib = 1e9 / 2**20  # MiB in a GB
    rows = []
    for n, rss_gb, step in ((1_000_000, 2.0, 0.10), (10_000_000, 3.0, 0.11), (45_840_617, 4.0, 0.14)):
        rows += [_stage_row(s, n, rss=rss_gb * mib) for s in ("generate", "prepare")]
        rows.append(_stage_row("fp32", n, wall=1000.0, rss=rss_gb * mib, step=step))
        rows.append(_stage_row("mpe", n, wall=2500.0, rss=7.0 * mib if n > 1e7 else rss_gb * mib, step=step))
    rows.append(_stage_row("fp32_2p", 45_840_617, rss=1.0 * mib, step=0.1))
    by = {c["name"]: c for c in bench_scale.full_size_checks(rows)}
    big = "45,840,617"
    assert by[f"peak RSS fp32 at {big} rows"]["ok"] is True
    assert by[f"peak RSS fp32 at {big} rows"]["measured"] == pytest.approx(4.0)
    mpe = by[f"peak RSS mpe at {big} rows"]
    assert mpe["ok"] is False and mpe["text"] == f"peak RSS mpe at {big} rows: 7 GB vs <= 6 GB -> NOT MET"
    assert by[f"peak RSS fp32 {big} / 10,000,000 rows"]["measured"] == pytest.approx(4 / 3)
    assert by[f"peak RSS fp32 {big} / 10,000,000 rows"]["ok"] is True
    assert by[f"peak RSS mpe {big} / 10,000,000 rows"]["ok"] is False
    fp32_2p = by[f"peak RSS fp32_2p {big} / 10,000,000 rows"]
    assert fp32_2p["ok"] is None and "10,000,000 fp32_2p not run" in fp32_2p["text"]
    step = by[f"fp32 step {big} / 1,000,000 rows"]
    assert step["measured"] == pytest.approx(1.4) and step["ok"] is False and step["text"].endswith("-> NOT MET")
    assert by[f"mpe search step {big} / 1,000,000 rows"]["ok"] is False
    epoch = by[f"fp32 epoch at {big} rows"]
    assert epoch["measured"] == pytest.approx(500 / 60) and epoch["ok"] is True
    wall = by[f"mpe wall / fp32 wall at {big} rows"]
    assert wall["measured"] == pytest.approx(2.5) and wall["text"].endswith("-> ok")


def _fake_stages(monkeypatch, fail=None):
    """Replace the subprocesses by instant fake stages; the calls made."""
    calls = []

    def fake(stage, rows, args, out, cache):
        if (rows, stage) == fail:
            raise bench_scale.StageError("exit status 1 (fake)")
        calls.append((rows, stage))
        step = 0.01 * args.batch_size / 100 if stage in bench_scale.TRAINING_STAGES else None
        return _stage_row(stage, rows, wall=float(rows), rss=100.0 + rows, step=step)

    monkeypatch.setattr(bench_scale, "run_stage", fake)
    monkeypatch.setattr(bench_scale, "artifacts_present", lambda stage, rows, cache: True)
    return calls


def test_full_size_resumes_stage_by_stage(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    base = ["--full-size", "--rows", "10", "20", "--hidden", "8", "--batch-size", "100",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    calls = _fake_stages(monkeypatch, fail=(20, "mpe"))
    assert bench_scale.main(base) == 1  # a stage fails: the finished ones are kept
    assert calls == [(10, s) for s in bench_scale.STAGES] + [(20, "generate"), (20, "prepare"), (20, "fp32")]
    partial = json.loads((out / "full_size.json").read_text())
    assert len(partial["rows"]) == 8 and (out / "full_size.md").read_text().count("| 20 |") == 3

    calls = _fake_stages(monkeypatch)
    assert bench_scale.main(base) == 0  # resumes at the failed stage
    assert calls == [(20, "mpe"), (20, "fp32_2p")]
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(
        f"{n}_{s}.json" for n in (10, 20) for s in bench_scale.STAGES)
    first = json.loads((out / "full_size.json").read_text())
    assert [(r["rows"], r["stage"]) for r in first["rows"]] == [(n, s) for n in (10, 20) for s in bench_scale.STAGES]
    assert any(c["name"] == "fp32 step 20 / 10 rows" for c in first["checks"])
    md = (out / "full_size.md").read_text()
    assert "| rows | stage | wall | step ms | peak RSS GB | test AUC | ratio |" in md and "Checks" in md
    with open(out / "full_size.csv") as f:
        assert len(list(csv.DictReader(f))) == 10

    capsys.readouterr()
    calls = _fake_stages(monkeypatch)
    assert bench_scale.main(base) == 0  # everything reused
    assert calls == [] and capsys.readouterr().out.count("reusing") == 10
    assert json.loads((out / "full_size.json").read_text())["rows"] == first["rows"]

    calls = _fake_stages(monkeypatch)
    assert bench_scale.main([*base, "--target-ratio", "100"]) == 0  # only mpe depends on it
    assert calls == [(10, "mpe"), (20, "mpe")]
    assert "options changed: target_ratio 200.0 -> 100.0" in capsys.readouterr().out

    calls = _fake_stages(monkeypatch)
    assert bench_scale.main([*base, "--batch-size", "50", "--stages", "fp32"]) == 0
    assert calls == [(10, "fp32"), (20, "fp32")]  # generate and prepare reused, not rerun
    rows = json.loads((out / "full_size.json").read_text())["rows"]
    # the table holds what matches the current options: mpe / fp32_2p were done with batch 100
    assert [(r["rows"], r["stage"]) for r in rows] == [(n, s) for n in (10, 20) for s in ("generate", "prepare", "fp32")]


def test_full_size_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch, capsys):
    calls = _fake_stages(monkeypatch)
    monkeypatch.setattr(bench_scale, "artifacts_present", lambda stage, rows, cache: False)
    monkeypatch.setattr(bench_scale.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    rc = bench_scale.main(["--full-size", "--rows", "45840617", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and calls == [] and err.startswith("error: not enough disk space") and err.count("\n") == 1


def test_stages_needs_full_size():
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--stages", "fp32"])
    assert e.value.code == 2


@pytest.mark.slow
def test_tiny_full_size_run_resumes_and_reruns_changed_stages(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ["--full-size", "--hidden", "8", "--batch-size", "500", "--stages", "generate", "prepare", "fp32",
            "--cache-dir", str(cache), "--out", str(out)]
    assert bench_scale.main([*base, "--rows", "3000", "6000"]) == 0
    first = json.loads((out / "full_size.json").read_text())
    assert [(r["rows"], r["stage"]) for r in first["rows"]] == [
        (n, s) for n in (3000, 6000) for s in ("generate", "prepare", "fp32")]
    by = {(r["rows"], r["stage"]): r for r in first["rows"]}
    for n in (3000, 6000):
        gen, prep, fp32 = by[(n, "generate")], by[(n, "prepare")], by[(n, "fp32")]
        assert gen["file_bytes"] == bench_scale.synthetic_path(n, cache).stat().st_size
        assert prep["total_rows"] == n and prep["num_features"] > 0
        report = json.loads((out / "runs" / f"{n}_fp32" / "report.json").read_text())
        assert fp32["step_seconds"] == report["step_seconds"] and fp32["test_auc"] == report["test"]["auc"]
        assert fp32["steps"] == report["steps"] and fp32["embedding_optimizer"] == report["embedding_optimizer"]
        for r in (gen, prep, fp32):
            assert not r["cached"] and r["wall_seconds"] > 0 and r["peak_rss_mb"] > 50
        assert (out / "stages" / f"{n}_fp32.json").is_file()
    md = (out / "full_size.md").read_text()
    assert md.count("| fp32 |") == 2 and "fp32 step 6,000 / 3,000 rows" in md

    capsys.readouterr()
    assert bench_scale.main([*base, "--rows", "3000", "6000"]) == 0  # all reused
    assert capsys.readouterr().out.count("reusing") == 6
    assert json.loads((out / "full_size.json").read_text())["rows"] == first["rows"]

    (out / "runs" / "3000_fp32" / "junk").write_text("a half-written run")
    assert bench_scale.main([*base, "--rows", "3000", "--batch-size", "250"]) == 0  # fp32 reruns, data reused
    log = capsys.readouterr().out
    assert log.count("reusing") == 2 and "options changed: batch_size 500 -> 250" in log
    assert not (out / "runs" / "3000_fp32" / "junk").exists()
    rows = json.loads((out / "full_size.json").read_text())["rows"]
    assert rows[:2] == first["rows"][:2] and rows[2]["steps"] == 2 * first["rows"][2]["steps"]
