"""Issue 16: several input files in order (Criteo 1TB day files), the by-file split, pre-split
train / val / test files (BARS / FuxiCTR), their errors, and the cache key over every file."""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data import sources
from data.manifest import load_manifest
from data.prepare import main, prepare
from data.reader import RawFormatError, expand_inputs, natural_key
from data.schema import AVAZU, CRITEO
from data.transforms import by_file_split, criteo_int_bucket

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def run(dataset: str, src, out: Path, **kw) -> dict:
    return prepare(dataset, src, out, progress=False, **kw)


def read_split(out: Path, name: str) -> pd.DataFrame:
    return pq.read_table(out / f"{name}.parquet").to_pandas()


def criteo_lines(src: Path, n: int | None = None) -> list[str]:
    with open(src) as f:
        lines = f.read().splitlines(keepends=True)
    return lines if n is None else lines[:n]


def day_files(src: Path, root: Path, names: list[str], gz: set[str] = frozenset()) -> list[Path]:
    """Cut the Criteo sample into consecutive files ``names`` (of nearly equal rows); ``gz`` gzipped."""
    lines = criteo_lines(src)
    bounds = np.linspace(0, len(lines), len(names) + 1).astype(int)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True):
        data = "".join(lines[lo:hi]).encode()
        path = root / name
        path.write_bytes(gzip.compress(data) if name in gz else data)
        paths.append(path)
    return paths


def assert_same_output(a: Path, b: Path) -> None:
    """Same rows in every split (row groups may differ: one per block and split), same vocabulary and counts."""
    for s in SPLITS:
        pd.testing.assert_frame_equal(read_split(a, s), read_split(b, s))
    ma, mb = load_manifest(a), load_manifest(b)
    for name in ("vocab.parquet", "frequency.npy"):
        assert ma["files"][name] == mb["files"][name], name
    assert ma["rows"] == mb["rows"] and ma["cardinalities"] == mb["cardinalities"]


def no_output(out: Path) -> None:
    assert not out.exists(), "a failed run must not leave an output directory"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial dirs left"


def cli_error(argv: list[str], out: Path, capsys) -> str:
    """Run data.prepare's CLI, expect exit status 2 with exactly one stderr line and no output."""
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    no_output(out)
    return err.strip()


# ---------------------------------------------------------------------------------------------
# pandas reference: vocabulary counted on some rows, applied to others
# ---------------------------------------------------------------------------------------------
def categories(df: pd.DataFrame, schema, field: str) -> tuple[pd.Series, bool]:
    """(category strings of ``field``, never_oov)."""
    if schema is CRITEO and field in schema.integer_columns:
        raw = df[field].str.replace(r"\.0+$", "", regex=True)
        missing = raw == ""
        buckets = criteo_int_bucket(raw.where(~missing, "0").astype(np.int64).to_numpy())
        return pd.Series(np.where(missing, "", buckets.astype(str)), index=df.index), True
    if field in ("hour_of_day", "weekday", "is_weekend"):
        def derive(h: str) -> str:
            d = datetime.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6]))
            return {"hour_of_day": str(int(h[6:])), "weekday": str(d.weekday()),
                    "is_weekend": str(int(d.weekday() >= 5))}[field]
        return df["hour"].map(derive), False
    return df[field], False


def reference(train: pd.DataFrame, others: list[pd.DataFrame], schema, min_count: int = 2) -> list[pd.DataFrame]:
    """Encode ``train`` and ``others`` with a vocabulary counted on ``train`` only (unseen -> 0)."""
    outs = [{"label": d[schema.label].astype(np.int8).to_numpy()} for d in (train, *others)]
    for f in schema.fields:
        cat, never_oov = categories(train, schema, f)
        vc = cat.value_counts()
        kept = vc if never_oov else vc[vc >= min_count]
        ids = {v: i + 1 for i, (v, _) in enumerate(sorted(kept.items(), key=lambda kv: (-kv[1], kv[0].encode())))}
        for out, d in zip(outs, (train, *others), strict=True):
            out[f] = categories(d, schema, f)[0].map(ids).fillna(0).astype(np.int32).to_numpy()
    return [pd.DataFrame(o) for o in outs]


