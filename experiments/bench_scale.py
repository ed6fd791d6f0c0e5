"""Scale benchmark: step time and peak memory of the real training CLIs as rows and
processes grow, measured in one run; an extrapolation to full-size Criteo, or (``--full-size``)
the full-size run itself.

    python -m experiments.bench_scale                                  # 100k, 1M and 4M rows, 1 and 2 processes
    python -m experiments.bench_scale --rows 20000 100000 --processes 1 2 --out runs/bench_scale_small
    nohup python -m experiments.bench_scale --full-size > bench_full.log 2>&1 &   # 1M, 10M, 45.8M rows (hours)

Scaling mode (default)
----------------------
For every row count R of ``--rows`` a synthetic Criteo-format file is generated and
prepared once (``data.sources``, cached under ``--cache-dir``). Then, for every process
count P of ``--processes``, two jobs run, each as its own subprocess (``torchrun`` for
P > 1: gloo, table-wise sharding), on the same prepared data, tower and global batch:

- ``fp32``: ``python -m ctr.train_fp32`` (one epoch);
- ``mpe``:  ``python -m mpe.search --lambda L`` (one epoch of search, selection, one epoch
  of retrain, export; no lambda bisection).

All jobs train the tables with ``--embedding-optimizer adagrad`` (fbgemm's CPU kernels,
which the sharded tables need, have no fused Adam), so one and several processes do the
same work. Every job gets ``--threads`` threads in all (P processes x threads/P each).

Measured per job: the median training-step seconds the CLI reports (``step_seconds``;
for MPE the search and the retrain step), the job's wall seconds, and its peak RSS (the
largest ``ru_maxrss`` among the job's processes, from ``os.wait4``). Ratios, all within
this run: MPE search step / fp32 step (same R and P) and P-process step / 1-process step.

Extrapolation (``extrapolate``): single-process step time is fit as ``a + b * F`` (F =
table rows: the unsharded tables get dense gradients, so the optimizer step grows with
F) and peak RSS as ``base + c_d * data_bytes + c_t * table_bytes`` (``data_bytes`` = rows
x (fields + 1) x 4 held as numpy arrays, ``table_bytes`` = F x dim x 4), each fit on the
measured points; applied to Criteo Kaggle (45,840,617 rows, 6,780,382 features) and to
Criteo 1TB (4,373,472,329 rows; 187,767,399 table rows after MLPerf DLRM's 40M-per-field
cap, an assumption: this machine never saw that data).

Writes ``OUT/bench_scale.json``, ``OUT/bench_scale.csv`` and ``OUT/extrapolation.md``
(OUT: ``--out``, default ``runs/bench_scale``).

Full-size mode (``--full-size``)
--------------------------------
Row points ``--rows`` (default 1,000,000, 10,000,000 and 45,840,617: Criteo Kaggle's size).
For each point, in order, these stages, each one subprocess measured for wall seconds and
peak RSS (``os.wait4``'s ``ru_maxrss``: the largest of the process and the descendants it
waited for, so for ``torchrun`` the largest process), its output in ``OUT/logs/``:

- ``generate``: ``python -m data.synthetic --dataset criteo --rows R --seed 2022`` into
  ``CACHE/synthetic/`` (the name ``data.sources`` uses, so CLI runs with ``--synthetic R``
  share it), with the generator's own cardinalities at R rows (the real Criteo Kaggle
  ones, capped at R / 2, so from 20.3M rows on all real). A complete file (present, with its
  ``.meta.json`` for the same rows, seed and generator version: the generator writes both
  atomically) is never regenerated: the stage is then ``cached`` and not timed.
- ``prepare``: ``python -m data.prepare --dataset criteo --input FILE --out DIR`` into
  ``CACHE/prepared/`` (``data.sources``' name; min count 2, random split, seed 2022). When
  the CLI reuses a matching directory the stage is ``cached`` (the manifest's own
  ``seconds`` are kept).
- ``fp32``: ``python -m ctr.train_fp32`` one process, one epoch, the default (``auto``)
  table optimizer.
- ``mpe``: ``python -m mpe.search --target-ratio T`` one process (lambda bisection, one epoch
  of search, one of retrain, export; ``--no-fp32-baseline``: the fp32 stage is that).
- ``fp32_2p``: the fp32 job under ``python -m torch.distributed.run --standalone
  --nproc_per_node=2`` (``auto``: Adagrad for the CPU-sharded tables).

The training jobs share ``--hidden``, ``--batch-size``, ``--threads`` (in all; per process
for two) and ``--embedding-lr`` (passed only when given), and run with ``--no-progress``;
the bench prints a start line (with a time stamp) and a result line per stage, flushed, so
``tail -f`` on its log shows the progress. ``--stages`` runs only some stages (generate and
prepare also run, or are reused, when a later stage needs them).

Resume: each finished stage is written atomically to ``OUT/stages/<rows>_<stage>.json``
with the options that affect it (row count, data seed, generator version, preprocessing,
tower, batch, threads, optimizer settings, target ratio...). A rerun with the same options
reuses finished stages ("reusing ...") and restarts an unfinished one from scratch (its run
directory ``OUT/runs/<rows>_<stage>`` is deleted first, as are leftovers of an interrupted
generator or prepare); a stage whose stored options differ is rerun. ``OUT/.lock`` keeps a
second bench out of the same OUT. Before the first stage a disk check estimates what the
remaining stages will write (~243 bytes per synthetic row, rows x 40 x 4 bytes + vocabulary
per prepared directory, a few times the fp32 table per training run) and exits with status
2 when it does not fit in ``shutil.disk_usage``'s free space.

Checks (printed and stored, never asserted; ratios within this run): at the largest point
every stage's peak RSS <= 6 GB and <= 1.5x the same stage at the next smaller point (10M);
the single-process fp32 step and MPE search step <= 1.3x their step at the smallest point
(1M); the fp32 epoch (the fp32 report's training seconds) < 45 min; MPE's wall <= 3x fp32's
wall. Each prints as ``name: measured vs target -> ok / NOT MET``.

Writes, after every stage (so a partial run has a partial table), ``OUT/full_size.json``
(stage rows, checks, machine, config), ``OUT/full_size.csv`` and ``OUT/full_size.md`` (the
table and the checks, ready for the README). OUT: ``--out``, default ``runs/bench_full``.

Not a test: figures depend on the machine (here: a shared 2-core box, no GPU).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctr.trainer import REPORT_FILE
from data import sources
from data.artifacts import atomic_write_bytes, atomic_write_json
from data.synthetic import CARD_CAP, CRITEO_CARDINALITY, GENERATOR_VERSION
from experiments.results_csv import write_rows
from mpe.config import BUDGET_METHODS, SearchConfig

ROOT = Path(__file__).resolve().parents[1]
CRITEO_KAGGLE = {"name": "Criteo Kaggle", "rows": 45_840_617, "features": 6_780_382}
CRITEO_1TB = {"name": "Criteo 1TB (24 days)", "rows": 4_373_472_329, "features": 187_767_399}
FIELDS = 39
JOBS = ("fp32", "mpe")


def prepare(rows: int, args: argparse.Namespace) -> Path:
    """Generate + prepare a synthetic Criteo file of ``rows`` rows (cached); its prepared dir."""

    ns = argparse.Namespace(dataset="criteo", data=None, prepared=None, synthetic=rows, days=1, drift=0.0,
                            min_count=None, split="random", data_seed=2022, on_bad_rows="error",
                            cache_dir=args.cache_dir)
    return Path(sources.resolve(ns, progress=not args.no_progress).root)


def job_command(job: str, processes: int, prepared: Path, out: Path, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    common = ["--dataset", "criteo", "--prepared", str(prepared), "--hidden", *map(str, args.hidden),
              "--batch-size", str(args.batch_size), "--epochs", "1", "--embedding-optimizer", "adagrad",
              "--embedding-lr", str(args.embedding_lr), "--no-progress", "--out", str(out)]
    if job == "fp32":
        return [*launcher, "-m", "ctr.train_fp32", *common]
    return [*launcher, "-m", "mpe.search", *common, "--lambda", str(args.mpe_lambda), "--groups", str(args.groups)]


def run_job(cmd: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``cmd``; (wall seconds, peak RSS MiB of its largest process, output tail)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-4000:]}")
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return wall, usage.ru_maxrss / scale, output[-2000:]


def measure(rows: int, processes: int, job: str, prepared: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / "runs" / f"{job}_{rows}rows_{processes}p"
    threads = max(1, args.threads // processes)
    wall, rss, _ = run_job(job_command(job, processes, prepared, out, args), threads)
    report = json.loads((out / REPORT_FILE).read_text())
    manifest = json.loads((prepared / "manifest.json").read_text())
    row = {"rows": rows, "features": int(manifest["num_features"]), "processes": processes,
           "threads_per_process": threads, "job": job, "wall_seconds": wall, "peak_rss_mb": rss}
    if job == "fp32":
        row.update(step_seconds=report["step_seconds"], test_auc=report["test"]["auc"])
    else:
        t = report["timings"]
        row.update(step_seconds=t["search_step_seconds"], retrain_step_seconds=t["retrain_step_seconds"],
                   test_auc=report["test"]["auc"], compression_ratio=report["compression_ratio"])
    return row


def add_ratios(rows: list[dict]) -> None:
    by = {(r["rows"], r["processes"], r["job"]): r for r in rows}
    for r in rows:
        fp32 = by.get((r["rows"], r["processes"], "fp32"))
        one = by.get((r["rows"], 1, r["job"]))
        r["step_vs_fp32"] = r["step_seconds"] / fp32["step_seconds"] if fp32 else None
        r["step_vs_1_process"] = r["step_seconds"] / one["step_seconds"] if one else None


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares (a cost never shrinks as data grows)."""
    from scipy.optimize import nnls

    coef, _ = nnls(x, y)
    return coef


