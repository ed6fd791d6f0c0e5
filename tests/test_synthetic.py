"""The synthetic generator: real raw formats, Zipf values, planted click model, days and drift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from data import synthetic
from data.prepare import prepare
from data.schema import AVAZU, CRITEO
from data.synthetic import generate

HEX8 = r"[0-9a-f]{8}"


def _read(path: Path, schema) -> pd.DataFrame:
    """Parse a raw file the way the schema describes it, every column as text."""
    return pd.read_csv(
        path, sep=schema.delimiter, header=0 if schema.has_header else None,
        names=None if schema.has_header else list(schema.columns), dtype=str, keep_default_na=False,
    )


@pytest.fixture(scope="module")
def criteo_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("criteo") / "train.txt"
    return path, generate("criteo", 20_000, path, seed=1, progress=False)


@pytest.fixture(scope="module")
def avazu_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("avazu") / "train.csv"
    return path, generate("avazu", 20_000, path, days=3, seed=1, progress=False)


def test_criteo_raw_format(criteo_file):
    path, meta = criteo_file
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 20_001  # no header, newline-terminated
    assert {line.count("\t") for line in lines[:-1]} == {39}
    df = _read(path, CRITEO)
    assert len(df) == 20_000 and list(df.columns) == list(CRITEO.columns)
    assert set(df["label"]) == {"0", "1"}
    ints = df[list(CRITEO.integer_columns)]
    assert ints.apply(lambda c: c[c != ""].str.fullmatch(r"-?[0-9]+").all()).all()
    assert (ints == "").mean()["I12"] > 0.6 and (ints == "").mean()["I2"] == 0
    i2 = ints["I2"].astype(int)
    assert (i2 < 0).any() and i2.min() >= -3
    assert (ints.drop(columns="I2").replace("", "0").astype(np.int64) >= 0).all().all()
    assert ints["I5"].replace("", "0").astype(np.int64).max() > 10_000  # heavy tail
    cats = df[list(CRITEO.categorical_columns)]
    assert cats.apply(lambda c: c[c != ""].str.fullmatch(HEX8).all()).all()
    empty = (cats == "").mean()
    assert empty["C1"] == 0 and 0.35 < empty["C19"] < 0.55 and empty["C22"] > 0.6
    assert ((cats["C19"] == "") == (cats["C26"] == "")).all()  # empty together, as in the real file
    assert abs(df["label"].astype(int).mean() - 0.22) < 0.02
    assert meta["click_rate"] == pytest.approx(df["label"].astype(int).mean())


def test_avazu_raw_format_and_days(avazu_file):
    path, meta = avazu_file
    lines = path.read_text().split("\n")
    assert lines[0] == ",".join(AVAZU.columns) and lines[-1] == ""
    assert {line.count(",") for line in lines[1:-1]} == {23}
    df = _read(path, AVAZU)
    assert list(df.columns) == list(AVAZU.columns) and len(df) == 20_000
    assert df["id"].str.fullmatch(r"[0-9]+").all() and df["id"].is_unique
    for c in ("site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
              "device_id", "device_ip", "device_model"):
        assert df[c].str.fullmatch(HEX8).all(), c
    for c in ("C1", "banner_pos", "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18",
              "C19", "C20", "C21"):
        assert df[c].str.fullmatch(r"-?[0-9]+").all(), c
    assert set(df["C1"].astype(int)) <= {1001, 1002, 1005, 1007, 1008, 1010, 1012}
    assert df["device_type"].value_counts(normalize=True)["1"] > 0.85
    hour = df["hour"].astype(int)
    assert hour.is_monotonic_increasing and hour.iloc[0] == 14102100 and hour.iloc[-1] == 14102323
    day = hour // 100
    assert sorted(set(day)) == [141021, 141022, 141023]
    assert set(hour % 100) == set(range(24))
    # Day d covers rows [d*N/D, (d+1)*N/D).
    starts = np.flatnonzero(np.diff(day.to_numpy())) + 1
    assert starts.tolist() == [6667, 13334]
    assert meta["day_rows"] == {"0": [0, 6667], "1": [6667, 13334], "2": [13334, 20000]}
    assert abs(df["click"].astype(int).mean() - 0.17) < 0.02


def test_days_run_over_month_end(tmp_path):
    path = tmp_path / "a.csv"
    generate("avazu", 1_500, path, days=15, progress=False)
    days = sorted(set(_read(path, AVAZU)["hour"].astype(int) // 100))
    assert days[0] == 141021 and days[10] == 141031 and days[11] == 141101 and days[-1] == 141104


def test_metadata_matches_file(criteo_file, avazu_file):
    for (path, meta), schema in ((criteo_file, CRITEO), (avazu_file, AVAZU)):
        assert json.loads(Path(f"{path}.meta.json").read_text()) == meta
        df = _read(path, schema)
        y = df[schema.label].astype(int)
        assert meta["rows"] == len(df) and meta["dataset"] == schema.name
        assert meta["click_rate"] == pytest.approx(y.mean())
        for d, (a, b) in meta["day_rows"].items():
            assert meta["click_rate_per_day"][d] == pytest.approx(y.iloc[a:b].mean())
            assert 0.75 < meta["oracle_auc_per_day"][d] < 0.87
        assert 0.75 < meta["oracle_auc"] < 0.87
        assert meta["generator_version"] == synthetic.GENERATOR_VERSION
        for field in schema.categorical_columns:
            values = df[field][df[field] != ""]
            assert meta["distinct_values"][field] == values.nunique(), field
            assert meta["distinct_values"][field] <= meta["cardinalities"][field]
        assert meta["cardinalities_full"]["C3" if schema is CRITEO else "device_ip"] > 1_000_000


def test_zipf_head_and_tail(criteo_file):
    df = _read(criteo_file[0], CRITEO)
    counts = df["C3"][df["C3"] != ""].value_counts()
    assert counts.iloc[0] > 50 * counts.median()
    assert (counts == 1).mean() > 0.5  # a long tail of values seen once
    assert len(counts) < 0.8 * len(df)  # still repeats
    assert df["C9"].value_counts(normalize=True).iloc[0] > 0.8


def test_sampler_follows_zipf_pmf():
    f = synthetic._Field("criteo", 2, "C3", 10_131_227, 2_000_000, seed=0)
    assert f.card == 1_000_000
    pmf = (np.arange(f.card) + 1.0) ** -f.exponent
    pmf /= pmf.sum()
    r = f.sample(np.random.default_rng(0), 400_000)
    assert r.min() >= 0 and r.max() < f.card
    freq = np.bincount(r[r < 5], minlength=5) / len(r)
    np.testing.assert_allclose(freq, pmf[:5], rtol=0.05)
    for lo, hi in ((256, 1_000), (1_000, 100_000), (100_000, f.card)):  # continuous part of the sampler
        assert np.mean((r >= lo) & (r < hi)) == pytest.approx(pmf[lo:hi].sum(), rel=0.03)


def test_rare_values_carry_weaker_effects():
    f = synthetic._Field("criteo", 2, "C3", 10_131_227, 2_000_000, seed=0)
    ranks = np.array([0, 10, 1_000, 100_000, 900_000])
    slot, strength = f.slots(ranks, None)
    assert np.all(np.diff(strength) < 0) and strength[0] == 1
    assert slot.max() < f.table


def test_deterministic(tmp_path, criteo_file):
    path, meta = criteo_file
    again, other = tmp_path / "again.txt", tmp_path / "other.txt"
    assert generate("criteo", 20_000, again, seed=1, progress=False) == meta
    generate("criteo", 20_000, other, seed=2, progress=False)
    assert again.read_bytes() == path.read_bytes() != other.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "again.txt", "again.txt.meta.json", "other.txt", "other.txt.meta.json"]  # no temp files left


def _fit_day0_auc(df: pd.DataFrame, fields: list[str], day: np.ndarray, last: int) -> tuple[float, float]:
    """AUC of a one-hot logistic regression fitted on day 0, on held-out day-0 rows and on the last day."""
    y = df["click"].astype(int).to_numpy()
    d0 = np.flatnonzero(day == 0)
    train, held = d0[: len(d0) * 3 // 4], d0[len(d0) * 3 // 4:]
    enc = OneHotEncoder(handle_unknown="ignore", min_frequency=3)
    x = enc.fit(df.iloc[train][fields]).transform(df[fields])
    model = LogisticRegression(C=0.3, max_iter=300).fit(x[train], y[train])
    score = model.decision_function(x)
    lastd = day == last
    return roc_auc_score(y[held], score[held]), roc_auc_score(y[lastd], score[lastd])


def test_drift_changes_the_click_model(tmp_path):
    fields = ["site_id", "app_id", "app_category", "site_category", "device_model", "C14", "C17", "C21"]
    drops = {}
    for drift in (0.0, 1.0):
        path = tmp_path / f"drift{drift}.csv"
        meta = generate("avazu", 40_000, path, days=2, drift=drift, seed=5, progress=False)
        df = _read(path, AVAZU)
        day = (df["hour"].astype(int) // 100 - 141021).to_numpy()
        same_day, last_day = _fit_day0_auc(df, fields, day, 1)
        drops[drift] = same_day - last_day
        assert meta["oracle_auc_per_day"]["1"] > 0.75  # each day's own model stays sharp
        assert abs(meta["click_rate_per_day"]["1"] - 0.17) < 0.02  # the bias is re-solved per day
    assert drops[1.0] > 0.1 and drops[0.0] < 0.05, drops


def test_avazu_domains_drift_at_different_speeds():
    model = synthetic._Model("avazu", 10_000, seed=0, days=5, drift=1.0)
    ranks = {"site_category": np.arange(20)}
    theta = model.drift_angle(np.full(20, 4), ranks)
    assert theta.min() >= np.pi / 4 - 1e-9 and theta.max() <= 3 * np.pi / 4 + 1e-9
    assert np.ptp(theta) > 0.3
    assert synthetic._Model("avazu", 10_000, seed=0, days=5).drift_angle(np.full(20, 4), ranks) is None


def test_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(5_000) < 0.3
    s = np.round(rng.random(5_000) + 0.3 * y, 2).astype(np.float32)  # many ties
    assert synthetic.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_training_metrics_match_sklearn():
    from sklearn.metrics import log_loss

    from ctr.trainer import metrics

    rng = np.random.default_rng(1)
    y = (rng.random(3_000_000) < 0.25).astype(np.float32)  # more rows than one log_loss block
    p = np.round(rng.random(len(y)) * 0.8 + 0.2 * y, 3)  # ties
    p[:5], p[5:10] = 0.0, 1.0  # clipped to [1e-7, 1 - 1e-7]
    m = metrics(y, p)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    assert m["auc"] == pytest.approx(roc_auc_score(y, clipped), abs=1e-12)
    assert m["logloss"] == pytest.approx(log_loss(y, clipped), rel=1e-12)
    assert np.isnan(metrics(np.ones(4), np.full(4, 0.5))["auc"])


def test_prepare_reads_synthetic_files(tmp_path):
    for name in ("criteo", "avazu"):
        raw = tmp_path / f"{name}.raw"
        generate(name, 3_000, raw, days=2, drift=0.5, seed=3, progress=False)
        manifest = prepare(name, raw, tmp_path / f"{name}_prep", progress=False)
        assert manifest["rows"]["total"] == 3_000
        assert manifest["bad_rows"]["skipped"] == 0


def test_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "c.txt"
    assert synthetic.main(["--dataset", "criteo", "--rows", "500", "--out", str(out), "--days", "2",
                           "--drift", "0.5", "--seed", "4", "--no-progress"]) == 0
    assert "oracle AUC" in capsys.readouterr().out
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert (meta["rows"], meta["days"], meta["drift"], meta["seed"]) == (500, 2, 0.5, 4)
    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    help_text = capsys.readouterr().out
    assert all(opt in help_text for opt in ("--dataset", "--rows", "--out", "--days", "--drift", "--seed"))
    assert synthetic.main(["--dataset", "avazu", "--rows", "5", "--days", "9", "--out", str(out)]) == 2
    assert "rows >= days" in capsys.readouterr().err


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        generate("criteo", 0, tmp_path / "x.txt", progress=False)
    with pytest.raises(ValueError, match="drift"):
        generate("criteo", 10, tmp_path / "x.txt", drift=-1, progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        generate("kdd12", 10, tmp_path / "x.txt", progress=False)
    assert list(tmp_path.iterdir()) == []
