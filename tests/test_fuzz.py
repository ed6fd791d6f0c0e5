"""Property-based tests (hypothesis) of the raw row parser and of the bit-packed table format.

Brief in CI: ``FUZZ_EXAMPLES`` examples per property (default 40), derandomized so CI always
runs the same cases. A longer, random fuzz run (see docs/reliability.md)::

    FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/test_fuzz.py

Setting ``FUZZ_EXAMPLES`` also turns derandomization off, so every long run explores new inputs.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from data.prepare import make_reader
from data.reader import RawFormatError, RawReader
from data.schema import AVAZU, CRITEO
from encoding.packing import (
    decode_id_map,
    ef_decode,
    ef_encode,
    encode_id_map,
    id_map_to_index,
    pack_codes,
    pack_unsigned,
    unpack_codes,
    unpack_unsigned,
)
from mpe.reader import _gather_codes

FUZZ_ENV = os.environ.get("FUZZ_EXAMPLES")
EXAMPLES = int(FUZZ_ENV) if FUZZ_ENV else 40
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=FUZZ_ENV is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextmanager
def scratch_file(data: bytes, name: str) -> Iterator[Path]:
    """``data`` written to a fresh temporary file called ``name`` (hypothesis reruns the test body,
    so pytest's function-scoped ``tmp_path`` cannot be used)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        yield path


def read_all(reader: RawReader) -> dict[str, list[str]]:
    """Every column of every yielded block, as Python strings, plus a check of the row count."""
    out: dict[str, list[str]] = {c: [] for c in reader.columns}
    for block in reader:
        for name, col in zip(block.batch.schema.names, block.batch.columns, strict=True):
            out[name].extend(col.to_pylist())
    assert all(len(v) == reader.rows for v in out.values())
    return out


# ---------------------------------------------------------------------------------------------
# row parser: valid rows round-trip
# ---------------------------------------------------------------------------------------------
# any UTF-8 text without the delimiters, line ends or NUL (surrogates cannot be encoded)
_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\t,\n\r\x00"), max_size=12)
_INT = st.one_of(st.just(""), st.integers(-(10**17), 10**18 - 1).map(str))
_HEX = st.integers(0, 2**32 - 1).map(lambda v: f"{v:08x}")


@st.composite
def criteo_rows(draw) -> list[list[str]]:
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        label = draw(st.sampled_from(["0", "1"]))
        ints = [draw(_INT) for _ in range(13)]
        cats = [draw(st.one_of(st.just(""), _HEX, _TEXT)) for _ in range(26)]
        rows.append([label, *ints, *cats])
    return rows


@st.composite
def avazu_rows(draw) -> list[list[str]]:
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        day, hour = draw(st.integers(1, 28)), draw(st.integers(0, 23))
        rows.append([
            draw(st.integers(0, 2**64 - 1).map(str)),
            draw(st.sampled_from(["0", "1"])),
            f"1410{day:02d}{hour:02d}",
            *[draw(st.one_of(_HEX, _TEXT)) for _ in AVAZU.columns[3:]],
        ])
    return rows


def encode_file(header: str | None, rows: list[list[str]], delimiter: str, eol: str, final_eol: bool,
                compress: bool) -> bytes:
    lines = ([header] if header is not None else []) + [delimiter.join(r) for r in rows]
    data = (eol.join(lines) + (eol if final_eol else "")).encode()
    return gzip.compress(data) if compress else data


@FUZZ
@given(rows=criteo_rows(), eol=st.sampled_from(["\n", "\r\n"]), final_eol=st.booleans(), compress=st.booleans(),
       block=st.sampled_from([1024, 1 << 20]))
def test_valid_criteo_rows_round_trip(rows, eol, final_eol, compress, block):
    # a row of only empty values would be a blank line; the label keeps every row non-empty
    data = encode_file(None, rows, "\t", eol, final_eol, compress)
    with scratch_file(data, "train.txt") as path:
        got = read_all(RawReader(path, CRITEO, block_size=block, prefetch=False))
    assert [list(r) for r in zip(*(got[c] for c in CRITEO.columns), strict=True)] == rows


@FUZZ
@given(rows=avazu_rows(), eol=st.sampled_from(["\n", "\r\n"]), final_eol=st.booleans(), compress=st.booleans())
def test_valid_avazu_rows_round_trip(rows, eol, final_eol, compress):
    data = encode_file(",".join(AVAZU.columns), rows, ",", eol, final_eol, compress)
    with scratch_file(data, "train.csv") as path:
        reader = make_reader(AVAZU, path)  # what data.prepare reads, with the hour check
        got = read_all(reader)
    assert got["click"] == [r[1] for r in rows]
    assert got["hour"] == [r[2] for r in rows]
    for c in reader.columns[2:]:
        assert got[c] == [r[AVAZU.columns.index(c)] for r in rows]


# ---------------------------------------------------------------------------------------------
# row parser: noise gives valid output or RawFormatError, nothing else
# ---------------------------------------------------------------------------------------------
@st.composite
def noisy_file(draw) -> tuple[str, bytes]:
    """A valid small file (either format) with random byte edits, or pure random bytes."""
    dataset = draw(st.sampled_from(["criteo", "avazu"]))
    if draw(st.integers(0, 9)) == 0:
        return dataset, draw(st.binary(max_size=400))
    if dataset == "criteo":
        data = bytearray(encode_file(None, draw(criteo_rows()), "\t", "\n", True, False))
    else:
        data = bytearray(encode_file(",".join(AVAZU.columns), draw(avazu_rows()), ",", "\n", True, False))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        junk = draw(st.sampled_from([b"\t", b",", b"\n", b"\r", b"\xff", b"\xc3", b"-", b"x", b"\x00", b"\x1f\x8b"]))
        if op == "insert":
            data[pos:pos] = junk
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif op == "replace":
            data[pos : pos + len(junk)] = junk
        else:
            del data[pos:]
    return dataset, bytes(data)


@FUZZ
@given(case=noisy_file(), mode=st.sampled_from(["error", "skip"]), compress=st.booleans())
def test_noise_gives_valid_rows_or_raw_format_error(case, mode, compress):
    dataset, data = case
    schema = CRITEO if dataset == "criteo" else AVAZU
    data = gzip.compress(data) if compress else data
    with scratch_file(data, "noise.bin") as path:
        for counting in (False, True):
            try:
                reader = make_reader(schema, path, on_bad_rows=mode, block_size=1024)
                if counting:
                    total = sum(b.num_rows for b in reader.iter_counts())
                    assert total == reader.rows
                else:
                    got = read_all(reader)
                    assert set(got[schema.label]) <= {"0", "1"}
            except RawFormatError as e:
                assert str(e).startswith("noise.bin"), str(e)
                assert "\n" not in str(e)


# ---------------------------------------------------------------------------------------------
# bit-packed tables
# ---------------------------------------------------------------------------------------------
@FUZZ
@given(bits=st.integers(0, 8), dim=st.integers(1, 33), n=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_codes_and_row_gather(bits, dim, n, seed):
    rng = np.random.default_rng(seed)
    half = 1 << max(bits - 1, 0)
    codes = rng.integers(-half, half, size=(n, dim)).astype(np.int8) if bits else np.zeros((n, dim), np.int8)
    buf = pack_codes(codes, bits)
    assert buf.dtype == np.uint8 and buf.size == (n * dim * bits + 7) // 8
    assert np.array_equal(unpack_codes(buf, n, dim, bits), codes)
    if bits and n:  # the serving path decodes single rows straight from the packed bytes
        rows = rng.integers(0, n, size=min(n, 9))
        padded = np.concatenate([buf, np.zeros(1, np.uint8)])
        assert np.array_equal(_gather_codes(padded, rows, dim, bits), codes[rows].astype(np.int16))
    if buf.size:  # a buffer of the wrong length is refused, not misread
        with pytest.raises(ValueError):
            unpack_codes(buf[:-1], n, dim, bits)


@FUZZ
@given(width=st.integers(1, 64), seed=st.integers(0, 2**32 - 1), n=st.integers(0, 200))
def test_pack_unpack_unsigned_any_width(width, seed, n):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, size=n, dtype=np.uint64, endpoint=False)
    values = values & np.uint64((1 << width) - 1) if width < 64 else values
    assert np.array_equal(unpack_unsigned(pack_unsigned(values, width), n, width), values)


@FUZZ
@given(universe=st.integers(1, 5000), data=st.data())
def test_elias_fano_round_trip(universe, data):
    values = np.array(sorted(data.draw(st.sets(st.integers(0, universe - 1), max_size=200))), dtype=np.int64)
    assert np.array_equal(ef_decode(ef_encode(values, universe), len(values), universe), values)


@FUZZ
@given(k=st.integers(1, 8), n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), runs=st.booleans())
def test_id_map_round_trip(k, n, seed, runs):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k) * 0.3)
    idx = np.sort(rng.choice(k, size=n, p=p)) if runs else rng.choice(k, size=n, p=p)
    blob = encode_id_map(idx, k)
    assert np.array_equal(id_map_to_index(blob, n, k), idx)


@FUZZ
@given(k=st.integers(1, 8), n=st.integers(1, 500), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_corrupted_id_map_is_refused_or_consistent(k, n, seed, data):
    """Random edits of an id map: ``ValueError``, or a map that still places every row once."""
    rng = np.random.default_rng(seed)
    blob = encode_id_map(rng.integers(0, k, size=n), k).copy()
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    for pos, value in edits:
        blob[pos] = value
    cut = data.draw(st.integers(0, 3))
    blob = blob[: len(blob) - cut] if cut else blob
    assume(len(blob) > 0)
    try:
        kinds, sets = decode_id_map(blob, n, k)
        index = id_map_to_index(blob, n, k)
    except ValueError:
        return
    assert index.shape == (n,) and index.min() >= 0 and index.max() < k
    assert sum(s.count for s in sets.values()) <= n
