"""Streaming preprocessing of a raw Criteo / Avazu file into parquet splits, vocabularies and counts.

Two passes over the file, both streamed block by block with pyarrow (``data.reader``):

1. count every distinct raw value of every source column over the whole file (per-block
   dictionary encoding + ``np.bincount``, merged with Arrow ``group_by``), then build each
   field's vocabulary: categories seen fewer than ``min_count`` times share the field's OOV
   id 0 (Criteo integer fields are bucketed and never OOV), kept categories get ids 1..K by
   count descending, ties by value (byte order);
2. encode every block (vectorised lookups of 64-bit string keys with ``np.searchsorted``),
   assign each row to train / val / test and append it to the split's parquet file.

Output directory: the contract the rest of the toolkit reads, described and validated in
``data.manifest`` (split parquet files, ``vocab.parquet``, ``frequency.npy``, ``manifest.json``).

The output is built in a hidden sibling directory and renamed into place when complete. A
second run with the same input file (path, size, mtime) and parameters reuses it.

CLI: ``python -m data.prepare --dataset criteo --input train.txt --out prepared/criteo``.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from data.artifacts import (
    ArtifactError,
    atomic_write_json,
    atomic_write_npy,
    replace_dir,
    seal_json,
    sha256_file,
)
from data.layout import field_offsets
from data.manifest import (
    FREQUENCY_FILE,
    MANIFEST_DIGEST,
    MANIFEST_FILE,
    OUTPUT_FILES,
    SCHEMA_VERSION,
    VOCAB_FILE,
    load_manifest,
    split_file,
)
from data.reader import DEFAULT_BLOCK_SIZE, ON_BAD_ROWS, RawBlock, RawFormatError, RawReader
from data.resources import check_disk
from data.schema import AVAZU_TIME_FIELDS, CRITEO, SCHEMAS, DatasetSchema, get_schema
from data.transforms import (
    SPLIT_METHODS,
    SPLIT_NAMES,
    avazu_hour_bad,
    avazu_hour_fields,
    criteo_int_categories,
    random_split,
    string_keys,
    time_split,
)

OOV_VALUE = "<OOV>"
_SORTED_QUERIES_ABOVE = 1 << 16
_HOUR_CHECK = (avazu_hour_bad, "an hour as YYMMDDHH (e.g. 14102100)")


# ---------------------------------------------------------------------------------------------
# fields: which raw column each model field comes from and how its categories are made
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldPlan:
    """How one model field is derived from one raw column.

    Attributes:
        name: the model field (one of ``schema.fields``).
        source: the raw column it is computed from.
        categories: raw distinct values (utf8 array) -> category strings (same length).
        min_count_applies: False for fields whose categories are never folded into OOV.
    """

    name: str
    source: str
    categories: Callable[[pa.Array], pa.Array] | None
    min_count_applies: bool


def field_plans(schema: DatasetSchema) -> list[FieldPlan]:
    """The derivation of every field of ``schema.fields``, in order."""
    plans: list[FieldPlan] = []
    for name in schema.fields:
        if schema.name == CRITEO.name and name in schema.integer_columns:
            plans.append(FieldPlan(name, name, criteo_int_categories, False))
        elif name in AVAZU_TIME_FIELDS:
            plans.append(FieldPlan(name, "hour", lambda t, n=name: avazu_hour_fields(t)[n], True))
        elif name in schema.categorical_columns:
            plans.append(FieldPlan(name, name, None, True))
        else:
            raise ValueError(f"{schema.name}: no rule derives field {name!r}")
    return plans


def source_columns(plans: Sequence[FieldPlan]) -> list[str]:
    """The raw columns the fields are computed from, in first-use order."""
    return list(dict.fromkeys(p.source for p in plans))


def make_reader(
    schema: DatasetSchema,
    path: str | os.PathLike,
    on_bad_rows: str = "error",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> RawReader:
    """The ``RawReader`` both passes use: label + source columns, label required, Avazu hour checked."""
    sources = source_columns(field_plans(schema))
    return RawReader(
        path,
        schema,
        on_bad_rows=on_bad_rows,
        block_size=block_size,
        columns=[schema.label, *sources],
        require_label=True,
        validators={"hour": _HOUR_CHECK} if "hour" in sources else None,
    )


# ---------------------------------------------------------------------------------------------
# pass 1: counting
# ---------------------------------------------------------------------------------------------
class ValueCounter:
    """Counts of the distinct values of one column, accumulated block by block in Arrow."""

    def __init__(self, merge_at: int = 1 << 18):
        self._pending: list[pa.Table] = []
        self._pending_len = 0
        self._merged: pa.Table | None = None
        self._merge_at = merge_at

    def add(self, dictionary: pa.Array, counts: np.ndarray) -> None:
        """Add ``counts[i]`` occurrences of ``dictionary[i]`` (distinct values)."""
        keep = counts > 0
        if not keep.all():
            dictionary = dictionary.filter(pa.array(keep))
            counts = counts[keep]
        self._pending.append(pa.table({"value": dictionary, "count": pa.array(counts, pa.int64())}))
        self._pending_len += len(counts)
        merged_len = 0 if self._merged is None else self._merged.num_rows
        if self._pending_len > max(self._merge_at, merged_len):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._merged] if self._merged is not None else []) + self._pending
        self._pending, self._pending_len = [], 0
        if not parts:
            return
        table = pa.concat_tables(parts)
        if len(parts) > 1:
            agg = table.group_by("value", use_threads=False).aggregate([("count", "sum")])
            table = pa.table({"value": agg["value"], "count": agg["count_sum"]})
        self._merged = table.combine_chunks()

    def result(self) -> pa.Table:
        """Table ``value`` (utf8, distinct), ``count`` (int64) over everything added."""
        self._merge()
        if self._merged is None:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        return self._merged


def _progress(desc: str, total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def _column_ids(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(dictionary, int32 indices) of a dictionary-encoded column chunk."""
    return col.dictionary, col.indices.to_numpy(zero_copy_only=False)


