"""Malformed raw input: every error names file, line and column; skip mode counts; no half output."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from data.manifest import load_manifest
from data.prepare import main, prepare
from data.reader import RawFormatError, RawReader
from data.schema import AVAZU, CRITEO

REPO = Path(__file__).resolve().parents[1]


def criteo_rows(src: Path, n: int = 20) -> list[list[str]]:
    with open(src) as f:
        return [next(f).rstrip("\n").split("\t") for _ in range(n)]


def avazu_rows(src: Path, n: int = 20) -> tuple[str, list[list[str]]]:
    with open(src) as f:
        header = next(f).rstrip("\n")
        return header, [next(f).rstrip("\n").split(",") for _ in range(n)]


def write_criteo(path: Path, rows: list[list[str]], eol: str = "\n") -> Path:
    path.write_text("".join("\t".join(r) + eol for r in rows))
    return path


def write_avazu(path: Path, header: str, rows: list[list[str]]) -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


def set_value(rows: list[list[str]], schema, line_index: int, column: str, value: str) -> None:
    rows[line_index][schema.columns.index(column)] = value


def prepare_error(dataset: str, src: Path, out: Path, **kw) -> RawFormatError:
    with pytest.raises(RawFormatError) as e:
        prepare(dataset, src, out, progress=False, **kw)
    assert not out.exists(), "a failed run must not leave an output directory"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial dirs left"
    return e.value


def assert_names(err: RawFormatError, file: str, line: int | None, column: str | None) -> None:
    text = str(err)
    assert text.startswith(f"{file}:{line}:" if line is not None else f"{file}:"), text
    assert err.line == line
    if column is not None:
        assert f"column {column}:" in text, text
        assert err.column == column


# ---------------------------------------------------------------------------------------------
# Criteo
# ---------------------------------------------------------------------------------------------
def test_criteo_too_few_and_too_many_columns(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    rows[4] = rows[4][:39]
    err = prepare_error("criteo", write_criteo(tmp_path / "short.txt", rows), tmp_path / "out")
    assert_names(err, "short.txt", 5, "C26")
    assert "expected 40" in str(err) and "found 39" in str(err) and err.reason == "column_count"

    rows = criteo_rows(criteo_sample)
    rows[11] = rows[11] + ["extra"]
    err = prepare_error("criteo", write_criteo(tmp_path / "long.txt", rows), tmp_path / "out")
    assert_names(err, "long.txt", 12, "41 (after C26)")
    assert "found 41" in str(err)


def test_criteo_non_integer_and_bad_label(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 6, "I5", "abc")
    err = prepare_error("criteo", write_criteo(tmp_path / "train.txt", rows), tmp_path / "out")
    assert str(err) == "train.txt:7: column I5: expected an integer, found 'abc'"
    assert err.reason == "bad_integer"

    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 2, "I1", "1.5")
    set_value(rows, CRITEO, 9, "label", "2")
    err = prepare_error("criteo", write_criteo(tmp_path / "two.txt", rows), tmp_path / "out")
    assert_names(err, "two.txt", 3, "I1")  # the first bad row wins

    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 9, "label", "2")
    err = prepare_error("criteo", write_criteo(tmp_path / "label.txt", rows), tmp_path / "out")
    assert str(err) == "label.txt:10: column label: expected 0 or 1, found '2'"


def test_criteo_undecodable_bytes(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    lines = ["\t".join(r).encode() for r in rows]
    parts = lines[8].split(b"\t")
    parts[CRITEO.columns.index("C3")] = b"\xff\xfe12ab"
    lines[8] = b"\t".join(parts)
    src = tmp_path / "bytes.txt"
    src.write_bytes(b"\n".join(lines) + b"\n")
    err = prepare_error("criteo", src, tmp_path / "out")
    assert_names(err, "bytes.txt", 9, "C3")
    assert "UTF-8" in str(err) and err.reason == "not_utf8"


def test_error_line_is_exact_across_blocks_crlf_and_gzip(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample, 3000)
    set_value(rows, CRITEO, 2733, "C20", "\u00e9t\u00e9")  # valid UTF-8: fine
    set_value(rows, CRITEO, 2876, "I13", "x7")
    src = write_criteo(tmp_path / "deep.txt", rows, eol="\r\n")
    err = prepare_error("criteo", src, tmp_path / "out", block_size=32 << 10)
    assert str(err) == "deep.txt:2877: column I13: expected an integer, found 'x7'"
    packed = tmp_path / "deep.csv"  # gzip whatever the name says
    packed.write_bytes(gzip.compress(src.read_bytes()))
    err = prepare_error("criteo", packed, tmp_path / "out", block_size=32 << 10)
    assert str(err) == "deep.csv:2877: column I13: expected an integer, found 'x7'"
    rows[1500] = rows[1500][:20]
    err = prepare_error("criteo", write_criteo(tmp_path / "deep2.txt", rows), tmp_path / "out", block_size=32 << 10)
    assert_names(err, "deep2.txt", 1501, "C7")  # 20 columns: label, I1-I13, C1-C6


def test_empty_and_blank_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    err = prepare_error("criteo", tmp_path / "empty.txt", tmp_path / "out")
    assert str(err) == "empty.txt: file is empty"
    (tmp_path / "empty.gz").write_bytes(gzip.compress(b""))
    assert "empty" in str(prepare_error("avazu", tmp_path / "empty.gz", tmp_path / "out"))
    (tmp_path / "blank.txt").write_text("\n\n\r\n")
    assert "blank" in str(prepare_error("criteo", tmp_path / "blank.txt", tmp_path / "out"))


def test_blank_lines_are_skipped_and_counted(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    text = "".join("\t".join(r) + "\n" for r in rows[:10]) + "\n" + "".join("\t".join(r) + "\n" for r in rows[10:])
    (tmp_path / "gap.txt").write_text(text + "\n")
    m = prepare("criteo", tmp_path / "gap.txt", tmp_path / "out", progress=False)
    assert m["rows"]["total"] == 20
    assert m["bad_rows"] == {"skipped": 2, "by_reason": {"empty_line": 2}}


def test_criteo_test_file_is_refused(criteo_sample, tmp_path):
    rows = [r[1:] for r in criteo_rows(criteo_sample)]
    src = write_criteo(tmp_path / "test.txt", rows)
    err = prepare_error("criteo", src, tmp_path / "out")
    assert "unlabeled" in str(err) and "test.txt" in str(err)
    # the reader itself accepts it: label absent, 39 columns
    reader = RawReader(src, CRITEO)
    blocks = list(reader)
    assert blocks[0].batch.schema.names == list(CRITEO.test_columns)
    assert reader.rows == 20


def test_kaggle_csv_copy_of_criteo_is_named_and_its_conversion_works(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample, 200)
    header = "Id,Label," + ",".join(CRITEO.columns[1:])
    src = tmp_path / "train.csv"
    src.write_text(header + "\n" + "".join(f"{10_000_000 + i}," + ",".join(r) + "\n" for i, r in enumerate(rows)))
    err = prepare_error("criteo", src, tmp_path / "out")
    assert_names(err, "train.csv", 1, None)
    assert "Kaggle CSV copy of Criteo" in str(err) and "line ends early" not in str(err)
    command = str(err).split("`")[1]  # the conversion the message gives, run as it says
    subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "train.txt").read_text() == write_criteo(tmp_path / "expected.txt", rows).read_text()
    manifest = prepare("criteo", tmp_path / "train.txt", tmp_path / "out", progress=False)
    assert manifest["rows"]["total"] == 200


def test_row_longer_than_block(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 3, "C1", "a" * 5000)
    err = prepare_error("criteo", write_criteo(tmp_path / "wide.txt", rows), tmp_path / "out", block_size=2048)
    assert "longer than" in str(err) and "--block-size" in str(err) and "wide.txt" in str(err)


# ---------------------------------------------------------------------------------------------
# Avazu and dataset mix-ups
# ---------------------------------------------------------------------------------------------
def test_avazu_errors_count_the_header_line(avazu_sample, tmp_path):
    header, rows = avazu_rows(avazu_sample)
    set_value(rows, AVAZU, 2, "click", "x")
    err = prepare_error("avazu", write_avazu(tmp_path / "train.csv", header, rows), tmp_path / "out")
    assert str(err) == "train.csv:4: column click: expected 0 or 1, found 'x'"

    header, rows = avazu_rows(avazu_sample)
    set_value(rows, AVAZU, 5, "hour", "14132100")
    err = prepare_error("avazu", write_avazu(tmp_path / "hour.csv", header, rows), tmp_path / "out")
    assert_names(err, "hour.csv", 7, "hour")
    assert "YYMMDDHH" in str(err) and "'14132100'" in str(err)

    header, rows = avazu_rows(avazu_sample)
    set_value(rows, AVAZU, 0, "hour", "")
    err = prepare_error("avazu", write_avazu(tmp_path / "nohour.csv", header, rows), tmp_path / "out")
    assert str(err) == "nohour.csv:2: column hour: expected an integer, found an empty value"

    header, rows = avazu_rows(avazu_sample)
    rows[7] = rows[7][:-2]
    err = prepare_error("avazu", write_avazu(tmp_path / "cols.csv", header, rows), tmp_path / "out")
    assert_names(err, "cols.csv", 9, "C20")


def test_avazu_header_only_and_bad_header(avazu_sample, tmp_path):
    header, rows = avazu_rows(avazu_sample)
    (tmp_path / "hdr.csv").write_text(header + "\r\n")
    err = prepare_error("avazu", tmp_path / "hdr.csv", tmp_path / "out")
    assert "hdr.csv" in str(err) and "no data rows" in str(err) and "header" in str(err)

    bad = header.replace("site_id", "siteid")
    err = prepare_error("avazu", write_avazu(tmp_path / "h.csv", bad, rows), tmp_path / "out")
    assert_names(err, "h.csv", 1, None)
    assert "header does not match avazu" in str(err)

    test_header = header.replace("click,", "")
    test_rows = [r[:1] + r[2:] for r in rows]
    err = prepare_error("avazu", write_avazu(tmp_path / "t.csv", test_header, test_rows), tmp_path / "out")
    assert "unlabeled" in str(err)


def test_dataset_mixups_say_what_the_file_looks_like(criteo_sample, avazu_sample, tmp_path):
    err = prepare_error("avazu", criteo_sample, tmp_path / "out")
    assert "looks like a Criteo file" in str(err) and "--dataset criteo" in str(err)
    err = prepare_error("criteo", avazu_sample, tmp_path / "out")
    assert "looks like an Avazu file" in str(err) and "--dataset avazu" in str(err)
    header, rows = avazu_rows(avazu_sample)
    headless = tmp_path / "headless.csv"
    headless.write_text("".join(",".join(r) + "\n" for r in rows))
    assert "looks like an Avazu file" in str(prepare_error("criteo", headless, tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# skip mode
# ---------------------------------------------------------------------------------------------
def test_skip_mode_counts_by_reason_and_matches_clean_file(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample, 400)
    bad = {
        3: ("I5", "abc", "bad_integer"),
        17: ("label", "7", "bad_label"),
        18: ("I2", "--1", "bad_integer"),
        250: (None, None, "column_count"),
        399: (None, "extra", "column_count"),
    }
    dirty = [list(r) for r in rows]
    for i, (col, value, _) in bad.items():
        if col is not None:
            set_value(dirty, CRITEO, i, col, value)
        elif value is None:
            dirty[i] = dirty[i][:30]
        else:
            dirty[i] = dirty[i] + [value]
    lines = ["\t".join(r).encode() for r in dirty]
    parts = lines[100].split(b"\t")
    parts[CRITEO.columns.index("C9")] = b"\xc3\x28"
    lines[100] = b"\t".join(parts)
    lines.insert(200, b"")  # a blank line
    src = tmp_path / "dirty.txt"
    src.write_bytes(b"\n".join(lines) + b"\n")
    clean = write_criteo(tmp_path / "clean.txt", [r for i, r in enumerate(rows) if i not in bad and i != 100])

    m = prepare("criteo", src, tmp_path / "out", on_bad_rows="skip", split="time", progress=False, block_size=8 << 10)
    assert m["bad_rows"] == {
        "skipped": 7,
        "by_reason": {"bad_integer": 2, "bad_label": 1, "column_count": 2, "empty_line": 1, "not_utf8": 1},
    }
    assert m["rows"]["total"] == 400 - 6 and m["params"]["on_bad_rows"] == "skip"
    ref = prepare("criteo", clean, tmp_path / "ref", split="time", progress=False)
    assert ref["bad_rows"]["skipped"] == 0
    for s in ("train", "val", "test"):
        pd.testing.assert_frame_equal(
            pq.read_table(tmp_path / "out" / f"{s}.parquet").to_pandas(),
            pq.read_table(tmp_path / "ref" / f"{s}.parquet").to_pandas(),
        )
    assert m["files"]["vocab.parquet"] == ref["files"]["vocab.parquet"]
    # error mode on the same file stops at the first bad row
    err = prepare_error("criteo", src, tmp_path / "err")
    assert_names(err, "dirty.txt", 4, "I5")


def test_skip_mode_avazu(avazu_sample, tmp_path):
    header, rows = avazu_rows(avazu_sample, 50)
    set_value(rows, AVAZU, 1, "hour", "14102199")
    set_value(rows, AVAZU, 2, "click", "")
    rows[3] = rows[3] + ["x"]
    m = prepare("avazu", write_avazu(tmp_path / "a.csv", header, rows), tmp_path / "out",
                on_bad_rows="skip", progress=False)
    assert m["rows"]["total"] == 47
    assert m["bad_rows"]["by_reason"] == {"bad_label": 1, "bad_value": 1, "column_count": 1}


def test_skip_mode_with_nothing_left(criteo_sample, tmp_path):
    rows = [r[:10] for r in criteo_rows(criteo_sample, 5)]
    err = prepare_error("criteo", write_criteo(tmp_path / "all_bad.txt", rows), tmp_path / "out", on_bad_rows="skip")
    assert "no data rows" in str(err) and "column_count" in str(err)


# ---------------------------------------------------------------------------------------------
# no half-written output, CLI behaviour
# ---------------------------------------------------------------------------------------------
def test_failed_rerun_keeps_previous_output(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample, 100)
    src = write_criteo(tmp_path / "in.txt", rows)
    out = tmp_path / "out"
    good = prepare("criteo", src, out, progress=False)
    set_value(rows, CRITEO, 60, "I3", "oops")
    write_criteo(src, rows)
    with pytest.raises(RawFormatError, match="in.txt:61: column I3"):
        prepare("criteo", src, out, progress=False)
    assert load_manifest(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


def test_cli_prints_one_line_and_exits_2(criteo_sample, tmp_path, capsys):
    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 6, "I5", "abc")
    src = write_criteo(tmp_path / "train.txt", rows)
    out = tmp_path / "out"
    assert main(["--dataset", "criteo", "--input", str(src), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: train.txt:7: column I5: expected an integer, found 'abc'\n"
    assert not out.exists()
    assert main(["--dataset", "criteo", "--input", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.txt: no such file" in err and err.count("\n") == 1


def test_cli_subprocess_has_no_traceback(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    rows[2] = rows[2][:5]
    src = write_criteo(tmp_path / "train.txt", rows)
    proc = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--dataset", "criteo", "--input", str(src), "--out",
         str(tmp_path / "out"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.txt:3: column I5: line ends early: expected 40 tab-separated columns, found 5"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("first, second", [("content", "columns"), ("columns", "content")])
def test_first_error_in_file_order_wins_despite_read_ahead(criteo_sample, tmp_path, first, second):
    rows = criteo_rows(criteo_sample, 1500)
    for kind, i in ((first, 700), (second, 760)):
        if kind == "content":
            set_value(rows, CRITEO, i, "I9", "nine")
        else:
            rows[i] = rows[i][:12]
    src = write_criteo(tmp_path / "order.txt", rows)
    for prefetch in (True, False):
        reader = RawReader(src, CRITEO, block_size=8 << 10, prefetch=prefetch)
        with pytest.raises(RawFormatError) as e:
            for _ in reader:
                pass
        assert e.value.line == 701 and e.value.column == ("I9" if first == "content" else "I12")


def test_reader_prefetch_gives_same_blocks(criteo_sample):
    a = [b.batch for b in RawReader(criteo_sample, CRITEO, block_size=64 << 10, prefetch=True)]
    b = [b.batch for b in RawReader(criteo_sample, CRITEO, block_size=64 << 10, prefetch=False)]
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        assert x.equals(y)


# ---------------------------------------------------------------------------------------------
# the rest of the corpus (issue 8): truncated last line, integer edge cases, header lines in
# Criteo, broken gzip, binary junk, short lines with undecodable bytes, CRLF Avazu
# ---------------------------------------------------------------------------------------------
def test_truncated_last_line(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    text = "".join("\t".join(r) + "\n" for r in rows)
    src = tmp_path / "cut.txt"
    src.write_text(text[: len(text) - 60])  # the download stopped inside the last row
    err = prepare_error("criteo", src, tmp_path / "out")
    assert_names(err, "cut.txt", 20, None)
    assert "line ends early" in str(err) and err.reason == "column_count"
    m = prepare("criteo", src, tmp_path / "skip", on_bad_rows="skip", progress=False)
    assert m["rows"]["total"] == 19 and m["bad_rows"]["by_reason"] == {"column_count": 1}
    complete = tmp_path / "no_final_newline.txt"
    complete.write_text(text[:-1])  # a complete last row without its newline is fine
    assert prepare("criteo", complete, tmp_path / "ok", progress=False)["rows"]["total"] == 20


def test_negative_and_huge_integers(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    set_value(rows, CRITEO, 3, "I2", "-3")  # Criteo integers may be negative
    set_value(rows, CRITEO, 4, "I3", "999999999999999999")  # 18 digits: still an int64
    m = prepare("criteo", write_criteo(tmp_path / "edge.txt", rows), tmp_path / "out", progress=False, min_count=1)
    assert m["rows"]["total"] == 20
    vocab = pq.read_table(tmp_path / "out" / "vocab.parquet").to_pandas()
    assert "-3" in set(vocab[vocab.field == "I2"].value)
    for value in ("99999999999999999999", "-99999999999999999999", "1e5", "0x1f", "+-1", " 7"):
        rows = criteo_rows(criteo_sample)
        set_value(rows, CRITEO, 5, "I4", value)
        err = prepare_error("criteo", write_criteo(tmp_path / "huge.txt", rows), tmp_path / "out2")
        assert str(err) == f"huge.txt:6: column I4: expected an integer, found {value!r}"


def test_criteo_file_with_a_header_line(criteo_sample, tmp_path):
    header = "\t".join(CRITEO.columns) + "\n"
    (tmp_path / "hdr.txt").write_text(header)
    err = prepare_error("criteo", tmp_path / "hdr.txt", tmp_path / "out")
    assert str(err) == "hdr.txt:1: column label: expected 0 or 1, found 'label'"
    rows = criteo_rows(criteo_sample)
    (tmp_path / "hdr_rows.txt").write_text(header + "".join("\t".join(r) + "\n" for r in rows))
    assert_names(prepare_error("criteo", tmp_path / "hdr_rows.txt", tmp_path / "out"), "hdr_rows.txt", 1, "label")
    m = prepare("criteo", tmp_path / "hdr_rows.txt", tmp_path / "skip", on_bad_rows="skip", progress=False)
    assert m["rows"]["total"] == 20 and m["bad_rows"]["by_reason"] == {"bad_label": 1}


def test_broken_gzip_and_binary_junk(criteo_sample, tmp_path):
    rows = criteo_rows(criteo_sample)
    packed = gzip.compress("".join("\t".join(r) + "\n" for r in rows).encode())
    (tmp_path / "cut.txt").write_bytes(packed[: len(packed) // 2])  # gzip, truncated, no .gz name
    err = prepare_error("criteo", tmp_path / "cut.txt", tmp_path / "out")
    assert str(err).startswith("cut.txt: cannot read the gzip stream") and "runcated" in str(err)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    assert "cannot read the gzip stream" in str(prepare_error("avazu", tmp_path / "bad.gz", tmp_path / "out"))
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)) * 8)
    err = prepare_error("criteo", tmp_path / "junk.bin", tmp_path / "out")
    assert_names(err, "junk.bin", 1, "I2")


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_short_line_with_undecodable_bytes(criteo_sample, tmp_path, capfd, mode):
    # pyarrow cannot hand such a line to the row handler; it must still be named, and quietly
    lines = ["\t".join(r).encode() for r in criteo_rows(criteo_sample)]
    lines[7] = lines[7][:50] + b"\xff\xfe"
    src = tmp_path / "mixed.txt"
    src.write_bytes(b"\n".join(lines) + b"\n")
    err = prepare_error("criteo", src, tmp_path / "out", on_bad_rows=mode)
    assert_names(err, "mixed.txt", 8, None)
    assert "line ends early" in str(err) and "not UTF-8" in str(err)
    assert ("cannot be skipped" in str(err)) == (mode == "skip")
    assert "Exception ignored" not in capfd.readouterr().err
    lines[3] = lines[3][:20]  # an earlier ordinary short line is reported first
    src.write_bytes(b"\n".join(lines) + b"\n")
    if mode == "error":
        assert_names(prepare_error("criteo", src, tmp_path / "out"), "mixed.txt", 4, None)


def test_avazu_crlf_gives_the_same_output(avazu_sample, tmp_path):
    header, rows = avazu_rows(avazu_sample, 200)
    lf = write_avazu(tmp_path / "lf.csv", header, rows)
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    a = prepare("avazu", lf, tmp_path / "a", progress=False)
    b = prepare("avazu", crlf, tmp_path / "b", progress=False)
    assert a["files"]["vocab.parquet"] == b["files"]["vocab.parquet"]
    assert a["files"]["train.parquet"] == b["files"]["train.parquet"]


def test_training_cli_bad_paths_and_unknown_dataset(criteo_sample, tmp_path, capsys):
    from ctr.train_fp32 import main as train_main

    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress"]
    for argv, expected in [
        (["--dataset", "movielens", "--synthetic", "100"], "unknown dataset 'movielens'"),
        (["--dataset", "criteo", "--data", str(tmp_path)], "is a directory"),
        (["--dataset", "criteo", "--data", str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        (["--dataset", "avazu", "--data", str(criteo_sample)], "looks like a Criteo file"),
    ]:
        assert train_main(argv + common) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:  # data.prepare: argparse rejects the choice
        main(["--dataset", "movielens", "--input", str(criteo_sample), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'movielens'" in capsys.readouterr().err
