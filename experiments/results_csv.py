"""The benchmarks' results CSV: one row per run, rewritten atomically, read back to resume."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.artifacts import atomic_write_bytes


def cell(value: Any) -> str:
    """A CSV cell: floats at full precision, NaN and None empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(float(value))
    return "" if value is None else str(value)


def number(text: str | None) -> float:
    """A numeric cell back as float (NaN when empty)."""
    return float(text) if text not in ("", None) else float("nan")


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write ``rows`` (only ``columns``, in that order) atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: cell(row.get(k, "")) for k in columns})
    atomic_write_bytes(path, buf.getvalue().encode())
