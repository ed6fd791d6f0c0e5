"""Streaming reader for raw files of a schema (Criteo, Avazu or a schema file's), with validation
that names file, line and column.

``RawReader`` parses a raw file block by block with pyarrow's streaming CSV reader
(``pyarrow.csv.open_csv``), reading every column as bytes, and yields each block as a
``RawBlock`` whose columns are dictionary-encoded (int32 indices into a small per-block
dictionary of distinct values). Validation runs on those per-block dictionaries, so its cost
grows with the number of distinct values, not with rows: UTF-8, integer columns, the label
(0 or 1), decimal columns and optional extra per-column checks. A row is located (file line, 1-based, counting
the Avazu header) only when a check fails.

Malformed input raises ``RawFormatError`` (``on_bad_rows="error"``) or is skipped and counted
by reason (``on_bad_rows="skip"``). Blank lines are skipped in both modes and counted as
``empty_line``. gzip, bz2 and zstd files are recognised by their magic bytes and decompressed
on the fly, whatever their name.

Besides the original layouts (Criteo TSV without header, Avazu CSV with header), a header row
naming the schema's columns in any order (case-insensitive, ``id`` optional for Avazu) is
accepted, and so is a comma-separated Criteo copy with the header ``Label,I1,...,C26`` (BARS /
FuxiCTR Criteo_x4; integers may be written as pandas floats, ``5.0``). For a schema read from a
file, a header that does not match names the columns it lacks, and the first rows are checked
against the schema's column types before anything is read (``_check_sample``). Parquet files
(``ParquetReader``) are read by column name and checked the same way, row by row.

``MultiReader`` reads several files of one layout (Criteo 1TB ``day_0`` ... ``day_23``) as one
stream, in order; ``expand_inputs`` turns paths and globs into that order (natural sort) and
``sniff_inputs`` checks every file's layout before anything is read.
"""

from __future__ import annotations

import atexit
import gc
import os
import queue
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.buckets import NUMBER_RE, parse_numbers
from data.schema import AVAZU, CRITEO, DatasetSchema

DEFAULT_BLOCK_SIZE = 8 << 20
# pyarrow's streaming CSV reader holds ~30-40 of its blocks in memory (read-ahead), so it
# parses at most this many bytes at a time; the reader joins its batches up to block_size.
PARSE_BLOCK_SIZE = 1 << 20
ON_BAD_ROWS = ("error", "skip")
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
_INT_RE = r"^-?[0-9]{1,18}$"
_FLOAT_INT_RE = r"^-?[0-9]{1,18}(\.0+)?$"  # "5.0": an integer as pandas writes it in a float column
_SNIFF_BYTES = 1 << 20
_SAMPLE_LINES = 200  # data lines a schema file's column types are checked on before any reading
_PARQUET_MAGIC = b"PAR1"

# A validator gets a block's distinct values of one column (a utf8 array) and returns a bool
# numpy mask of the bad ones, plus the phrase that completes "expected ..." in the message.
Validator = Callable[[pa.Array], np.ndarray]


class _RowHandler:
    """The invalid-row callback handed to pyarrow, tracked until pyarrow lets go of it.

    pyarrow's CSV streaming reader reads ahead on its own worker threads. When iteration stops
    early (a malformed row), the reader's last reference can be dropped by such a worker after
    the Python object is gone; the worker then takes the GIL to release this callback. If that
    happens while the interpreter is finalizing, the thread is torn down inside C++ code and the
    process aborts ("terminate called without an active exception", exit status 134) instead of
    exiting with the CLI's status. ``_release_handlers`` (at exit) waits for those releases.
    """

    __slots__ = ("fn", "finished", "undecodable", "__weakref__")

    def __init__(self, fn: Callable[[pacsv.InvalidRow], str]):
        self.fn = fn
        self.finished = False  # the iteration that used it is over
        self.undecodable = False  # pyarrow could not hand it a row (not UTF-8), see _quiet_undecodable_rows

    def __call__(self, row: pacsv.InvalidRow) -> str:
        return self.fn(row)


_HANDLERS: weakref.WeakSet[_RowHandler] = weakref.WeakSet()


def _quiet_undecodable_rows() -> Callable[[], None]:
    """Install an unraisable-exception hook for one iteration; returns the function that removes it.

    A line with the wrong number of columns that also holds bytes that are not UTF-8 never
    reaches the row handler: pyarrow fails to decode its text, prints "Exception ignored in
    <handler>" with a traceback and stops with a CSV parse error. The hook marks the handler
    instead (``RawReader._arrow_error`` then names the line) and leaves every other report to
    the previous hook.
    """
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.object, _RowHandler) and isinstance(unraisable.exc_value, UnicodeDecodeError):
            unraisable.object.undecodable = True
            return
        previous(unraisable)

    sys.unraisablehook = hook

    def remove() -> None:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous

    return remove


_PARSE_ROW_ERROR = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")


@atexit.register
def _release_handlers(timeout: float = 5.0) -> None:
    """Before the interpreter finalizes, let pyarrow's workers drop finished readers (see ``_RowHandler``)."""
    if not any(h.finished for h in list(_HANDLERS)):
        return
    gc.collect()
    deadline = time.monotonic() + timeout
    while any(h.finished for h in list(_HANDLERS)) and time.monotonic() < deadline:
        time.sleep(0.002)  # releases the GIL so the worker can release the handler