def read_criteo(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", header=None, names=list(CRITEO.columns), dtype=str,
                       keep_default_na=False, na_filter=False)


def read_avazu(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


# ---------------------------------------------------------------------------------------------
# several files in order
# ---------------------------------------------------------------------------------------------
def test_expand_inputs_sorts_naturally_and_refuses_repeats(tmp_path):
    for name in ("day_10", "day_2", "day_1", "day_0", "other"):
        (tmp_path / name).write_text("x")
    got = expand_inputs(str(tmp_path / "day_*"))
    assert [p.name for p in got] == ["day_0", "day_1", "day_2", "day_10"]
    assert sorted(["day_10.gz", "day_9.gz"], key=natural_key) == ["day_9.gz", "day_10.gz"]
    # explicit order is kept; several patterns are concatenated
    got = expand_inputs([str(tmp_path / "day_2"), str(tmp_path / "day_1*")])
    assert [p.name for p in got] == ["day_2", "day_1", "day_10"]
    (tmp_path / "odd[1]").write_text("x")  # an existing name is literal, even with glob characters
    assert expand_inputs(str(tmp_path / "odd[1]")) == [tmp_path / "odd[1]"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs(str(tmp_path / "nothing_*"))
    with pytest.raises(ValueError, match="given twice"):
        expand_inputs([str(tmp_path / "day_0"), str(tmp_path / "day_*")])


def test_day_files_read_as_one_stream_in_order(criteo_sample, tmp_path):
    """4 day files (day_10 last: natural order) under --split time == the single file, byte for byte."""
    names = ["day_0", "day_1", "day_2", "day_10"]
    day_files(criteo_sample, tmp_path / "days", names)
    single = run("criteo", criteo_sample, tmp_path / "single", split="time")
    multi = run("criteo", str(tmp_path / "days" / "day_*"), tmp_path / "multi", split="time", block_size=64 << 10)
    assert_same_output(tmp_path / "multi", tmp_path / "single")
    assert multi["rows"] == single["rows"] == {"train": 6400, "val": 800, "test": 800, "total": 8000}
    assert [Path(e["path"]).name for e in multi["inputs"]] == names
    assert [e["rows"] for e in multi["inputs"]] == [2000] * 4
    for e in multi["inputs"]:
        assert e["size"] == os.path.getsize(e["path"]) and e["mtime_ns"] == os.stat(e["path"]).st_mtime_ns
    assert multi["params"]["split"] == "time"
    # the same files in another order are another stream: time split follows the given order
    shuffled = [str(tmp_path / "days" / n) for n in ("day_10", "day_0", "day_1", "day_2")]
    m = run("criteo", shuffled, tmp_path / "shuffled", split="time")
    ref = read_split(tmp_path / "single", "train")
    assert read_split(tmp_path / "shuffled", "train").shape == ref.shape
    first = read_split(tmp_path / "shuffled", "train").iloc[:2000]
    last_day = pd.concat([read_split(tmp_path / "single", s) for s in SPLITS]).iloc[6000:].reset_index(drop=True)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), last_day)
    assert m["files"]["vocab.parquet"] == single["files"]["vocab.parquet"]  # counted over the same rows


def test_random_split_across_gzipped_day_files_matches_single_file(criteo_sample, tmp_path):
    names = ["day_0.gz", "day_1.gz", "day_2"]
    paths = day_files(criteo_sample, tmp_path, names, gz={"day_0.gz", "day_1.gz"})
    assert paths[0].read_bytes()[:2] == b"\x1f\x8b"
    single = run("criteo", criteo_sample, tmp_path / "single")
    multi = run("criteo", paths, tmp_path / "multi")
    assert_same_output(tmp_path / "multi", tmp_path / "single")
    assert [e["rows"] for e in multi["inputs"]] == [2666, 2667, 2667]
    assert multi["files"]["train.parquet"] != single["files"]["train.parquet"]  # row groups: one per file


