"""The benchmarks' results CSV: one row per run, rewritten atomically, read back to resume;
and the settings file that says which run an output directory holds."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.artifacts import atomic_write_bytes, atomic_write_json, read_json

RUN_CONFIG = "run_config.json"


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


def settings_conflict(out: Path, settings: dict) -> dict | None:
    """{key: (recorded, given)} for the settings that differ from ``out/run_config.json``;
    None when they agree or nothing is recorded yet (a resumed run must use the same ones)."""
    path = out / RUN_CONFIG
    if not path.exists():
        return None
    old = read_json(path)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    return diff or None


def record_settings(out: Path, settings: dict) -> None:
    """Write ``out/run_config.json`` atomically."""
    atomic_write_json(out / RUN_CONFIG, settings)


def run_settings(args, run_selection: Sequence[str]) -> dict:
    """Every option of ``args`` but those in ``run_selection`` (the ones that only choose which
    runs to do, or how to show them): what a resumed benchmark must share with the first run."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in set(run_selection)}
