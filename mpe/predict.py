"""``python -m mpe.predict --export DIR --data FILE [FILE ...] --out predictions.csv``: score raw
rows from a deployable export alone (``mpe.vocabulary``: the preprocessing and the kept-feature
vocabulary; the packed tables; the tower).

The files are read in the dataset's own format by ``data.reader`` (Criteo / Avazu train files
with labels, Criteo's unlabeled 39-column ``test.txt``, Avazu's ``test`` without ``click``, a
schema file's CSV / TSV / parquet), block by block: every block's distinct values become tokens
and local ids (``ExportVocabulary.encode``), the rows are scored in batches of ``--batch-size``
(the batches ``ctr.trainer.predict`` makes, so the probabilities equal the served model's on
the prepared rows bit for bit), and written to the CSV as they come: one row per input row,
``probability`` (float32 written exactly), after the row's id column (the schema's first
dropped column, Avazu's ``id``) where the file has one. Memory: one block and one batch, plus
5 bytes per row (label, probability) when the rows have labels, for the AUC and logloss, which
are printed and written to ``OUT.metrics.json`` (with rows, bad rows, seconds, rows/s).
Malformed rows follow ``--on-bad-rows`` with ``data.prepare``'s messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import torch
from tqdm import tqdm

from ctr.trainer import metrics
from data.artifacts import ArtifactError, atomic_write_json
from data.batches import to_kjt
from data.prepare import _validators
from data.reader import (
    DEFAULT_BLOCK_SIZE,
    ON_BAD_ROWS,
    RawFormatError,
    RawReader,
    open_reader,
    sniff_layout,
)
from mpe.reader import read_header
from mpe.serving import load_served_model
from mpe.vocabulary import ExportVocabulary, load_vocabulary

DEFAULT_BATCH_SIZE = 16384  # ctr.trainer.predict's


@dataclass
class ScoreResult:
    """What ``Scorer.score`` returns: float32 probabilities (and int8 labels when every file has
    them) of the good rows in file order, the row count, skipped rows by reason, seconds."""

    probabilities: np.ndarray
    labels: np.ndarray | None
    rows: int
    bad_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    metrics: dict[str, float] | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


class Scorer:
    """Raw rows -> click probabilities with an export's vocabulary and a model (by default the
    export's served model; ``experiments.bench_serving`` plugs in an fp32 one)."""

    def __init__(self, vocabulary: ExportVocabulary, model: torch.nn.Module, fields: Sequence[str]):
        self.vocabulary = vocabulary
        self.model = model.eval()
        self.fields = list(fields)
        self.schema = vocabulary.schema

    def _reader(self, path: Path, on_bad_rows: str, block_size: int) -> tuple[RawReader, str | None]:
        schema = self.schema
        layout = sniff_layout(path, schema)
        id_column = next((c for c in schema.drop if c in layout.columns), None) if layout.kind == "text" else None
        columns = list(dict.fromkeys([*([schema.label] if layout.labeled else []), *self.vocabulary.columns,
                                      *([id_column] if id_column else [])]))
        reader = open_reader(path, schema, on_bad_rows=on_bad_rows, block_size=block_size, columns=columns,
                             validators=_validators(schema, columns), layout=layout)
        return reader, id_column

    @torch.inference_mode()
    def _run(self, ids: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self.model(to_kjt(ids, self.fields))).numpy()

    def score(
        self, paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
        batch_size: int = DEFAULT_BATCH_SIZE, on_bad_rows: str = "error", block_size: int = DEFAULT_BLOCK_SIZE,
        progress: bool = False,
    ) -> ScoreResult:
        """Score every good row of ``paths`` (read in order); write ``out`` (CSV) when given."""
        if on_bad_rows not in ON_BAD_ROWS:
            raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        files = [Path(p) for p in paths]
        for p in files:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file" if not p.exists() else f"{p}: is not a file")
        readers = [self._reader(p, on_bad_rows, block_size) for p in files]  # every layout checked first
        labeled = all(r.layout.labeled for r, _ in readers)
        with_ids = readers[0][1] is not None and all(c == readers[0][1] for _, c in readers)
        names = (["id"] if with_ids else []) + ["probability"]
        schema = pa.schema([(n, pa.string() if n == "id" else pa.float64()) for n in names])
        writer = None
        tmp = None
        if out is not None:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
            writer = pacsv.CSVWriter(tmp, schema)
        probs: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        pending_ids: list[np.ndarray] = []
        pending_keys: list[pa.Array] = []
        pending = 0
        rows = 0
        bad: dict[str, int] = {}
        t0 = time.perf_counter()
        total = sum(r.size for r, _ in readers)
        done = 0
        bar = tqdm(total=total, desc="mpe.predict", unit="B", unit_scale=True, unit_divisor=1024,
                   disable=not progress, leave=False)

        def flush(final: bool) -> None:
            nonlocal pending, pending_ids, pending_keys
            if not pending:
                return
            ids = np.concatenate(pending_ids) if len(pending_ids) > 1 else pending_ids[0]
            keys = pa.concat_arrays(pending_keys) if with_ids else None
            stop = pending if final else pending - pending % batch_size
            for lo in range(0, stop, batch_size):
                hi = min(lo + batch_size, stop)
                p = self._run(ids[lo:hi])
                if labeled:
                    probs.append(p)
                if writer is not None:
                    cols = ([keys.slice(lo, hi - lo)] if with_ids else []) + [pa.array(p.astype(np.float64))]
                    writer.write_batch(pa.record_batch(cols, schema=schema))
                elif not labeled:
                    probs.append(p)
            pending_ids = [ids[stop:]] if stop < pending else []
            pending_keys = [keys.slice(stop)] if with_ids and stop < pending else []
            pending -= stop

        try:
            with bar:
                for reader, id_column in readers:
                    for block in reader:
                        batch = block.batch
                        pending_ids.append(self.vocabulary.encode(batch))
                        if with_ids:
                            col = batch.column(id_column)
                            pending_keys.append(col.dictionary.take(col.indices).cast(pa.string()))
                        if labeled:
                            col = batch.column(self.schema.label)
                            lab = pc.equal(col.dictionary, "1").to_numpy(zero_copy_only=False).astype(np.int8)
                            labels.append(lab[col.indices.to_numpy(zero_copy_only=False)])
                        pending += batch.num_rows
                        rows += batch.num_rows
                        if pending >= batch_size:
                            flush(False)
                        bar.update(done + reader.bytes_read - bar.n)
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix_str(f"{rows:,} rows, {rows / max(elapsed, 1e-9):,.0f} rows/s", refresh=False)
                    done += reader.size
                    for k, v in reader.bad_rows.items():
                        bad[k] = bad.get(k, 0) + v
                flush(True)
            if writer is not None:
                writer.close()
                writer = None
                os.replace(tmp, out)
        finally:
            if writer is not None:
                writer.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()
        seconds = time.perf_counter() - t0
        p_all = np.concatenate(probs) if probs else np.zeros(0, np.float32)
        lab_all = (np.concatenate(labels) if labels else np.zeros(0, np.int8)) if labeled else None
        result = ScoreResult(p_all, lab_all, rows, dict(sorted(bad.items())), seconds)
        if labeled and rows:
            result.metrics = metrics(lab_all, p_all.astype(np.float64))
        return result


