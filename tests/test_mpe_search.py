"""End to end: ``python -m mpe.search`` on the real Criteo sample and on a small synthetic file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpe import search
from mpe.bitwidths import packed_size_breakdown, packed_table_bytes
from mpe.quantizer import LSQQuantizer
from mpe.writer import write_packed_export

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CRITEO_SAMPLE = SHARED / "criteo_sample" / "train.txt"

SMALL = ["--hidden", "64", "32", "--batch-size", "1000", "--groups", "16", "--no-progress"]


def check_run(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    export = out / "export"
    header = json.loads((export / "header.json").read_text())
    on_disk = sum((export / name).stat().st_size for name in header["files"])
    assert report["packed_bytes"] == on_disk
    assert report["export_test_auc"] == report["test"]["auc"]
    assert report["compression_ratio"] == pytest.approx(report["fp32_bytes"] / on_disk)
    bits = np.asarray(report["bits_per_group"])
    assert len(bits) == 16 and set(bits.tolist()) <= set(range(7))
    assert (out / "bits_vs_frequency.png").stat().st_size > 1000
    return report


@pytest.mark.slow
@pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason="real Criteo sample not found in ../shared/data")
def test_search_on_real_criteo_sample(tmp_path):
    out = tmp_path / "run"
    rc = search.main(["--dataset", "criteo", "--data", str(CRITEO_SAMPLE), "--out", str(out),
                      "--cache-dir", str(tmp_path / "cache"), "--epochs", "2", *SMALL])
    assert rc == 0
    report = check_run(out)
    assert report["test"]["rows"] == json.loads(
        next((tmp_path / "cache" / "prepared").iterdir()).joinpath("manifest.json").read_text()
    )["rows"]["test"]
    assert 0.5 < report["test"]["auc"] < 1.0


@pytest.mark.slow
def test_search_on_synthetic_with_target_ratio_by_bisection(tmp_path):
    out = tmp_path / "run"
    rc = search.main(["--dataset", "criteo", "--synthetic", "30000", "--out", str(out),
                      "--cache-dir", str(tmp_path / "cache"), "--target-ratio", "20", "--epochs", "3",
                      "--selection", "budgeted", "--samples", "4", "--budget", "bisection", *SMALL])
    assert rc == 0
    report = check_run(out)
    assert report["test"]["auc"] > 0.6
    ratio = report["compression_ratio"]
    assert 20 * 0.9 <= ratio <= 20 * 1.1, ratio
    assert report["lambda_trials"], "bisection ran no trial"


def test_all_pruned_table_stores_id_map_steps_and_offset(tmp_path):
    """10 pruned rows, D = 16, candidates 0..6: no code files, only three .npy files, each a
    128-byte v1.0 header + data: steps 7 x fp32, offset 16 x fp32, id map 63 bytes (9-byte
    descriptor per candidate: kind u8 + count u32 + runs u32; bucket 0 holds every row, so it is
    implicit and has no Elias-Fano block)."""
    cands, dim = tuple(range(7)), 16
    bits = np.zeros(10, dtype=np.int64)
    expected = {"steps.npy": 128 + 7 * 4, "offset.npy": 128 + dim * 4, "id_map.npy": 128 + 9 * 7}
    assert packed_size_breakdown(bits, dim, cands) == expected
    assert packed_table_bytes(bits, dim, cands) == 539 == sum(expected.values())
    header = write_packed_export(tmp_path / "e", torch.randn(10, dim), bits, LSQQuantizer(cands, dim, 10), ["x"], [0])
    assert {name: (tmp_path / "e" / name).stat().st_size for name in header["files"]} == expected
    assert header["total_bytes"] == 539


@pytest.mark.slow
def test_no_data_explains_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MPE_DATA_DIR", raising=False)
    rc = search.main(["--dataset", "criteo", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--synthetic" in err and "Criteo" in err


@pytest.mark.slow
def test_unknown_dataset_is_a_clear_error(capsys):
    assert search.main(["--dataset", "movielens", "--synthetic", "100"]) == 2
    assert "unknown dataset 'movielens'" in capsys.readouterr().err