class RawFormatError(ValueError):
    """A raw input file is malformed; the message names the file, the line and the column.

    Attributes:
        path: the file.
        line: 1-based line number in the (decompressed) file, or None when not tied to a line.
        column: the column's name, or None.
        reason: short machine-readable reason (``bad_integer``, ``column_count``...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        message: str,
        line: int | None = None,
        column: str | None = None,
        reason: str = "format",
    ):
        self.path = Path(path)
        self.message = message
        self.line = line
        self.column = column
        self.reason = reason
        where = str(self.path.name)
        if line is not None:
            where += f":{line}"
        text = f"{where}: column {column}: {message}" if column else f"{where}: {message}"
        super().__init__(text)


def detect_compression(path: str | os.PathLike) -> str | None:
    """Compression of ``path`` from its magic bytes ('gzip', 'bz2', 'zstd'), or None for plain text."""
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, codec in _MAGIC.items():
        if head.startswith(magic):
            return codec
    return None


def open_raw(path: str | os.PathLike) -> tuple[pa.NativeFile, pa.NativeFile]:
    """Open ``path`` for reading: ``(raw_file, stream)``; the stream decompresses when needed.

    ``raw_file.tell()`` is the position in the file on disk (for progress bars).
    """
    codec = detect_compression(path)
    raw = pa.OSFile(str(path), "rb")
    if codec is None:
        return raw, raw
    if not pa.Codec.is_available(codec):
        raw.close()
        raise RawFormatError(path, f"file is {codec}-compressed and this pyarrow lacks the {codec} codec")
    return raw, pa.CompressedInputStream(raw, codec)


@dataclass(frozen=True)
class Layout:
    """What the first line says about a raw file.

    Attributes:
        labeled: whether the file carries the label column.
        columns: the file's columns in file order (the schema's names).
        compression: 'gzip', 'bz2', 'zstd' or None.
        delimiter: the field separator.
        header_lines: lines before the first row (1 for a header, else 0).
        float_integers: integer columns may be written as pandas floats ("5.0"), as in the
            CSV copies of Criteo with a header (BARS / FuxiCTR Criteo_x4).
        kind: ``text`` (CSV / TSV) or ``parquet`` (columns read by name; "lines" are rows).
    """

    labeled: bool
    columns: tuple[str, ...]
    compression: str | None
    delimiter: str
    header_lines: int
    float_integers: bool = False
    kind: str = "text"

    def same_as(self, other: Layout) -> bool:
        """Whether two files can be read as one stream (compression may differ)."""
        return (self.labeled, self.columns, self.delimiter, self.header_lines, self.float_integers, self.kind) == (
            other.labeled, other.columns, other.delimiter, other.header_lines, other.float_integers, other.kind
        )

    def describe(self, schema: DatasetSchema) -> str:
        """E.g. "a labeled criteo file (40 tab-separated columns, no header)"."""
        if self.kind == "parquet":
            what = f"a labeled {schema.name} parquet file" if self.labeled else f"an unlabeled {schema.name} parquet file"
            return f"{what} ({len(self.columns)} of its columns)"
        kind = {"\t": "tab-separated", ",": "comma-separated"}.get(self.delimiter, f"{self.delimiter!r}-separated")
        head = "with a header line" if self.header_lines else "no header"
        what = f"a labeled {schema.name} file" if self.labeled else f"an unlabeled {schema.name} test file"
        return f"{what} ({len(self.columns)} {kind} columns, {head})"


def _kaggle_csv_header(first: str) -> bool:
    """True for the header of the Kaggle CSV copies of Criteo: ``Id,Label,I1,...,C26``."""
    names = [n.strip().strip('"').lower() for n in first.split(",")]
    return names[:2] == ["id", "label"] and names[2:] == [c.lower() for c in CRITEO.columns[1:]]


def _header_names(first: str, delimiter: str) -> tuple[str, ...]:
    return tuple(n.strip().strip('"') for n in first.split(delimiter))


def _match_header(names: Sequence[str], schema: DatasetSchema) -> tuple[bool, tuple[str, ...]] | None:
    """``(labeled, columns in file order)`` when ``names`` are the schema's columns in any order
    (compared case-insensitively, the ``schema.drop`` columns optional), else None."""
    by_lower = {c.lower(): c for c in schema.columns}
    mapped = tuple(by_lower.get(n.lower(), "") for n in names)
    if "" in mapped or len(set(mapped)) != len(mapped):
        return None
    present = set(mapped)
    needed = set(schema.columns) - set(schema.drop)
    if present - set(schema.drop) == needed:
        return True, mapped
    if present - set(schema.drop) == needed - {schema.label}:
        return False, mapped
    return None


def _looks_like(first: str) -> str | None:
    tabs = first.split("\t")
    commas = first.split(",")
    if len(tabs) in (len(CRITEO.columns), len(CRITEO.test_columns)):
        return f"a Criteo file ({len(tabs)} tab-separated columns)"
    if commas[:2] == ["id", "click"] or commas[:2] == ["id", "hour"]:
        return "an Avazu file (CSV header 'id,click,hour,...')"
    if len(commas) in (len(AVAZU.columns), len(AVAZU.test_columns)):
        return f"an Avazu file ({len(commas)} comma-separated columns)"
    return None


def sniff_layout(path: str | os.PathLike, schema: DatasetSchema) -> Layout:
    """Check the start of ``path`` against ``schema``; return whether it is a train or test file.

    Raises ``RawFormatError`` for an empty file, a header that does not match (saying which
    dataset the file looks like, or which columns a schema file's header lacks) or a first line
    with the wrong number of columns. For a schema read from a file, the first rows are also
    checked against its column types (``_check_sample``); a parquet schema goes to
    ``sniff_parquet``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a raw {schema.name} file")
    if schema.file_type == "parquet":
        return sniff_parquet(path, schema)
    compression = detect_compression(path)
    raw, stream = open_raw(path)
    try:
        head = stream.read(_SNIFF_BYTES)
    except (OSError, pa.ArrowException) as e:
        raise RawFormatError(path, f"cannot read the {compression or 'plain'} stream ({e})") from None
    finally:
        stream.close()
        raw.close()
    if not head.strip():
        raise RawFormatError(path, "file is empty" if not head else "file holds only blank lines")
    if head.startswith(_PARQUET_MAGIC):
        raise RawFormatError(path, f"this is a parquet file, but {schema.name} is {schema.describe_format()}",
                             reason="wrong_format")
    lines = head.split(b"\n")
    layout = _sniff_text(path, schema, compression, lines)
    if not schema.builtin:
        _check_sample(path, schema, layout, lines if len(head) < _SNIFF_BYTES else lines[:-1])
    return layout


def _header_mismatch(path: Path, names: Sequence[str], schema: DatasetSchema) -> RawFormatError:
    """A schema file's header that does not match: which columns are missing or unknown."""
    given = {n.lower() for n in names}
    known = {c.lower() for c in schema.columns}
    missing = [c for c in schema.columns if c.lower() not in given and c not in schema.drop]
    unknown = [n for n in names if n.lower() not in known]
    dup = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
    if missing:
        text = f"the header has no column {', '.join(repr(c) for c in missing[:5])}, which the schema {schema.name} names"
        column = missing[0]
    elif unknown:
        text = (f"the header names {', '.join(repr(c) for c in unknown[:5])}, which the schema {schema.name} does "
                "not: add it to the schema (a feature, or under drop)")
        column = unknown[0]
    elif dup:
        text, column = f"the header names {dup[0]!r} twice", dup[0]
    else:
        text, column = f"the header does not match the schema {schema.name}", None
    return RawFormatError(path, text, line=1, column=column, reason="bad_header")


def _sniff_text(path: Path, schema: DatasetSchema, compression: str | None, lines: list[bytes]) -> Layout:
    if schema.has_header:
        first_b = lines[0].rstrip(b"\r")
        if first_b.startswith(b"\xef\xbb\xbf"):
            first_b = first_b[3:]
        first = first_b.decode("utf-8", errors="replace")
        names = _header_names(first, schema.delimiter)
        found = _match_header(names, schema)
        if found is not None:
            return Layout(found[0], found[1], compression, schema.delimiter, 1)
        if not schema.builtin:
            raise _header_mismatch(path, names, schema)
        other = _looks_like(first)
        if other and "Avazu" not in other:
            raise RawFormatError(
                path, f"this looks like {other}, not {schema.name}: use --dataset criteo", line=1,
                reason="wrong_dataset",
            )
        shown = first if len(first) <= 80 else first[:77] + "..."
        raise RawFormatError(
            path,
            f"header does not match {schema.name}: expected "
            f"'{schema.delimiter.join(schema.columns[:4])}{schema.delimiter}...' "
            f"({len(schema.columns)} columns), found '{shown}'",
            line=1,
            reason="bad_header",
        )
    first_line = lines[0].rstrip(b"\r").removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")
    if not schema.builtin:
        # a header line in a file the schema says has none: fine when it names the columns
        found = _match_header(_header_names(first_line, schema.delimiter), schema)
        if found is not None:
            return Layout(found[0], found[1], compression, schema.delimiter, 1)
    if "," in first_line and "\t" not in first_line:
        # a CSV copy with a header (BARS / FuxiCTR Criteo_x4: 'Label,I1,...,I13,C1,...,C26'), whose
        # integers may be written as pandas floats
        found = _match_header(_header_names(first_line, ","), schema)
        if found is not None:
            return Layout(found[0], found[1], compression, ",", 1, float_integers=True)
    if schema.builtin and schema.name == CRITEO.name and _kaggle_csv_header(first_line):
        raise RawFormatError(
            path,
            "this is the Kaggle CSV copy of Criteo (comma-separated, header 'Id,Label,I1,...,C26'), not "
            "the original train.txt (tab-separated, no header, no Id): convert it with "
            f"`tail -n +2 {path.name} | cut -d, -f2- | tr ',' '\\t' > train.txt` (Criteo values hold no "
            "commas) and pass train.txt",
            line=1,
            reason="kaggle_csv",
        )
    # No header (Criteo): the first non-blank line decides between train (40) and test (39).
    for number, line_b in enumerate(lines[:-1] if len(lines) > 1 else lines, start=1):
        line_b = line_b.rstrip(b"\r")
        if not line_b:
            continue
        line = line_b.decode("utf-8", errors="replace")
        n = len(line.split(schema.delimiter))
        if n == len(schema.columns):
            return Layout(True, schema.columns, compression, schema.delimiter, 0)
        if n == len(schema.test_columns):
            return Layout(False, schema.test_columns, compression, schema.delimiter, 0)
        other = _looks_like(line) if schema.builtin else None
        if other and schema.name.capitalize() not in other:
            raise RawFormatError(
                path, f"this looks like {other}, not {schema.name}: use --dataset avazu", line=number,
                reason="wrong_dataset",
            )
        # Let the row-level checks report (or skip) it with the right column.
        return Layout(True, schema.columns, compression, schema.delimiter, 0)
    return Layout(True, schema.columns, compression, schema.delimiter, 0)


def _value_ok(schema: DatasetSchema, column: str, value: str, float_integers: bool) -> bool:
    """Whether one value fits the type the schema gives its column (the row-level rule)."""
    if column == schema.label:
        return value in ("0", "1")
    if value == "" and column in schema.nullable_columns:
        return True
    if column in schema.integer_columns:
        return re.match(_FLOAT_INT_RE if float_integers else _INT_RE, value) is not None
    if column in schema.float_columns:
        return re.match(NUMBER_RE, value) is not None
    return True


def _check_sample(path: Path, schema: DatasetSchema, layout: Layout, lines: list[bytes]) -> None:
    """A schema file that misreads the file's columns is an error before any reading: the label
    holding no 0/1, or a numeric / datetime column holding no number, in the first rows.

    A column that does hold valid values there is left to the row-level checks (so
    ``--on-bad-rows skip`` still skips the odd bad row).
    """
    rows: list[tuple[int, list[str]]] = []
    for number, line_b in enumerate(lines[layout.header_lines:], start=layout.header_lines + 1):
        line_b = line_b.rstrip(b"\r")
        parts = line_b.decode("utf-8", errors="replace").split(layout.delimiter)
        if line_b and len(parts) == len(layout.columns):
            rows.append((number, parts))
        if len(rows) >= _SAMPLE_LINES:
            break
    typed = [c for c in layout.columns if c == schema.label or c in schema.integer_columns or c in schema.float_columns]
    for column in typed:
        j = layout.columns.index(column)
        seen = [(number, parts[j]) for number, parts in rows if parts[j] != ""]
        if not seen or any(_value_ok(schema, column, v, layout.float_integers) for _, v in seen):
            continue
        number, value = seen[0]
        if column == schema.label:
            text = f"the label must be 0 or 1, found {_describe(value.encode())} (and no 0 or 1 in the first {len(rows)} rows)"
        else:
            feature = schema.feature(column)
            if feature is not None and feature.kind == "numeric":
                what = f"a number ({feature.dtype}, bucket {feature.bucketing})"
            elif feature is not None:
                what = f"a {feature.time_format} datetime (an integer)"
            else:
                what = "an integer time (the schema's time column)"
            text = (f"the schema {schema.name} reads this column as {what}, but it holds text: "
                    f"{_describe(value.encode())} (no valid value in the first {len(rows)} rows); make it a "
                    "categorical feature or fix the schema")
        raise RawFormatError(path, text, line=number, column=column, reason="schema_mismatch")


def sniff_parquet(path: str | os.PathLike, schema: DatasetSchema) -> Layout:
    """The ``Layout`` of a parquet file: its columns must include the schema's (read by name;
    other columns are ignored) and their types must fit the schema (a number for a numeric
    column or the label, not a string)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != _PARQUET_MAGIC:
            raise RawFormatError(path, f"not a parquet file, but the schema {schema.name} says parquet",
                                 reason="wrong_format")
        arrow_schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise RawFormatError(path, f"cannot read the parquet file ({e})") from None
    present = {n: arrow_schema.field(n).type for n in arrow_schema.names}
    missing = [c for c in schema.columns if c not in present and c not in schema.drop and c != schema.label]
    if missing:
        raise RawFormatError(path, f"the file has no column {', '.join(repr(c) for c in missing[:5])}, which the "
                             f"schema {schema.name} names", column=missing[0], reason="missing_column")
    for column in schema.columns:
        if column not in present:
            continue
        t = present[column]
        if pa.types.is_dictionary(t):
            t = t.value_type
        textual = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
        numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        if column == schema.label and not numeric:
            raise RawFormatError(path, f"the label must be 0 or 1, but the column's type is {t}", column=column,
                                 reason="schema_mismatch")
        if (column in schema.integer_columns or column in schema.float_columns) and textual:
            raise RawFormatError(path, f"the schema {schema.name} reads this column as a number, but its type is "
                                 f"{t}; make it a categorical feature or fix the schema", column=column,
                                 reason="schema_mismatch")
    columns = tuple(c for c in schema.columns if c in present and c not in schema.drop)
    return Layout(schema.label in present, columns, None, "", 0, kind="parquet")


@dataclass
class RawBlock:
    """One validated block of rows.

    Attributes:
        batch: dictionary-encoded columns (int32 indices, utf8 dictionary), bad rows removed.
        first_row: index of the block's first row among all good rows of the file (0-based;
            of the concatenation for a ``MultiReader``).
        file_index: which input file of a ``MultiReader`` the block comes from.
    """

    batch: pa.RecordBatch
    first_row: int
    file_index: int = 0  # which input file (``MultiReader``)

    @property
    def num_rows(self) -> int:
        return self.batch.num_rows


@dataclass
class CountBlock:
    """One validated block as counts: ``{column: (distinct utf8 values, int64 counts)}``.

    Values may include entries with count 0 (from skipped rows).
    """

    counts: dict[str, tuple[pa.Array, np.ndarray]]
    first_row: int
    num_rows: int
    file_index: int = 0
    rows: dict[str, pa.Array] = field(default_factory=dict)  # the ``row_columns``' values, row by row


def _maybe_blank(values: Sequence[pa.Array]) -> bool:
    """Whether every column has an empty value (only then can a block hold blank lines)."""
    for v in values:
        pos = pc.index(v, "").as_py()
        if pos is None or pos < 0:
            return False
    return True


@dataclass
class _BadRow:
    line: int
    column: str | None
    message: str
    reason: str


@dataclass
class _Invalid:
    """Rows the CSV parser rejected (wrong column count), recorded by the handler."""

    lines: list[int] = field(default_factory=list)  # sorted: the parser runs in file order
    first: _BadRow | None = None
    count: int = 0


def _column_count_message(columns: Sequence[str], actual: int, delimiter: str) -> tuple[str, str]:
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"
    expected = len(columns)
    if actual < expected:
        col = columns[actual] if actual < expected else columns[-1]
        return col, f"line ends early: expected {expected} {kind} columns, found {actual}"
    return (
        f"{expected + 1} (after {columns[-1]})",
        f"too many columns: expected {expected} {kind} columns, found {actual}",
    )


def _describe(value: bytes, limit: int = 40) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return repr(value[:limit])
    if text == "":
        return "an empty value"
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _combine(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _prefetch(it: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Run ``it`` in a background thread (parsing releases the GIL), ``depth`` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, name="raw-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        t.join()


class RawReader:
    """Iterate over a raw Criteo / Avazu file as validated, dictionary-encoded blocks.

    Args:
        path: the raw file (plain, gzip, bz2 or zstd).
        schema: the dataset's ``DatasetSchema``.
        on_bad_rows: ``"error"`` raises ``RawFormatError`` at the first malformed row;
            ``"skip"`` drops malformed rows and counts them in ``bad_rows`` by reason.
        block_size: approximate bytes of parsed data per yielded block (pyarrow parses
            ``PARSE_BLOCK_SIZE`` at a time; its batches are joined up to this size).
        columns: columns to decode and yield (default: every column but ``schema.drop``).
        require_label: raise ``RawFormatError`` if the file is the unlabeled test file.
        validators: extra checks, ``{column: (fn, expected)}``; ``fn(distinct_values)`` returns a
            bool mask of bad values, ``expected`` completes the message "expected ...".
        prefetch: parse the next block in a background thread while the caller works.
        layout: the file's ``Layout`` when already sniffed (``sniff_inputs``).
        row_columns: columns whose values ``iter_counts`` also hands over row by row
            (``CountBlock.rows``: quantile samples, a time column).

    After iteration, ``rows`` is the number of good rows and ``bad_rows`` the skipped rows by
    reason (``column_count``, ``not_utf8``, ``bad_label``, ``bad_integer``, ``bad_number``,
    ``bad_value``, ``empty_line``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        schema: DatasetSchema,
        *,
        on_bad_rows: str = "error",
        block_size: int = DEFAULT_BLOCK_SIZE,
        columns: Sequence[str] | None = None,
        require_label: bool = False,
        validators: dict[str, tuple[Validator, str]] | None = None,
        prefetch: bool = True,
        layout: Layout | None = None,
        row_columns: Sequence[str] = (),
    ):
        if on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
        if block_size < 1024:
            raise ValueError(f"block_size must be at least 1024 bytes, got {block_size}")
        self.path = Path(path)
        self.schema = schema
        self.on_bad_rows = on_bad_rows
        self.block_size = int(block_size)
        self.layout = layout if layout is not None else sniff_layout(self.path, schema)
        if require_label and not self.layout.labeled:
            raise RawFormatError(
                self.path,
                f"this is an unlabeled {schema.name} test file ({len(self.layout.columns)} columns, "
                f"no '{schema.label}' column); preprocessing needs the labeled train file (score a test file "
                "with a trained export: `python -m mpe.predict --export RUN/export --data FILE --out predictions.csv`)",
                line=1,
            )
        self.file_columns = self.layout.columns
        wanted = columns if columns is not None else [c for c in self.file_columns if c not in schema.drop]
        missing = [c for c in wanted if c not in self.file_columns]
        if missing:
            raise ValueError(f"columns {missing} are not in the {schema.name} file layout")
        self.columns: tuple[str, ...] = tuple(wanted)
        extra = [c for c in row_columns if c not in self.columns]
        if extra:
            raise ValueError(f"row_columns {extra} are not among the columns read")
        self.row_columns = tuple(row_columns)
        self.validators = dict(validators or {})
        self.prefetch = prefetch
        self.size = self.path.stat().st_size
        self.rows = 0
        self.bad_rows: dict[str, int] = {}
        self._parsed = 0  # rows the parser produced (good + bad-content + blank)
        self._invalid = _Invalid()
        self._raw: pa.NativeFile | None = None
        self._header_lines = self.layout.header_lines
        self.delimiter = self.layout.delimiter
        self._pool: ThreadPoolExecutor | None = None
        self._row_handler: _RowHandler | None = None

    # -- progress -----------------------------------------------------------------------------
    @property
    def bytes_read(self) -> int:
        """Bytes of the file on disk consumed so far (compressed bytes for compressed files)."""
        raw = self._raw
        if raw is None or raw.closed:
            return self.size if self._parsed else 0
        try:
            return min(int(raw.tell()), self.size)
        except (OSError, ValueError, pa.ArrowException):
            return 0

    # -- line bookkeeping ---------------------------------------------------------------------
    def _line_of(self, parsed_index: int) -> int:
        """1-based file line of the parser's row ``parsed_index`` (0-based, rejected rows excluded)."""
        line = self._header_lines + parsed_index + 1
        for bad in self._invalid.lines:
            if bad <= line:
                line += 1
            else:
                break
        return line

    def _handler(self, row: pacsv.InvalidRow) -> str:
        inv = self._invalid
        inv.count += 1
        if self.on_bad_rows == "error" and inv.first is None:
            col, msg = _column_count_message(self.file_columns, row.actual_columns, self.delimiter)
            number = row.number if row.number is not None else -1
            inv.first = _BadRow(number, col, msg, "column_count")
        if row.number is not None and self.on_bad_rows == "error":
            inv.lines.append(int(row.number))
        return "skip"

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self.bad_rows[reason] = self.bad_rows.get(reason, 0) + n

    def _raise(self, bad: _BadRow) -> None:
        raise RawFormatError(
            self.path, bad.message, line=bad.line if bad.line >= 0 else None, column=bad.column, reason=bad.reason
        )

    # -- iteration ----------------------------------------------------------------------------
    def _open(self) -> tuple[pa.NativeFile, pacsv.CSVStreamingReader]:
        raw, stream = open_raw(self.path)
        read_opts = pacsv.ReadOptions(
            block_size=min(self.block_size, PARSE_BLOCK_SIZE),
            use_threads=False,
            column_names=list(self.file_columns),
            skip_rows=self._header_lines,
        )
        handler = _RowHandler(self._handler)
        _HANDLERS.add(handler)
        self._row_handler = handler
        parse_opts = pacsv.ParseOptions(
            delimiter=self.delimiter,
            quote_char=False,
            ignore_empty_lines=False,
            invalid_row_handler=handler,
        )
        conv_opts = pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in self.file_columns},
            include_columns=list(self.columns),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        try:
            reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts, convert_options=conv_opts)
        except pa.ArrowInvalid as e:
            raw.close()
            handler.finished = True
            raise self._arrow_error(e) from None
        except OSError as e:
            raw.close()
            handler.finished = True
            raise RawFormatError(self.path, f"cannot read ({e})") from None
        return raw, reader

    def _arrow_error(self, e: Exception) -> RawFormatError:
        msg = str(e)
        if "straddling" in msg or "straddles" in msg:
            limit = min(self.block_size, PARSE_BLOCK_SIZE)
            hint = "; raise --block-size" if limit < PARSE_BLOCK_SIZE else ""
            return RawFormatError(self.path, f"a row is longer than the parser's block ({limit} bytes){hint}")
        row = _PARSE_ROW_ERROR.search(msg)
        if row is not None:  # a wrong-column-count line the handler never saw (not UTF-8)
            line, actual = int(row.group(1)), int(row.group(3))
            first = self._invalid.first
            if first is not None and 0 <= first.line < line:
                return RawFormatError(self.path, first.message, line=first.line, column=first.column, reason=first.reason)
            col, text = _column_count_message(self.file_columns, actual, self.delimiter)
            if self._row_handler is not None and self._row_handler.undecodable:
                text += "; the line also holds bytes that are not UTF-8"
                if self.on_bad_rows == "skip":
                    text += " (such a line cannot be skipped: remove or fix it)"
            return RawFormatError(self.path, text, line=line, column=col, reason="column_count")
        return RawFormatError(self.path, f"cannot parse: {msg.splitlines()[0] if msg else type(e).__name__}")

    def __iter__(self) -> Iterator[RawBlock]:
        """Validated blocks with dictionary-encoded columns (for encoding)."""
        return self._iterate("encode")  # type: ignore[return-value]

    def iter_counts(self) -> Iterator[CountBlock]:
        """Validated blocks as per-column distinct values and counts (for counting)."""
        return self._iterate("count")  # type: ignore[return-value]

    def _iterate(self, mode: str) -> Iterator[RawBlock | CountBlock]:
        self.rows = 0
        self.bad_rows = {}
        self._parsed = 0
        self._invalid = _Invalid()
        unhook = _quiet_undecodable_rows()
        try:
            raw, reader = self._open()
        except BaseException:
            unhook()
            raise
        self._raw = raw

        def parsed() -> Iterator[pa.RecordBatch]:
            while True:
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as e:
                    raise self._arrow_error(e) from None
                except OSError as e:
                    raise RawFormatError(self.path, f"cannot read ({e})") from None
                yield b

        def batches() -> Iterator[pa.RecordBatch]:
            # pyarrow's streaming reader buffers tens of its blocks ahead, so it parses small
            # blocks (PARSE_BLOCK_SIZE) and they are joined here into blocks of ~block_size.
            pending: list[pa.RecordBatch] = []
            size = 0
            for b in parsed():
                pending.append(b)
                size += b.nbytes
                if size >= self.block_size:
                    yield _combine(pending)
                    pending, size = [], 0
            if pending:
                yield _combine(pending)

        source = _prefetch(batches()) if self.prefetch else batches()
        if self.prefetch:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="raw-encode")
        try:
            for batch in source:
                block = self._validate(batch, mode)
                inv = self._invalid.first
                if inv is not None and (inv.line < 0 or inv.line <= self._line_of(self._parsed - 1)):
                    self._raise(inv)
                if block is not None and block.num_rows:
                    yield block
            if self._invalid.first is not None:
                self._raise(self._invalid.first)
            self._count("column_count", self._invalid.count)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            raw.close()
            unhook()
            if self._row_handler is not None:
                self._row_handler.finished = True
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _check_dictionary(self, name: str, dictionary: pa.Array) -> tuple[pa.Array, list[tuple[np.ndarray, str, str]]]:
        """Validate one column's distinct values: ``(utf8_dictionary, [(bad_mask, reason, expected)])``."""
        problems: list[tuple[np.ndarray, str, str]] = []
        try:
            text = dictionary.cast(pa.string())
        except pa.ArrowInvalid:
            values = dictionary.to_pylist()
            bad = np.zeros(len(values), dtype=bool)
            for i, v in enumerate(values):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
                    values[i] = b""
            text = pa.array(values, type=pa.binary()).cast(pa.string())
            problems.append((bad, "not_utf8", "UTF-8 text"))
        schema = self.schema
        if name == schema.label:
            bad = ~pc.or_(pc.equal(text, "0"), pc.equal(text, "1")).to_numpy(zero_copy_only=False)
            if bad.any():
                problems.append((bad, "bad_label", "0 or 1"))
        elif name in schema.integer_columns:
            ok = pc.match_substring_regex(text, _FLOAT_INT_RE if self.layout.float_integers else _INT_RE)
            if name in schema.nullable_columns:  # numeric columns (Criteo's integers) may be missing (empty)
                ok = pc.or_(ok, pc.equal(text, ""))
            bad = ~ok.to_numpy(zero_copy_only=False)
            if bad.any():
                problems.append((bad, "bad_integer", "an integer"))
        elif name in schema.float_columns:
            values, missing = parse_numbers(text)  # "1e400" overflows: not a number either
            bad = ~(pc.equal(text, "").to_numpy(zero_copy_only=False) | (~missing & np.isfinite(values)))
            if bad.any():
                problems.append((bad, "bad_number", "a number"))
        if name in self.validators:
            fn, expected = self.validators[name]
            bad = np.asarray(fn(text), dtype=bool)
            if bad.any():
                problems.append((bad, "bad_value", expected))
        return text, problems

    def _map(self, fn: Callable[[pa.Array], pa.Array], columns: Sequence[pa.Array]) -> list[pa.Array]:
        if self._pool is not None and len(columns[0]) >= 4096:
            return list(self._pool.map(fn, columns))
        return [fn(c) for c in columns]

    def _validate(self, batch: pa.RecordBatch, mode: str) -> RawBlock | CountBlock | None:
        n = batch.num_rows
        first_parsed = self._parsed
        self._parsed += n
        if n == 0:
            return None
        names = list(self.columns)
        if mode == "count":
            # fast path: distinct values and their counts; rows are only looked at on a problem
            vcs = self._map(pc.value_counts, batch.columns)
            values = [vc.field(0) for vc in vcs]
            checked = [self._check_dictionary(name, v) for name, v in zip(names, values, strict=True)]
            if not any(found for _, found in checked) and not _maybe_blank(values):
                block = CountBlock(
                    {
                        name: (text, vc.field(1).to_numpy(zero_copy_only=False))
                        for name, (text, _), vc in zip(names, checked, vcs, strict=True)
                    },
                    self.rows,
                    n,
                    rows={c: batch.column(c) for c in self.row_columns},
                )
                self.rows += n
                return block
        encoded: list[pa.DictionaryArray] = []
        # (column position, bad-value mask over the column's dictionary, raw dictionary, reason, expected)
        problems: list[tuple[int, np.ndarray, pa.Array, str, str]] = []
        dicts = self._map(pc.dictionary_encode, batch.columns)
        for j, name in enumerate(names):
            d = dicts[j]
            text, found = self._check_dictionary(name, d.dictionary)
            encoded.append(pa.DictionaryArray.from_arrays(d.indices, text))
            problems.extend((j, bad, d.dictionary, reason, expected) for bad, reason, expected in found)
        keep: np.ndarray | None = None
        if problems:
            # per row: index into ``problems`` of its first problem (column order), -1 if none
            row_bad = np.full(n, -1, dtype=np.int32)
            for k in range(len(problems) - 1, -1, -1):
                j, bad = problems[k][0], problems[k][1]
                row_bad[bad[encoded[j].indices.to_numpy(zero_copy_only=False)]] = k
            blank = self._blank_rows(encoded)
            if blank is not None:
                row_bad[blank] = -2
            if self.on_bad_rows == "error":
                real = np.flatnonzero(row_bad >= 0)
                if len(real):
                    i = int(real[0])
                    j, _, dictionary, reason, expected = problems[int(row_bad[i])]
                    value = dictionary[encoded[j].indices[i].as_py()].as_py()
                    line = self._line_of(first_parsed + i)
                    inv = self._invalid.first
                    if inv is not None and inv.line < line:
                        self._raise(inv)
                    self._raise(_BadRow(line, names[j], f"expected {expected}, found {_describe(value)}", reason))
            else:
                for k, (_, _, _, reason, _) in enumerate(problems):
                    self._count(reason, int(np.count_nonzero(row_bad == k)))
            self._count("empty_line", int(np.count_nonzero(row_bad == -2)))
            keep = row_bad == -1
        else:
            blank = self._blank_rows(encoded)
            if blank is not None:
                self._count("empty_line", int(np.count_nonzero(blank)))
                keep = ~blank
        batch = pa.RecordBatch.from_arrays(encoded, names=names)
        if keep is not None:
            batch = batch.filter(pa.array(keep))
        first = self.rows
        self.rows += batch.num_rows
        if mode == "count":
            counts = {}
            for name, col in zip(names, batch.columns, strict=True):
                c = np.bincount(col.indices.to_numpy(zero_copy_only=False), minlength=len(col.dictionary))
                counts[name] = (col.dictionary, c.astype(np.int64))
            return CountBlock(counts, first, batch.num_rows, rows={c: batch.column(c) for c in self.row_columns})
        return RawBlock(batch, first)

    @staticmethod
    def _blank_rows(encoded: list[pa.DictionaryArray]) -> np.ndarray | None:
        """Rows whose every column is empty (blank lines), or None when there are none."""
        empties = []
        for d in encoded:
            pos = pc.index(d.dictionary, "").as_py()
            if pos is None or pos < 0:
                return None
            empties.append(pos)
        mask: np.ndarray | None = None
        for d, pos in zip(encoded, empties, strict=True):
            m = d.indices.to_numpy(zero_copy_only=False) == pos
            mask = m if mask is None else (mask & m)
            if not mask.any():
                return None
        return mask


