"""MPE in the AUC-vs-size benchmark: registry name ``"mpe"`` (kind ``"pipeline"``).

A setting ``"x<R>"`` (e.g. ``"x10"``) is a target compression ratio: ``mpe.pipeline.run``
finds lambda by bisection so that the bit-packed export is about R times smaller than the
fp32 tables, then searches, selects, retrains, exports and evaluates the export. The bytes
are those of the bit-packed export on disk (codes, steps, offset, id map), the AUC is the
test AUC of the model served from that export (early stopping on the val split).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from baselines.registry import Method
from ctr.trainer import REPORT_FILE
from data.artifacts import read_json
from data.batches import PreparedDataset
from mpe.config import MPEConfig
from mpe.format import HEADER_FILE
from mpe.pipeline import run
from mpe.run_dir import EXPORT_DIR

_SETTING = re.compile(r"x(\d+(?:\.\d+)?)")


def target_ratio(setting: str) -> float:
    """``"x10"`` -> 10.0; ``ValueError`` for anything that is not ``x<ratio>`` with ratio > 1."""
    m = _SETTING.fullmatch(setting)
    if m is None or float(m.group(1)) <= 1:
        raise ValueError(f"mpe setting {setting!r} is not a target compression ratio 'x<R>' with R > 1 (e.g. 'x10')")
    return float(m.group(1))


@dataclass
class PipelineResult:
    """One finished MPE run, as the benchmark records it.

    ``bytes`` are the export's table files on disk; ``test_auc`` / ``test_logloss`` are
    those of the model loaded from the export; ``seconds`` is the whole pipeline (lambda
    bisection, search, retrain, export); ``steps`` are search plus retrain steps.
    """

    bytes: int
    fp32_bytes: int
    test_auc: float
    test_logloss: float
    val_auc: float
    seconds: float
    steps: int
    export_dir: Path
    report: dict


def run_setting(data: PreparedDataset, cfg: MPEConfig, out: Path) -> PipelineResult:
    """Run MPE with ``cfg`` (its target ratio: the setting) into ``out`` (resumable).

    Raises ``RuntimeError`` if the bytes on disk differ from the report's packed bytes.
    """
    report = read_json(out / REPORT_FILE) if (out / REPORT_FILE).exists() else run(data, cfg, out, resume=True)
    export_dir = out / EXPORT_DIR
    header = read_json(export_dir / HEADER_FILE)
    on_disk = sum((export_dir / name).stat().st_size for name in header["files"])
    if on_disk != report["packed_bytes"]:
        raise RuntimeError(f"{export_dir}: {on_disk:,} table bytes on disk, report says {report['packed_bytes']:,}")
    steps = sum(h[-1]["step"] for h in report["history"].values() if h)
    export_auc = report["export_test_auc"]
    if not (math.isnan(export_auc) and math.isnan(report["test"]["auc"])) and export_auc != report["test"]["auc"]:
        raise RuntimeError(f"{export_dir}: export AUC {export_auc} differs from the in-memory model's {report['test']['auc']}")
    return PipelineResult(
        bytes=int(on_disk),
        fp32_bytes=int(report["fp32_bytes"]),
        test_auc=float(export_auc),
        test_logloss=float(report["test"]["logloss"]),
        val_auc=float(report["retrain_val_auc"]),
        seconds=float(report["timings"]["total_seconds"]),
        steps=int(steps),
        export_dir=export_dir,
        report=report,
    )


METHOD = Method(
    name="mpe",
    kind="pipeline",
    settings=("x10", "x50", "x200", "x500", "x1000"),
    description="mixed-precision embeddings (0-6 bits per frequency group, bit-packed export) at target ratios xR",
)
