"""Synthetic files for a dataset described by a schema file, with a planted click model.

    python -m data.synthetic --dataset my_schema.toml --rows 100000 --out clicks.csv

(``data.synthetic`` sends a schema file here; ``--synthetic ROWS`` with ``--dataset
my_schema.toml`` does the same.) The file has the schema's format (CSV / TSV with or without
a header, or parquet) and its columns in the schema's order, so ``data.prepare`` reads it as
it reads the user's own file. Metadata, among it the oracle AUC (the AUC of the true click
probabilities on the file's labels, overall and per day), goes to ``FILE.meta.json``.

Columns
- categorical: K values, K = 20000, 2000, 200, 20 for the 1st, 2nd, 3rd, 4th categorical
  column (then again), capped at ``max(2, rows / 4)``; rank r is drawn from a continuous power
  law of exponent 1.1 on [1, K + 1) (inverse CDF); a value is an 8-hex-char token of its rank.
- numeric, ``bucket = "none"``: a slot 1..8 drawn the same way.
- other numeric: exp(1.5 + 1.2 g), g ~ N(0, 1) per row and column; ``int`` columns floor it,
  ``float`` ones keep 2 decimals; 3% of the values are empty (missing).
- datetime columns and the time column: the rows are in time order over ``days`` days from
  2024-01-01 00:00 UTC, spread evenly over each day (Unix seconds or YYMMDDHH).
- dropped columns: a 16-hex-char row id.

Click model
    logit = b0 + gain * (sum_c a_c(v_c) + sum_n w_n g_n + 0.3 sin(2 pi (hour - 8) / 24) + 0.1 weekend)
- a_c(v): N(0, 1) times (1 + r / 20)^-0.4 for the value of rank r (rare values carry weaker
  effects); a missing numeric value has no effect; w_n = +-0.6 per numeric column.
- gain scales the sum to a standard deviation of 1.4 and b0 gives a ~20% click rate, both
  measured on a 50k-row pilot sample; labels ~ Bernoulli(sigmoid(logit)).
- ``--drift X``: every effect e has a second draw e'; day d of D uses cos(t) e + sin(t) e',
  t = pi/2 * X * d / (D - 1), as in ``data.synthetic``.

Seeded: the same schema and arguments give the same bytes. Written to a temporary file in the
same directory and renamed after the metadata.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data.artifacts import atomic_write_json
from data.auc import click_summary
from data.schema import DatasetSchema
from data.transforms import splitmix64, string_keys

SCHEMA_GENERATOR_VERSION = 1
CHUNK_ROWS = 200_000
PILOT_ROWS = 50_000
CARDINALITIES = (20_000, 2_000, 200, 20)
SLOTS = 8
ZIPF = 1.1
MISSING_SHARE = 0.03
NUMERIC_WEIGHT = 0.6
LOGIT_STD = 1.4
TARGET_CTR = 0.2
START_SECONDS = 1_704_067_200  # 2024-01-01 00:00:00 UTC (a Monday)
SUFFIX = {"csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _salt(*parts: int | str) -> int:
    return int(string_keys(pa.array(["/".join(map(str, parts))], pa.string()))[0])


def _zipf(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """Ranks 0..k-1 from the continuous power law x^-ZIPF on [1, k + 1)."""
    a = 1.0 - ZIPF
    u = rng.random(n)
    x = ((k + 1.0) ** a * u + (1.0 - u)) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, k - 1)


def _hex(values: np.ndarray, width: int) -> pa.Array:
    return pa.array([format(int(v), f"0{width}x") for v in values], pa.string())


def _yymmddhh(seconds: np.ndarray) -> np.ndarray:
    t = seconds.astype("datetime64[s]")
    day = t.astype("datetime64[D]")
    month = t.astype("datetime64[M]")
    yy = t.astype("datetime64[Y]").astype(np.int64) + 1970
    mm = month.astype(np.int64) % 12 + 1
    dd = (day - month.astype("datetime64[D]")).astype(np.int64) + 1
    hh = (t - day.astype("datetime64[s]")).astype(np.int64) // 3600
    return (yy % 100) * 1_000_000 + mm * 10_000 + dd * 100 + hh


class _Model:
    """The planted effects of one schema: per column a value table (two draws, for drift)."""

    def __init__(self, schema: DatasetSchema, rows: int, days: int, drift: float, seed: int):
        self.schema, self.rows, self.days, self.seed = schema, rows, days, seed
        self.theta = np.array([math.pi / 2 * drift * d / (days - 1) if days > 1 else 0.0 for d in range(days)])
        self.cards: dict[str, int] = {}
        self.tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.tokens: dict[str, pa.Array] = {}
        self.weights: dict[str, tuple[float, float]] = {}
        cats = [f for f in schema.features if f.kind == "categorical"]
        for f in schema.features:
            rng = np.random.default_rng([seed, 17, _salt("column", f.column) & 0xFFFFFFFF])
            if f.kind == "categorical" or (f.kind == "numeric" and f.bucket == "none"):
                k = SLOTS if f.kind == "numeric" else max(2, min(CARDINALITIES[cats.index(f) % len(CARDINALITIES)], rows // 4))
                strength = (1.0 + np.arange(k) / 20.0) ** -0.4
                self.cards[f.column] = k
                self.tables[f.column] = (rng.standard_normal(k) * strength, rng.standard_normal(k) * strength)
                if f.kind == "categorical":
                    h = splitmix64(np.arange(k, dtype=np.uint64) ^ np.uint64(_salt("token", seed, f.column)))
                    self.tokens[f.column] = _hex(h & np.uint64(0xFFFFFFFF), 8)
            elif f.kind == "numeric":
                sign = rng.choice([-1.0, 1.0], size=2)
                self.weights[f.column] = (NUMERIC_WEIGHT * sign[0], NUMERIC_WEIGHT * sign[1])
        self.gain, self.b0 = 1.0, 0.0
        self.bounds = np.array([-((-d * rows) // days) for d in range(days + 1)], dtype=np.int64)

    def _mix(self, a: np.ndarray, b: np.ndarray, day: np.ndarray) -> np.ndarray:
        return np.cos(self.theta[day]) * a + np.sin(self.theta[day]) * b

    def chunk(self, start: int, n: int, stream: int) -> tuple[dict[str, pa.Array], np.ndarray, np.ndarray]:
        """Columns (no label yet), the effect sum and the day of rows ``start .. start+n-1``."""
        schema = self.schema
        idx = np.arange(start, start + n, dtype=np.int64)
        day = np.minimum((idx * self.days) // self.rows, self.days - 1)
        first, length = self.bounds[day], np.maximum(self.bounds[day + 1] - self.bounds[day], 1)
        seconds = START_SECONDS + day * 86_400 + ((idx - first) * 86_400) // length
        hour, weekday = (seconds // 3600) % 24, (seconds // 86_400 + 3) % 7
        rng = np.random.default_rng([self.seed, stream, start])
        effect = np.zeros(n)
        arrays: dict[str, pa.Array] = {}
        time_effect = False
        for column in schema.columns:
            f = schema.feature(column)
            if column == schema.label:
                continue
            if column in schema.drop and column != schema.time_column:
                arrays[column] = _hex(splitmix64(idx.astype(np.uint64) ^ np.uint64(_salt("id", self.seed))), 16)
            elif column == schema.time_column or (f is not None and f.kind == "datetime"):
                fmt = f.time_format if f is not None else "unix_seconds"
                arrays[column] = pa.array(_yymmddhh(seconds) if fmt == "yymmddhh" else seconds, pa.int64())
                time_effect = time_effect or f is not None
            elif f is not None and column in self.tables:
                ranks = _zipf(rng, self.cards[column], n)
                a, b = self.tables[column]
                effect += self._mix(a[ranks], b[ranks], day)
                arrays[column] = self.tokens[column].take(pa.array(ranks)) if column in self.tokens \
                    else pa.array(ranks + 1, pa.int64())
            elif f is not None:  # bucketed numeric
                g = rng.standard_normal(n)
                missing = rng.random(n) < MISSING_SHARE
                w = self.weights[column]
                effect += np.where(missing, 0.0, self._mix(np.full(n, w[0]), np.full(n, w[1]), day) * g)
                x = np.exp(1.5 + 1.2 * g)
                arrays[column] = pa.array(np.floor(x).astype(np.int64) if f.dtype == "int" else np.round(x, 2),
                                          mask=missing)
        if time_effect:
            effect += 0.3 * np.sin(2 * np.pi * (hour - 8) / 24) + 0.1 * (weekday >= 5)
        return arrays, effect, day

    def calibrate(self) -> None:
        """gain (logit std LOGIT_STD) and b0 (click rate TARGET_CTR) on a pilot sample."""
        n = min(self.rows, PILOT_ROWS)
        _, effect, _ = self.chunk(0, n, stream=29)
        self.gain = LOGIT_STD / max(float(effect.std()), 1e-6)
        base = self.gain * effect
        lo, hi = -20.0, 20.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(base + mid).mean() < TARGET_CTR else (lo, mid)
        self.b0 = (lo + hi) / 2


def generate_for_schema(schema: DatasetSchema, rows: int, out_path: str | os.PathLike, days: int = 1,
                        drift: float = 0.0, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Write ``rows`` synthetic rows in ``schema``'s format to ``out_path``; returns the metadata
    (also written to ``<out_path>.meta.json``)."""
    if rows < 1 or days < 1 or days > rows:
        raise ValueError(f"need rows >= days >= 1, got rows={rows}, days={days}")
    if not math.isfinite(drift) or drift < 0:
        raise ValueError(f"drift must be a finite number >= 0, got {drift}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    model = _Model(schema, rows, days, drift, seed)
    model.calibrate()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    probs = np.empty(rows, dtype=np.float64)
    labels = np.empty(rows, dtype=bool)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as sink:
            writer: Any = None
            if schema.file_type != "parquet" and schema.has_header:
                sink.write((schema.delimiter.join(schema.columns) + "\n").encode())
            with tqdm(total=rows, desc=f"synthetic {schema.name}", unit="row", disable=not progress) as bar:
                for start in range(0, rows, CHUNK_ROWS):
                    n = min(CHUNK_ROWS, rows - start)
                    arrays, effect, day = model.chunk(start, n, stream=101)
                    p = _sigmoid(model.b0 + model.gain * effect)
                    y = np.random.default_rng([seed, 103, start]).random(n) < p
                    probs[start:start + n], labels[start:start + n] = p, y
                    arrays[schema.label] = pa.array(y.astype(np.int8))
                    table = pa.Table.from_arrays([arrays[c] for c in schema.columns], names=list(schema.columns))
                    if writer is None:
                        writer = pq.ParquetWriter(sink, table.schema) if schema.file_type == "parquet" else \
                            pacsv.CSVWriter(sink, table.schema, write_options=pacsv.WriteOptions(
                                include_header=False, delimiter=schema.delimiter, quoting_style="none"))
                    writer.write_table(table)
                    bar.update(n)
            if writer is not None:
                writer.close()
            sink.flush()
            os.fsync(sink.fileno())
        meta = _metadata(schema, model, rows, days, drift, seed, probs, labels)
        atomic_write_json(Path(f"{out}.meta.json"), meta)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return meta


def _metadata(schema: DatasetSchema, model: _Model, rows: int, days: int, drift: float, seed: int,
              probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "generator": "data.synthetic_schema",
        "generator_version": SCHEMA_GENERATOR_VERSION,
        "dataset": schema.name,
        "schema_sha256": schema.digest,
        "rows": rows,
        "days": days,
        "drift": drift,
        "seed": seed,
        **click_summary(labels, probs, model.bounds[: days + 1]),
        "cardinalities": dict(model.cards),
        "logit": {"gain": round(model.gain, 6), "bias": round(model.b0, 6)},
    }