def count_pass(reader: RawReader, sources: Sequence[str], progress: bool = True) -> dict[str, pa.Table]:
    """Pass 1: ``{column: table(value, count)}`` over every good row of the file."""
    counters = {c: ValueCounter() for c in sources}
    bar = _progress(f"{reader.schema.name} 1/2 counting", reader.size, progress)
    with bar:
        for block in reader.iter_counts():
            for c in sources:
                values, counts = block.counts[c]
                counters[c].add(values, counts)
            bar.update(reader.bytes_read - bar.n)
        bar.update(reader.size - bar.n)
    return {c: counters[c].result() for c in sources}


# ---------------------------------------------------------------------------------------------
# vocabularies and lookups
# ---------------------------------------------------------------------------------------------
class Lookup:
    """Maps raw values of one column to one field's local ids (0 = OOV), vectorised.

    Built from every distinct raw value of the column: their 64-bit ``string_keys`` are checked
    to be collision-free (so a lookup of any value of the same file is exact), then sorted for
    ``np.searchsorted``. On a collision it falls back to ``pc.index_in``.
    """

    def __init__(self, raw_values: pa.Array, raw_ids: np.ndarray, strict: bool, name: str):
        self.name = name
        self.strict = strict  # every value must be found (fields that are never OOV)
        raw_ids = np.asarray(raw_ids, dtype=np.int32)
        keys = string_keys(raw_values)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        self.values: pa.Array | None = None
        if len(sorted_keys) > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            keep = raw_ids > 0
            self.values = raw_values.filter(pa.array(keep))
            self.ids = raw_ids[keep]
            self.keys = np.zeros(0, dtype=np.uint64)
        else:
            sorted_ids = raw_ids[order]
            keep = sorted_ids > 0
            self.keys = sorted_keys[keep]
            self.ids = sorted_ids[keep]

    def __call__(self, dictionary: pa.Array, used: np.ndarray | None = None) -> np.ndarray:
        """int32 ids of the values of ``dictionary`` (0 for values not in the vocabulary).

        ``used``: the indices into ``dictionary`` that rows refer to; a strict lookup raises
        if one of those values is unknown (the file changed between the two passes).
        """
        if self.values is not None:
            pos = pc.index_in(dictionary, value_set=self.values)
            found = pos.is_valid().to_numpy(zero_copy_only=False)
            p = pc.fill_null(pos, 0).to_numpy(zero_copy_only=False)
            out = np.where(found, self.ids[p] if len(self.ids) else 0, 0).astype(np.int32)
        elif len(self.keys) == 0:
            found = np.zeros(len(dictionary), dtype=bool)
            out = np.zeros(len(dictionary), dtype=np.int32)
        else:
            k = string_keys(dictionary)
            if len(self.keys) > _SORTED_QUERIES_ABOVE and len(k) > 1024:
                # sorted queries walk the big key array in order: ~2x fewer cache misses
                order = np.argsort(k)
                p = np.empty(len(k), dtype=np.intp)
                p[order] = np.searchsorted(self.keys, k[order])
            else:
                p = np.searchsorted(self.keys, k)
            p = np.minimum(p, len(self.keys) - 1)
            found = self.keys[p] == k
            out = np.where(found, self.ids[p], 0).astype(np.int32)
        if self.strict and not found.all():
            unknown = np.flatnonzero(~found)
            if used is not None:
                unknown = np.intersect1d(unknown, used)
            if len(unknown):
                bad = dictionary[int(unknown[0])].as_py()
                raise RuntimeError(
                    f"field {self.name}: value {bad!r} was not seen in the counting pass; "
                    "the input file changed while it was being prepared"
                )
        return out


