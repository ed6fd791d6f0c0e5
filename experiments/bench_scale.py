"""Scale benchmark: step time and peak memory of the real training CLIs as rows and
processes grow, measured in one run, and an extrapolation to full-size Criteo.

    python -m experiments.bench_scale                                  # 100k, 1M and 4M rows, 1 and 2 processes
    python -m experiments.bench_scale --rows 20000 100000 --processes 1 2 --out runs/bench_scale_small

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

Writes ``OUT/bench_scale.json``, ``OUT/bench_scale.csv`` and ``OUT/extrapolation.md``.
Not a test: figures depend on the machine (here: a shared 2-core box, no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctr.trainer import REPORT_FILE
from data import sources
from data.artifacts import atomic_write_bytes, atomic_write_json
from experiments.results_csv import write_rows

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 4_000_000],
                   help="synthetic Criteo row counts (default 100000 1000000 4000000)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--threads", type=int, default=2, help="threads per job in all (default 2)")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 128, 64], help="DNN hidden sizes")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--embedding-lr", type=float, default=0.01, help="Adagrad learning rate of the tables")
    p.add_argument("--mpe-lambda", type=float, default=3e-4)
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="runs/bench_scale")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

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
