"""Dataset schemas: the one place that says what a raw file looks like and which fields it gives.

A schema is a small TOML or JSON file (the layout of FuxiCTR's dataset configs: a label column
and lists of feature columns, each list with a type). The Criteo and Avazu schemas are two
such files shipped in ``data/schemas/`` (``criteo.toml``, ``avazu.toml``); a user's own log is
a third (``data/schemas/example_clicks.toml`` is a worked example). Every reader,
preprocessor, generator and model takes a ``DatasetSchema``; nothing else spells out column
names. ``get_schema`` takes ``criteo``, ``avazu`` or the path of a schema file.

File format (README, "Your own data: a schema file")::

    name = "my_clicks"               # letters, digits, '_', '-', '.'; not criteo / avazu
    label = "clicked"                # the 0/1 column
    time = "ts"                      # optional: --split time cuts by this column's values
    drop = ["request_id"]            # optional: columns read but never features
    min_count = 2                    # optional (default 2): rarer categories share the OOV id
    [format]
    type = "csv"                     # csv | tsv | parquet
    header = true                    # csv / tsv: the first line names the columns
    separator = ","                  # csv / tsv (default "," / tab)
    columns = ["request_id", ...]    # file order; needed when header = false
    [[features]]
    columns = ["user", "ad"]
    type = "categorical"
    [[features]]
    columns = ["price"]
    type = "numeric"                 # dtype = "int" | "float" (default float)
    bucket = "log2"                  # log2 | ln_squared | quantile:N | none
    [[features]]
    columns = ["ts"]
    type = "datetime"                # format = "unix_seconds" | "yymmddhh"
    format = "unix_seconds"
    fields = ["hour_of_day", "weekday", "is_weekend"]
    [mpe]                            # optional MPE defaults of this dataset
    lambda = 3e-4                    # default 3e-4 (Criteo's)
    l2 = 0.0                         # default 0

A file that does not describe a usable dataset (a missing or unknown key, a column named in
two features, a label that is also a feature, a column no key uses...) raises ``SchemaError``
(a ``ValueError``) naming the file, the line where it can tell, and the key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

SCHEMA_DIR = Path(__file__).resolve().with_name("schemas")
EXAMPLE_SCHEMA = SCHEMA_DIR / "example_clicks.toml"
SCHEMA_SUFFIXES = (".toml", ".json")
FILE_TYPES = ("csv", "tsv", "parquet")
FEATURE_TYPES = ("categorical", "numeric", "datetime")
BUCKETINGS = ("log2", "ln_squared", "quantile:N", "none")
DTYPES = ("int", "float")
DATETIME_FORMATS = ("unix_seconds", "yymmddhh")
DATETIME_PARTS = ("hour_of_day", "weekday", "is_weekend")
DEFAULT_MIN_COUNT = 2
DEFAULT_MPE_LAMBDA = 3e-4  # a schema without [mpe] lambda: Criteo's (the paper's main setting)
DEFAULT_MPE_L2 = 0.0  # a schema without [mpe] l2: none, as the fp32 model
MAX_QUANTILES = 1 << 16
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOP_KEYS = ("name", "description", "label", "time", "drop", "min_count", "format", "features", "mpe", "reference")
_FORMAT_KEYS = ("type", "header", "separator", "columns")
_FEATURE_KEYS = {"categorical": ("columns", "type"), "numeric": ("columns", "type", "dtype", "bucket"),
                 "datetime": ("columns", "type", "format", "fields")}


class SchemaError(ValueError):
    """A schema file that does not describe a usable dataset; the message names file, line and key."""

    def __init__(self, path: str | os.PathLike | None, message: str, line: int | None = None, key: str | None = None):
        self.path = Path(path) if path is not None else None
        self.message, self.line, self.key = message, line, key
        where = self.path.name if self.path is not None else "schema"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: key {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True)
class Feature:
    """One raw column used as model input and how it becomes categories.

    Attributes:
        column: the raw column.
        kind: ``categorical`` (the value is the category), ``numeric`` (bucketed) or
            ``datetime`` (split into ``parts``).
        dtype: numeric: ``int`` or ``float`` (what the values must parse as).
        bucket: numeric: ``log2``, ``ln_squared``, ``quantile`` or ``none``.
        quantiles: ``quantile:N``: N.
        time_format: datetime: ``unix_seconds`` or ``yymmddhh``.
        parts: datetime: the fields it gives, a subset of ``DATETIME_PARTS``.
    """

    column: str
    kind: str
    dtype: str = ""
    bucket: str = ""
    quantiles: int = 0
    time_format: str = ""
    parts: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """The model fields of this column (one embedding table each)."""
        return self.parts if self.kind == "datetime" else (self.column,)

    @property
    def bucketing(self) -> str:
        """The bucketing as written in a schema file (``quantile:8``, ``log2``...)."""
        return f"quantile:{self.quantiles}" if self.bucket == "quantile" else self.bucket

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"columns": [self.column], "type": self.kind}
        if self.kind == "numeric":
            d.update(dtype=self.dtype, bucket=self.bucketing)
        elif self.kind == "datetime":
            d.update(format=self.time_format, fields=list(self.parts))
        return d


@dataclass(frozen=True)
class DatasetSchema:
    """Layout of one dataset's raw train file and of the fields the model sees.

    Attributes:
        name: dataset name (command line, manifests, run titles).
        columns: raw train-file columns, in file order.
        label: name of the label column (absent from the test file).
        delimiter: field separator of the raw file ("" for parquet).
        has_header: whether the first line holds column names (parquet: True).
        integer_columns: raw columns that must parse as (possibly negative) integers.
        categorical_columns: raw columns used as categories as they are.
        drop: raw columns read but not used as features.
        fields: model fields after the transform, in order (one embedding table each).
        default_min_count: the OOV min_count of this dataset (the MPE paper's for Criteo/Avazu).
        rows_full: rows of the full public train file (docs and extrapolation), or None.
        features_full: vocabulary size the MPE paper reports at min_count 2, or None.
        file_type: ``csv``, ``tsv`` or ``parquet``.
        features: every feature column, in file order.
        time_column: the column ``--split time`` cuts by (None: the file order).
        float_columns: numeric columns that parse as decimal numbers.
        nullable_columns: numeric columns whose empty value is a category of its own.
        mpe_lambda, mpe_l2: MPE's default size-penalty weight and L2 for this dataset.
        builtin: one of the schemas shipped in ``data/schemas/`` under its own name.
        source: the schema file it was read from.
        description: free text.
    """

    name: str
    columns: tuple[str, ...]
    label: str
    delimiter: str
    has_header: bool
    integer_columns: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    drop: tuple[str, ...]
    fields: tuple[str, ...]
    default_min_count: int
    rows_full: int | None
    features_full: int | None
    file_type: str = "csv"
    features: tuple[Feature, ...] = ()
    time_column: str | None = None
    float_columns: tuple[str, ...] = ()
    nullable_columns: tuple[str, ...] = ()
    mpe_lambda: float = DEFAULT_MPE_LAMBDA
    mpe_l2: float = DEFAULT_MPE_L2
    builtin: bool = False
    source: str = ""
    description: str = ""

    @property
    def test_columns(self) -> tuple[str, ...]:
        """Columns of the unlabeled test file (the train columns without the label)."""
        return tuple(c for c in self.columns if c != self.label)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def feature(self, column: str) -> Feature | None:
        """The feature of raw column ``column``, or None."""
        return next((f for f in self.features if f.column == column), None)

    @property
    def quantile_columns(self) -> tuple[str, ...]:
        """Numeric columns bucketed by quantiles of the training rows."""
        return tuple(f.column for f in self.features if f.bucket == "quantile")

    def to_dict(self) -> dict[str, Any]:
        """The canonical description (a valid JSON schema file; what manifests record)."""
        fmt: dict[str, Any] = {"type": self.file_type, "columns": list(self.columns)}
        if self.file_type != "parquet":
            fmt.update(header=self.has_header, separator=self.delimiter)
        d: dict[str, Any] = {
            "name": self.name, "description": self.description, "label": self.label, "time": self.time_column,
            "drop": list(self.drop), "min_count": self.default_min_count, "format": fmt,
            "features": [f.to_dict() for f in self.features],
            "mpe": {"lambda": self.mpe_lambda, "l2": self.mpe_l2},
        }
        if d["time"] is None:
            del d["time"]
        ref = {k: v for k, v in (("rows", self.rows_full), ("features", self.features_full)) if v is not None}
        if ref:
            d["reference"] = ref
        return d

    @property
    def digest(self) -> str:
        """sha256 of what the prepared data depends on (the description minus its free text and
        the MPE defaults): a changed schema file gives a different prepared directory."""
        d = self.to_dict()
        for k in ("description", "mpe", "reference"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def describe_format(self) -> str:
        """E.g. "CSV with a header line (11 columns)"."""
        if self.file_type == "parquet":
            return f"parquet ({len(self.columns)} columns)"
        kind = {"\t": "tab-separated", ",": "comma-separated"}.get(self.delimiter, f"{self.delimiter!r}-separated")
        return f"{kind}, {'with a header line' if self.has_header else 'no header'} ({len(self.columns)} columns)"


# ---------------------------------------------------------------------------------------------
# reading a schema file
# ---------------------------------------------------------------------------------------------
def _line_of(text: str | None, keypath: Sequence[str | int], is_toml: bool) -> int | None:
    """Best-effort 1-based line of ``keypath`` (``("features", 1, "bucket")``) in the file text."""
    if not text:
        return None
    lines = text.splitlines()
    key = keypath[-1] if isinstance(keypath[-1], str) else None
    if not is_toml:
        if key is None:
            return None
        hits = [i for i, line in enumerate(lines) if f'"{key}"' in line]
        return hits[0] + 1 if len(hits) == 1 else None
    table_start = re.compile(r"^\s*\[")
    start, end = 0, len(lines)
    if len(keypath) > 1:
        table, index = str(keypath[0]), keypath[1] if isinstance(keypath[1], int) else None
        pattern = rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]" if index is not None else rf"^\s*\[\s*{re.escape(table)}\s*\]"
        hits = [i for i, line in enumerate(lines) if re.match(pattern, line)]
        if len(hits) <= (index or 0):
            return None
        start = hits[index or 0]
        end = next((i for i in range(start + 1, len(lines)) if table_start.match(lines[i])), len(lines))
        if key is None or key == table:
            return start + 1
    else:
        end = next((i for i, line in enumerate(lines) if table_start.match(line)), len(lines))
    assign = re.compile(rf"^\s*\"?{re.escape(str(key))}\"?\s*=")
    for i in range(start, end):
        if assign.match(lines[i]):
            return i + 1
    return start + 1 if len(keypath) > 1 else None


class _Parser:
    """Validates one parsed schema document and builds the ``DatasetSchema``."""

    def __init__(self, data: Any, path: Path | None, text: str | None, is_toml: bool, builtin: bool):
        self.data, self.path, self.text, self.is_toml, self.builtin = data, path, text, is_toml, builtin

    def fail(self, keypath: Sequence[str | int], message: str) -> SchemaError:
        key = "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keypath)) or None
        return SchemaError(self.path, message, _line_of(self.text, keypath, self.is_toml) if keypath else None, key)

    def _str(self, obj: Mapping, key: str, keypath: tuple, default: Any = ..., choices: Sequence[str] = ()) -> Any:
        if key not in obj:
            if default is ...:
                raise self.fail(keypath, "missing" + (f"; expected one of {', '.join(choices)}" if choices else ""))
            return default
        value = obj[key]
        if not isinstance(value, str) or not value:
            raise self.fail(keypath, f"expected a non-empty string, found {value!r}")
        if choices and value not in choices:
            raise self.fail(keypath, f"unknown value {value!r}; expected one of {', '.join(choices)}")
        return value

    def _names(self, obj: Mapping, key: str, keypath: tuple, required: bool = True) -> tuple[str, ...]:
        if key not in obj:
            if required:
                raise self.fail(keypath, "missing: a column name or a list of column names")
            return ()
        value = obj[key]
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or (required and not value) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(keypath, f"expected a list of column names, found {obj[key]!r}")
        dup = sorted({v for v in value if value.count(v) > 1})
        if dup:
            raise self.fail(keypath, f"column {dup[0]!r} is listed twice")
        return tuple(value)

    def _unknown(self, obj: Mapping, allowed: Sequence[str], keypath: tuple) -> None:
        extra = [k for k in obj if k not in allowed]
        if extra:
            raise self.fail((*keypath, extra[0]), f"unknown key; expected one of {', '.join(allowed)}")

    def _number(self, obj: Mapping, key: str, keypath: tuple, default: float, integer: bool = False,
                minimum: float = 0.0) -> Any:
        if key not in obj:
            return default
        value = obj[key]
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or value < minimum or value != value:
            kind = "an integer" if integer else "a number"
            raise self.fail(keypath, f"expected {kind} >= {minimum:g}, found {value!r}")
        return int(value) if integer else float(value)

    def _feature(self, entry: Any, i: int) -> list[Feature]:
        kp = ("features", i)
        if not isinstance(entry, Mapping):
            raise self.fail(kp, f"expected a table of columns and a type, found {entry!r}")
        kind = self._str(entry, "type", (*kp, "type"), choices=FEATURE_TYPES)
        self._unknown(entry, _FEATURE_KEYS[kind], kp)
        columns = self._names(entry, "columns", (*kp, "columns"))
        if kind == "categorical":
            return [Feature(c, kind) for c in columns]
        if kind == "numeric":
            dtype = self._str(entry, "dtype", (*kp, "dtype"), default="float", choices=DTYPES)
            if "bucket" not in entry:
                raise self.fail((*kp, "bucket"), f"missing; expected one of {', '.join(BUCKETINGS)}")
            raw = self._str(entry, "bucket", (*kp, "bucket"))
            bucket, n = raw, 0
            if raw.startswith("quantile"):
                m = re.fullmatch(r"quantile:(\d+)", raw)
                n = int(m.group(1)) if m else 0
                if not 2 <= n <= MAX_QUANTILES:
                    raise self.fail((*kp, "bucket"), f"{raw!r}: expected quantile:N with 2 <= N <= {MAX_QUANTILES}")
                bucket = "quantile"
            elif raw not in BUCKETINGS:
                raise self.fail((*kp, "bucket"), f"unknown bucketing {raw!r}; expected one of {', '.join(BUCKETINGS)}")
            return [Feature(c, kind, dtype=dtype, bucket=bucket, quantiles=n) for c in columns]
        fmt = self._str(entry, "format", (*kp, "format"), choices=DATETIME_FORMATS)
        parts = self._names(entry, "fields", (*kp, "fields"), required=False) or DATETIME_PARTS
        bad = [p for p in parts if p not in DATETIME_PARTS]
        if bad:
            raise self.fail((*kp, "fields"), f"unknown datetime field {bad[0]!r}; expected some of {', '.join(DATETIME_PARTS)}")
        if len(columns) > 1:
            raise self.fail((*kp, "columns"), "a datetime feature takes one column (its fields are named after the parts)")
        return [Feature(c, kind, time_format=fmt, parts=parts) for c in columns]

    def build(self) -> DatasetSchema:
        d = self.data
        if not isinstance(d, Mapping):
            raise self.fail((), "a schema is a table of keys (name, label, format, features...)")
        self._unknown(d, _TOP_KEYS, ())
        name = self._str(d, "name", ("name",))
        if not _NAME_RE.match(name):
            raise self.fail(("name",), f"{name!r}: use letters, digits, '_', '-' and '.' (it names cache directories)")
        if not self.builtin and name.lower() in BUILTIN_NAMES:
            raise self.fail(("name",), f"{name!r} is the name of a shipped dataset (--dataset {name.lower()}); "
                                       "give yours another name")
        description = d.get("description", "")
        if not isinstance(description, str):
            raise self.fail(("description",), f"expected a string, found {description!r}")
        label = self._str(d, "label", ("label",))
        time_column = self._str(d, "time", ("time",), default=None)
        drop = self._names(d, "drop", ("drop",), required=False)
        min_count = self._number(d, "min_count", ("min_count",), DEFAULT_MIN_COUNT, integer=True, minimum=1)

        fmt = d.get("format")
        if not isinstance(fmt, Mapping):
            raise self.fail(("format",), "missing [format] table (type = csv | tsv | parquet)")
        self._unknown(fmt, _FORMAT_KEYS, ("format",))
        file_type = self._str(fmt, "type", ("format", "type"), choices=FILE_TYPES)
        if file_type == "parquet":
            for k in ("header", "separator"):
                if k in fmt:
                    raise self.fail(("format", k), "does not apply to parquet (its columns are named in the file)")
            has_header, delimiter = True, ""
        else:
            has_header = fmt.get("header", True)
            if not isinstance(has_header, bool):
                raise self.fail(("format", "header"), f"expected true or false, found {has_header!r}")
            delimiter = fmt.get("separator", "\t" if file_type == "tsv" else ",")
            if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
                raise self.fail(("format", "separator"), f"expected one character, found {delimiter!r}")
        listed = self._names(fmt, "columns", ("format", "columns"), required=False)
        if not listed and not has_header:
            raise self.fail(("format", "columns"), "a file without a header needs its columns, in file order")

        entries = d.get("features")
        if not isinstance(entries, list) or not entries:
            raise self.fail(("features",), "missing: at least one [[features]] table (columns and a type)")
        features: list[Feature] = []
        where: dict[str, tuple[int, str]] = {}
        for i, entry in enumerate(entries):
            for f in self._feature(entry, i):
                if f.column in where:
                    j, kind = where[f.column]
                    also = f"{kind} (features[{j}])"
                    raise self.fail(("features", i, "columns"), f"column {f.column!r} is {f.kind} here but also {also}; "
                                                                "a column is one feature")
                where[f.column] = (i, f.kind)
                features.append(f)
        if label in where:
            raise self.fail(("label",), f"the label {label!r} is also a feature (features[{where[label][0]}])")
        if label in drop:
            raise self.fail(("drop",), f"the label {label!r} cannot be dropped")
        for c in drop:
            if c in where:
                raise self.fail(("drop",), f"column {c!r} is dropped but also a feature (features[{where[c][0]}])")
        if time_column is not None:
            f = next((f for f in features if f.column == time_column), None)
            if time_column == label:
                raise self.fail(("time",), "the label cannot be the time column")
            if f is not None and f.kind != "datetime":
                raise self.fail(("time",), f"the time column {time_column!r} is a {f.kind} feature; it must be a "
                                           "datetime feature or no feature (integers that sort in time order)")

        default_order = [label, *where, *([time_column] if time_column and time_column not in where else []),
                         *[c for c in drop if c != time_column]]
        if listed:
            known = set(listed)
            for keypath, cols in ((("label",), [label]), (("time",), [time_column] if time_column else []),
                                  (("drop",), drop)):
                for c in cols:
                    if c not in known:
                        raise self.fail(keypath, f"column {c!r} is not in format.columns")
            for c, (i, _) in where.items():
                if c not in known:
                    raise self.fail(("features", i, "columns"), f"column {c!r} is not in format.columns")
            unused = [c for c in listed if c not in set(default_order)]
            if unused:
                raise self.fail(("format", "columns"), f"column {unused[0]!r} is not the label, a feature, the time "
                                                       "column or dropped: list it under drop")
            columns = listed
        else:
            columns = tuple(dict.fromkeys(default_order))

        ordered = sorted(features, key=lambda f: columns.index(f.column))
        fields = tuple(p for f in ordered for p in f.fields)
        dup = sorted({p for p in fields if fields.count(p) > 1} | ({label} & set(fields)) | ({"label"} & set(fields)))
        if dup:
            raise self.fail(("features",), f"field {dup[0]!r} is given twice (datetime fields are named after their "
                                           "parts; 'label' is the prepared label column)")
        ints = {f.column for f in features if (f.kind == "numeric" and f.dtype == "int") or f.kind == "datetime"}
        if time_column is not None and time_column not in where:
            ints.add(time_column)
        mpe = d.get("mpe", {})
        if not isinstance(mpe, Mapping):
            raise self.fail(("mpe",), f"expected a table (lambda, l2), found {mpe!r}")
        self._unknown(mpe, ("lambda", "l2"), ("mpe",))
        ref = d.get("reference", {})
        if not isinstance(ref, Mapping):
            raise self.fail(("reference",), f"expected a table (rows, features), found {ref!r}")
        self._unknown(ref, ("rows", "features"), ("reference",))
        return DatasetSchema(
            name=name, columns=columns, label=label, delimiter=delimiter, has_header=has_header,
            integer_columns=tuple(c for c in columns if c in ints),
            categorical_columns=tuple(f.column for f in ordered if f.kind == "categorical"),
            drop=drop, fields=fields, default_min_count=min_count,
            rows_full=self._number(ref, "rows", ("reference", "rows"), None, integer=True),
            features_full=self._number(ref, "features", ("reference", "features"), None, integer=True),
            file_type=file_type, features=tuple(ordered), time_column=time_column,
            float_columns=tuple(f.column for f in ordered if f.kind == "numeric" and f.dtype == "float"),
            nullable_columns=tuple(f.column for f in ordered if f.kind == "numeric"),
            mpe_lambda=self._number(mpe, "lambda", ("mpe", "lambda"), DEFAULT_MPE_LAMBDA),
            mpe_l2=self._number(mpe, "l2", ("mpe", "l2"), DEFAULT_MPE_L2),
            builtin=self.builtin, source=str(self.path) if self.path is not None else "",
            description=description,
        )


def schema_from_dict(data: Mapping[str, Any], path: str | os.PathLike | None = None) -> DatasetSchema:
    """The schema a parsed document describes (``DatasetSchema.to_dict`` output included)."""
    return _Parser(data, Path(path) if path is not None else None, None, False, False).build()


def load_schema(path: str | os.PathLike, builtin: bool = False) -> DatasetSchema:
    """Read and validate a ``.toml`` or ``.json`` schema file; ``SchemaError`` when it is not usable."""
    path = Path(path)
    if path.suffix.lower() not in SCHEMA_SUFFIXES:
        raise SchemaError(path, f"a schema file ends in {' or '.join(SCHEMA_SUFFIXES)}")
    if not path.is_file():
        raise SchemaError(path, "no such schema file" if not path.exists() else "is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SchemaError(path, f"cannot read ({e})") from None
    is_toml = path.suffix.lower() == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else json.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e)) or "invalid TOML"
        raise SchemaError(path, f"invalid TOML: {msg}" + (f" (column {m.group(2)})" if m else ""),
                          int(m.group(1)) if m else None) from None
    except json.JSONDecodeError as e:
        raise SchemaError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    return _Parser(data, path, text, is_toml, builtin).build()


# ---------------------------------------------------------------------------------------------
# the shipped schemas and the registry of loaded ones
# ---------------------------------------------------------------------------------------------
BUILTIN_NAMES = ("criteo", "avazu")
CRITEO = load_schema(SCHEMA_DIR / "criteo.toml", builtin=True)
AVAZU = load_schema(SCHEMA_DIR / "avazu.toml", builtin=True)
SCHEMAS: dict[str, DatasetSchema] = {s.name: s for s in (CRITEO, AVAZU)}
_LOADED: dict[str, DatasetSchema] = {}  # schema files read in this process, by name (the latest wins)

CRITEO_INT_COLUMNS = CRITEO.integer_columns
CRITEO_CAT_COLUMNS = CRITEO.categorical_columns
AVAZU_CAT_COLUMNS = AVAZU.categorical_columns
AVAZU_TIME_FIELDS = AVAZU.feature("hour").parts  # type: ignore[union-attr]


def is_schema_path(text: str | os.PathLike) -> bool:
    """Whether a ``--dataset`` value names a schema file rather than a shipped dataset."""
    s = os.fspath(text)
    return Path(s).suffix.lower() in SCHEMA_SUFFIXES or os.sep in s or "/" in s


def register_schema(schema: DatasetSchema) -> DatasetSchema:
    """Make ``get_schema(schema.name)`` return ``schema`` in this process (a file read or a
    prepared directory's recorded schema); returns it."""
    if schema.builtin:
        return schema
    _LOADED[schema.name] = schema
    return schema


def get_schema(name: str | os.PathLike | DatasetSchema) -> DatasetSchema:
    """The schema of ``criteo``, ``avazu``, a schema file's path, or the name of a schema read
    earlier in this process; anything else raises ``ValueError`` listing what is known."""
    if isinstance(name, DatasetSchema):
        return name
    text = os.fspath(name)
    if text.lower() in SCHEMAS:
        return SCHEMAS[text.lower()]
    if is_schema_path(text):
        shipped = next((s for s in SCHEMAS.values() if Path(s.source) == Path(text).resolve()), None)
        return shipped if shipped is not None else register_schema(load_schema(text))
    if text in _LOADED:
        return _LOADED[text]
    raise ValueError(
        f"unknown dataset {text!r}; known datasets: {', '.join(sorted(SCHEMAS))}, or the path of a schema "
        "file (.toml or .json)"
    )


def dataset_argument(text: str) -> str:
    """argparse ``type`` of ``--dataset``: a shipped name (lower-cased) or a schema file's path,
    which ``get_schema`` reads later so that its errors come as one line."""
    if text.lower() in SCHEMAS:
        return text.lower()
    if is_schema_path(text):
        return text
    choices = ", ".join(repr(n) for n in SCHEMAS)
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {choices} or a schema file, .toml or .json)")
