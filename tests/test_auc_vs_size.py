"""End to end: the AUC-vs-size benchmark on a small synthetic Criteo-format file, and its resume."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import types
from pathlib import Path

import pytest

from baselines import registry
from baselines.base import CompressedEmbedding
from baselines.registry import Method
from experiments import auc_vs_size

pytestmark = pytest.mark.slow

NUM_FIELDS = 39  # Criteo
METHODS = ["fp32", "hash:x10", "ptq:int4", "mpe:x10"]
SMALL = ["--dataset", "criteo", "--synthetic", "20000", "--seeds", "1", "--hidden", "16", "--batch-size", "2000",
         "--epochs", "1", "--mpe-groups", "16", "--mpe-bisection-steps", "2", "--no-progress"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _markdown_rows(path: Path) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("method", "---"):
            out[(cells[0], cells[1])] = cells
    return out


def _front(rows: list[dict[str, str]]) -> set[tuple[str, str]]:
    """Independent Pareto front (one seed: the runs themselves): nothing smaller-or-equal is better."""
    pts = [(r["method"], r["setting"], int(r["bytes"]), float(r["test_auc"])) for r in rows]
    return {(m, s) for m, s, b, a in pts
            if not any((b2 <= b and a2 > a) or (b2 < b and a2 >= a) for _, _, b2, a2 in pts)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("auc_vs_size")
    argv = [*SMALL, "--cache-dir", str(tmp / "cache"), "--out", str(tmp / "out"), "--keep-exports",
            "--methods", *METHODS]
    assert auc_vs_size.main(argv) == 0
    return tmp / "out", argv


def test_outputs_are_consistent_with_the_runs(bench) -> None:
    out, _ = bench
    rows = _rows(out / "results.csv")
    assert list(rows[0]) == list(auc_vs_size.COLUMNS)
    assert [(r["method"], r["setting"], r["seed"]) for r in rows] == [
        ("fp32", "-", "2022"), ("hash", "x10", "2022"), ("ptq", "int4", "2022"), ("mpe", "x10", "2022")]
    by = {r["method"]: r for r in rows}
    fp32_bytes = int(by["fp32"]["fp32_bytes"])
    # fp32's export is its tables plus one 128-byte .npy header per field
    assert int(by["fp32"]["bytes"]) == fp32_bytes + NUM_FIELDS * 128
    for r in rows:
        rid = auc_vs_size.run_id(r["method"], r["setting"], int(r["seed"]))
        report = json.loads((out / "reports" / f"{rid}.json").read_text())
        nbytes = int(r["bytes"])
        # the CSV's bytes are the files really written, listed in the report and still on disk
        assert report["bytes"] == nbytes == sum(report["export_files"].values())
        export = Path(report["export_dir"])
        assert export == out / "exports" / rid
        assert sum((export / name).stat().st_size for name in report["export_files"]) == nbytes
        assert int(r["fp32_bytes"]) == fp32_bytes
        assert float(r["ratio"]) == pytest.approx(fp32_bytes / nbytes, rel=1e-12)
        assert float(r["test_auc"]) == report["test_auc"] and 0.5 < report["test_auc"] < 1.0
        assert float(r["test_logloss"]) > 0 and float(r["seconds"]) > 0 and int(r["steps"]) > 0
        assert not math.isnan(float(r["val_auc"]))
    # MPE: the bit-packed export's bytes and the AUC of the model served from it
    mpe_report = json.loads((out / "mpe" / "x10_seed2022" / "report.json").read_text())
    assert int(by["mpe"]["bytes"]) == mpe_report["packed_bytes"]
    assert float(by["mpe"]["test_auc"]) == mpe_report["export_test_auc"]
    assert 9 <= float(by["mpe"]["ratio"]) <= 11
    assert 10 <= float(by["hash"]["ratio"]) < 11  # the hash tables fill the x10 budget
    # post-training: the seed's fp32 model converted, not retrained
    assert by["ptq"]["kind"] == "post" and by["ptq"]["steps"] == by["fp32"]["steps"]
    assert int(by["ptq"]["bytes"]) < int(by["fp32"]["bytes"])
    # intermediate MPE files are cleaned up; the export was moved under exports/
    assert not (out / "mpe" / "x10_seed2022" / "search_model.pt").exists()

    # the markdown table and the front agree with the CSV
    md = _markdown_rows(out / "auc_vs_size.md")
    assert set(md) == {(r["method"], r["setting"]) for r in rows}
    front = _front(rows)
    for r in rows:
        cells = md[(r["method"], r["setting"])]
        assert cells[2] == f"{int(r['bytes']):,}"
        assert cells[3] == f"{float(r['ratio']):.1f}x"
        assert cells[4] == f"{float(r['test_auc']):.4f}"
        assert cells[8] == ("yes" if (r["method"], r["setting"]) in front else "no")
    assert (out / "auc_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "auc_vs_size.png").stat().st_size > 5000


def test_resume_skips_done_rows(bench) -> None:
    out, argv = bench
    csv_path = out / "results.csv"
    rows = _rows(csv_path)
    reports = {p.name: p.stat().st_mtime_ns for p in (out / "reports").iterdir()}
    fp32_model = (out / "fp32" / "seed2022.pt").stat().st_mtime_ns
    # every row done: nothing runs, nothing changes
    before = csv_path.read_text()
    assert auc_vs_size.main(argv) == 0
    assert csv_path.read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "reports").iterdir()} == reports
    # an interrupted benchmark (the fp32 row lost): only that run is redone, from the saved fp32 model
    auc_vs_size.write_rows(csv_path, [r for r in rows if r["method"] != "fp32"], auc_vs_size.COLUMNS)
    assert auc_vs_size.main(argv) == 0
    again = _rows(csv_path)
    assert [r["method"] for r in again] == ["hash", "ptq", "mpe", "fp32"]
    assert again[-1] == rows[0]  # same model, same metrics, same bytes
    assert (out / "fp32" / "seed2022.pt").stat().st_mtime_ns == fp32_model  # not retrained
    mpe_report = "mpe_x10_seed2022.json"
    assert (out / "reports" / mpe_report).stat().st_mtime_ns == reports[mpe_report]  # MPE not rerun
    # another configuration in the same directory is refused
    assert auc_vs_size.main([*argv, "--dim", "8"]) == 2


def test_unknown_methods_and_settings_are_named(bench, capsys) -> None:
    out, argv = bench
    base = argv[: argv.index("--methods")]
    reports = sorted(os.listdir(out / "reports"))
    assert auc_vs_size.main([*base, "--methods", "fp32", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nosuch'" in err and "mpe" in err
    assert auc_vs_size.main([*base, "--methods", "mpe:x10,ten"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"method 'mpe': setting 'ten' rejected", err), err
    assert auc_vs_size.main([*base, "--methods", "fp32:8bit"]) == 2
    assert "setting '8bit' rejected" in capsys.readouterr().err
    assert sorted(os.listdir(out / "reports")) == reports  # nothing ran


class _Half(CompressedEmbedding):
    """A stand-in post-training method: the fp32 rows stored as float16 (one global array)."""

    method = "half"

    def __init__(self, fp32) -> None:
        super().__init__()
        self.fields, self.cardinalities, self.dim = fp32.fields, fp32.cardinalities, fp32.dim
        self.register_buffer("rows", fp32.global_weight().half())

    def forward(self, kjt):
        return self.rows[self.global_ids(kjt)].float()

    def export_arrays(self):
        return {"rows": self.rows.numpy()}

    def export_config(self):
        return {}


def test_post_methods_reuse_the_fp32_model_of_the_seed(bench, monkeypatch) -> None:
    out, argv = bench
    module = types.ModuleType("fake_post_method")
    module.METHOD = Method("half", "post", ("fp16",), "fp16 copy of the fp32 rows",
                           convert=lambda fp32, inputs, setting: _Half(fp32))
    monkeypatch.setitem(sys.modules, "fake_post_method", module)
    monkeypatch.setitem(registry.METHODS, "half", "fake_post_method:METHOD")
    fp32_model = (out / "fp32" / "seed2022.pt").stat().st_mtime_ns
    base = argv[: argv.index("--methods")]
    assert auc_vs_size.main([*base, "--methods", "fp32", "half"]) == 0
    assert (out / "fp32" / "seed2022.pt").stat().st_mtime_ns == fp32_model  # loaded, not retrained
    rows = {r["method"]: r for r in _rows(out / "results.csv")}
    half, fp32 = rows["half"], rows["fp32"]
    assert half["kind"] == "post" and half["steps"] == fp32["steps"]  # the fp32 model's training
    n_rows = int(fp32["fp32_bytes"]) // (16 * 4)
    assert int(half["bytes"]) == n_rows * 16 * 2 + 128
    assert float(half["ratio"]) == pytest.approx(int(fp32["fp32_bytes"]) / int(half["bytes"]), rel=1e-12)
    assert abs(float(half["test_auc"]) - float(fp32["test_auc"])) < 1e-3  # fp16 rows, same tower
    assert ("half", "fp16") in _markdown_rows(out / "auc_vs_size.md")


def test_seed_agreement_of_mpe_bits() -> None:
    reports = [
        {"method": "mpe", "setting": "x10", "seed": 1, "bits_per_group": [0, 0, 2, 4]},
        {"method": "mpe", "setting": "x10", "seed": 2, "bits_per_group": [0, 0, 2, 6]},
        {"method": "mpe", "setting": "x10", "seed": 3, "bits_per_group": [0, 1, 3, 6]},
        {"method": "mpe", "setting": "x50", "seed": 1, "bits_per_group": [0, 0, 0, 6]},  # one seed: no pair
        {"method": "lsq", "setting": "4", "seed": 1},
    ]
    agreement = auc_vs_size.seed_agreement(reports)
    assert list(agreement) == ["x10"]
    a = agreement["x10"]
    assert a["seeds"] == [1, 2, 3]
    assert a["pairs"] == {"1-2": 0.75, "1-3": 0.25, "2-3": 0.5}
    assert a["share_equal"] == pytest.approx(0.5)