class ParquetReader(RawReader):
    """A parquet file read like a raw text file: every column as text, the same checks.

    Columns are read by name in batches of about ``block_size`` bytes and turned into text:
    integers and decimals as pyarrow writes them ("5", "0.25"), booleans as 0 / 1, timestamps
    as Unix seconds, nulls and NaN as the empty (missing) value. Error "lines" are row numbers
    (1-based).
    """

    _total_rows = 0

    @property
    def bytes_read(self) -> int:
        total = self._total_rows
        if not total:
            return self.size if self._parsed else 0
        return min(self.size, int(self.size * self._parsed / total))

    def _iterate(self, mode: str) -> Iterator[RawBlock | CountBlock]:
        self.rows = 0
        self.bad_rows = {}
        self._parsed = 0
        self._invalid = _Invalid()
        try:
            pf = pq.ParquetFile(str(self.path))
        except (OSError, pa.ArrowException) as e:
            raise RawFormatError(self.path, f"cannot read the parquet file ({e})") from None
        self._total_rows = pf.metadata.num_rows
        width = max(1, len(self.columns))
        batch_rows = max(1024, self.block_size // (16 * width))
        try:
            batches = pf.iter_batches(batch_size=batch_rows, columns=list(self.columns), use_threads=False)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (OSError, pa.ArrowException) as e:
                    raise RawFormatError(self.path, f"cannot read the parquet file ({e})") from None
                block = self._validate(_as_text(batch, self.columns), mode)
                if block is not None and block.num_rows:
                    yield block
        finally:
            pf.close()


def _as_text(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.RecordBatch:
    """Every column of a parquet batch as non-null text bytes (null / NaN -> ""), as the CSV reader reads."""
    out = []
    for name in columns:
        col = batch.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        t = col.type
        if pa.types.is_boolean(t):
            col = pc.cast(col, pa.int8())
        elif pa.types.is_timestamp(t):
            col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
        elif pa.types.is_floating(t):
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, t), col)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pc.cast(col, pa.string())
        out.append(pc.fill_null(col, "").cast(pa.binary()))  # as the CSV reader hands them over
    return pa.RecordBatch.from_arrays(out, names=list(columns))


