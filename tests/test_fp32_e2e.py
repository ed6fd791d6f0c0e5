"""fp32 baseline end to end: generate or take a raw file, prepare, train, evaluate."""

import json
from pathlib import Path

import pytest

from ctr import train_fp32 as train

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SAMPLES = {"criteo": SHARED / "criteo_sample" / "train.txt", "avazu": SHARED / "avazu_sample" / "train.csv"}
SMALL = ["--hidden", "64", "32", "--batch-size", "512", "--no-progress"]
# The planted model's oracle AUC is the ceiling. 40k rows leave most values' effects
# unlearned (measured: 0.73 against an oracle of 0.89); at 1M rows the gap is smaller
# (README). The test bounds the gap at 40k rows.
ORACLE_GAP = 0.2

pytestmark = pytest.mark.slow


def test_synthetic_fp32_reaches_near_oracle(tmp_path):
    out = tmp_path / "run"
    rc = train.main(["--dataset", "criteo", "--synthetic", "40000", "--epochs", "2", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--hidden", "64", "32", "--batch-size", "256",
                     "--lr", "3e-3", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    meta_path = next((tmp_path / "cache" / "synthetic").glob("*.meta.json"))
    oracle = json.loads(meta_path.read_text())["oracle_auc"]
    auc = report["test"]["auc"]
    assert oracle - ORACLE_GAP < auc <= oracle + 0.01, (auc, oracle)
    assert report["embedding_bytes"] == report["num_features"] * 16 * 4


@pytest.mark.parametrize("dataset", ["criteo", "avazu"])
def test_real_sample_beats_constant_predictor(tmp_path, dataset):
    if not SAMPLES[dataset].exists():
        pytest.skip(f"real sample {SAMPLES[dataset]} not found")
    out = tmp_path / "run"
    rc = train.main(["--dataset", dataset, "--data", str(SAMPLES[dataset]), "--epochs", "3", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), *SMALL])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    # A constant predictor has AUC 0.5; 8k rows give a noisy but clearly better model.
    assert report["test"]["auc"] > 0.55
    assert report["test"]["rows"] > 700