def test_by_file_split_puts_the_last_file_in_val_and_test_halves(criteo_sample, tmp_path):
    lines = criteo_lines(criteo_sample)
    root = tmp_path / "days"
    root.mkdir()
    cuts = [0, 3000, 6000, 6999, 8000]  # the last day has 1001 rows: 500 val, 501 test
    for d, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        (root / f"day_{d}.gz").write_bytes(gzip.compress("".join(lines[lo:hi]).encode()))
    out = tmp_path / "out"
    assert main(["--dataset", "criteo", "--input", str(root / "day_*.gz"), "--split", "by-file", "--out", str(out),
                 "--no-progress"]) == 0
    m = load_manifest(out)
    assert m["rows"] == {"train": 6999, "val": 500, "test": 501, "total": 8000}
    assert m["params"]["split"] == "by-file"
    # vocabulary over every row (the MPE convention), splits by position in the concatenation
    ref = reference(read_criteo(criteo_sample), [], CRITEO)[0]
    pd.testing.assert_frame_equal(read_split(out, "train"), ref.iloc[:6999].reset_index(drop=True))
    pd.testing.assert_frame_equal(read_split(out, "val"), ref.iloc[6999:7499].reset_index(drop=True))
    pd.testing.assert_frame_equal(read_split(out, "test"), ref.iloc[7499:].reset_index(drop=True))
    assert by_file_split(0, 7, [3, 4]).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert by_file_split(4, 3, [3, 4]).tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="at least 2"):
        by_file_split(0, 3, [3])


def test_reuse_covers_every_input_file(criteo_sample, tmp_path, capsys):
    paths = day_files(criteo_sample, tmp_path / "days", ["day_0", "day_1", "day_2"])
    out = tmp_path / "out"
    m1 = run("criteo", paths, out, split="by-file")
    capsys.readouterr()
    assert run("criteo", paths, out, split="by-file") == m1
    assert "reusing" in capsys.readouterr().out
    # a later file changes (mtime): recomputed
    os.utime(paths[1], ns=(1, 1))
    m2 = run("criteo", paths, out, split="by-file")
    assert "reusing" not in capsys.readouterr().out and m2["inputs"][1]["mtime_ns"] == 1
    # one file fewer: recomputed
    m3 = run("criteo", paths[:2], out, split="by-file")
    assert "reusing" not in capsys.readouterr().out and len(m3["inputs"]) == 2
    assert m3["rows"]["train"] == m1["inputs"][0]["rows"]


def test_prepared_dir_key_covers_every_file(tmp_path):
    a, b, c = (tmp_path / n for n in ("day_0", "day_1", "day_2"))
    single = sources.prepared_dir(tmp_path, "criteo", a, 2, "random", 1)
    assert single == sources.prepared_dir(tmp_path, "criteo", [a], 2, None, 1)  # one file: the old name
    assert single.name.startswith("criteo_day_0_") and single.name.endswith("_mc2_random_s1")
    keys = {
        sources.prepared_dir(tmp_path, "criteo", [a, b], 2, "time", 1),
        sources.prepared_dir(tmp_path, "criteo", [b, a], 2, "time", 1),
        sources.prepared_dir(tmp_path, "criteo", [a, b, c], 2, "time", 1),
        sources.prepared_dir(tmp_path, "criteo", {"train": [a], "val": [b], "test": [c]}, 2, None, 1),
        sources.prepared_dir(tmp_path, "criteo", {"train": [a], "val": [c], "test": [b]}, 2, None, 1),
        single,
    }
    assert len(keys) == 6
    presplit = sources.prepared_dir(tmp_path, "criteo", {"train": a, "val": b, "test": c}, 2, None, 1)
    assert presplit.name.endswith("_pre-split_s1")