def open_reader(path: str | os.PathLike, schema: DatasetSchema, **kw) -> RawReader:
    """The reader of one file of ``schema``'s format (``ParquetReader`` for parquet)."""
    return (ParquetReader if schema.file_type == "parquet" else RawReader)(path, schema, **kw)


# ---------------------------------------------------------------------------------------------
# several files read as one stream
# ---------------------------------------------------------------------------------------------
_GLOB_CHARS = re.compile(r"[*?\[]")


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that orders numbers by value: ``day_2`` before ``day_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def expand_inputs(patterns: str | os.PathLike | Sequence[str | os.PathLike], what: str = "--data") -> list[Path]:
    """Paths and globs -> files in order: each glob expanded and sorted naturally (day_2 < day_10).

    A path that exists is taken as it is, even if its name holds glob characters. Raises
    ``FileNotFoundError`` for a glob that matches nothing or a missing path and ``ValueError``
    for a file given twice.
    """
    import glob

    items = [patterns] if isinstance(patterns, str | os.PathLike) else list(patterns)
    if not items:
        raise ValueError(f"{what}: no input file given")
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if not os.path.exists(text) and _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(os.path.expanduser(text)), key=natural_key)
            if not matches:
                raise FileNotFoundError(f"{what} {text}: no file matches this pattern")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(os.path.expanduser(text)))
    seen: dict[Path, Path] = {}
    for p in out:
        key = p.resolve()
        if key in seen:
            raise ValueError(f"{what}: {p} is given twice (as {seen[key]} and {p}); each file is read once")
        seen[key] = p
    return out