@dataclass
class Vocabulary:
    """One field's vocabulary: kept categories with ids 1..K, plus the OOV count."""

    field: str
    values: pa.Array  # utf8, in id order (id = position + 1)
    counts: np.ndarray  # int64
    oov_count: int
    lookup: Lookup

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1


def build_vocabulary(plan: FieldPlan, raw: pa.Table, min_count: int) -> Vocabulary:
    """Fold rare categories into OOV, order the rest, and build the raw-value lookup."""
    raw_values = raw["value"].combine_chunks()
    raw_counts = raw["count"].combine_chunks()
    cats = raw_values if plan.categories is None else plan.categories(raw_values)
    if plan.categories is None:
        table = pa.table({"value": raw_values, "count": raw_counts})
    else:
        agg = pa.table({"value": cats, "count": raw_counts}).group_by("value", use_threads=False).aggregate(
            [("count", "sum")]
        )
        table = pa.table({"value": agg["value"], "count": agg["count_sum"]})
    counts = table["count"].to_numpy()
    keep = counts >= min_count if plan.min_count_applies else np.ones(len(counts), dtype=bool)
    kept = table.filter(pa.array(keep)).sort_by([("count", "descending"), ("value", "ascending")])
    kept_values = kept["value"].combine_chunks()
    oov_count = int(counts[~keep].sum())
    if plan.categories is None:
        # raw values are the categories: id = rank among kept values
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("value", "ascending")]).to_numpy()
        order = order[keep[order]]
        raw_ids = np.zeros(len(counts), dtype=np.int32)
        raw_ids[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    else:
        pos = pc.index_in(cats, value_set=kept_values)
        raw_ids = (pc.fill_null(pos, -1).to_numpy(zero_copy_only=False) + 1).astype(np.int32)
    lookup = Lookup(raw_values, raw_ids, strict=not plan.min_count_applies, name=plan.name)
    return Vocabulary(plan.name, kept_values, kept["count"].to_numpy(), oov_count, lookup)


def vocab_table(vocabs: Sequence[Vocabulary]) -> pa.Table:
    """The ``vocab.parquet`` table: per field an ``<OOV>`` row (id 0), then ids 1..K."""
    parts = []
    for v in vocabs:
        k = len(v.values)
        parts.append(
            pa.table(
                {
                    "field": pa.array([v.field] * (k + 1), pa.string()),
                    "value": pa.concat_arrays([pa.array([OOV_VALUE], pa.string()), v.values.cast(pa.string())]),
                    "id": pa.array(np.arange(k + 1, dtype=np.int32)),
                    "count": pa.array(np.concatenate([[v.oov_count], v.counts]).astype(np.int64)),
                }
            )
        )
    return pa.concat_tables(parts)


# ---------------------------------------------------------------------------------------------
# pass 2: encoding and writing
# ---------------------------------------------------------------------------------------------
def split_schema(fields: Sequence[str]) -> pa.Schema:
    """Arrow schema of ``train/val/test.parquet``."""
    return pa.schema([("label", pa.int8())] + [(f, pa.int32()) for f in fields])


@dataclass
class _SplitStats:
    rows: np.ndarray  # [3]
    clicks: np.ndarray  # [3]
    frequency: np.ndarray  # train counts per global id


def encode_pass(
    reader: RawReader,
    schema: DatasetSchema,
    plans: Sequence[FieldPlan],
    vocabs: Sequence[Vocabulary],
    offsets: np.ndarray,
    split: str,
    seed: int,
    total_rows: int,
    out_dir: Path,
    progress: bool = True,
) -> _SplitStats:
    """Pass 2: encode every block and append its rows to the split files in ``out_dir``."""
    fields = [p.name for p in plans]
    pa_schema = split_schema(fields)
    num_features = int(offsets[-1] + vocabs[-1].cardinality) if vocabs else 0
    stats = _SplitStats(np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(num_features, np.int64))
    writer = _SplitWriter([out_dir / split_file(name) for name in SPLIT_NAMES], pa_schema)
    bar = _progress(f"{schema.name} 2/2 encoding", reader.size, progress)
    try:
        with bar:
            for block in reader:
                _encode_block(block, schema, plans, vocabs, offsets, split, seed, total_rows, pa_schema, writer, stats)
                bar.update(reader.bytes_read - bar.n)
            bar.update(reader.size - bar.n)
    finally:
        writer.close()
    return stats


class _SplitWriter:
    """Appends row groups to the split files from a background thread (writing releases the GIL)."""

    def __init__(self, paths: Sequence[Path], schema: pa.Schema, depth: int = 6):
        self._writers = [pq.ParquetWriter(p, schema) for p in paths]
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="split-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            split, table = item
            try:
                self._writers[split].write_table(table, row_group_size=max(1, table.num_rows))
            except BaseException as e:  # reported to the producer
                self._error = e

    def write(self, split: int, table: pa.Table) -> None:
        """Queue ``table`` as one row group of split ``split``."""
        if self._error is not None:
            raise self._error
        self._queue.put((split, table))

    def close(self) -> None:
        """Flush, close the files and re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        for w in self._writers:
            w.close()
        if self._error is not None:
            raise self._error


def _encode_block(
    block: RawBlock,
    schema: DatasetSchema,
    plans: Sequence[FieldPlan],
    vocabs: Sequence[Vocabulary],
    offsets: np.ndarray,
    split: str,
    seed: int,
    total_rows: int,
    pa_schema: pa.Schema,
    writer: _SplitWriter,
    stats: _SplitStats,
) -> None:
    batch, n = block.batch, block.num_rows
    if block.first_row + n > total_rows:
        raise RuntimeError("the input file has more rows than in the counting pass; it changed while being prepared")
    codes = random_split(block.first_row, n, seed) if split == "random" else time_split(block.first_row, n, total_rows)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(4))
    label_dict, label_idx = _column_ids(batch.column(schema.label))
    label = pc.equal(label_dict, "1").to_numpy(zero_copy_only=False).astype(np.int8)[label_idx][order]
    columns = [label]
    train_lo, train_hi = int(bounds[0]), int(bounds[1])
    for f, (plan, vocab) in enumerate(zip(plans, vocabs, strict=True)):
        dictionary, idx = _column_ids(batch.column(plan.source))
        dict_ids = vocab.lookup(dictionary, idx)
        columns.append(dict_ids[idx[order]])
        if train_hi > train_lo:
            counts = np.bincount(idx[order[train_lo:train_hi]], minlength=len(dictionary))
            nz = np.flatnonzero(counts)
            np.add.at(stats.frequency, offsets[f] + dict_ids[nz], counts[nz])
    for s in range(3):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        if hi == lo:
            continue
        table = pa.Table.from_arrays([pa.array(c[lo:hi]) for c in columns], schema=pa_schema)
        writer.write(s, table)
        stats.rows[s] += hi - lo
        stats.clicks[s] += int(label[lo:hi].sum())


# ---------------------------------------------------------------------------------------------
# reuse of a previous output
# ---------------------------------------------------------------------------------------------
def _input_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _reusable(out: Path, dataset: str, identity: dict, params: dict) -> dict | None:
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except ArtifactError as e:
        print(f"data.prepare: existing output is not usable ({e}); recomputing", file=sys.stderr)
        return None
    if manifest.get("dataset") == dataset and manifest.get("input") == identity and manifest.get("params") == params:
        return manifest
    return None


def _output_bytes(path: Path) -> int:
    """A generous estimate of the prepared directory's size: the parquet splits hold about a
    quarter of a plain-text input's bytes (49 B per Criteo row), compressed inputs expand."""
    size = path.stat().st_size
    return int(size * (0.5 if path.suffix not in (".gz", ".bz2", ".zst", ".xz") else 2.0))


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out}: exists, is not empty and holds no data.prepare output; refusing to replace it")


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------
def prepare(
    dataset: str,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_count: int = 2,
    split: str = "random",
    seed: int = 2022,
    on_bad_rows: str = "error",
    progress: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, Any]:
    """Preprocess a raw Criteo / Avazu file into ``out_dir``; returns the manifest dict.

    Args:
        dataset: ``"criteo"`` or ``"avazu"``.
        input_path: the raw labeled train file (plain or gzip/bz2/zstd-compressed).
        out_dir: output directory (replaced atomically; reused if input and params match).
        min_count: categories seen fewer times over the whole file map to the field's OOV id 0.
        split: ``"random"`` (8:1:1 by a hash of row index and seed) or ``"time"`` (file order).
        seed: seed of the random split.
        on_bad_rows: ``"error"`` stops at the first malformed row (``RawFormatError``);
            ``"skip"`` drops malformed rows and counts them in the manifest.
        progress: show tqdm progress bars (bytes read) for both passes.
        block_size: approximate bytes of parsed data per block (one parquet row group per block
            and split); memory use grows with it.
    """
    schema = get_schema(dataset)
    if split not in SPLIT_METHODS:
        raise ValueError(f"split must be one of {SPLIT_METHODS}, got {split!r}")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    path = Path(input_path)
    out = Path(out_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a raw {schema.name} file")
    params = {"min_count": int(min_count), "split": split, "seed": int(seed), "on_bad_rows": on_bad_rows}
    identity = _input_identity(path)
    reused = _reusable(out, schema.name, identity, params)
    if reused is not None:
        print(f"data.prepare: reusing {out} (same input file and parameters)")
        return reused
    _check_replaceable(out)

    check_disk(out.parent if out.parent.exists() else Path.cwd(), _output_bytes(path), f"data.prepare of {path}")
    t0 = time.perf_counter()
    plans = field_plans(schema)
    sources = source_columns(plans)
    reader = make_reader(schema, path, on_bad_rows=on_bad_rows, block_size=block_size)
    counts = count_pass(reader, sources, progress)
    total = reader.rows
    bad_rows = dict(sorted(reader.bad_rows.items()))
    if total == 0:
        what = "only a header line" if schema.has_header and not bad_rows else "no usable rows"
        raise RawFormatError(path, f"no data rows: the file holds {what}" + (f" (skipped: {bad_rows})" if bad_rows else ""))
    vocabs = [build_vocabulary(p, counts[p.source], int(min_count)) for p in plans]
    del counts
    cards = np.array([v.cardinality for v in vocabs], dtype=np.int64)
    offsets = field_offsets(cards)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        stats = encode_pass(reader, schema, plans, vocabs, offsets, split, int(seed), total, tmp, progress)
        if reader.rows != total or dict(sorted(reader.bad_rows.items())) != bad_rows:
            raise RuntimeError(f"{path}: the file changed while it was being prepared; run again")
        if _input_identity(path) != identity:
            raise RuntimeError(f"{path}: the file changed while it was being prepared; run again")
        pq.write_table(vocab_table(vocabs), tmp / VOCAB_FILE)
        atomic_write_npy(tmp / FREQUENCY_FILE, stats.frequency)
        manifest: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "dataset": schema.name,
            "fields": [p.name for p in plans],
            "cardinalities": [int(c) for c in cards],
            "field_offsets": [int(o) for o in offsets],
            "num_features": int(cards.sum()),
            "params": params,
            "input": identity,
            "rows": {**{s: int(stats.rows[i]) for i, s in enumerate(SPLIT_NAMES)}, "total": int(total)},
            "bad_rows": {"skipped": int(sum(bad_rows.values())), "by_reason": bad_rows},
            "click_rate": {
                s: (float(stats.clicks[i] / stats.rows[i]) if stats.rows[i] else None)
                for i, s in enumerate(SPLIT_NAMES)
            },
            "files": {name: sha256_file(tmp / name) for name in OUTPUT_FILES},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        manifest = seal_json(manifest, MANIFEST_DIGEST)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.prepare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=(
            "Preprocess a raw Criteo (train.txt / day_N, TSV, 40 columns) or Avazu (train, CSV with "
            "header) file into parquet splits + vocabularies + train-split feature counts. "
            "The file is streamed in two passes (count, then encode); gzip input is detected "
            "from its magic bytes."
        ),
        epilog=(
            "output: OUT/{train,val,test}.parquet (label int8 + one int32 local-id column per field), "
            "OUT/vocab.parquet (field, value, id, count), OUT/frequency.npy (train counts per global id), "
            "OUT/manifest.json (cardinalities, offsets, params, row counts, checksums). "
            "A second run with the same input and parameters reuses OUT. "
            "Exit status 2 on malformed input or a missing file."
        ),
    )
    p.add_argument("--dataset", required=True, choices=list(SCHEMAS), help="raw file format")
    p.add_argument("--input", required=True, metavar="FILE", help="the raw labeled train file (plain or gzip)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument(
        "--min-count",
        type=int,
        default=2,
        help="categories seen fewer times (whole file, before the split) map to the field's OOV id 0; "
        "Criteo integer fields are bucketed and never OOV (default 2)",
    )
    p.add_argument(
        "--split",
        choices=SPLIT_METHODS,
        default="random",
        help="random: 8:1:1 by a hash of (row index, seed); time: first 80%% / next 10%% / last 10%% "
        "in file order (default random)",
    )
    p.add_argument("--seed", type=int, default=2022, help="seed of the random split (default 2022)")
    p.add_argument(
        "--on-bad-rows",
        choices=ON_BAD_ROWS,
        default="error",
        help="error: stop at the first malformed row naming file, line and column; "
        "skip: drop malformed rows and count them in the manifest (default error)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="BYTES",
        help="approximate bytes of parsed data handled per block; one parquet row group per block and "
        f"split (default {DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        manifest = prepare(
            args.dataset,
            args.input,
            args.out,
            min_count=args.min_count,
            split=args.split,
            seed=args.seed,
            on_bad_rows=args.on_bad_rows,
            progress=not args.no_progress,
            block_size=args.block_size,
        )
    except (RawFormatError, FileNotFoundError, IsADirectoryError, FileExistsError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rows = manifest["rows"]
    print(
        f"{manifest['dataset']}: {rows['total']:,} rows (train {rows['train']:,} / val {rows['val']:,} / "
        f"test {rows['test']:,}), {manifest['num_features']:,} features in {len(manifest['fields'])} fields, "
        f"skipped {manifest['bad_rows']['skipped']:,} bad rows -> {args.out} ({manifest['seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