# ---------------------------------------------------------------------------------------------
# pre-split files
# ---------------------------------------------------------------------------------------------
def avazu_presplit(src: Path, root: Path, drop_id: bool = False) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Cut the Avazu sample into train / valid / test CSVs (row i goes to i % 10: 0-7, 8, 9), planting
    a site_id only val and test have, and an app_id seen once in train but 4 times in val."""
    lines = src.read_text().splitlines()
    header, rows = lines[0], [r.split(",") for r in lines[1:]]
    site, app = AVAZU.columns.index("site_id"), AVAZU.columns.index("app_id")
    parts: dict[str, list[list[str]]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(rows):
        parts["train" if i % 10 < 8 else "val" if i % 10 == 8 else "test"].append(r)
    for r in parts["val"][:3] + parts["test"][:2]:
        r[site] = "feedface"
    parts["train"][5][app] = "c0ffee00"
    for r in parts["val"][10:14]:
        r[app] = "c0ffee00"
    root.mkdir(parents=True, exist_ok=True)
    names = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
    out, text = {}, {}
    for s, rs in parts.items():
        cols = header.split(",")
        if drop_id:
            cols, rs = cols[1:], [r[1:] for r in rs]
        text[s] = [",".join(r) for r in rs]
        out[s] = root / names[s]
        out[s].write_text("\n".join([",".join(cols), *text[s]]) + "\n")
    return out, text


def test_presplit_rows_stay_in_their_split_and_vocab_is_train_only(avazu_sample, tmp_path):
    files, _ = avazu_presplit(avazu_sample, tmp_path / "bars")
    out = tmp_path / "out"
    m = run("avazu", files, out)
    frames = {s: read_avazu(files[s]) for s in SPLITS}
    assert m["params"]["split"] == "pre-split"
    assert m["rows"] == {"train": 7200, "val": 900, "test": 899, "total": 8999}
    assert [(Path(e["path"]).name, e["split"], e["rows"]) for e in m["inputs"]] == [
        ("train.csv", "train", 7200), ("valid.csv", "val", 900), ("test.csv", "test", 899)]
    refs = reference(frames["train"], [frames["val"], frames["test"]], AVAZU)
    for s, ref in zip(SPLITS, refs, strict=True):
        got = read_split(out, s)
        pd.testing.assert_frame_equal(got, ref)  # every row, in its file's order, in its own split
        assert int(got["label"].sum()) == int(frames[s]["click"].astype(int).sum())
        assert m["click_rate"][s] == pytest.approx(frames[s]["click"].astype(int).mean())
    vocab = pq.read_table(out / "vocab.parquet").to_pandas()
    assert "feedface" not in set(vocab[vocab.field == "site_id"].value)  # only in val / test
    assert "c0ffee00" not in set(vocab[vocab.field == "app_id"].value)  # once in train: below min_count
    site = AVAZU.fields.index("site_id")
    val = read_split(out, "val")
    assert (val.iloc[:3, site + 1] == 0).all() and (read_split(out, "test").iloc[:2, site + 1] == 0).all()
    assert (val["app_id"].iloc[10:14] == 0).all()
    # vocabulary counts are train counts
    assert int(vocab[vocab.field == "site_id"]["count"].sum()) == 7200
    freq = np.load(out / "frequency.npy")
    assert freq.sum() == 7200 * len(AVAZU.fields)
    # counted over all the data instead, the app_id seen 5 times would have been kept
    together = tmp_path / "together.csv"
    together.write_text(files["train"].read_text() + "".join(
        f.read_text().split("\n", 1)[1] for f in (files["val"], files["test"])))
    run("avazu", together, tmp_path / "all", split="time")
    all_vocab = pq.read_table(tmp_path / "all" / "vocab.parquet").to_pandas()
    assert "c0ffee00" in set(all_vocab[all_vocab.field == "app_id"].value)


def test_presplit_without_id_column_and_globs(avazu_sample, tmp_path):
    with_id, _ = avazu_presplit(avazu_sample, tmp_path / "a")
    no_id, _ = avazu_presplit(avazu_sample, tmp_path / "b", drop_id=True)
    assert no_id["train"].read_text().startswith("click,hour,")
    run("avazu", with_id, tmp_path / "out_a")
    # each of the three may be several files / a glob: cut train into two files
    lines = no_id["train"].read_text().splitlines(keepends=True)
    (tmp_path / "b" / "train_0.csv").write_text("".join(lines[:3001]))
    (tmp_path / "b" / "train_1.csv").write_text(lines[0] + "".join(lines[3001:]))
    b = run("avazu", {"train": str(tmp_path / "b" / "train_*.csv"), "val": no_id["val"], "test": [no_id["test"]]},
            tmp_path / "out_b")
    assert_same_output(tmp_path / "out_b", tmp_path / "out_a")
    assert [e["split"] for e in b["inputs"]] == ["train", "train", "val", "test"]


def test_presplit_criteo_unseen_integer_gets_its_bucket(criteo_sample, tmp_path):
    lines = [r.rstrip("\n").split("\t") for r in criteo_lines(criteo_sample, 300)]
    i1 = CRITEO.columns.index("I1")
    for r in lines[:200]:
        r[i1] = "1000"  # bucket 47, the only I1 value in train
    lines[250][i1] = "1001"  # unseen raw value, known bucket 47
    lines[251][i1] = "5"  # unseen bucket: OOV
    root = tmp_path / "x"
    root.mkdir()
    for name, lo, hi in (("train.txt", 0, 200), ("val.txt", 200, 250), ("test.txt", 250, 300)):
        (root / name).write_text("".join("\t".join(r) + "\n" for r in lines[lo:hi]))
    out = tmp_path / "out"
    m = run("criteo", {s: root / f"{s}.txt" for s in SPLITS}, out)
    assert m["rows"] == {"train": 200, "val": 50, "test": 50, "total": 300}
    test = read_split(out, "test")
    assert test["I1"].iloc[0] == 1 and test["I1"].iloc[1] == 0
    frames = {s: read_criteo(root / f"{s}.txt") for s in SPLITS}
    for s, ref in zip(SPLITS, reference(frames["train"], [frames["val"], frames["test"]], CRITEO), strict=True):
        pd.testing.assert_frame_equal(read_split(out, s), ref)


def test_bars_criteo_x4_csv_with_header_and_float_integers(criteo_sample, tmp_path):
    """BARS / FuxiCTR Criteo_x4: comma-separated, header 'Label,I1,...,C26', integers as pandas floats."""
    rows = [r.rstrip("\n").split("\t") for r in criteo_lines(criteo_sample, 3000)]
    root = tmp_path / "x4"
    root.mkdir()
    header = "Label," + ",".join(CRITEO.columns[1:])
    tsv = {}
    for name, lo, hi in (("train", 0, 2400), ("valid", 2400, 2700), ("test", 2700, 3000)):
        part = rows[lo:hi]
        tsv[name] = root / f"{name}.txt"
        tsv[name].write_text("".join("\t".join(r) + "\n" for r in part))
        csv_rows = [[r[0]] + [v + ".0" if v and k < 13 else v for k, v in enumerate(r[1:])] for r in part]
        (root / f"{name}.csv").write_text(header + "\n" + "".join(",".join(r) + "\n" for r in csv_rows))
    assert (root / "train.csv").read_text().split("\n")[1].split(",")[1].endswith(".0")
    out = tmp_path / "out"
    assert main(["--dataset", "criteo", "--train", str(root / "train.csv"), "--val", str(root / "valid.csv"),
                 "--test", str(root / "test.csv"), "--out", str(out), "--no-progress"]) == 0
    ref = run("criteo", {"train": tsv["train"], "val": tsv["valid"], "test": tsv["test"]}, tmp_path / "ref")
    got = load_manifest(out)
    for s in SPLITS:  # the same ids: the vocabulary holds buckets, not the raw "5.0"
        pd.testing.assert_frame_equal(read_split(out, s), read_split(tmp_path / "ref", s))
    assert got["files"]["frequency.npy"] == ref["files"]["frequency.npy"]
    assert got["rows"] == ref["rows"] == {"train": 2400, "val": 300, "test": 300, "total": 3000}
    # a bad value is named with the CSV's own line (the header is line 1)
    text = (root / "valid.csv").read_text().split("\n")
    cells = text[5].split(",")
    cells[3] = "2.5"
    text[5] = ",".join(cells)
    (root / "valid.csv").write_text("\n".join(text))
    with pytest.raises(RawFormatError) as e:
        run("criteo", {"train": root / "train.csv", "val": root / "valid.csv", "test": root / "test.csv"},
            tmp_path / "bad")
    assert str(e.value) == "valid.csv:6: column I3: expected an integer, found '2.5'"


# ---------------------------------------------------------------------------------------------
# errors: one line, exit status 2, no output
# ---------------------------------------------------------------------------------------------
def test_bad_line_in_second_file_names_that_file_and_its_line(criteo_sample, avazu_sample, tmp_path, capsys):
    paths = day_files(criteo_sample, tmp_path / "days", ["day_0", "day_1.gz", "day_2"], gz={"day_1.gz"})
    lines = gzip.decompress(paths[1].read_bytes()).decode().splitlines(keepends=True)
    cells = lines[1233].split("\t")
    cells[CRITEO.columns.index("I5")] = "abc"
    lines[1233] = "\t".join(cells)
    paths[1].write_bytes(gzip.compress("".join(lines).encode()))
    err = cli_error(["--dataset", "criteo", "--input", str(tmp_path / "days" / "day_*"), "--split", "by-file"],
                    tmp_path / "out", capsys)
    assert err == "error: day_1.gz:1234: column I5: expected an integer, found 'abc'"
    # skip mode counts it, over every file
    m = run("criteo", paths, tmp_path / "skip", on_bad_rows="skip", split="by-file")
    assert m["bad_rows"] == {"skipped": 1, "by_reason": {"bad_integer": 1}}
    assert [e["rows"] for e in m["inputs"]] == [2666, 2666, 2667] and m["rows"]["total"] == 7999
    # a short line in a pre-split test file: named by that file and its own line (header = line 1)
    files, _ = avazu_presplit(avazu_sample, tmp_path / "bars")
    text = files["test"].read_text().split("\n")
    text[40] = ",".join(text[40].split(",")[:10])
    files["test"].write_text("\n".join(text))
    err = cli_error(["--dataset", "avazu", "--train", str(files["train"]), "--val", str(files["val"]),
                     "--test", str(files["test"])], tmp_path / "out2", capsys)
    assert err.startswith("error: test.csv:41: column ") and "line ends early" in err


def test_empty_glob_partial_and_mixed_options(criteo_sample, tmp_path, capsys):
    out = tmp_path / "out"
    err = cli_error(["--dataset", "criteo", "--input", str(tmp_path / "day_*.gz")], out, capsys)
    assert "day_*.gz: no file matches this pattern" in err
    err = cli_error(["--dataset", "criteo", "--train", str(criteo_sample)], out, capsys)
    assert err == "error: --train, --val and --test go together: --val and --test missing"
    err = cli_error(["--dataset", "criteo", "--train", str(criteo_sample), "--test", str(criteo_sample)], out, capsys)
    assert "--val missing" in err
    err = cli_error(["--dataset", "criteo", "--input", str(criteo_sample), "--train", str(criteo_sample),
                     "--val", str(criteo_sample), "--test", str(criteo_sample)], out, capsys)
    assert "exclude each other" in err
    err = cli_error(["--dataset", "criteo"], out, capsys)
    assert "no input" in err
    err = cli_error(["--dataset", "criteo", "--input", str(criteo_sample), "--split", "by-file"], out, capsys)
    assert "by-file needs at least 2 input files" in err
    day = tmp_path / "d"
    day.mkdir()
    a, b, c = day_files(criteo_sample, day, ["a.txt", "b.txt", "c.txt"])
    err = cli_error(["--dataset", "criteo", "--train", str(a), "--val", str(b), "--test", str(c), "--split", "time"],
                    out, capsys)
    assert "--split time does not apply" in err
    err = cli_error(["--dataset", "criteo", "--train", str(a), "--val", str(b), "--test", str(a)], out, capsys)
    assert "both --train and --test" in err
    err = cli_error(["--dataset", "criteo", "--input", str(a), str(b), str(a)], out, capsys)
    assert "given twice" in err
    err = cli_error(["--dataset", "criteo", "--input", str(a), str(day / "missing.txt")], out, capsys)
    assert "missing.txt: no such file" in err


def test_mixed_layouts_name_both_files_before_any_work(criteo_sample, avazu_sample, tmp_path, capsys):
    day = tmp_path / "d"
    a, b = day_files(criteo_sample, day, ["day_0", "day_1"])
    out = tmp_path / "out"
    # Criteo TSV then Avazu CSV
    err = cli_error(["--dataset", "criteo", "--input", str(a), str(avazu_sample)], out, capsys)
    assert err.startswith("error: train.csv:1: this looks like an Avazu file") and "day_0, the first input file" in err
    assert "same layout" in err
    # labeled day file then an unlabeled one
    (day / "day_1").write_text("".join("\t".join(r.split("\t")[1:]) for r in criteo_lines(b)))
    err = cli_error(["--dataset", "criteo", "--input", str(day / "day_*")], out, capsys)
    assert err.startswith("error: day_1:1: this is an unlabeled criteo test file (39 tab-separated")
    assert "day_0, the first input file, is a labeled criteo file (40 tab-separated columns" in err
    # pre-split files too: an unlabeled val file; Avazu with and without the id column
    c = day / "c.txt"
    c.write_text("".join(criteo_lines(a)[:10]))
    err = cli_error(["--dataset", "criteo", "--train", str(a), "--val", str(day / "day_1"), "--test", str(c)],
                    out, capsys)
    assert err.startswith("error: day_1:1: this is an unlabeled criteo test file") and "day_0, the first" in err
    files, _ = avazu_presplit(avazu_sample, tmp_path / "bars")
    no_id, _ = avazu_presplit(avazu_sample, tmp_path / "bars2", drop_id=True)
    err = cli_error(["--dataset", "avazu", "--train", str(files["train"]), "--val", str(files["val"]),
                     "--test", str(no_id["test"])], out, capsys)
    assert err.startswith("error: test.csv:1: this is a labeled avazu file (23 comma-separated columns")
    assert "train.csv, the first input file, is a labeled avazu file (24 comma-separated" in err


def test_cli_subprocess_one_line_for_mixed_layouts(criteo_sample, avazu_sample, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--dataset", "avazu", "--input", str(avazu_sample), str(criteo_sample),
         "--out", str(tmp_path / "out"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.txt:1: this looks like a Criteo file")
    assert "train.csv, the first input file" in lines[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# data.sources: every CLI's --data / --train / --val / --test
# ---------------------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sources.add_data_arguments(p)
    return p.parse_args(argv)


def test_sources_several_files_and_presplit(criteo_sample, avazu_sample, tmp_path):
    cache = str(tmp_path / "cache")
    paths = day_files(criteo_sample, tmp_path / "days", ["day_0.gz", "day_1.gz", "day_2.gz"],
                      gz={"day_0.gz", "day_1.gz", "day_2.gz"})
    args = parse(["--dataset", "criteo", "--data", str(tmp_path / "days" / "day_*.gz"), "--split", "by-file",
                  "--cache-dir", cache])
    assert str(args.data) == str(tmp_path / "days" / "day_*.gz")  # prints as the paths (run titles)
    data = sources.resolve(args, progress=False)
    m = json.loads((data.root / "manifest.json").read_text())
    assert m["rows"] == {"train": 5333, "val": 1333, "test": 1334, "total": 8000}
    assert [Path(e["path"]).name for e in m["inputs"]] == [p.name for p in paths]
    assert Path(data.root).parent == Path(cache) / "prepared"
    assert len(data.split("val")) == 1333
    # one file keeps its cache name and the default split
    one = sources.resolve(parse(["--dataset", "criteo", "--data", str(criteo_sample), "--cache-dir", cache]), False)
    assert Path(one.root) == sources.prepared_dir(cache, "criteo", criteo_sample, 2, "random", 2022)
    files, _ = avazu_presplit(avazu_sample, tmp_path / "bars")
    args = parse(["--dataset", "avazu", "--train", str(files["train"]), "--val", str(files["val"]),
                  "--test", str(files["test"]), "--cache-dir", cache])
    pre = sources.resolve(args, progress=False)
    assert json.loads((pre.root / "manifest.json").read_text())["rows"]["val"] == 900
    for argv, expected in [
        (["--train", str(files["train"])], "go together"),
        (["--data", str(avazu_sample), "--train", str(files["train"]), "--val", str(files["val"]), "--test",
          str(files["test"])], "exclude each other"),
        (["--data", str(tmp_path / "nothing_*")], "no file matches"),
        (["--train", str(files["train"]), "--val", str(files["val"]), "--test", str(files["test"]), "--split",
          "random"], "does not apply"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=expected):
            sources.resolve(parse(["--dataset", "avazu", "--cache-dir", cache, *argv]), progress=False)


def test_training_cli_with_day_files_one_line_errors(criteo_sample, tmp_path, capsys):
    from ctr.train_fp32 import main as train_main

    day = tmp_path / "d"
    day_files(criteo_sample, day, ["day_0", "day_1"])
    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress"]
    for argv, expected in [
        (["--dataset", "criteo", "--data", str(day / "nope_*")], "no file matches"),
        (["--dataset", "criteo", "--train", str(day / "day_0")], "go together"),
        (["--dataset", "avazu", "--data", str(day / "day_*")], "looks like a Criteo file"),
    ]:
        assert train_main(argv + common) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_output_of_the_one_file_manifest_is_still_reused(criteo_sample, tmp_path, capsys):
    """A directory written before several inputs existed (manifest ``input``: one identity) is reused."""
    from data.artifacts import atomic_write_json, seal_json
    from data.manifest import MANIFEST_DIGEST, MANIFEST_FILE

    out = tmp_path / "out"
    m = run("criteo", criteo_sample, out)
    old = {k: v for k, v in m.items() if k not in ("inputs", MANIFEST_DIGEST)}
    old["input"] = {k: v for k, v in m["inputs"][0].items() if k != "rows"}
    atomic_write_json(out / MANIFEST_FILE, seal_json(old, MANIFEST_DIGEST))
    capsys.readouterr()
    assert run("criteo", criteo_sample, out) == load_manifest(out)
    assert "reusing" in capsys.readouterr().out
    # other parameters: recomputed, in the new format
    assert run("criteo", criteo_sample, out, min_count=3)["inputs"][0]["rows"] == 8000


def test_avazu_header_in_another_column_order(avazu_sample, tmp_path):
    """A header naming the schema's columns in another order (any case) is read by name."""
    lines = avazu_sample.read_text().splitlines()[:400]
    cols = lines[0].split(",")
    perm = [1, 2, 0] + list(range(len(cols) - 1, 2, -1))  # click, hour, id, then C21 ... C1
    rows = [[r.split(",")[j] for j in perm] for r in lines]
    rows[0][0] = rows[0][0].upper()
    moved = tmp_path / "moved.csv"
    moved.write_text("".join(",".join(r) + "\n" for r in rows))
    assert moved.read_text().startswith("CLICK,hour,id,C21,")
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(lines) + "\n")
    run("avazu", plain, tmp_path / "a")
    run("avazu", moved, tmp_path / "b")
    assert_same_output(tmp_path / "a", tmp_path / "b")