def sniff_inputs(paths: Sequence[str | os.PathLike], schema: DatasetSchema) -> list[Layout]:
    """``sniff_layout`` of every file, all before any reading: they must share one layout.

    A file that looks like another dataset than the first, or whose layout (labeled or not,
    delimiter, header) differs from the first file's, raises ``RawFormatError`` naming both.
    """
    layouts: list[Layout] = []
    first: Path | None = None
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file")
        if p.is_dir():
            raise IsADirectoryError(f"{p}: is a directory, expected a raw {schema.name} file")
        try:
            layout = sniff_layout(p, schema)
        except RawFormatError as e:
            if first is None or e.reason not in ("wrong_dataset", "bad_header"):
                raise
            said = e.message.split(", not ")[0] if e.reason == "wrong_dataset" else e.message
            raise RawFormatError(
                p, f"{said}; but {first.name}, the first input file, is {layouts[0].describe(schema)}: "
                "all input files must have the same layout", line=e.line, reason="mixed_layout",
            ) from None
        if first is None:
            first = p
        elif not layout.same_as(layouts[0]):
            this, that = layout.describe(schema), layouts[0].describe(schema)
            if this == that and layout.columns != layouts[0].columns:
                this += " with its columns in another order"
            raise RawFormatError(
                p, f"this is {this}, but {first.name}, the first input file, is "
                f"{that}: all input files must have the same layout",
                line=1, reason="mixed_layout",
            )
        layouts.append(layout)
    return layouts


