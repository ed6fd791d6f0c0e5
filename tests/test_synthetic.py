"""The synthetic generator writes the real raw formats with a planted, drifting click model."""

import json

import pandas as pd
import pytest

from data.prepare import prepare
from data.schema import AVAZU, CRITEO
from data.synthetic import generate


def test_criteo_format_click_rate_and_determinism(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    meta = generate("criteo", 20000, a, seed=1, progress=False)
    generate("criteo", 20000, b, seed=1, progress=False)
    generate("criteo", 20000, c, seed=2, progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    lines = a.read_text().splitlines()
    assert len(lines) == 20000 and all(line.count("\t") == 39 for line in lines)
    df = pd.read_csv(a, sep="\t", header=None, names=list(CRITEO.columns), dtype=str, keep_default_na=False)
    assert set(df["label"]) == {"0", "1"}
    assert abs(df["label"].astype(int).mean() - 0.22) < 0.02
    assert meta["click_rate"] == pytest.approx(df["label"].astype(int).mean())
    assert df["C3"].str.fullmatch(r"[0-9a-f]{8}").all()
    assert (df["I2"].replace("", "0").astype(int) < 0).any()
    assert (df["I12"] == "").mean() > 0.5
    assert 0.7 < meta["oracle_auc"] < 0.95
    assert json.loads((tmp_path / "a.txt.meta.json").read_text()) == meta
    counts = df["C3"].value_counts()
    assert counts.iloc[0] > 20 * counts.median()  # Zipf: the head dominates


def test_avazu_days_in_time_order_and_drift(tmp_path):
    path = tmp_path / "avazu.csv"
    meta = generate("avazu", 30000, path, days=3, drift=1.0, seed=0, progress=False)
    df = pd.read_csv(path, dtype=str)
    assert list(df.columns) == list(AVAZU.columns)
    hours = df["hour"].astype(int)
    assert hours.is_monotonic_increasing and hours.iloc[0] == 14102100
    assert len(set(hours // 100)) == 3
    assert set(meta["oracle_auc_per_day"]) == {"0", "1", "2"}
    # The click model changes: a value's click rate on day 0 predicts the last day worse than day 0.
    day = (hours // 100).rank(method="dense").astype(int) - 1
    y = df["click"].astype(int)
    rate = y[day == 0].groupby(df["site_id"][day == 0]).mean()
    pred = df["site_id"].map(rate).fillna(y.mean())
    from sklearn.metrics import roc_auc_score

    auc0 = roc_auc_score(y[day == 0], pred[day == 0])
    auc2 = roc_auc_score(y[day == 2], pred[day == 2])
    assert auc2 < auc0 - 0.02


def test_prepare_reads_synthetic_files(tmp_path):
    for name in ("criteo", "avazu"):
        raw = tmp_path / f"{name}.raw"
        generate(name, 5000, raw, seed=3, progress=False)
        manifest = prepare(name, raw, tmp_path / f"{name}_prep", progress=False)
        assert manifest["rows"]["total"] == 5000
        assert manifest["bad_rows"]["skipped"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="rows"):
        generate("criteo", 0, "x.txt", progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        generate("kdd12", 10, "x.txt", progress=False)
