"""Benchmark: data.prepare's counting pass vs a chunked pandas ``read_csv`` doing the same counting.

Each contender runs in its own subprocess (so peak RSS, ``ru_maxrss``, is its own), on the
same Criteo-format file, in the same run:

- ``arrow_count``: pass 1 of ``data.prepare`` (streaming pyarrow reader, per-block value counts
  of every raw column, validation, Arrow merges) - exactly the code ``prepare`` runs;
- ``pandas_count``: ``pd.read_csv(chunksize=...)`` with the values kept as raw strings
  (``dtype=str``, no NA conversion: the same categories), per-chunk ``value_counts`` of every
  column, merged with ``groupby(level=0).sum()``;
- ``pandas_count_inferred``: the same with pandas' default type inference (the common idiom);
- ``arrow_read_csv_ceiling`` / ``arrow_read_csv_inferred``: ``pyarrow.csv.read_csv``
  multithreaded over the whole file (all-bytes columns / inferred types), parse only: the
  parse ceiling of this machine;
- ``prepare_full``: the whole ``prepare`` (both passes, parquet output), for reference;
- ``arrow_count_days`` / ``prepare_full_days``: the same two on the input cut into ``--days``
  day files (``day_0`` ... as Criteo 1TB ships them) read as one stream (``MultiReader``),
  ``prepare_full_days`` with ``--split by-file`` (the last day is val + test).

Input: ``--input FILE`` or a generated ``--rows``-row Criteo-format file (``data.synthetic``),
cached in ``--out`` (with its day files).
Results: ``--out/bench_prepare.json`` and ``.csv``.

    python -m experiments.bench_prepare                 # 2M generated rows (and as 4 day files)
    python -m experiments.bench_prepare --input train.txt --skip prepare_full prepare_full_days
    python -m experiments.bench_prepare --rows 200000 --skip pandas_count pandas_count_inferred  # quick
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data.prepare import count_pass, field_plans, make_reader, prepare, source_columns
from data.reader import DEFAULT_BLOCK_SIZE
from data.schema import CRITEO
from data.synthetic import generate

CONTENDERS = (
    "arrow_count",
    "pandas_count",
    "pandas_count_inferred",
    "arrow_read_csv_ceiling",
    "arrow_read_csv_inferred",
    "prepare_full",
    "arrow_count_days",
    "prepare_full_days",
)


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    ``VmHWM`` from /proc (Linux) belongs to this process's address space, so it is not
    inflated by the parent's size at fork the way ``ru_maxrss`` is; ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale


# ---------------------------------------------------------------------------------------------
# input file
# ---------------------------------------------------------------------------------------------
def make_input(out: Path, rows: int, seed: int) -> Path:
    """A cached Criteo-format file of ``rows`` rows under ``out``."""
    path = out / f"criteo_like_{rows}rows_s{seed}.txt"
    if path.exists():
        return path
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    generate("criteo", rows, path, seed=seed, progress=True)
    print(f"generated {path} ({rows:,} rows, {path.stat().st_size / 2**20:.0f} MiB) with data.synthetic.generate "
          f"in {time.perf_counter() - t:.1f} s")
    return path


def make_days(path: Path, out: Path, days: int) -> list[Path]:
    """``path`` cut into ``days`` consecutive day files of nearly equal lines (cached under ``out``), streamed."""
    root = out / f"{path.stem}_{days}days"
    files = [root / f"day_{d}" for d in range(days)]
    if all(f.exists() for f in files) and (root / "complete").exists():
        return files
    root.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
    bounds = [lines * d // days for d in range(days + 1)]
    with open(path, "rb") as f:
        for d, dst in enumerate(files):
            with open(dst, "wb") as w:
                for _ in range(bounds[d + 1] - bounds[d]):
                    w.write(next(f))
    (root / "complete").write_text(f"{lines}\n")
    return files


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def _work_arrow_count(path: Path | list[Path], args: argparse.Namespace) -> dict[str, Any]:

    rss0 = _rss_mb()
    t = time.perf_counter()
    reader = make_reader(CRITEO, path, block_size=args.block_size)
    counts = count_pass(reader, source_columns(field_plans(CRITEO)), progress=False)
    seconds = time.perf_counter() - t
    distinct = sum(tab.num_rows for tab in counts.values())
    return {"rows": reader.rows, "seconds": seconds, "distinct_values": distinct, "import_rss_mb": rss0}


def _work_pandas_count(path: Path, args: argparse.Namespace, infer: bool) -> dict[str, Any]:
    import pandas as pd


    rss0 = _rss_mb()
    names = list(CRITEO.columns)
    kw: dict[str, Any] = {} if infer else {"dtype": str, "keep_default_na": False, "na_filter": False}
    t = time.perf_counter()
    acc: dict[str, list[pd.Series]] = {c: [] for c in names[1:]}
    rows = 0
    for chunk in pd.read_csv(path, sep="\t", header=None, names=names, chunksize=args.chunksize, **kw):
        rows += len(chunk)
        for c in names[1:]:
            acc[c].append(chunk[c].value_counts(sort=False, dropna=False))
            if len(acc[c]) >= 8:
                acc[c] = [pd.concat(acc[c]).groupby(level=0, dropna=False).sum()]
    counts = {c: pd.concat(v).groupby(level=0, dropna=False).sum() for c, v in acc.items()}
    seconds = time.perf_counter() - t
    return {"rows": rows, "seconds": seconds, "distinct_values": int(sum(len(s) for s in counts.values())),
            "import_rss_mb": rss0}


def _work_read_csv(path: Path, args: argparse.Namespace, infer: bool) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.csv as pacsv


    rss0 = _rss_mb()
    names = list(CRITEO.columns)
    conv = pacsv.ConvertOptions() if infer else pacsv.ConvertOptions(column_types={c: pa.binary() for c in names})
    t = time.perf_counter()
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, use_threads=True),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=conv,
    )
    seconds = time.perf_counter() - t
    return {"rows": table.num_rows, "seconds": seconds, "import_rss_mb": rss0}


def _work_prepare_full(path: Path | list[Path], args: argparse.Namespace, split: str = "random") -> dict[str, Any]:
    import shutil


    rss0 = _rss_mb()
    out = Path(args.out) / "prepared_bench"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    m = prepare("criteo", path, out, split=split, progress=False, block_size=args.block_size)
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": m["rows"]["total"], "seconds": seconds, "num_features": m["num_features"], "import_rss_mb": rss0}


def worker(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one contender in this process and return its measurements."""
    if name == "arrow_count":
        res = _work_arrow_count(path, args)
    elif name == "pandas_count":
        res = _work_pandas_count(path, args, infer=False)
    elif name == "pandas_count_inferred":
        res = _work_pandas_count(path, args, infer=True)
    elif name == "arrow_read_csv_ceiling":
        res = _work_read_csv(path, args, infer=False)
    elif name == "arrow_read_csv_inferred":
        res = _work_read_csv(path, args, infer=True)
    elif name == "prepare_full":
        res = _work_prepare_full(path, args)
    elif name == "arrow_count_days":
        res = _work_arrow_count(make_days(path, Path(args.out), args.days), args)
        res["files"] = args.days
    elif name == "prepare_full_days":
        res = _work_prepare_full(make_days(path, Path(args.out), args.days), args, split="by-file")
        res["files"] = args.days
    else:
        raise ValueError(f"unknown contender {name!r}")
    res["peak_rss_mb"] = _rss_mb()
    return res


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_in_subprocess(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "experiments.bench_prepare", "--worker", name, "--input", str(path),
           "--out", str(args.out), "--block-size", str(args.block_size), "--chunksize", str(args.chunksize),
           "--days", str(args.days)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", metavar="FILE", help="a Criteo-format file (default: generate one)")
    p.add_argument("--rows", type=int, default=2_000_000, help="rows of the generated file (default 2,000,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated file")
    p.add_argument("--out", default="runs/bench_prepare", help="results and cached input (default runs/bench_prepare)")
    p.add_argument("--block-size", type=int, default=None, help="data.prepare block size in bytes (default: prepare's)")
    p.add_argument("--chunksize", type=int, default=200_000, help="pandas read_csv chunk rows (default 200,000)")
    p.add_argument("--days", type=int, default=4,
                   help="day files the input is cut into for the *_days contenders (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="runs per contender; the fastest is kept (default 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=CONTENDERS, help="contenders to leave out")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.block_size is None:

        args.block_size = DEFAULT_BLOCK_SIZE
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.input), args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.input) if args.input else make_input(out, args.rows, args.seed)
    if args.days < 2:
        p.error("--days must be at least 2 (prepare_full_days splits by file)")
    if any(name.endswith("_days") and name not in args.skip for name in CONTENDERS):
        make_days(path, out, args.days)
    results: dict[str, dict[str, Any]] = {}
    for name in CONTENDERS:
        if name in args.skip:
            continue
        runs = [run_in_subprocess(name, path, args) for _ in range(max(1, args.repeat))]
        best = min(runs, key=lambda r: r["seconds"])
        best["rows_per_s"] = best["rows"] / best["seconds"]
        best["rss_growth_mb"] = best["peak_rss_mb"] - best["import_rss_mb"]  # the work itself
        results[name] = best
        print(f"{name:<25} {best['rows']:>10,} rows {best['seconds']:7.2f} s {best['rows_per_s'] / 1e6:6.3f} M rows/s "
              f"peak RSS {best['peak_rss_mb']:5.0f} MiB (imports {best['import_rss_mb']:3.0f}, "
              f"work {best['rss_growth_mb']:4.0f})", flush=True)

    summary: dict[str, Any] = {
        "input": str(path.resolve()),
        "input_bytes": path.stat().st_size,
        "block_size": args.block_size,
        "pandas_chunksize": args.chunksize,
        "days": args.days,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
    }
    if "arrow_count" in results:
        a = results["arrow_count"]
        for base in ("pandas_count", "pandas_count_inferred"):
            if base in results:
                b = results[base]
                summary[f"speedup_vs_{base}"] = a["rows_per_s"] / b["rows_per_s"]
                summary[f"peak_rss_ratio_vs_{base}"] = a["peak_rss_mb"] / b["peak_rss_mb"]
                summary[f"rss_growth_ratio_vs_{base}"] = a["rss_growth_mb"] / b["rss_growth_mb"]
                print(f"arrow_count vs {base}: {summary[f'speedup_vs_{base}']:.2f}x rows/s, "
                      f"peak RSS ratio {summary[f'peak_rss_ratio_vs_{base}']:.2f} "
                      f"(growth past imports {summary[f'rss_growth_ratio_vs_{base}']:.2f})")
        if "arrow_read_csv_ceiling" in results:
            c = results["arrow_read_csv_ceiling"]["rows_per_s"]
            summary["fraction_of_parse_ceiling"] = a["rows_per_s"] / c
            print(f"arrow_count reaches {summary['fraction_of_parse_ceiling']:.0%} of the multithreaded "
                  f"read_csv parse ceiling ({c / 1e6:.3f} M rows/s)")
    for multi, one in (("arrow_count_days", "arrow_count"), ("prepare_full_days", "prepare_full")):
        if multi in results and one in results:
            summary[f"{multi}_vs_one_file"] = results[multi]["rows_per_s"] / results[one]["rows_per_s"]
            print(f"{multi}: {results[multi]['rows_per_s'] / 1e6:.3f} M rows/s over {args.days} day files, "
                  f"{summary[f'{multi}_vs_one_file']:.2f}x the one-file rate")
    (out / "bench_prepare.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "bench_prepare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["contender", "rows", "seconds", "rows_per_s", "peak_rss_mb", "import_rss_mb", "rss_growth_mb"])
        for name, r in results.items():
            w.writerow([name, r["rows"], f"{r['seconds']:.3f}", f"{r['rows_per_s']:.0f}",
                        f"{r['peak_rss_mb']:.0f}", f"{r['import_rss_mb']:.0f}", f"{r['rss_growth_mb']:.0f}"])
    print(f"results: {out / 'bench_prepare.json'}, {out / 'bench_prepare.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
