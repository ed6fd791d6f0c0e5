"""``python -m mpe.predict``: raw rows scored from a deployable export alone (``mpe.vocabulary``)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch

from ctr.trainer import predict
from data.artifacts import ArtifactError, atomic_torch_save, atomic_write_json, sha256_file
from data.batches import PreparedDataset
from data.reader import RawFormatError
from data.schema import EXAMPLE_SCHEMA
from data.transforms import TEST, random_split
from mpe import export as export_cli
from mpe import predict as predict_cli
from mpe import search
from mpe.format import HEADER_DIGEST, HEADER_FILE, VOCAB_KEY, header_digest
from mpe.predict import load_scorer
from mpe.serving import load_served_model
from mpe.vocabulary import choose_fingerprint, fingerprints

SMALL = ["--hidden", "64", "32", "--batch-size", "1000", "--groups", "16", "--no-progress", "--epochs", "1"]


def _run(tmp: Path, dataset: str, rows: int, *extra: str) -> dict:
    out, cache = tmp / "run", tmp / "cache"
    assert search.main(["--dataset", dataset, "--synthetic", str(rows), "--out", str(out), "--cache-dir", str(cache),
                        *SMALL, *extra]) == 0
    raw = next(p for p in (cache / "synthetic").iterdir() if not p.name.endswith(".json"))
    return {"run": out, "export": out / "export", "raw": raw, "prepared": next((cache / "prepared").iterdir()),
            "report": json.loads((out / "report.json").read_text())}


def _test_rows(raw: Path, dest: Path, header: bool, drop_column: int | None = None) -> Path:
    """The raw rows of the random test split (seed 2022), optionally without one column."""
    lines = raw.read_bytes().rstrip(b"\n").split(b"\n")
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    keep = [line for line, c in zip(body, random_split(0, len(body), 2022), strict=True) if c == TEST]
    if drop_column is not None:
        sep = b"," if header else b"\t"
        keep = [sep.join(p for i, p in enumerate(line.split(sep)) if i != drop_column) for line in head + keep]
        head = []
    dest.write_bytes(b"\n".join(head + keep) + b"\n")
    return dest


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("criteo"), "criteo", 20000)


@pytest.fixture(scope="module")
def avazu(tmp_path_factory):
    # the paper's zero vector for pruned rows: the exact vocabulary then stores pruned tokens
    return _run(tmp_path_factory.mktemp("avazu"), "avazu", 20000, "--pruned-as", "zero")


def _served(r: dict) -> np.ndarray:
    data = PreparedDataset(r["prepared"])
    return predict(load_served_model(r["export"]), data.split("test"), data.fields)


def test_raw_test_rows_equal_served_model_bit_for_bit(criteo, tmp_path, capsys):
    rows = _test_rows(criteo["raw"], tmp_path / "test_rows.txt", header=False)
    out = tmp_path / "pred.csv"
    assert predict_cli.main(["--export", str(criteo["export"]), "--data", str(rows), "--out", str(out),
                             "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rows/s" in printed and "AUC" in printed
    want = _served(criteo)
    got = pacsv.read_csv(out)
    assert got.column_names == ["probability"]
    p = got["probability"].to_numpy()
    assert np.array_equal(p.astype(np.float32).astype(np.float64), p)  # float32 written exactly
    assert np.array_equal(p, want)
    m = json.loads(Path(f"{out}.metrics.json").read_text())
    assert m["auc"] == criteo["report"]["test"]["auc"] == criteo["report"]["export_test_auc"]
    assert m["rows"] == len(want)
    # small blocks and odd batches: the same numbers (batches are cut as ctr.trainer.predict cuts them)
    res = load_scorer(criteo["export"]).score([rows], block_size=4096)
    assert np.array_equal(res.probabilities.astype(np.float64), want)


def test_header_and_report_break_bytes_down(criteo):
    header = json.loads((criteo["export"] / HEADER_FILE).read_text())
    b = header["bytes"]
    assert b["embedding_total"] == header["total_bytes"] == b["codes"] + b["id_map"] + b["steps_offset"]
    on_disk = {n: (criteo["export"] / n).stat().st_size for n in ("vocab.npy", "preprocess.json", "tower.pt", "tower.json")}
    assert b["vocabulary"] == on_disk["vocab.npy"] + on_disk["preprocess.json"]
    assert b["tower"] == on_disk["tower.pt"] + on_disk["tower.json"]
    assert header["deployable_bytes"] == b["deployable_total"] == b["embedding_total"] + b["vocabulary"] + b["tower"]
    report = criteo["report"]
    assert report["bytes"] == b and report["compression_ratio"] == report["fp32_bytes"] / b["embedding_total"]
    # the vocabulary stores the kept tokens, `width` bytes each: the narrowest of 2, 3, 4 whose
    # false-hit rate (stored / 2^(8 width)) is at most 1e-4, so 3 bytes for up to 1,677 tokens
    v = header[VOCAB_KEY]
    fields = json.loads((criteo["export"] / "preprocess.json").read_text())["vocabulary"]
    assert v["bytes"] == 128 + sum(f["width"] * (f["kept"] + f["pruned"]) for f in fields)
    for f in fields:
        stored = f["kept"] + f["pruned"]
        assert stored <= 1e-4 * 2.0 ** (8 * f["width"]) and (f["width"] == 2 or stored > 1e-4 * 2.0 ** (8 * f["width"] - 8))
    assert v["bytes"] < 128 + 4 * (v["kept_tokens"] + v["pruned_tokens"])


def test_unlabeled_criteo_test_file_is_scored(criteo, tmp_path):
    labeled = _test_rows(criteo["raw"], tmp_path / "labeled.txt", header=False)
    unlabeled = _test_rows(criteo["raw"], tmp_path / "test.txt", header=False, drop_column=0)
    assert len(unlabeled.read_text().split("\n")[0].split("\t")) == 39
    out = tmp_path / "pred.csv"
    assert predict_cli.main(["--export", str(criteo["export"]), "--data", str(unlabeled), "--out", str(out),
                             "--no-progress"]) == 0
    assert not Path(f"{out}.metrics.json").exists()
    scorer = load_scorer(criteo["export"])
    assert np.array_equal(pacsv.read_csv(out)["probability"].to_numpy().astype(np.float32),
                          scorer.score([labeled]).probabilities)


def test_avazu_test_file_without_click_is_scored_with_its_ids(avazu, tmp_path):
    labeled = _test_rows(avazu["raw"], tmp_path / "labeled.csv", header=True)
    unlabeled = _test_rows(avazu["raw"], tmp_path / "test.csv", header=True, drop_column=1)
    assert unlabeled.read_text().startswith("id,hour,")
    out = tmp_path / "pred.csv"
    assert predict_cli.main(["--export", str(avazu["export"]), "--data", str(unlabeled), "--out", str(out),
                             "--no-progress"]) == 0
    got = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types={"id": "string"}))
    assert got.column_names == ["id", "probability"]
    ids = [line.split(",")[0] for line in unlabeled.read_text().split("\n")[1:] if line]
    assert got["id"].to_pylist() == ids
    res = load_scorer(avazu["export"]).score([labeled])
    assert np.array_equal(got["probability"].to_numpy(), _served(avazu))
    assert res.metrics["auc"] == avazu["report"]["test"]["auc"]


def test_all_unseen_row_gets_a_prediction(criteo, tmp_path):
    row = "\t".join(["1"] + ["123456789"] * 13 + [f"never{i}" for i in range(26)])
    path = tmp_path / "unseen.txt"
    path.write_text(row + "\n")
    scorer = load_scorer(criteo["export"])
    res = scorer.score([path])
    assert res.rows == 1 and np.isfinite(res.probabilities).all()
    assert np.array_equal(scorer.vocabulary.encode(next(iter(scorer._reader(path, "error", 1 << 20)[0])).batch),
                          np.zeros((1, 39), dtype=np.int64))
    assert res.probabilities[0] == scorer._run(np.zeros((1, 39), dtype=np.int64))[0]


def test_bad_rows_error_or_skip(criteo, tmp_path, capsys):
    rows = _test_rows(criteo["raw"], tmp_path / "rows.txt", header=False)
    n = len(rows.read_text().strip().split("\n"))
    good = rows.read_text().strip().split("\n")
    bad = good[:5] + ["1\tnot-a-number" + "\t" * 38, "0\t1\t2"] + good[5:]
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(bad) + "\n")
    scorer = load_scorer(criteo["export"])
    with pytest.raises(RawFormatError, match=r"bad.txt:6: column I1: expected an integer"):
        scorer.score([path])
    assert predict_cli.main(["--export", str(criteo["export"]), "--data", str(path), "--out", str(tmp_path / "p.csv"),
                             "--no-progress"]) == 2
    assert "bad.txt:6: column I1" in capsys.readouterr().err
    res = scorer.score([path], on_bad_rows="skip")
    assert res.rows == n and sum(res.bad_rows.values()) == 2
    assert np.array_equal(res.probabilities.astype(np.float64), _served(criteo))


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _rewrite_header(export: Path, fn) -> None:
    header = json.loads((export / HEADER_FILE).read_text())
    fn(header)
    header[HEADER_DIGEST] = header_digest(header)
    atomic_write_json(export / HEADER_FILE, header)


def test_tampered_truncated_or_mixed_exports_are_refused(criteo, avazu, tmp_path):
    exp = criteo["export"]
    e = _copy(exp, tmp_path / "flip")
    data = bytearray((e / "vocab.npy").read_bytes())
    data[-1] ^= 1
    (e / "vocab.npy").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="vocab.npy"):
        load_scorer(e)
    e = _copy(exp, tmp_path / "trunc")
    (e / "vocab.npy").write_bytes((exp / "vocab.npy").read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="truncated"):
        load_scorer(e)
    # another run's vocabulary, even with a header rewritten to match its files
    e = _copy(exp, tmp_path / "mixed")
    for name in ("vocab.npy", "preprocess.json"):
        shutil.copy(avazu["export"] / name, e / name)
    with pytest.raises(ArtifactError, match="vocab.npy|preprocess.json"):
        load_scorer(e)
    other = json.loads((avazu["export"] / HEADER_FILE).read_text())[VOCAB_KEY]
    _rewrite_header(e, lambda h: h.__setitem__(VOCAB_KEY, other))
    with pytest.raises(ArtifactError, match="another export|does not match"):
        load_scorer(e)
    # a tower from another export: a consistent tower.pt + tower.json pair that is not this one's
    e = _copy(exp, tmp_path / "tower")
    state = torch.load(e / "tower.pt", weights_only=True)
    atomic_torch_save(e / "tower.pt", {k: v + 1 for k, v in state.items()})
    meta = json.loads((e / "tower.json").read_text())
    atomic_write_json(e / "tower.json", {**meta, "sha256": sha256_file(e / "tower.pt")})
    with pytest.raises(ArtifactError, match="tower.json"):
        load_served_model(e)
    # an export written before vocabularies: still served, but not deployable
    e = _copy(exp, tmp_path / "old")
    _rewrite_header(e, lambda h: [h.pop(k) for k in ("vocabulary", "tower", "bytes", "deployable_bytes")])
    load_served_model(e)
    with pytest.raises(ArtifactError, match="no vocabulary"):
        load_scorer(e)


def test_compact_vocabulary_is_smaller_and_close(avazu, tmp_path):
    # pruned rows as the zero vector: compact drops the pruned tokens of fields whose OOV row has bits
    out = tmp_path / "compact"
    assert export_cli.main(["--run", str(avazu["run"]), "--out", str(out), "--vocabulary", "compact",
                            "--no-torchrec", "--prepared", str(avazu["prepared"])]) == 0
    exact = json.loads((avazu["export"] / HEADER_FILE).read_text())
    compact = json.loads((out / HEADER_FILE).read_text())
    assert exact["pruned_as"] == "zero" and exact[VOCAB_KEY]["pruned_tokens"] > 0
    assert compact[VOCAB_KEY]["pruned_tokens"] == 0
    assert compact["bytes"]["vocabulary"] < exact["bytes"]["vocabulary"]
    rows = _test_rows(avazu["raw"], tmp_path / "rows.csv", header=True)
    res = load_scorer(out).score([rows])
    assert abs(res.metrics["auc"] - avazu["report"]["test"]["auc"]) < 0.01


def test_pruned_as_oov_stores_kept_tokens_only(criteo, tmp_path):
    # the default: a pruned value reads as its field's OOV row, like an unseen one, so the
    # exact vocabulary is the compact one and still gives the served model's predictions
    header = json.loads((criteo["export"] / HEADER_FILE).read_text())
    assert header["pruned_as"] == "oov" and header[VOCAB_KEY]["pruned_tokens"] == 0
    served = load_served_model(criteo["export"]).embedding.packed
    assert served.oov_fields.any()  # some field keeps its OOV row: the alias is exercised
    out = tmp_path / "compact"
    assert export_cli.main(["--run", str(criteo["run"]), "--out", str(out), "--vocabulary", "compact",
                            "--no-torchrec", "--prepared", str(criteo["prepared"])]) == 0
    assert (out / "vocab.npy").read_bytes() == (criteo["export"] / "vocab.npy").read_bytes()


def test_fingerprints_hex_tokens_exact_and_salted_collisions():
    import pyarrow as pa

    hexes = pa.array(["0000002a", "ffffffff", "68fd1e64", "", "ABCDEF01", "1234567"])
    fp = fingerprints(hexes, 4, 0)
    assert fp[:3].tolist() == [0x2A, 0xFFFFFFFF, 0x68FD1E64]
    assert fp.max() < 2**32
    assert not np.array_equal(fingerprints(hexes, 4, 1)[3:], fp[3:])  # the salt moves hashed tokens only
    assert np.array_equal(fingerprints(hexes, 4, 1)[:3], fp[:3])
    assert fingerprints(hexes, 3, 0).max() < 2**24 and fingerprints(hexes, 2, 0).max() < 2**16
    tokens = pa.array([str(i) for i in range(50_000)])
    # 1,000 stored of 50,000 counted: 3 bytes (1,000 / 2^24 <= 1e-4), stored ones distinct and
    # no other counted token on a stored fingerprint
    stored = np.zeros(50_000, dtype=bool)
    stored[::50] = True
    width, salt = choose_fingerprint(tokens, stored)
    assert width == 3 and 0 <= salt < 16
    f = fingerprints(tokens, width, salt)
    assert np.unique(f[stored]).size == 1_000 and not np.isin(f[~stored], f[stored]).any()
    # the false-hit rate measured on 200,000 values never counted: about 1,000 / 2^24 = 6e-5
    unseen = fingerprints(pa.array([f"x{i}" for i in range(200_000)]), width, salt)
    rate = np.isin(unseen, f[stored]).mean()
    assert rate < 2e-4
    assert choose_fingerprint(tokens, np.ones(50_000, dtype=bool))[0] == 4  # 50,000 stored: 4 bytes
    assert choose_fingerprint(tokens[:6], np.ones(6, dtype=bool))[0] == 2  # 6 / 2^16 <= 1e-4


@pytest.mark.slow
def test_custom_schema_end_to_end(tmp_path):
    r = _run(tmp_path, str(EXAMPLE_SCHEMA), 30000, "--split", "random")
    rows = _test_rows(r["raw"], tmp_path / "rows.csv", header=True)
    scorer = load_scorer(r["export"])
    res = scorer.score([rows], tmp_path / "pred.csv")
    assert np.array_equal(res.probabilities.astype(np.float64), _served(r))
    assert res.metrics["auc"] == r["report"]["test"]["auc"]
    got = pacsv.read_csv(tmp_path / "pred.csv", convert_options=pacsv.ConvertOptions(column_types={"id": "string"}))
    assert got.column_names == ["id", "probability"]  # request_id, the schema's dropped id column