class MultiReader:
    """Several raw files of one layout read as one stream, in order, block by block.

    Every file is sniffed up front (``sniff_inputs``: same layout, label present when
    required) before any of them is read. Each file keeps its own ``RawReader``, so an error
    names that file and its own line. Blocks never straddle files; a block's ``first_row`` is
    its index in the concatenation and ``file_index`` says which file it comes from.

    After a full iteration: ``rows`` (all files), ``file_rows`` (per file) and ``bad_rows``
    (summed over files, by reason).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        schema: DatasetSchema,
        *,
        require_label: bool = False,
        layouts: Sequence[Layout] | None = None,
        **reader_kw,
    ):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no input files")
        self.schema = schema
        self.layouts = list(layouts) if layouts is not None else sniff_inputs(self.paths, schema)
        self._kw = dict(reader_kw, require_label=require_label)
        self.readers = [
            open_reader(p, schema, require_label=require_label, layout=lay, **reader_kw)
            for p, lay in zip(self.paths, self.layouts, strict=True)
        ]
        self.columns = self.readers[0].columns
        self.size = sum(r.size for r in self.readers)
        self.rows = 0
        self.file_rows: list[int] = [0] * len(self.readers)
        self.bad_rows: dict[str, int] = {}
        self._current = -1

    def subset(self, indices: Sequence[int]) -> MultiReader:
        """A reader over some of the files (same options; no second sniffing)."""
        return MultiReader(
            [self.paths[i] for i in indices], self.schema, layouts=[self.layouts[i] for i in indices], **self._kw
        )

    @property
    def bytes_read(self) -> int:
        """Bytes on disk consumed so far over all files (compressed bytes for compressed files)."""
        done = sum(r.size for r in self.readers[: max(self._current, 0)])
        if 0 <= self._current < len(self.readers):
            return done + self.readers[self._current].bytes_read
        return self.size if self._current >= len(self.readers) else 0

    def __iter__(self) -> Iterator[RawBlock]:
        return self._iterate("encode")  # type: ignore[return-value]

    def iter_counts(self) -> Iterator[CountBlock]:
        return self._iterate("count")  # type: ignore[return-value]

    def _iterate(self, mode: str) -> Iterator[RawBlock | CountBlock]:
        self.rows = 0
        self.file_rows = [0] * len(self.readers)
        self.bad_rows = {}
        offset = 0
        for i, reader in enumerate(self.readers):
            self._current = i
            for block in reader.iter_counts() if mode == "count" else reader:
                block.first_row += offset
                block.file_index = i
                yield block
            self.file_rows[i] = reader.rows
            offset += reader.rows
            for reason, n in reader.bad_rows.items():
                self.bad_rows[reason] = self.bad_rows.get(reason, 0) + n
        self.rows = offset
        self._current = len(self.readers)