def extrapolate(rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Fit single-process step time and RSS on the measured points; apply to full-size data."""
    out: dict[str, Any] = {}
    dim = 16
    for job in JOBS:
        pts = [r for r in rows if r["job"] == job and r["processes"] == 1]
        if len({p["features"] for p in pts}) < 2:
            continue
        f = np.array([p["features"] for p in pts], dtype=np.float64)
        t = np.array([p["step_seconds"] for p in pts])
        a, b = _lstsq(np.stack([np.ones_like(f), f], 1), t)
        data_bytes = np.array([p["rows"] * (FIELDS + 1) * 4 for p in pts], dtype=np.float64)
        table_bytes = f * dim * 4
        rss = np.array([p["peak_rss_mb"] for p in pts]) * 2**20
        if len(pts) >= 3:
            base, c_d, c_t = _lstsq(np.stack([np.ones_like(f), data_bytes, table_bytes], 1), rss)
        else:  # two points: table term from the fit, no separate data term
            base, c_t = _lstsq(np.stack([np.ones_like(f), table_bytes + data_bytes], 1), rss)
            c_d = c_t
        fits = {"step_seconds": {"a": a, "b_per_table_row": b},
                "peak_rss_bytes": {"base": base, "per_data_byte": c_d, "per_table_byte": c_t}}
        targets = []
        for target in (CRITEO_KAGGLE, CRITEO_1TB):
            train_rows = int(target["rows"] * 0.8)
            steps = math.ceil(train_rows / args.batch_size)
            step = a + b * target["features"]
            mem = base + c_d * target["rows"] * (FIELDS + 1) * 4 + c_t * target["features"] * dim * 4
            table = target["features"] * dim * 4
            targets.append({
                **target, "train_rows": train_rows, "steps_per_epoch": steps,
                "step_seconds": step, "epoch_hours": steps * step * (2 if job == "mpe" else 1) / 3600,
                "peak_rss_gb": mem / 1e9, "fp32_table_gb": table / 1e9,
            })
        out[job] = {"fits": fits, "targets": targets}
    return out


def markdown(ex: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"Extrapolated from the single-process points of this run (batch {args.batch_size}, DNN "
             f"{'-'.join(map(str, args.hidden))}, dim 16, 1 epoch; MPE = search + retrain epochs):", "",
             "| job | data | train rows | steps / epoch | step s | hours / epoch | peak RSS GB | fp32 table GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for job, e in ex.items():
        for t in e["targets"]:
            lines.append(f"| {job} | {t['name']} | {t['train_rows']:,} | {t['steps_per_epoch']:,} | "
                         f"{t['step_seconds']:.2f} | {t['epoch_hours']:.1f} | {t['peak_rss_gb']:.1f} | "
                         f"{t['fp32_table_gb']:.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# full-size mode
# ---------------------------------------------------------------------------------------------
FULL_SIZE_ROWS = (1_000_000, 10_000_000, CRITEO_KAGGLE["rows"])
STAGES = ("generate", "prepare", "fp32", "mpe", "fp32_2p")
TRAINING_STAGES = ("fp32", "mpe", "fp32_2p")
STAGE_PROCESSES = {"fp32": 1, "mpe": 1, "fp32_2p": 2}
DATA_SEED = 2022  # data.sources' default --data-seed: synthetic seed and split seed
MIN_COUNT = 2  # Criteo's default min count in data.prepare / data.sources
DIM = 16  # the training CLIs' default embedding dimension (not passed)
STAGE_FILE_VERSION = 1
# Disk estimates. Synthetic Criteo: runs/cache/synthetic/criteo_v2_1000000rows_1d_drift0_s2022.txt
# is 242,861,649 bytes. A prepared directory: label + 39 int32 ids per row, plus vocabulary and
# counts per feature. Features after min count 2: 272,184 at 1M rows, sublinear in rows.
SYNTHETIC_BYTES_PER_ROW = 242_861_649 / 1_000_000
PREPARED_BYTES_PER_ROW = (FIELDS + 1) * 4
PREPARED_BYTES_PER_FEATURE = 64
FEATURES_PER_ROW = 0.3
# A run directory's bytes per fp32 table byte: checkpoints hold the table and its optimizer
# state (tiny runs: fp32 ~4.2x; MPE ~11x, a search and a retrain checkpoint and two models).
RUN_BYTES_PER_TABLE_BYTE = {"fp32": 5, "mpe": 12, "fp32_2p": 5}
TARGETS = {"peak_rss_gb": 6.0, "rss_growth": 1.5, "step_growth": 1.3, "fp32_epoch_minutes": 45.0,
           "mpe_vs_fp32_wall": 3.0}
TABLE_COLUMNS = ("rows", "stage", "cached", "wall_seconds", "peak_rss_mb", "cpu_seconds", "step_seconds",
                 "retrain_step_seconds", "steps", "retrain_steps", "train_seconds", "test_auc", "compression_ratio",
                 "file_bytes", "num_features", "train_rows", "prepare_seconds", "processes",
                 "embedding_optimizer", "started_at", "finished_at")


class StageError(RuntimeError):
    """A stage's subprocess failed (the message has the tail of its log)."""


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _say(msg: str) -> None:
    print(f"[{_now()}] {msg}", flush=True)


def synthetic_path(rows: int, cache: Path) -> Path:
    """The synthetic Criteo file of ``rows`` rows: ``data.sources``' cache name."""
    return sources.synthetic_file(cache, "criteo", rows, seed=DATA_SEED)


def prepared_path(raw: Path, cache: Path) -> Path:
    """``raw``'s prepared directory: ``data.sources``' cache name."""
    return sources.prepared_dir(cache, "criteo", raw, MIN_COUNT, "random", DATA_SEED)


def synthetic_meta(path: Path, rows: int) -> dict | None:
    """The metadata of a complete synthetic file at ``path`` for these rows / seed / version; else None.

    The generator writes ``FILE.meta.json`` before it renames the finished file into place."""
    meta_path = Path(f"{path}.meta.json")
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    want = {"dataset": "criteo", "rows": rows, "days": 1, "drift": 0.0, "seed": DATA_SEED,
            "generator_version": GENERATOR_VERSION}
    return meta if all(meta.get(k) == v for k, v in want.items()) else None


def generator_cardinalities(rows: int) -> dict[str, int]:
    """The generator's cardinality per field at ``rows`` rows (``data.synthetic._Field``)."""
    return {f: max(1, min(k, max(2, int(rows * CARD_CAP)))) for f, k in CRITEO_CARDINALITY.items()}


def stage_options(stage: str, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    """The options a stage's result depends on (cumulative: a stage's inputs' options too)."""
    opts: dict[str, Any] = {"stage": stage, "dataset": "criteo", "rows": rows, "data_seed": DATA_SEED,
                            "generator_version": GENERATOR_VERSION}
    if stage == "generate":
        return opts
    opts.update(min_count=MIN_COUNT, split="random")
    if stage == "prepare":
        return opts
    opts.update(hidden=list(args.hidden), batch_size=args.batch_size, epochs=1, threads=args.threads,
                processes=STAGE_PROCESSES[stage], embedding_optimizer="auto", embedding_lr=args.embedding_lr)
    if stage == "mpe":
        opts.update(target_ratio=args.target_ratio, groups=args.groups, fp32_baseline=False, budget=args.budget)
    return json.loads(json.dumps(opts))


def stage_file(out: Path, rows: int, stage: str) -> Path:
    return out / "stages" / f"{rows}_{stage}.json"


def load_stage(out: Path, rows: int, stage: str) -> dict | None:
    path = stage_file(out, rows, stage)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("version") == STAGE_FILE_VERSION else None


def options_diff(old: dict, new: dict) -> dict[str, tuple]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def artifacts_present(stage: str, rows: int, cache: Path) -> bool:
    """A finished generate / prepare stage is only reusable while its output still exists."""
    raw = synthetic_path(rows, cache)
    if stage == "generate":
        return synthetic_meta(raw, rows) is not None
    if stage == "prepare":
        return (prepared_path(raw, cache) / "manifest.json").is_file()
    return True


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the bench dies (no orphaned jobs after a kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_logged(cmd: list[str], threads: int, log: Path) -> dict[str, float]:
    """Run ``cmd`` with its output to ``log``; wall seconds, peak RSS MiB (``ru_maxrss`` of the
    process and its waited-for descendants: the largest process) and CPU seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise StageError(f"exit status {proc.returncode} (log {log}):\n{tail}")
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return {"wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / scale,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def _remove_stale_generator_files(path: Path, min_age_s: float = 600.0) -> None:
    """Temporary files of an interrupted generator run for ``path`` (not written for 10 minutes)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > min_age_s:
                tmp.unlink()
        except OSError:
            pass


def _remove_stale_prepare_dirs(out: Path) -> None:
    """Partial directories ``data.prepare`` left for ``out`` when its process was killed."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(tmp.name[len(f".{out.name}.partial-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def training_command(stage: str, prepared: Path, run_dir: Path, args: argparse.Namespace) -> list[str]:
    procs = STAGE_PROCESSES[stage]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    common = ["--dataset", "criteo", "--prepared", str(prepared), "--hidden", *map(str, args.hidden),
              "--batch-size", str(args.batch_size), "--epochs", "1", "--no-progress", "--out", str(run_dir)]
    if args.embedding_lr is not None:
        common += ["--embedding-lr", str(args.embedding_lr)]
    if stage == "mpe":
        return [*launcher, "-m", "mpe.search", *common, "--target-ratio", str(args.target_ratio),
                "--groups", str(args.groups), "--budget", args.budget, "--no-fp32-baseline"]
    return [*launcher, "-m", "ctr.train_fp32", *common]


def _report_fields(stage: str, report: dict) -> dict[str, Any]:
    """The measured figures of a training run's report.json."""
    test = report.get("test") or {}
    optimizer = (report.get("embedding_optimizer") or (report.get("distributed") or {}).get("embedding_optimizer")
                 or ((report.get("config") or {}).get("train") or {}).get("embedding_optimizer"))
    row: dict[str, Any] = {"test_auc": test.get("auc"), "test_logloss": test.get("logloss"),
                           "processes": report.get("processes"), "embedding_optimizer": optimizer}
    if stage == "mpe":
        t = report.get("timings") or {}
        hist = report.get("history") or {}
        last = {k: (v[-1] if v else {}) for k, v in hist.items() if isinstance(v, list)}
        row.update(step_seconds=t.get("search_step_seconds"), retrain_step_seconds=t.get("retrain_step_seconds"),
                   steps=last.get("search", {}).get("step"), retrain_steps=last.get("retrain", {}).get("step"),
                   compression_ratio=report.get("compression_ratio"), export_test_auc=report.get("export_test_auc"),
                   lambda_trials=len(report.get("lambda_trials") or []),
                   budget="multiplier" if report.get("budget_multiplier") else
                   ("bisection" if report.get("lambda_trials") else "fixed lambda"),
                   train_seconds=(t.get("search_seconds") or 0) + (t.get("retrain_seconds") or 0))
        row.update({k: v for k, v in t.items() if k.endswith("seconds") and not k.endswith("step_seconds")})
        row["lambda"] = (report.get("config") or {}).get("lambda")
    else:
        t = report.get("timings") or {}
        row.update(step_seconds=report.get("step_seconds"), steps=report.get("steps"),
                   num_features=report.get("num_features"), report_seconds=report.get("seconds"),
                   train_seconds=t.get("train_seconds", report.get("seconds")))
    return row


def run_stage(stage: str, rows: int, args: argparse.Namespace, out: Path, cache: Path) -> dict[str, Any]:
    """Run one stage (from scratch); its result row."""
    raw = synthetic_path(rows, cache)
    prepared = prepared_path(raw, cache)
    log = out / "logs" / f"{rows}_{stage}.log"
    row: dict[str, Any] = {"rows": rows, "stage": stage, "cached": False, "started_at": _now()}
    py = sys.executable
    if stage == "generate":
        meta = synthetic_meta(raw, rows)
        if meta is None:
            _remove_stale_generator_files(raw)
            cmd = [py, "-m", "data.synthetic", "--dataset", "criteo", "--rows", str(rows), "--out", str(raw),
                   "--seed", str(DATA_SEED), "--no-progress"]
            _say(f"start  {rows:>12,} rows  generate  -> {raw}  (log {log})")
            row.update(run_logged(cmd, args.threads, log), command=" ".join(cmd))
            meta = synthetic_meta(raw, rows)
            if meta is None:
                raise StageError(f"the generator exited 0 but {raw} (+ .meta.json) is not complete")
        else:
            row.update(cached=True, wall_seconds=None, peak_rss_mb=None, cpu_seconds=None)
        cards = meta.get("cardinalities") or {}
        full = meta.get("cardinalities_full") or {}
        row.update(file=str(raw), file_bytes=raw.stat().st_size, click_rate=meta.get("click_rate"),
                   oracle_auc=meta.get("oracle_auc"), cardinality_sum=sum(cards.values()),
                   full_cardinalities=bool(cards) and cards == full)
    elif stage == "prepare":
        manifest_path = prepared / "manifest.json"

        def signature() -> tuple | None:
            try:
                st = manifest_path.stat()
            except OSError:
                return None
            return st.st_ino, st.st_mtime_ns, st.st_size

        before = signature()
        _remove_stale_prepare_dirs(prepared)
        cmd = [py, "-m", "data.prepare", "--dataset", "criteo", "--input", str(raw), "--out", str(prepared),
               "--min-count", str(MIN_COUNT), "--split", "random", "--seed", str(DATA_SEED), "--no-progress"]
        _say(f"start  {rows:>12,} rows  prepare   -> {prepared}  (log {log})")
        row.update(run_logged(cmd, args.threads, log), command=" ".join(cmd))
        if before is not None and signature() == before:  # the CLI reused a matching directory
            row.update(cached=True, wall_seconds=None, peak_rss_mb=None, cpu_seconds=None)
        manifest = json.loads(manifest_path.read_text())
        split_rows = manifest["rows"]
        row.update(dir=str(prepared), dir_bytes=_dir_bytes(prepared), num_features=int(manifest["num_features"]),
                   prepare_seconds=manifest.get("seconds"))
        if isinstance(split_rows, dict):
            row.update(total_rows=split_rows.get("total"), train_rows=split_rows.get("train"),
                       val_rows=split_rows.get("val"), test_rows=split_rows.get("test"))
        else:
            row["total_rows"] = split_rows
    else:
        run_dir = out / "runs" / f"{rows}_{stage}"
        if run_dir.exists():  # an interrupted attempt: start again from scratch
            shutil.rmtree(run_dir)
        cmd = training_command(stage, prepared, run_dir, args)
        threads = max(1, args.threads // STAGE_PROCESSES[stage])
        _say(f"start  {rows:>12,} rows  {stage:<8}  -> {run_dir}  (log {log})")
        row.update(run_logged(cmd, threads, log), command=" ".join(cmd), run_dir=str(run_dir),
                   threads_per_process=threads)
        report = json.loads((run_dir / REPORT_FILE).read_text())
        row.update(_report_fields(stage, report))
    row["finished_at"] = _now()
    if row.get("peak_rss_mb") is not None:
        row["peak_rss_gb"] = row["peak_rss_mb"] * 2**20 / 1e9
    return row


def describe(row: dict) -> str:
    """A stage's result on one line."""
    parts = [f"{row['rows']:>12,} rows  {row['stage']:<8}"]
    if row.get("cached"):
        parts.append("cached (not timed)")
    else:
        parts.append(f"wall {row['wall_seconds']:8.1f} s  peak RSS {row['peak_rss_mb'] * 2**20 / 1e9:6.2f} GB")
    if row.get("file_bytes") is not None:
        parts.append(f"file {_bytes(row['file_bytes'])}")
    if row["stage"] == "prepare" and row.get("num_features") is not None:
        parts.append(f"{row['num_features']:,} features")
    if row.get("step_seconds") is not None:
        step = f"step {row['step_seconds'] * 1e3:.1f} ms"
        if row.get("retrain_step_seconds") is not None:
            step += f" / retrain {row['retrain_step_seconds'] * 1e3:.1f} ms"
        parts.append(step)
    if row.get("test_auc") is not None:
        parts.append(f"test AUC {row['test_auc']:.4f}")
    if row.get("compression_ratio") is not None:
        parts.append(f"{row['compression_ratio']:.1f}x")
    return "  ".join(parts)


def _check(name: str, measured: float | None, target: float, op: str, unit: str, why: str = "") -> dict[str, Any]:
    ok = None if measured is None else (measured <= target if op == "<=" else measured < target)
    tgt = f"{op} {target:g}{unit}"
    if measured is None:
        text = f"{name}: n/a ({why or 'not measured'}) vs target {tgt}"
    else:
        text = f"{name}: {measured:.3g}{unit} vs {tgt} -> {'ok' if ok else 'NOT MET'}"
    return {"name": name, "measured": measured, "target": target, "op": op, "unit": unit, "ok": ok, "text": text}


def full_size_checks(rows: list[dict]) -> list[dict[str, Any]]:
    """The issue's targets, all ratios within this run (largest point vs the next smaller / smallest)."""
    if not rows:
        return []
    by = {(r["rows"], r["stage"]): r for r in rows}
    points = sorted({r["rows"] for r in rows})
    big, small = points[-1], points[0]
    mid = points[-2] if len(points) > 1 else None

    def get(n: int | None, stage: str, key: str) -> float | None:
        r = by.get((n, stage))
        return None if r is None else r.get(key)

    def why(*keys: tuple[int | None, str]) -> str:
        missing = [f"{n:,} {s}" for n, s in keys if n is not None and (n, s) not in by]
        cached = [f"{n:,} {s}" for n, s in keys if by.get((n, s), {}).get("cached")]
        return "; ".join([*(f"{m} not run" for m in missing), *(f"{c} cached" for c in cached)]) or "not measured"

    checks = []
    for stage in STAGES:
        rss = get(big, stage, "peak_rss_mb")
        gb = None if rss is None else rss * 2**20 / 1e9
        checks.append(_check(f"peak RSS {stage} at {big:,} rows", gb, TARGETS["peak_rss_gb"], "<=", " GB",
                             why((big, stage))))
    if mid is not None:
        for stage in STAGES:
            a, b = get(big, stage, "peak_rss_mb"), get(mid, stage, "peak_rss_mb")
            checks.append(_check(f"peak RSS {stage} {big:,} / {mid:,} rows", a / b if a and b else None,
                                 TARGETS["rss_growth"], "<=", "x", why((big, stage), (mid, stage))))
        for stage, label in (("fp32", "fp32 step"), ("mpe", "mpe search step")):
            a, b = get(big, stage, "step_seconds"), get(small, stage, "step_seconds")
            checks.append(_check(f"{label} {big:,} / {small:,} rows", a / b if a and b else None,
                                 TARGETS["step_growth"], "<=", "x", why((big, stage), (small, stage))))
    epoch = get(big, "fp32", "train_seconds")
    checks.append(_check(f"fp32 epoch at {big:,} rows", None if epoch is None else epoch / 60,
                         TARGETS["fp32_epoch_minutes"], "<", " min", why((big, "fp32"))))
    a, b = get(big, "mpe", "wall_seconds"), get(big, "fp32", "wall_seconds")
    checks.append(_check(f"mpe wall / fp32 wall at {big:,} rows", a / b if a and b else None,
                         TARGETS["mpe_vs_fp32_wall"], "<=", "x", why((big, "mpe"), (big, "fp32"))))
    return checks


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _wall(s: float | None) -> str:
    if s is None:
        return "cached"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def full_size_markdown(rows: list[dict], checks: list[dict], args: argparse.Namespace, machine: dict) -> str:
    lines = [f"Full-size run on synthetic Criteo (`python -m experiments.bench_scale --full-size`; generator "
             f"v{GENERATOR_VERSION}, seed {DATA_SEED}; DNN {'-'.join(map(str, args.hidden))}, dim {DIM}, batch "
             f"{args.batch_size}, 1 epoch, {args.threads} threads per job; MPE at --target-ratio "
             f"{args.target_ratio:g}; {machine['cpus']} CPUs, {machine['memory_gb']:.0f} GB):", "",
             "| rows | stage | wall | step ms | peak RSS GB | test AUC | ratio |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = ""
        if r.get("step_seconds") is not None:
            step = f"{r['step_seconds'] * 1e3:.1f}"
            if r.get("retrain_step_seconds") is not None:
                step += f" / {r['retrain_step_seconds'] * 1e3:.1f}"
        rss = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb'] * 2**20 / 1e9:.2f}"
        auc = "" if r.get("test_auc") is None else f"{r['test_auc']:.4f}"
        ratio = "" if r.get("compression_ratio") is None else f"{r['compression_ratio']:.1f}x"
        wall = _wall(r.get("wall_seconds"))
        if r.get("cached") and r.get("prepare_seconds") is not None:
            wall = f"cached (prepared in {r['prepare_seconds']:.1f} s)"
        lines.append(f"| {r['rows']:,} | {r['stage']} | {wall} | {step} | {rss} | "
                     f"{auc} | {ratio} |")
    notes = []
    for n in sorted({r["rows"] for r in rows}):
        by = {r["stage"]: r for r in rows if r["rows"] == n}
        bits = []
        if by.get("generate", {}).get("file_bytes") is not None:
            g = by["generate"]
            bits.append(f"file {_bytes(g['file_bytes'])}"
                        + (", real Criteo cardinalities" if g.get("full_cardinalities") else ", cardinalities capped at rows / 2"))
        if by.get("prepare", {}).get("num_features") is not None:
            bits.append(f"{by['prepare']['num_features']:,} features")
        if "fp32" in by and by["fp32"].get("steps"):
            bits.append(f"{by['fp32']['steps']:,} steps / epoch")
        if bits:
            notes.append(f"- {n:,} rows: " + ", ".join(bits))
    lines += ["", "MPE step: search / retrain. Peak RSS: the largest process (`ru_maxrss`). "
              "\"cached\": reused from the cache, not timed.", *notes]
    if checks:
        lines += ["", "Checks (the issue's targets; ratios within this run):", ""]
        lines += [f"- {c['text']}" for c in checks]
    return "\n".join(lines) + "\n"


def collect(points: list[int], args: argparse.Namespace, out: Path) -> list[dict]:
    """The finished stages of ``points`` whose stored options match the current ones."""
    rows = []
    for n in points:
        for stage in STAGES:
            rec = load_stage(out, n, stage)
            if rec is not None and rec.get("options") == stage_options(stage, n, args):
                rows.append(rec["result"])
    return rows


def machine_info() -> dict[str, Any]:
    import torch

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "memory_gb": memory / 1e9}


def write_full_size(points: list[int], args: argparse.Namespace, out: Path, machine: dict) -> list[dict]:
    """(Re)write OUT/full_size.{json,csv,md} from the finished stages; the checks."""
    rows = collect(points, args, out)
    checks = full_size_checks(rows)
    config = {k: v for k, v in vars(args).items()}
    atomic_write_json(out / "full_size.json", {"rows": rows, "checks": checks, "targets": TARGETS,
                                               "machine": machine, "config": config})
    columns = list(dict.fromkeys([*TABLE_COLUMNS, *(k for r in rows for k in r)]))
    write_rows(out / "full_size.csv", rows, columns)
    atomic_write_bytes(out / "full_size.md", full_size_markdown(rows, checks, args, machine).encode())
    return checks


def estimate_bytes(stage: str, rows: int, cache: Path) -> int:
    """What ``stage`` at ``rows`` rows will write (an upper-end estimate)."""
    raw = synthetic_path(rows, cache)
    if stage == "generate":
        return 0 if synthetic_meta(raw, rows) is not None else int(rows * SYNTHETIC_BYTES_PER_ROW)
    manifest = prepared_path(raw, cache) / "manifest.json"
    if stage == "prepare" and manifest.is_file():
        return 0  # data.prepare reuses it when it matches (else it may write it again: a small miss)
    try:
        features = int(json.loads(manifest.read_text())["num_features"])
    except (OSError, ValueError, KeyError):
        features = min(sum(generator_cardinalities(rows).values()), int(rows * FEATURES_PER_ROW))
    if stage == "prepare":
        return rows * PREPARED_BYTES_PER_ROW + features * PREPARED_BYTES_PER_FEATURE
    return RUN_BYTES_PER_TABLE_BYTE[stage] * features * DIM * 4


def _device_of(path: Path) -> tuple[int, Path]:
    p = path
    while not p.exists():
        p = p.parent
    return os.stat(p).st_dev, p


def disk_check(todo: list[tuple[int, str]], cache: Path, out: Path) -> str | None:
    """None when the stages ``todo`` fit on disk; else a one-line error."""
    need: dict[int, list] = {}
    for n, stage in todo:
        dev, where = _device_of(cache if stage in ("generate", "prepare") else out)
        entry = need.setdefault(dev, [0, where])
        entry[0] += estimate_bytes(stage, n, cache)
    for nbytes, where in need.values():
        free = shutil.disk_usage(where).free
        _say(f"disk: the remaining stages write ~{nbytes / 1e9:.1f} GB under {where}, {free / 1e9:.1f} GB free")
        if nbytes > free:
            return (f"not enough disk space: the remaining stages need ~{nbytes / 1e9:.1f} GB on the file system "
                    f"of {where}, {free / 1e9:.1f} GB free (free space, or use --cache-dir / --out elsewhere)")
    return None


def needed_stages(selected: list[str]) -> list[str]:
    """``selected`` plus the stages they need (generate, prepare), in pipeline order."""
    need = set(selected)
    if need & set(TRAINING_STAGES):
        need.add("prepare")
    if "prepare" in need:
        need.add("generate")
    return [s for s in STAGES if s in need]


def main_full_size(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    cache = Path(args.cache_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"error: another experiments.bench_scale is running in {out}", file=sys.stderr)
        return 2
    points = sorted(set(args.rows))
    stages = needed_stages(args.stages or list(STAGES))
    machine = machine_info()
    _say(f"full-size bench: rows {', '.join(f'{n:,}' for n in points)}; stages {' '.join(stages)}; -> {out}")

    plan: list[tuple[int, str, str]] = []  # (rows, stage, action: reuse / run / rerun)
    for n in points:
        for stage in stages:
            rec = load_stage(out, n, stage)
            opts = stage_options(stage, n, args)
            if rec is None:
                plan.append((n, stage, "run"))
            elif rec.get("options") != opts:
                plan.append((n, stage, "options changed: " + ", ".join(
                    f"{k} {a!r} -> {b!r}" for k, (a, b) in options_diff(rec.get("options") or {}, opts).items())))
            elif not artifacts_present(stage, n, cache):
                plan.append((n, stage, "its output is gone"))
            else:
                plan.append((n, stage, "reuse"))
    todo = [(n, s) for n, s, action in plan if action != "reuse"]
    error = disk_check(todo, cache, out) if todo else None
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    for n, stage, action in plan:
        if action == "reuse":
            _say(f"reusing {n:,} rows {stage} ({stage_file(out, n, stage)})")
            continue
        if action != "run":
            _say(f"rerunning {n:,} rows {stage}: {action}")
        try:
            row = run_stage(stage, n, args, out, cache)
        except StageError as e:
            _say(f"FAILED {n:,} rows {stage}: {e}")
            write_full_size(points, args, out, machine)
            return 1
        atomic_write_json(stage_file(out, n, stage), {"version": STAGE_FILE_VERSION, "rows": n, "stage": stage,
                                                      "options": stage_options(stage, n, args), "result": row})
        _say(f"done   {describe(row)}")
        write_full_size(points, args, out, machine)

    checks = write_full_size(points, args, out, machine)
    print("\nchecks (the issue's targets; ratios within this run)", flush=True)
    for c in checks:
        print(f"  {c['text']}", flush=True)
    print(f"-> {out / 'full_size.md'}, {out / 'full_size.json'}, {out / 'full_size.csv'}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true",
                   help="the full-size run: generate / prepare / fp32 / mpe / fp32_2p stages per row point, "
                        "resumable stage by stage")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="synthetic Criteo row counts (default 100000 1000000 4000000; "
                        "--full-size: 1000000 10000000 45840617)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None,
                   help="--full-size: the stages to run (default all; generate and prepare run when needed)")
    p.add_argument("--threads", type=int, default=2, help="threads per job in all (default 2)")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 128, 64], help="DNN hidden sizes")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--embedding-lr", type=float, default=None,
                   help="learning rate of the tables (default 0.01 for the Adagrad tables of the scaling mode; "
                        "--full-size: the CLIs' default)")
    p.add_argument("--mpe-lambda", type=float, default=3e-4)
    p.add_argument("--target-ratio", type=float, default=200.0,
                   help="--full-size: the mpe stage's --target-ratio (default 200)")
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--budget", choices=BUDGET_METHODS, default=SearchConfig.budget,
                   help=f"--full-size: how the mpe stage meets --target-ratio (default {SearchConfig.budget})")
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="output directory (default runs/bench_scale; --full-size: runs/bench_full)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rows is not None and min(args.rows) < 1:
        parser.error("--rows must be positive")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.full_size:
        args.rows = args.rows or list(FULL_SIZE_ROWS)
        args.out = args.out or "runs/bench_full"
        return main_full_size(args)
    if args.stages is not None:
        parser.error("--stages needs --full-size")
    args.rows = args.rows or [100_000, 1_000_000, 4_000_000]
    args.out = args.out or "runs/bench_scale"
    if args.embedding_lr is None:
        args.embedding_lr = 0.01

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for n in sorted(args.rows):
        prepared = prepare(n, args)
        for procs in args.processes:
            for job in args.jobs:
                r = measure(n, procs, job, prepared, args)
                rows.append(r)
                print(f"{n:>10,} rows  {procs}p  {job:<5} step {r['step_seconds'] * 1e3:8.1f} ms  "
                      f"wall {r['wall_seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:8.1f} MiB  "
                      f"test AUC {r['test_auc']:.4f}", flush=True)
    add_ratios(rows)
    print("\nratios within this run")
    for r in rows:
        vs_fp32 = f"{r['step_vs_fp32']:.2f}x fp32" if r["step_vs_fp32"] else "-"
        vs_one = f"{r['step_vs_1_process']:.2f}x 1-process" if r["step_vs_1_process"] else "-"
        print(f"  {r['rows']:>10,} rows {r['processes']}p {r['job']:<5} {vs_fp32:>12}  {vs_one:>16}")
    ex = extrapolate(rows, args)
    md = markdown(ex, args) if ex else ""
    if md:
        print("\n" + md)
        atomic_write_bytes(out / "extrapolation.md", md.encode())
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    atomic_write_json(out / "bench_scale.json", {"rows": rows, "extrapolation": ex, "machine": machine,
                                                 "config": vars(args)})
    write_rows(out / "bench_scale.csv", rows, list(dict.fromkeys(k for r in rows for k in r)))
    print(f"-> {out / 'bench_scale.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
