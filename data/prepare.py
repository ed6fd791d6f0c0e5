"""Streaming preprocessing of raw files (Criteo, Avazu or a schema file's) into parquet splits,
vocabularies and counts.

Two passes over the input, both streamed block by block with pyarrow (``data.reader``). The
input is one file, several files read as one stream in order (Criteo 1TB ``day_0`` ...
``day_23``), or pre-split train / val / test files (BARS / FuxiCTR ``train.csv``, ``valid.csv``,
``test.csv``):

1. count every distinct raw value of every source column over the whole input (the train
   files only for pre-split input: values unseen in train map to OOV) (per-block
   dictionary encoding + ``np.bincount``, merged with Arrow ``group_by``), then build each
   field's vocabulary: categories seen fewer than ``min_count`` times share the field's OOV
   id 0 (Criteo integer fields and a schema's bucketed numeric columns are never OOV), kept
   categories get ids 1..K by count descending, ties by value (byte order). The same pass
   counts the time column of a ``--split time`` by a schema's ``time`` (its cut points) and
   samples every ``quantile:N`` column (``data.buckets.QuantileSample``; its cut points are
   the quantiles of the sampled training rows);
2. encode every block (vectorised lookups of 64-bit string keys with ``np.searchsorted``),
   assign each row to train / val / test (``SplitAssigner``: random, time, by-file, or the
   file's own split) and append it to the split's parquet file.

Output directory: the contract the rest of the toolkit reads, described and validated in
``data.manifest`` (split parquet files, ``vocab.parquet``, ``frequency.npy``, ``manifest.json``).

The output is built in a hidden sibling directory and renamed into place when complete. A
second run with the same input files (each one's path, size, mtime, in order) and parameters
reuses it.

CLI: ``python -m data.prepare --dataset criteo --input train.txt --out prepared/criteo``;
``--input 'day_*.gz' --split by-file``; ``--train train.csv --val valid.csv --test test.csv``.
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
from collections.abc import Callable, Mapping, Sequence
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
from data.buckets import QuantileSample, bucket_function
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
from data.reader import (
    DEFAULT_BLOCK_SIZE,
    ON_BAD_ROWS,
    CountBlock,
    MultiReader,
    RawBlock,
    RawFormatError,
    RawReader,
    expand_inputs,
    open_reader,
)
from data.resources import check_disk
from data.schema import DatasetSchema, dataset_argument, get_schema
from data.transforms import (
    DATETIME_FIELDS,
    PRESPLIT,
    SPLIT_METHODS,
    SPLIT_NAMES,
    TRAIN,
    avazu_hour_bad,
    by_file_split,
    integer_values,
    random_split,
    random_split_codes,
    string_keys,
    time_split,
    time_split_sizes,
    time_value_cuts,
    time_value_split,
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


def _unknown_cuts(text: pa.Array) -> pa.Array:
    raise RuntimeError("the quantile cut points are only known after the counting pass")


def field_plans(schema: DatasetSchema, boundaries: Mapping[str, np.ndarray] | None = None) -> list[FieldPlan]:
    """The derivation of every field of ``schema.fields``, in order.

    ``boundaries``: the cut points of every ``quantile:N`` column (known after the counting
    pass; without them those fields' ``categories`` cannot be called yet).
    """
    plans: list[FieldPlan] = []
    for feature in schema.features:
        c = feature.column
        if feature.kind == "categorical":
            plans.append(FieldPlan(c, c, None, True))
        elif feature.kind == "datetime":
            parts = DATETIME_FIELDS[feature.time_format]
            plans.extend(FieldPlan(n, c, lambda t, n=n, parts=parts: parts(t)[n], True) for n in feature.parts)
        elif feature.bucket == "quantile" and (boundaries is None or c not in boundaries):
            plans.append(FieldPlan(c, c, _unknown_cuts, False))
        else:
            fn = bucket_function(feature.bucket, feature.dtype == "int", (boundaries or {}).get(c))
            plans.append(FieldPlan(c, c, fn, fn is None))  # "none": the value itself, min_count applies
    if [p.name for p in plans] != list(schema.fields):
        raise ValueError(f"{schema.name}: the fields {[p.name for p in plans]} differ from the schema's {schema.fields}")
    return plans


def source_columns(plans: Sequence[FieldPlan]) -> list[str]:
    """The raw columns the fields are computed from, in first-use order."""
    return list(dict.fromkeys(p.source for p in plans))


def _validators(schema: DatasetSchema, columns: Sequence[str]) -> dict[str, tuple[Callable, str]] | None:
    """Extra value checks of the columns read: YYMMDDHH datetimes (Avazu's ``hour``)."""
    checks = {f.column: _HOUR_CHECK for f in schema.features
              if f.kind == "datetime" and f.time_format == "yymmddhh" and f.column in columns}
    return checks or None


def _time_column(schema: DatasetSchema, split: str) -> str | None:
    """The column a ``time`` split cuts by (None: the input order)."""
    return schema.time_column if split == "time" else None


def _read_columns(schema: DatasetSchema, sources: Sequence[str], time_column: str | None) -> list[str]:
    return list(dict.fromkeys([schema.label, *sources, *([time_column] if time_column else [])]))


def make_reader(
    schema: DatasetSchema,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    on_bad_rows: str = "error",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> RawReader | MultiReader:
    """The reader both passes use: label + source columns, label required, Avazu hour checked.

    One path gives a ``RawReader`` (``ParquetReader`` for a parquet schema); a sequence of
    paths a ``MultiReader`` (one stream, in order, every file's layout checked first).
    """
    columns = [schema.label, *source_columns(field_plans(schema))]
    kw = dict(on_bad_rows=on_bad_rows, block_size=block_size, columns=columns, require_label=True,
              validators=_validators(schema, columns))
    if isinstance(path, str | os.PathLike):
        return open_reader(path, schema, **kw)
    return MultiReader(path, schema, **kw)


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


def count_pass(reader: RawReader | MultiReader, sources: Sequence[str], progress: bool = True,
               on_block: Callable[[CountBlock], None] | None = None) -> dict[str, pa.Table]:
    """Pass 1: ``{column: table(value, count)}`` over every good row of the file; ``on_block``
    also sees every block (the quantile samples)."""
    counters = {c: ValueCounter() for c in sources}
    bar = _progress(f"{reader.schema.name} 1/2 counting", reader.size, progress)
    with bar:
        for block in reader.iter_counts():
            for c in sources:
                values, counts = block.counts[c]
                counters[c].add(values, counts)
            if on_block is not None:
                on_block(block)
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

    def __init__(self, raw_values: pa.Array, raw_ids: np.ndarray, strict: bool, name: str, exact_unseen: bool = False):
        self.name = name
        self.strict = strict  # every value must be found (fields that are never OOV)
        raw_ids = np.asarray(raw_ids, dtype=np.int32)
        keys = string_keys(raw_values)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        self.values: pa.Array | None = None
        self.key_values: pa.Array | None = None  # the raw value of each key (exact_unseen)
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
            if exact_unseen:
                self.key_values = raw_values.take(pa.array(order[keep])).cast(pa.string())

    def __call__(self, dictionary: pa.Array, used: np.ndarray | None = None, unseen: bool = False) -> np.ndarray:
        """int32 ids of the values of ``dictionary`` (0 for values not in the vocabulary).

        ``used``: the indices into ``dictionary`` that rows refer to; a strict lookup raises
        if one of those values is unknown (the file changed between the two passes).
        ``unseen``: the values may be ones the lookup was not built from (pre-split val / test
        files): no strict check, and a 64-bit key match is confirmed on the value itself
        (the lookup needs ``exact_unseen``).
        """
        out, found = self.find(dictionary, unseen)
        if self.strict and not unseen and not found.all():
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

    def find(self, dictionary: pa.Array, unseen: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(int32 ids, found mask)`` of the values of ``dictionary`` (see ``__call__``)."""
        if self.values is not None:
            pos = pc.index_in(dictionary, value_set=self.values)
            found = pos.is_valid().to_numpy(zero_copy_only=False)
            p = pc.fill_null(pos, 0).to_numpy(zero_copy_only=False)
            out = np.where(found, self.ids[p] if len(self.ids) else 0, 0).astype(np.int32)
            return out, found
        if len(self.keys) == 0:
            return np.zeros(len(dictionary), dtype=np.int32), np.zeros(len(dictionary), dtype=bool)
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
        if unseen and found.any():
            # a value the keys were not checked against may share a key with a kept one
            if self.key_values is None:
                raise RuntimeError(f"field {self.name}: lookup built without exact_unseen")
            hit = np.flatnonzero(found)
            same = pc.equal(dictionary.take(pa.array(hit)).cast(pa.string()), self.key_values.take(pa.array(p[hit])))
            found[hit] = same.to_numpy(zero_copy_only=False)
        return np.where(found, self.ids[p], 0).astype(np.int32), found


@dataclass
class Vocabulary:
    """One field's vocabulary: kept categories with ids 1..K, plus the OOV count."""

    field: str
    values: pa.Array  # utf8, in id order (id = position + 1)
    counts: np.ndarray  # int64
    oov_count: int
    lookup: Lookup
    categories: Callable[[pa.Array], pa.Array] | None = None  # the field's FieldPlan.categories

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1

    def ids(self, dictionary: pa.Array, used: np.ndarray | None = None, unseen: bool = False) -> np.ndarray:
        """Local ids of the raw values of ``dictionary``.

        ``unseen``: the values may not have been counted (pre-split val / test files). A raw
        value the vocabulary was not built from gets its category's id when the category was
        kept (a Criteo integer in a known bucket, an Avazu hour on a known weekday), else the
        OOV id 0.
        """
        if not unseen:
            return self.lookup(dictionary, used)
        out, found = self.lookup.find(dictionary, unseen=True)
        if self.categories is not None and not found.all():
            wanted = ~found
            if used is not None:  # not the values of skipped rows, which need not parse
                referred = np.zeros(len(dictionary), dtype=bool)
                referred[used] = True
                wanted &= referred
            miss = np.flatnonzero(wanted)
            cats = self.categories(dictionary.take(pa.array(miss)))
            pos = pc.index_in(cats, value_set=self.values)
            out[miss] = pc.fill_null(pos, -1).to_numpy(zero_copy_only=False) + 1
        return out


def build_vocabulary(plan: FieldPlan, raw: pa.Table, min_count: int, unseen: bool = False) -> Vocabulary:
    """Fold rare categories into OOV, order the rest, and build the raw-value lookup.

    ``unseen``: the lookup will also meet values that were not counted (pre-split files).
    """
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
    lookup = Lookup(raw_values, raw_ids, strict=not plan.min_count_applies, name=plan.name, exact_unseen=unseen)
    return Vocabulary(plan.name, kept_values, kept["count"].to_numpy(), oov_count, lookup, plan.categories)


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


class SplitAssigner:
    """The split (0 train, 1 val, 2 test) of every row of a block.

    ``random``: a hash of the row's index in the concatenated input and the seed (8:1:1);
    ``time``: first 80% / next 10% / last 10% of the concatenation, or, with a time column,
    of the rows in time order (``time_cuts``, see ``data.transforms.time_value_cuts``);
    ``by-file``: every file but the last is train, the last one's first half val, its second
    half test; ``pre-split``: the split of the row's file (``file_splits``).
    """

    def __init__(
        self,
        method: str,
        seed: int = 0,
        total_rows: int | None = None,
        file_rows: Sequence[int] | None = None,
        file_splits: Sequence[str] | None = None,
        time_column: str | None = None,
        time_cuts: tuple[int, int] | None = None,
    ):
        if method not in (*SPLIT_METHODS, PRESPLIT):
            raise ValueError(f"split must be one of {(*SPLIT_METHODS, PRESPLIT)}, got {method!r}")
        if (time_column is None) != (time_cuts is None) or (time_column is not None and method != "time"):
            raise ValueError("a time column and its cut points go together, with the time split")
        self.method = method
        self.seed = int(seed)
        self.total_rows = total_rows
        self.file_rows = list(file_rows or [])
        self.codes = [SPLIT_NAMES.index(r) for r in file_splits] if file_splits is not None else []
        self.time_column = time_column
        self.time_cuts = time_cuts

    def train_mask(self, rows: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Which rows (global indices, with their times when the split cuts by a time column)
        are training rows; for pre-split input every counted row is (the train files)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.method == PRESPLIT:
            return np.ones(len(rows), dtype=bool)
        if self.method == "random":
            return random_split_codes(rows, self.seed) == TRAIN
        if self.method == "time":
            if self.time_cuts is not None:
                return np.asarray(times, dtype=np.int64) < self.time_cuts[0]
            assert self.total_rows is not None
            return rows < time_split_sizes(self.total_rows)[0]
        return rows < int(sum(self.file_rows[:-1]))

    def unseen(self, block: RawBlock) -> bool:
        """Whether the block's values may be missing from the vocabulary (a pre-split val / test file)."""
        return self.method == PRESPLIT and self.codes[block.file_index] != 0

    def __call__(self, block: RawBlock) -> np.ndarray:
        n = block.num_rows
        if self.method == PRESPLIT:
            return np.full(n, self.codes[block.file_index], dtype=np.int8)
        assert self.total_rows is not None
        if block.first_row + n > self.total_rows:
            raise RuntimeError("the input has more rows than in the counting pass; it changed while being prepared")
        if self.method == "random":
            return random_split(block.first_row, n, self.seed)
        if self.method == "time" and self.time_cuts is not None:
            col = block.batch.column(self.time_column)
            times = integer_values(col.dictionary)[col.indices.to_numpy(zero_copy_only=False)]
            return time_value_split(times, self.time_cuts)
        if self.method == "time":
            return time_split(block.first_row, n, self.total_rows)
        return by_file_split(block.first_row, n, self.file_rows)


@dataclass
class _SplitStats:
    rows: np.ndarray  # [3]
    clicks: np.ndarray  # [3]
    frequency: np.ndarray  # train counts per global id


def encode_pass(
    reader: RawReader | MultiReader,
    schema: DatasetSchema,
    plans: Sequence[FieldPlan],
    vocabs: Sequence[Vocabulary],
    offsets: np.ndarray,
    assign: SplitAssigner,
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
                _encode_block(block, schema, plans, vocabs, offsets, assign, pa_schema, writer, stats)
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
    assign: SplitAssigner,
    pa_schema: pa.Schema,
    writer: _SplitWriter,
    stats: _SplitStats,
) -> None:
    batch = block.batch
    codes = assign(block)
    unseen = assign.unseen(block)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(4))
    label_dict, label_idx = _column_ids(batch.column(schema.label))
    label = pc.equal(label_dict, "1").to_numpy(zero_copy_only=False).astype(np.int8)[label_idx][order]
    columns = [label]
    train_lo, train_hi = int(bounds[0]), int(bounds[1])
    for f, (plan, vocab) in enumerate(zip(plans, vocabs, strict=True)):
        dictionary, idx = _column_ids(batch.column(plan.source))
        dict_ids = vocab.ids(dictionary, idx, unseen=unseen)
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
# inputs: one file, several files in order, or pre-split train / val / test files
# ---------------------------------------------------------------------------------------------
InputSpec = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any]


@dataclass(frozen=True)
class Inputs:
    """The raw files of one run, in reading order.

    Attributes:
        files: every file (globs expanded); pre-split input lists train, then val, then test files.
        splits: per file its split ('train', 'val', 'test') for pre-split input, else None.
    """

    files: tuple[Path, ...]
    splits: tuple[str, ...] | None = None

    @property
    def presplit(self) -> bool:
        return self.splits is not None

    def indices(self, split: str) -> list[int]:
        """Positions in ``files`` of the files of ``split`` (pre-split input)."""
        return [i for i, s in enumerate(self.splits or ()) if s == split]

    def describe(self) -> str:
        """``day_0`` or ``day_0 .. day_23 (24 files)``."""
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.files[0]} .. {self.files[-1].name} ({len(self.files)} files)"


def input_files(spec: InputSpec, what: str = "--input") -> Inputs:
    """Turn ``prepare``'s ``input_path`` into ``Inputs``.

    ``spec``: a path or glob, a sequence of paths / globs (read as one stream, in the given
    order; each glob sorted naturally, ``day_2`` before ``day_10``), or a mapping with exactly
    the keys ``train``, ``val`` and ``test``, each a path, glob or sequence (pre-split files).
    """
    if isinstance(spec, Mapping):
        if set(spec) != set(SPLIT_NAMES) or not all(spec[k] for k in SPLIT_NAMES):
            missing = [f"--{k}" for k in SPLIT_NAMES if not spec.get(k)]
            extra = sorted(set(spec) - set(SPLIT_NAMES))
            raise ValueError(
                "pre-split input needs all three of --train, --val and --test"
                + (f": {', '.join(missing)} missing" if missing else "")
                + (f" (unknown keys {extra})" if extra else "")
            )
        files: list[Path] = []
        splits: list[str] = []
        seen: dict[Path, str] = {}
        for name in SPLIT_NAMES:
            for f in expand_inputs(spec[name], f"--{name}"):
                key = f.resolve()
                if key in seen:
                    raise ValueError(f"{f} is given as both --{seen[key]} and --{name}; a file belongs to one split")
                seen[key] = name
                files.append(f)
                splits.append(name)
        return Inputs(tuple(files), tuple(splits))
    return Inputs(tuple(expand_inputs(spec, what)))


def input_options(data: Sequence[str] | None, train: Sequence[str] | None, val: Sequence[str] | None,
                  test: Sequence[str] | None, data_flag: str = "--data") -> InputSpec | None:
    """The input a CLI was given: ``data`` (a list of paths / globs), ``{"train", "val", "test"}``
    (pre-split files) or None; ``ValueError`` when both kinds are given or only some of the three."""
    given = {name: list(v) for name, v in zip(SPLIT_NAMES, (train, val, test), strict=True) if v}
    if data and given:
        raise ValueError(
            f"{data_flag} and --train/--val/--test exclude each other: give {data_flag} FILE... (split by --split) "
            "or the three pre-split files --train F --val F --test F"
        )
    if given and len(given) < 3:
        missing = [f"--{n}" for n in SPLIT_NAMES if n not in given]
        raise ValueError(f"--train, --val and --test go together: {' and '.join(missing)} missing")
    if given:
        return given
    return list(data) if data else None


def resolve_split(split: str | None, inputs: Inputs) -> str:
    """The split method of a run: ``PRESPLIT`` for pre-split files, else ``split`` (default random)."""
    if inputs.presplit:
        if split not in (None, PRESPLIT):
            raise ValueError(
                f"--split {split} does not apply to --train/--val/--test: every row stays in its file's split"
            )
        return PRESPLIT
    split = "random" if split is None else split
    if split not in SPLIT_METHODS:
        raise ValueError(f"split must be one of {SPLIT_METHODS}, got {split!r}")
    if split == "by-file" and len(inputs.files) < 2:
        raise ValueError(
            f"--split by-file needs at least 2 input files (all but the last are train, the last is cut "
            f"into val and test halves); got 1: {inputs.files[0]}"
        )
    return split


# ---------------------------------------------------------------------------------------------
# reuse of a previous output
# ---------------------------------------------------------------------------------------------
_IDENTITY_KEYS = ("path", "size", "mtime_ns", "split")


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _input_identity(inputs: Inputs) -> list[dict[str, Any]]:
    """Every input file's identity (path, size, mtime; its split for pre-split input), in order."""
    out = []
    for i, path in enumerate(inputs.files):
        ident = _file_identity(path)
        if inputs.splits is not None:
            ident["split"] = inputs.splits[i]
        out.append(ident)
    return out


def _stored_identity(manifest: dict) -> list[dict[str, Any]] | None:
    stored = manifest.get("inputs")
    if stored is None and isinstance(manifest.get("input"), dict):
        stored = [manifest["input"]]  # written before several inputs existed: one file
    if not isinstance(stored, list) or not all(isinstance(e, dict) for e in stored):
        return None
    return [{k: e[k] for k in _IDENTITY_KEYS if k in e} for e in stored]


def _reusable(out: Path, dataset: str, identity: list[dict], params: dict) -> dict | None:
    if not (out / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except ArtifactError as e:
        print(f"data.prepare: existing output is not usable ({e}); recomputing", file=sys.stderr)
        return None
    if manifest.get("dataset") == dataset and _stored_identity(manifest) == identity and manifest.get("params") == params:
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
    dataset: str | DatasetSchema,
    input_path: InputSpec,
    out_dir: str | os.PathLike,
    min_count: int = 2,
    split: str | None = None,
    seed: int = 2022,
    on_bad_rows: str = "error",
    progress: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, Any]:
    """Preprocess raw files of a dataset into ``out_dir``; returns the manifest dict.

    Args:
        dataset: ``"criteo"``, ``"avazu"``, the path of a schema file or a ``DatasetSchema``.
        input_path: the raw labeled file (plain or gzip/bz2/zstd-compressed); or several files
            or globs, read as one stream in the given order (every glob sorted naturally, all
            files of one layout); or pre-split files, ``{"train": F, "val": F, "test": F}``
            (each a path, glob or list), whose rows stay in their file's split.
        out_dir: output directory (replaced atomically; reused if inputs and params match).
        min_count: categories seen fewer times map to the field's OOV id 0; counted over every
            row of the input before the split, or over the train files only for pre-split input
            (the BARS convention; values unseen in train map to 0 too).
        split: ``"random"`` (8:1:1 by a hash of row index and seed, the default), ``"time"``
            (first 80% / 10% / 10% in input order, or in the order of the schema's ``time``
            column) or ``"by-file"`` (every file but the last is
            train, the last one's first half val, its second half test); for pre-split input
            None (or ``PRESPLIT``). Row indices run over the concatenation of the files.
        seed: seed of the random split.
        on_bad_rows: ``"error"`` stops at the first malformed row (``RawFormatError``);
            ``"skip"`` drops malformed rows and counts them in the manifest.
        progress: show tqdm progress bars (bytes read) for both passes.
        block_size: approximate bytes of parsed data per block (one parquet row group per block
            and split); memory use grows with it.
    """
    schema = get_schema(dataset)
    inputs = input_files(input_path)
    split = resolve_split(split, inputs)
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    out = Path(out_dir)
    for path in inputs.files:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory, expected a raw {schema.name} file")
    params = {"min_count": int(min_count), "split": split, "seed": int(seed), "on_bad_rows": on_bad_rows}
    if not schema.builtin:  # a changed schema file must not reuse an old output
        params["schema_sha256"] = schema.digest
    identity = _input_identity(inputs)
    reused = _reusable(out, schema.name, identity, params)
    if reused is not None:
        what = "input file" if len(inputs.files) == 1 else "input files"
        print(f"data.prepare: reusing {out} (same {what} and parameters)")
        return reused
    _check_replaceable(out)

    check_disk(out.parent if out.parent.exists() else Path.cwd(), sum(_output_bytes(p) for p in inputs.files),
               f"data.prepare of {inputs.describe()}")
    t0 = time.perf_counter()
    plans = field_plans(schema)
    sources = source_columns(plans)
    time_column = _time_column(schema, split)
    columns = _read_columns(schema, sources, time_column)
    quantiles = schema.quantile_columns
    # every file's layout is checked here, before any of them is read
    reader = MultiReader(
        list(inputs.files), schema, require_label=True, on_bad_rows=on_bad_rows, block_size=block_size,
        columns=columns, validators=_validators(schema, columns),
        row_columns=[*quantiles, *([time_column] if time_column and quantiles else [])],
    )
    counted = reader.subset(inputs.indices("train")) if inputs.presplit else reader
    samples = {c: QuantileSample(c, int(seed)) for c in quantiles}

    def sample(block: CountBlock) -> None:
        times = integer_values(block.rows[time_column]) if time_column and samples else None
        for c, s in samples.items():
            s.add(block.first_row, block.rows[c], times)

    counts = count_pass(counted, list(dict.fromkeys([*sources, *([time_column] if time_column else [])])), progress,
                        on_block=sample if samples else None)
    total = counted.rows
    counted_rows = list(counted.file_rows)
    counted_bad = [dict(r.bad_rows) for r in counted.readers]
    if total == 0:
        bad_rows = dict(sorted(counted.bad_rows.items()))
        what = "only a header line" if reader.layouts[0].header_lines and not bad_rows else "no usable rows"
        n = len(counted.paths)
        where = "the file holds" if n == 1 else f"the {n} {'train ' if inputs.presplit else ''}files hold"
        raise RawFormatError(
            counted.paths[0],
            f"no data rows: {where} {what}" + (f" (skipped: {bad_rows})" if bad_rows else ""),
        )
    cuts = None
    if time_column is not None:
        t = counts[time_column]
        cuts = time_value_cuts(integer_values(t["value"].combine_chunks()), t["count"].to_numpy(), total)
    assign = SplitAssigner(split, int(seed), total, counted_rows, inputs.splits,
                           time_column=time_column, time_cuts=cuts)
    boundaries = {c: samples[c].boundaries(schema.feature(c).quantiles, assign.train_mask) for c in quantiles}
    plans = field_plans(schema, boundaries)
    vocabs = [build_vocabulary(p, counts[p.source], int(min_count), unseen=inputs.presplit) for p in plans]
    del counts
    cards = np.array([v.cardinality for v in vocabs], dtype=np.int64)
    offsets = field_offsets(cards)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        stats = encode_pass(reader, schema, plans, vocabs, offsets, assign, tmp, progress)
        again = inputs.indices("train") if inputs.presplit else range(len(inputs.files))
        if (
            [reader.file_rows[i] for i in again] != counted_rows
            or [dict(reader.readers[i].bad_rows) for i in again] != counted_bad
            or _input_identity(inputs) != identity
        ):
            raise RuntimeError(f"{inputs.describe()}: the input changed while it was being prepared; run again")
        bad_rows = dict(sorted(reader.bad_rows.items()))
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
            "inputs": [dict(ident, rows=int(reader.file_rows[i])) for i, ident in enumerate(identity)],
            "rows": {**{s: int(stats.rows[i]) for i, s in enumerate(SPLIT_NAMES)}, "total": int(reader.rows)},
            "bad_rows": {"skipped": int(sum(bad_rows.values())), "by_reason": bad_rows},
            "click_rate": {
                s: (float(stats.clicks[i] / stats.rows[i]) if stats.rows[i] else None)
                for i, s in enumerate(SPLIT_NAMES)
            },
            "files": {name: sha256_file(tmp / name) for name in OUTPUT_FILES},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if not schema.builtin:  # the schema itself, and what its bucketing and time split learnt
            manifest["schema"] = schema.to_dict()
            manifest["schema_sha256"] = schema.digest
            if boundaries:
                manifest["quantile_cuts"] = {c: [float(b) for b in v] for c, v in boundaries.items()}
            if cuts is not None:
                manifest["time_split"] = {"column": time_column, "cuts": list(cuts)}
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
MIN_COUNT_HELP = (
    "categories seen fewer times map to the field's OOV id 0 (default 2); counted over every input row before "
    "the split (the MPE paper's convention), or over the train files only with --train/--val/--test (the BARS "
    "convention: values unseen in train map to 0 too). Criteo integer fields are bucketed and never OOV "
    "(with pre-split files, a bucket unseen in train is OOV)"
)
SPLIT_HELP = (
    "random: 8:1:1 by a hash of (row index, seed); time: first 80%% / next 10%% / last 10%% in input order (in "
    "the order of its time column for a schema file with a time key); "
    "by-file: every input file but the last is train, the last one's first half val, its second half test "
    "(Criteo 1TB: days 0-22 train, day 23 val + test; needs 2+ files). Row indices run over the files in "
    "order. Not with --train/--val/--test, whose rows keep their file's split (default random)"
)
INPUT_HELP = (
    "Several files (paths, or quoted globs such as 'day_*.gz', sorted naturally: day_2 before day_10) are read "
    "as one stream in the given order; all must have the same layout"
)


def add_presplit_arguments(group: argparse._ActionsContainer) -> None:
    """``--train/--val/--test FILE...``: pre-split files (BARS / FuxiCTR train.csv, valid.csv, test.csv)."""
    group.add_argument(
        "--train", nargs="+", metavar="FILE", default=None,
        help="pre-split input (with --val and --test, instead of the single data input): the train file(s), e.g. "
        "BARS / FuxiCTR Criteo_x4 or Avazu_x4 train.csv (paths or globs). The vocabulary and the --min-count cut "
        "are counted on the train files only (the BARS convention; the MPE paper counts over all the data); "
        "every row stays in its file's split",
    )
    group.add_argument("--val", nargs="+", metavar="FILE", default=None,
                       help="pre-split input: the validation file(s), e.g. valid.csv; values unseen in train map "
                       "to the field's OOV id 0")
    group.add_argument("--test", nargs="+", metavar="FILE", default=None,
                       help="pre-split input: the test file(s), e.g. test.csv; values unseen in train map to the "
                       "field's OOV id 0")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.prepare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=(
            "Preprocess raw Criteo (train.txt / day_N, TSV, 40 columns; or a CSV with the header "
            "Label,I1,...,C26 as BARS Criteo_x4) or Avazu (train, CSV with header) files, or the CSV / TSV / "
            "parquet files a schema file describes (--dataset my.toml), into parquet splits + "
            "vocabularies + train-split feature counts. The input is streamed in two passes (count, then "
            "encode); gzip / bz2 / zstd input is detected from its magic bytes. " + INPUT_HELP + ". Pre-split train / val / test files "
            "go to --train/--val/--test."
        ),
        epilog=(
            "output: OUT/{train,val,test}.parquet (label int8 + one int32 local-id column per field), "
            "OUT/vocab.parquet (field, value, id, count), OUT/frequency.npy (train counts per global id), "
            "OUT/manifest.json (cardinalities, offsets, params, every input file's identity and rows, row counts, "
            "checksums). A second run with the same inputs and parameters reuses OUT. "
            "Exit status 2 on malformed input or a missing file."
        ),
    )
    p.add_argument("--dataset", required=True, type=dataset_argument, metavar="criteo|avazu|SCHEMA",
                   help="raw file format: criteo, avazu, or the path of a schema file (.toml or .json; README, "
                   "'Your own data')")
    p.add_argument("--input", nargs="+", metavar="FILE", default=None,
                   help="the raw labeled file(s) (plain or compressed); several files or globs in order")
    add_presplit_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    p.add_argument("--min-count", type=int, default=2, help=MIN_COUNT_HELP)
    p.add_argument("--split", choices=SPLIT_METHODS, default=None, help=SPLIT_HELP)
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
        spec = input_options(args.input, args.train, args.val, args.test, "--input")
        if spec is None:
            raise ValueError("no input: give --input FILE... or the pre-split --train F --val F --test F")
        manifest = prepare(
            args.dataset,
            spec,
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
    files = len(manifest.get("inputs", [None]))
    print(
        f"{manifest['dataset']}: {rows['total']:,} rows"
        + (f" from {files} files" if files > 1 else "")
        + f" (train {rows['train']:,} / val {rows['val']:,} / "
        f"test {rows['test']:,}), {manifest['num_features']:,} features in {len(manifest['fields'])} fields, "
        f"skipped {manifest['bad_rows']['skipped']:,} bad rows -> {args.out} ({manifest['seconds']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