def load_scorer(export_dir: str | os.PathLike, model: torch.nn.Module | None = None) -> Scorer:
    """The ``Scorer`` of a deployable export: header, packed tables, tower and vocabulary, every
    checksum verified (``ArtifactError`` otherwise). ``model``: an already loaded served model."""
    root = Path(export_dir)
    header = read_header(root)
    served = model if model is not None else load_served_model(root)
    bits = served.embedding.packed.bits_per_row()
    vocab = load_vocabulary(root, header, bits)
    return Scorer(vocab, served, header["fields"])


def metrics_path(out: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(out)}.metrics.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpe.predict",
        description="Score raw rows (the dataset's own format: train files with labels, Criteo's unlabeled "
        "test.txt, Avazu's test, a schema file's CSV / TSV / parquet) with a deployable export (written by "
        "mpe.search / mpe.export with the prepared data: preprocessing + kept-feature vocabulary + packed "
        "tables + tower): one probability per row, streamed.",
        epilog="output: OUT (CSV: the row's id column where the file has one, probability), and with labels "
        "OUT.metrics.json (AUC, logloss, rows, bad rows, rows/s). Exit status 2 on a bad export or input.",
    )
    p.add_argument("--export", required=True, metavar="DIR", help="the export directory (RUN/export)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="raw file(s), read in order")
    p.add_argument("--out", required=True, metavar="FILE", help="predictions CSV (replaced atomically)")
    p.add_argument("--on-bad-rows", choices=ON_BAD_ROWS, default="error",
                   help="error: stop at the first malformed row naming file, line and column; skip: drop it and "
                   "count it (default error; as data.prepare)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"rows per tower call (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="BYTES",
                   help=f"approximate bytes of parsed data per block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scorer = load_scorer(args.export)
        result = scorer.score(args.data, args.out, batch_size=args.batch_size, on_bad_rows=args.on_bad_rows,
                              block_size=args.block_size, progress=not args.no_progress)
    except (ArtifactError, RawFormatError, FileNotFoundError, IsADirectoryError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    skipped = sum(result.bad_rows.values())
    print(f"scored {result.rows:,} rows in {result.seconds:.1f} s ({result.rows_per_second:,.0f} rows/s)"
          + (f", skipped {skipped:,} bad rows {result.bad_rows}" if skipped else "") + f" -> {args.out}")
    if result.metrics is not None:
        m = result.metrics
        print(f"AUC {m['auc']:.5f}  logloss {m['logloss']:.5f}  ({m['rows']:,} labeled rows)")
        report: dict[str, Any] = {**m, "seconds": round(result.seconds, 3), "rows_per_second": result.rows_per_second,
                                  "bad_rows": result.bad_rows, "export": str(Path(args.export).resolve()),
                                  "data": [str(Path(d).resolve()) for d in args.data]}
        atomic_write_json(metrics_path(args.out), json.loads(json.dumps(report)))
        print(f"metrics -> {metrics_path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
