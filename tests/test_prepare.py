"""data.prepare on the real Criteo / Avazu samples: counts, vocabularies, splits, outputs, reuse."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.artifacts import ArtifactError
from data.manifest import OUTPUT_FILES, load_manifest
from data.prepare import main, prepare
from data.schema import AVAZU, CRITEO
from data.transforms import (
    avazu_hour_bad,
    avazu_hour_fields,
    criteo_int_bucket,
    random_split,
    string_keys,
    time_split,
    time_split_sizes,
)

SPLITS = ("train", "val", "test")


def run(dataset: str, src: Path, out: Path, **kw) -> dict:
    return prepare(dataset, src, out, progress=False, **kw)


def read_split(out: Path, name: str) -> pd.DataFrame:
    return pq.read_table(out / f"{name}.parquet").to_pandas()


def all_rows(out: Path) -> pd.DataFrame:
    return pd.concat([read_split(out, s) for s in SPLITS], ignore_index=True)


def reference_encoding(path: Path, schema, min_count: int) -> pd.DataFrame:
    """Independent pandas implementation of the documented encoding (whole file, file order)."""
    if schema.has_header:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    else:
        df = pd.read_csv(path, sep="\t", header=None, names=list(schema.columns), dtype=str,
                         keep_default_na=False, na_filter=False)
    out = {"label": df[schema.label].astype(np.int8).to_numpy()}
    for f in schema.fields:
        never_oov = False
        if schema is CRITEO and f in schema.integer_columns:
            raw = df[f]
            missing = raw == ""
            buckets = criteo_int_bucket(raw.where(~missing, "0").astype(np.int64).to_numpy())
            cat = pd.Series(np.where(missing, "", buckets.astype(str)))
            never_oov = True
        elif f in ("hour_of_day", "weekday", "is_weekend"):
            import datetime

            def derive(h: str, f=f) -> str:
                d = datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6]))
                return {"hour_of_day": str(int(h[6:])), "weekday": str(d.weekday()),
                        "is_weekend": str(int(d.weekday() >= 5))}[f]

            cat = df["hour"].map(derive)
        else:
            cat = df[f]
        vc = cat.value_counts()
        kept = vc if never_oov else vc[vc >= min_count]
        ordered = sorted(kept.items(), key=lambda kv: (-kv[1], kv[0].encode()))
        ids = {v: i + 1 for i, (v, _) in enumerate(ordered)}
        out[f] = cat.map(ids).fillna(0).astype(np.int32).to_numpy()
    return pd.DataFrame(out)


@pytest.fixture(scope="module")
def criteo_out(criteo_sample, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("criteo") / "prepared"
    return out, run("criteo", criteo_sample, out)


@pytest.fixture(scope="module")
def avazu_out(avazu_sample, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("avazu") / "prepared"
    return out, run("avazu", avazu_sample, out)


# ---------------------------------------------------------------------------------------------
# real samples
# ---------------------------------------------------------------------------------------------
def test_criteo_counts_and_layout(criteo_out):
    out, m = criteo_out
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, "manifest.json"])
    assert m["schema_version"] == 2 and m["dataset"] == "criteo"
    assert m["fields"] == list(CRITEO.fields)
    assert m["rows"]["total"] == 8000
    assert sum(m["rows"][s] for s in SPLITS) == 8000
    assert m["bad_rows"] == {"skipped": 0, "by_reason": {}}
    assert m["params"] == {"min_count": 2, "split": "random", "seed": 2022, "on_bad_rows": "error"}
    assert len(m["inputs"]) == 1 and m["inputs"][0]["rows"] == 8000
    assert m["inputs"][0]["size"] == os.path.getsize(m["inputs"][0]["path"]) and os.path.isabs(m["inputs"][0]["path"])
    assert np.cumsum([0, *m["cardinalities"][:-1]]).tolist() == m["field_offsets"]
    assert m["num_features"] == sum(m["cardinalities"])
    labels = all_rows(out)["label"]
    assert int(labels.sum()) == 1728  # click rate 0.216
    clicks = sum(m["click_rate"][s] * m["rows"][s] for s in SPLITS)
    assert round(clicks) == 1728
    for s in SPLITS:
        schema = pq.read_schema(out / f"{s}.parquet")
        assert schema.names == ["label", *CRITEO.fields]
        assert schema.field("label").type == pa.int8()
        assert all(schema.field(f).type == pa.int32() for f in CRITEO.fields)
        assert pq.ParquetFile(out / f"{s}.parquet").metadata.num_rows == m["rows"][s]
    assert json.loads((out / "manifest.json").read_text()) == m


def test_criteo_matches_reference_encoding(criteo_out, criteo_sample):
    out, m = criteo_out
    ref = reference_encoding(criteo_sample, CRITEO, 2)
    codes = random_split(0, len(ref), 2022)
    for k, s in enumerate(SPLITS):
        got = read_split(out, s)
        want = ref[codes == k].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_dtype=True)
    cards = np.array(m["cardinalities"])
    assert (ref[list(CRITEO.fields)].max().to_numpy() < cards).all()


def test_avazu_sample(avazu_out, avazu_sample):
    out, m = avazu_out
    assert m["fields"] == list(AVAZU.fields)
    assert len(m["fields"]) == 24 and "hour" not in m["fields"] and "id" not in m["fields"]
    assert m["rows"]["total"] == 8999
    df = all_rows(out)
    assert int(df["label"].sum()) == 1563  # click rate 0.1737
    ref = reference_encoding(avazu_sample, AVAZU, 2)
    codes = random_split(0, len(ref), 2022)
    for k, s in enumerate(SPLITS):
        pd.testing.assert_frame_equal(read_split(out, s), ref[codes == k].reset_index(drop=True))
    vocab = pq.read_table(out / "vocab.parquet").to_pandas()
    # every row is from 2014-10-21 00:00, a Tuesday
    for f, value in (("hour_of_day", "0"), ("weekday", "1"), ("is_weekend", "0")):
        rows = vocab[(vocab.field == f) & (vocab.id > 0)]
        assert rows.value.tolist() == [value] and rows["count"].tolist() == [8999]


def test_vocab_file(criteo_out):
    out, m = criteo_out
    vocab = pq.read_table(out / "vocab.parquet")
    assert vocab.schema.names == ["field", "value", "id", "count"]
    assert [t for t in vocab.schema.types] == [pa.string(), pa.string(), pa.int32(), pa.int64()]
    v = vocab.to_pandas()
    for f, card in zip(m["fields"], m["cardinalities"], strict=True):
        rows = v[v.field == f]
        assert rows.id.tolist() == list(range(card))  # OOV row then 1..K
        assert rows.iloc[0].value == "<OOV>"
        assert int(rows["count"].sum()) == 8000
        kept = rows.iloc[1:]
        assert (kept["count"].diff().dropna() <= 0).all()  # count descending
    ints = v[v.field.isin(CRITEO.integer_columns)]
    assert (ints[ints.id == 0]["count"] == 0).all()  # Criteo integers never OOV
    cats = v[v.field.isin(CRITEO.categorical_columns) & (v.id > 0)]
    assert (cats["count"] >= 2).all()


def test_frequency_is_train_counts(criteo_out):
    out, m = criteo_out
    freq = np.load(out / "frequency.npy")
    assert freq.dtype == np.int64 and freq.shape == (m["num_features"],)
    assert freq.sum() == m["rows"]["train"] * len(m["fields"])
    train = read_split(out, "train")
    gids = train[m["fields"]].to_numpy() + np.array(m["field_offsets"])
    np.testing.assert_array_equal(freq, np.bincount(gids.ravel(), minlength=m["num_features"]))


def test_prepared_dataset_reads_output(criteo_out):
    from data.batches import PreparedDataset

    out, m = criteo_out
    ds = PreparedDataset(out)
    assert len(ds.split("train")) == m["rows"]["train"]
    assert ds.frequency().sum() == m["rows"]["train"] * 39


# ---------------------------------------------------------------------------------------------
# semantics on small files built from the samples
# ---------------------------------------------------------------------------------------------
def criteo_lines(src: Path, n: int) -> list[list[str]]:
    with open(src) as f:
        return [next(f).rstrip("\n").split("\t") for _ in range(n)]


def write_criteo(path: Path, rows: list[list[str]], eol: str = "\n") -> Path:
    path.write_text("".join("\t".join(r) + eol for r in rows))
    return path


def test_min_count_oov(criteo_sample, tmp_path):
    rows = criteo_lines(criteo_sample, 30)
    c1 = CRITEO.columns.index("C1")
    for r in rows:
        r[c1] = "0000000a"  # common value
    rows[0][c1] = "deadbeef"  # seen once -> OOV
    rows[1][c1] = rows[2][c1] = "cafebabe"  # seen twice -> kept
    src = write_criteo(tmp_path / "small.txt", rows)
    out = tmp_path / "out"
    run("criteo", src, out, split="time")
    df = all_rows(out)
    assert df["C1"].tolist()[:3] == [0, 2, 2] and (df["C1"][3:] == 1).all()
    v = pq.read_table(out / "vocab.parquet").to_pandas()
    c1v = v[v.field == "C1"].set_index("value")
    assert "deadbeef" not in c1v.index
    assert c1v.loc["cafebabe", "count"] == 2 and c1v.loc["<OOV>", "count"] == 1
    # with min_count 1 the single value gets its own id
    run("criteo", src, tmp_path / "out1", split="time", min_count=1)
    assert (all_rows(tmp_path / "out1")["C1"] > 0).all()
    # with min_count 3 the pair folds too
    run("criteo", src, tmp_path / "out3", split="time", min_count=3)
    assert all_rows(tmp_path / "out3")["C1"].tolist()[:3] == [0, 0, 0]


def test_criteo_integer_bucketing(criteo_sample, tmp_path):
    values = ["", "-7", "-1", "0", "1", "2", "3", "100", "1000", "1000", "007"]
    rows = criteo_lines(criteo_sample, len(values))
    i1 = CRITEO.columns.index("I1")
    for r, v in zip(rows, values, strict=True):
        r[i1] = v
    out = tmp_path / "out"
    run("criteo", write_criteo(tmp_path / "ints.txt", rows), out, split="time")
    v = pq.read_table(out / "vocab.parquet").to_pandas()
    i1v = v[(v.field == "I1") & (v.id > 0)].set_index("value")["count"].to_dict()
    # 3 -> floor(ln(3)^2) = 1, 100 -> 21, 1000 -> 47, 007 -> 7 -> floor(ln(7)^2) = 3; seen-once values kept
    assert i1v == {"": 1, "-7": 1, "-1": 1, "0": 1, "1": 2, "2": 1, "21": 1, "47": 2, "3": 1}
    ids = dict(zip(v[v.field == "I1"].value, v[v.field == "I1"].id, strict=True))
    df = all_rows(out)
    assert df["I1"].tolist() == [ids[x] for x in ["", "-7", "-1", "0", "1", "2", "1", "21", "47", "47", "3"]]
    assert ids["1"] == 1 and ids["47"] == 2  # count 2 first, ties ordered by value
    np.testing.assert_array_equal(criteo_int_bucket(np.array([-5, 2, 3, 4, 10**12])), [-5, 2, 1, 1, 763])


def test_splits_deterministic_and_block_size_independent(criteo_sample, tmp_path):
    a = run("criteo", criteo_sample, tmp_path / "a", seed=7)
    b = run("criteo", criteo_sample, tmp_path / "b", seed=7, block_size=64 << 10)
    c = run("criteo", criteo_sample, tmp_path / "c", seed=8)
    for s in SPLITS:
        pd.testing.assert_frame_equal(read_split(tmp_path / "a", s), read_split(tmp_path / "b", s))
    assert pq.ParquetFile(tmp_path / "b" / "train.parquet").metadata.num_row_groups > 1
    assert a["files"]["vocab.parquet"] == b["files"]["vocab.parquet"]
    assert a["files"]["frequency.npy"] == b["files"]["frequency.npy"]
    assert a["files"]["train.parquet"] != c["files"]["train.parquet"]
    assert a["rows"] != c["rows"] or not read_split(tmp_path / "a", "val").equals(read_split(tmp_path / "c", "val"))
    again = run("criteo", criteo_sample, tmp_path / "a2", seed=7)
    assert again["files"] == a["files"]
    # the split is a property of (row index, seed): 8:1:1 in expectation
    counts = np.bincount(random_split(0, 200_000, 2022), minlength=3) / 200_000
    np.testing.assert_allclose(counts, [0.8, 0.1, 0.1], atol=0.005)
    np.testing.assert_array_equal(random_split(0, 100, 3)[40:], random_split(40, 60, 3))


def test_time_split_keeps_file_order(criteo_sample, tmp_path):
    out = tmp_path / "t"
    m = run("criteo", criteo_sample, out, split="time")
    assert (m["rows"]["train"], m["rows"]["val"], m["rows"]["test"]) == (6400, 800, 800)
    ref = reference_encoding(criteo_sample, CRITEO, 2)
    pd.testing.assert_frame_equal(read_split(out, "train"), ref.iloc[:6400].reset_index(drop=True))
    pd.testing.assert_frame_equal(read_split(out, "val"), ref.iloc[6400:7200].reset_index(drop=True))
    pd.testing.assert_frame_equal(read_split(out, "test"), ref.iloc[7200:].reset_index(drop=True))
    assert time_split_sizes(8999) == (7199, 900, 900)
    assert time_split(0, 10, 10).tolist() == [0] * 8 + [1, 2]


def test_reuse_and_replace(criteo_sample, tmp_path, capsys):
    src = write_criteo(tmp_path / "in.txt", criteo_lines(criteo_sample, 500))
    out = tmp_path / "out"
    m1 = run("criteo", src, out)
    stamp = (out / "train.parquet").stat().st_mtime_ns
    capsys.readouterr()
    m2 = run("criteo", src, out)
    assert "reusing" in capsys.readouterr().out
    assert m2 == m1 and (out / "train.parquet").stat().st_mtime_ns == stamp
    # different parameters: recomputed and replaced, no temporary directories left behind
    m3 = run("criteo", src, out, min_count=1)
    assert m3["params"]["min_count"] == 1 and load_manifest(out) == m3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]
    # the input changed (mtime): recomputed
    os.utime(src, ns=(stamp, stamp))
    capsys.readouterr()
    m4 = run("criteo", src, out, min_count=1)
    assert "reusing" not in capsys.readouterr().out and m4["inputs"][0]["mtime_ns"] == stamp
    # damaged output: recomputed rather than reused
    with open(out / "val.parquet", "ab") as f:
        f.write(b"x")
    m5 = run("criteo", src, out, min_count=1)
    assert load_manifest(out) == m5


def test_tiny_file_has_empty_splits(criteo_sample, tmp_path):
    out = tmp_path / "out"
    m = run("criteo", write_criteo(tmp_path / "tiny.txt", criteo_lines(criteo_sample, 5)), out, split="time")
    assert m["rows"] == {"train": 4, "val": 0, "test": 1, "total": 5}
    assert m["click_rate"]["val"] is None
    assert pq.read_table(out / "val.parquet").num_rows == 0
    assert pq.read_schema(out / "val.parquet").names == ["label", *CRITEO.fields]
    df = all_rows(out)
    assert (df[list(CRITEO.fields)].max().to_numpy() < np.array(m["cardinalities"])).all()


def test_load_manifest_verifies_checksums(criteo_sample, tmp_path):
    out = tmp_path / "out"
    run("criteo", write_criteo(tmp_path / "in.txt", criteo_lines(criteo_sample, 200)), out)
    assert load_manifest(out)["rows"]["total"] == 200
    original = (out / "frequency.npy").read_bytes()
    data = bytearray(original)
    data[-1] ^= 1
    (out / "frequency.npy").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="frequency.npy"):
        load_manifest(out)
    (out / "frequency.npy").write_bytes(original)
    load_manifest(out)
    (out / "test.parquet").unlink()
    with pytest.raises(ArtifactError, match="test.parquet"):
        load_manifest(out)


def test_crlf_and_gzip_inputs_give_same_output(criteo_sample, tmp_path):
    rows = criteo_lines(criteo_sample, 300)
    plain = write_criteo(tmp_path / "plain.txt", rows)
    crlf = write_criteo(tmp_path / "crlf.txt", rows, eol="\r\n")
    gz = tmp_path / "packed.txt"  # gzip content, misleading name
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ms = [run("criteo", p, tmp_path / f"out_{p.stem}") for p in (plain, crlf, gz)]
    for m in ms[1:]:
        assert m["files"] == ms[0]["files"] and m["rows"] == ms[0]["rows"]


def test_cli(criteo_sample, tmp_path, capsys):
    src = write_criteo(tmp_path / "in.txt", criteo_lines(criteo_sample, 100))
    out = tmp_path / "out"
    assert main(["--dataset", "criteo", "--input", str(src), "--out", str(out), "--no-progress",
                 "--split", "time", "--min-count", "1", "--seed", "3"]) == 0
    m = load_manifest(out)
    assert m["params"] == {"min_count": 1, "split": "time", "seed": 3, "on_bad_rows": "error"}
    assert "100 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--on-bad-rows" in capsys.readouterr().out


def test_prepare_rejects_bad_parameters(criteo_sample, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        prepare("kdd", criteo_sample, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="split"):
        prepare("criteo", criteo_sample, tmp_path / "o", split="shuffle", progress=False)
    with pytest.raises(ValueError, match="min_count"):
        prepare("criteo", criteo_sample, tmp_path / "o", min_count=0, progress=False)
    with pytest.raises(ValueError, match="on_bad_rows"):
        prepare("criteo", criteo_sample, tmp_path / "o", on_bad_rows="ignore", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare("criteo", criteo_sample, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
def test_avazu_hour_transform():
    hours = pa.array(["14102100", "14102523", "14102612", "16022900"])
    f = avazu_hour_fields(hours)
    assert f["hour_of_day"].to_pylist() == ["0", "23", "12", "0"]
    assert f["weekday"].to_pylist() == ["1", "5", "6", "0"]  # Tue, Sat, Sun, Mon
    assert f["is_weekend"].to_pylist() == ["0", "1", "1", "0"]
    bad = avazu_hour_bad(pa.array(["14102100", "14022900", "14132100", "14102124", "1410210", "abcdefgh"]))
    assert bad.tolist() == [False, True, True, True, True, True]


def test_string_keys_depend_only_on_the_string():
    words = ["", "a", "a\x00", "abcdefgh", "abcdefghi", "x" * 40, "é"]
    keys = string_keys(pa.array(words))
    assert len(set(keys.tolist())) == len(words)
    for i, w in enumerate(words):
        assert string_keys(pa.array([w]))[0] == keys[i]
        assert string_keys(pa.array(["zz", w, "y" * 17]).slice(1, 1))[0] == keys[i]
