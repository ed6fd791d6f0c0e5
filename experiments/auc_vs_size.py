"""AUC against embedding bytes for every compression method, measured in one run.

    python -m experiments.auc_vs_size --dataset criteo --synthetic 1000000 --seeds 3 --out runs/auc_vs_size
    python -m experiments.auc_vs_size --dataset avazu --data train.gz --methods fp32 lsq:8,4 ptq mpe:x10 --out DIR

Every (method, setting, seed) is trained with the same tower and training options and
early-stopped on the val split; its test AUC and logloss come from the test split. Method
kinds (``baselines.registry``):

  train     the compressed embedding is trained from scratch with the tower;
  post      the embedding of the fp32 model of the same seed is compressed after training
            (the fp32 model is trained once per seed, kept as OUT/fp32/seed<S>.pt);
  pipeline  MPE: lambda bisection to the target ratio, search, retrain, bit-packed export
            (``mpe.pipeline.run``; its run directory is OUT/mpe/<setting>_seed<S>/).

Bytes are bytes really written: every run exports its embedding (``export()``, MPE's
bit-packed export) under OUT/exports/ and the runner checks that the files on disk hold
exactly ``num_bytes()``; exports are deleted after measuring unless --keep-exports. The
ratio is fp32 bytes (rows x dim x 4) / bytes.

Written to OUT: ``results.csv`` (one row per run, rewritten atomically after each run;
rows already in it are skipped, so an interrupted benchmark resumes), ``reports/<run>.json``
(each run's details), ``auc_vs_size.png`` (mean test AUC over seeds, min-max bars, against
bytes on a log axis, one line per method, the Pareto front of the means marked) and
``auc_vs_size.md`` (the same as a table), and, when MPE ran with two or more seeds,
``mpe_seed_agreement.json`` (per setting, the share of groups whose bits the seeds agree on). ``--methods NAME[:S1,S2,...]`` overrides a
method's default settings; without --methods every registered method runs at its defaults.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import math
import re
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from baselines.base import CompressedEmbedding
from baselines.mpe_method import run_setting, target_ratio
from baselines.registry import METHODS, Method, MethodInputs, get_method
from ctr.model import CTRModel
from ctr.options import add_training_arguments, train_config
from ctr.trainer import Trainer, evaluate
from data import sources
from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    load_torch,
    read_json,
    replace_dir,
    sha256_file,
)
from data.batches import PreparedDataset
from experiments.results_csv import (
    cell,
    number,
    read_rows,
    record_settings,
    run_settings,
    settings_conflict,
    write_rows,
)
from genlora_rec.towers import build_tower
from mpe.config import MPEConfig, add_mpe_arguments
from mpe.format import HEADER_FILE
from mpe.run_dir import EXPORT_DIR, MODEL_FILE, RETRAIN_DIR, SEARCH_DIR, SEARCH_MODEL_FILE

COLUMNS = (
    "dataset", "method", "kind", "setting", "seed", "bytes", "fp32_bytes", "ratio", "test_auc",
    "test_logloss", "val_auc", "best_step", "steps", "seconds",
)
# options that only choose which runs to do (or how to show them); every other option must
# match for OUT to be resumed
RUN_SELECTION = ("out", "methods", "seed", "seeds", "keep_exports", "no_progress", "cache_dir")
PNG, MARKDOWN, CSV = "auc_vs_size.png", "auc_vs_size.md", "results.csv"
AGREEMENT = "mpe_seed_agreement.json"


# -- what to run --------------------------------------------------------------------------------
def parse_methods(specs: Sequence[str] | None) -> list[tuple[Method, list[str]]]:
    """``["fp32", "lsq:8,4", "mpe:x10"]`` -> [(Method, settings)]; defaults when no settings given.

    ``ValueError`` names an unknown method (listing the known ones) or an empty setting.
    """
    specs = list(specs) if specs else list(METHODS)
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, rest = spec.partition(":")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r} in --methods {spec!r}; known: {', '.join(METHODS)}")
        settings = rest.split(",") if rest else []
        if any(not s for s in settings):
            raise ValueError(f"--methods {spec!r}: empty setting")
        out.setdefault(name, [])
        out[name] += [s for s in settings if s not in out[name]]
    chosen = []
    for name, settings in out.items():
        method = get_method(name)
        chosen.append((method, settings or list(method.settings)))
    return chosen


def check_settings(method: Method, settings: Sequence[str], inputs: MethodInputs) -> None:
    """Raise ``ValueError`` naming a setting the method rejects (defaults are trusted).

    A non-default setting is tried once on the real fields and sizes (an untrained module).
    """
    for setting in settings:
        if setting in method.settings:
            continue
        try:
            if method.kind == "pipeline":

                target_ratio(setting)
            elif method.kind == "train":
                method.build(inputs, setting)
            else:
                fp32 = get_method("fp32").build(inputs, "-")
                method.convert(fp32, inputs, setting)
        except Exception as e:  # noqa: BLE001 - any rejection is reported with the method's message
            raise ValueError(
                f"method {method.name!r}: setting {setting!r} rejected ({e}); "
                f"its default settings are {', '.join(method.settings)}"
            ) from None


def run_id(method: str, setting: str, seed: int) -> str:
    return f"{method}_{re.sub(r'[^A-Za-z0-9._-]', '_', setting)}_seed{seed}"


# -- results file -------------------------------------------------------------------------------
# -- one run --------------------------------------------------------------------------------------
def export_and_measure(embedding: CompressedEmbedding, out_dir: Path) -> dict:
    """Export ``embedding`` to ``out_dir``; check the payload files on disk hold ``num_bytes()``.

    Returns ``{"bytes": ..., "files": {name: bytes}}``; ``RuntimeError`` on a mismatch.
    """
    header = embedding.export(out_dir)
    files = {name: (out_dir / name).stat().st_size for name in header["files"]}
    on_disk, claimed = sum(files.values()), int(embedding.num_bytes())
    if on_disk != claimed or header["total_bytes"] != on_disk:
        raise RuntimeError(
            f"{embedding.method}: num_bytes() says {claimed:,} but export wrote {on_disk:,} bytes to {out_dir}"
        )
    return {"bytes": on_disk, "files": files}


def mpe_config(args: argparse.Namespace, dataset: str, setting: str, seed: int) -> MPEConfig:
    """The MPE run of ``setting`` (``x<R>``) and ``seed``: ``MPEConfig.from_args``, as the CLI
    builds it, at target ratio R; no fp32 comparison (the benchmark has its own fp32 rows)."""
    return MPEConfig.from_args(args, dataset=dataset, seed=seed, fp32_baseline=False,
                               target_ratio=target_ratio(setting), lam=None)


class Benchmark:
    """Runs (method, setting, seed) jobs on one dataset with one set of tower / training options."""

    def __init__(self, args: argparse.Namespace, data: PreparedDataset, out: Path, log=print):
        self.args = args
        self.data = data
        self.out = out
        self.log = log
        self.frequency = data.frequency()
        self._fp32: tuple[int, CTRModel, dict] | None = None

    def inputs(self, seed: int) -> MethodInputs:
        return MethodInputs(list(self.data.fields), list(self.data.cardinalities), self.args.dim, self.frequency, seed)

    def fp32_bytes(self) -> int:
        return self.inputs(0).fp32_bytes

    def _tower(self) -> torch.nn.Module:
        hidden = tuple(self.args.hidden) if self.args.hidden else None
        return build_tower(self.args.tower, len(self.data.fields), self.args.dim, hidden)

    def train(self, method: Method, setting: str, seed: int) -> tuple[CTRModel, dict]:
        """Build (seeded) and train embedding + tower; the model ends with its best-val weights."""
        torch.manual_seed(seed)
        model = CTRModel(method.build(self.inputs(seed), setting), self._tower())
        cfg = dataclasses.replace(train_config(self.args), seed=seed)
        factory = (lambda m: method.optimizers(m, cfg.lr)) if method.optimizers is not None else None
        fit = Trainer(model, cfg, factory, log=self.log).fit(
            self.data.split("train"), self.data.split("val"), self.data.fields
        )
        info = {"val_auc": fit.best_auc, "best_step": fit.best_step, "steps": fit.steps,
                "seconds": fit.seconds, "history": fit.history}
        return model, info

    def fp32_base(self, seed: int) -> tuple[CTRModel, dict]:
        """The fp32 model of ``seed``: trained once, kept as OUT/fp32/seed<S>.pt (+ .json)."""
        if self._fp32 is not None and self._fp32[0] == seed:
            return self._fp32[1], self._fp32[2]
        fp32 = get_method("fp32")
        path, meta_path = self.out / "fp32" / f"seed{seed}.pt", self.out / "fp32" / f"seed{seed}.json"
        if meta_path.exists():
            info = read_json(meta_path)
            torch.manual_seed(seed)
            model = CTRModel(fp32.build(self.inputs(seed), "-"), self._tower())
            model.load_state_dict(load_torch(path, expected_sha256=info["sha256"]))
            self.log(f"seed {seed}: fp32 model loaded from {path}")
        else:
            model, info = self.train(fp32, "-", seed)
            atomic_torch_save(path, model.state_dict())
            info["sha256"] = sha256_file(path)
            atomic_write_json(meta_path, info)
        model.eval()
        self._fp32 = (seed, model, info)
        return model, info

    def run(self, method: Method, setting: str, seed: int) -> dict:
        """One run: its CSV row (``details`` holds what goes to the per-run report only)."""
        rid = run_id(method.name, setting, seed)
        export_dir = self.out / "exports" / rid
        details: dict[str, Any] = {"description": method.description}
        if method.kind == "pipeline":
            return self._run_pipeline(method, setting, seed, rid)
        if method.kind == "train" and method.name == "fp32":
            model, info = self.fp32_base(seed)
        elif method.kind == "train":
            model, info = self.train(method, setting, seed)
        else:
            base, base_info = self.fp32_base(seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            embedding = method.convert(copy.deepcopy(base.embedding), self.inputs(seed), setting)
            seconds = time.perf_counter() - t0
            model = CTRModel(embedding, copy.deepcopy(base.tower))
            val = evaluate(model, self.data.split("val"), self.data.fields)
            info = {"val_auc": val["auc"], "best_step": base_info["best_step"], "steps": base_info["steps"],
                    "seconds": seconds, "fp32_seconds": base_info["seconds"]}
        model.eval()
        test = evaluate(model, self.data.split("test"), self.data.fields)
        measured = export_and_measure(model.embedding, export_dir)
        details.update(export_dir=str(export_dir), export_files=measured["files"],
                       export_config=model.embedding.export_config(), tower_bytes=model.tower_bytes(),
                       history=info.get("history", []))
        if "fp32_seconds" in info:
            details["fp32_train_seconds"] = info["fp32_seconds"]
        if not self.args.keep_exports:
            shutil.rmtree(export_dir, ignore_errors=True)
            details["export_dir"] = None
        return self._row(method, setting, seed, measured["bytes"], test, info, details)

    def _run_pipeline(self, method: Method, setting: str, seed: int, rid: str) -> dict:
        cfg = mpe_config(self.args, self.data.dataset, setting, seed)
        run_dir = self.out / "mpe" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', setting)}_seed{seed}"
        res = run_setting(self.data, cfg, run_dir)
        if res.fp32_bytes != self.fp32_bytes():
            raise RuntimeError(f"MPE's fp32 bytes {res.fp32_bytes:,} differ from the benchmark's {self.fp32_bytes():,}")
        r = res.report
        header = read_json(res.export_dir / HEADER_FILE)
        details: dict[str, Any] = {
            "description": method.description, "mpe_run_dir": str(run_dir), "lambda": r["config"]["lambda"],
            "mean_bits_per_row": r["mean_bits_per_row"], "paper_ratio_32_over_mean_bits": r["paper_ratio_32_over_mean_bits"],
            "torchrec_quant_bytes": r.get("torchrec_quant_bytes"), "tower_bytes": r["tower_bytes"],
            "bits_per_group": r["bits_per_group"], "lambda_trials": r["lambda_trials"], "history": r["history"],
            "export_files": {name: info["bytes"] for name, info in header["files"].items()},
            "export_dir": None,
        }
        if self.args.keep_exports:
            dest = self.out / "exports" / rid
            dest.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(res.export_dir, dest)
            details["export_dir"] = str(dest)
        # the retrained model, checkpoints and export are not needed once measured
        for name in (SEARCH_DIR, RETRAIN_DIR, EXPORT_DIR, SEARCH_MODEL_FILE, MODEL_FILE):
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        test = {"auc": res.test_auc, "logloss": res.test_logloss}
        info = {"val_auc": res.val_auc, "best_step": "", "steps": res.steps, "seconds": res.seconds}
        return self._row(method, setting, seed, res.bytes, test, info, details)

    def _row(self, method: Method, setting: str, seed: int, nbytes: int, test: dict, info: dict, details: dict) -> dict:
        fp32 = self.fp32_bytes()
        row = {
            "dataset": self.data.dataset, "method": method.name, "kind": method.kind, "setting": setting,
            "seed": seed, "bytes": int(nbytes), "fp32_bytes": fp32, "ratio": fp32 / nbytes,
            "test_auc": float(test["auc"]), "test_logloss": float(test["logloss"]), "val_auc": float(info["val_auc"]),
            "best_step": info["best_step"], "steps": info["steps"], "seconds": float(info["seconds"]),
        }
        atomic_write_json(self.out / "reports" / f"{run_id(method.name, setting, seed)}.json", {**row, **details})
        return row


# -- summaries ------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict[str, str]]) -> list[dict]:
    """One point per (method, setting) in first-seen order: means / spreads over seeds, ``on_front``.

    The Pareto front is taken over the means: a point is on it when no point with fewer or
    equal bytes has a higher mean AUC (at equal bytes and AUC the first one seen counts).
    """
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        g = groups.setdefault((r["method"], r["setting"]), {"method": r["method"], "setting": r["setting"],
                                                             "kind": r.get("kind", ""), "vals": {}})
        for k in ("bytes", "fp32_bytes", "test_auc", "test_logloss", "val_auc", "seconds"):
            g["vals"].setdefault(k, []).append(number(r.get(k, "")))
    points = []
    for g in groups.values():
        v = {k: np.asarray(x, dtype=float) for k, x in g["vals"].items()}
        auc = v["test_auc"]
        points.append({
            "method": g["method"], "setting": g["setting"], "kind": g["kind"], "seeds": int(auc.size),
            "bytes": float(v["bytes"].mean()), "ratio": float(v["fp32_bytes"].mean() / v["bytes"].mean()),
            "auc_mean": float(auc.mean()), "auc_std": float(auc.std()), "auc_min": float(auc.min()),
            "auc_max": float(auc.max()), "logloss": float(v["test_logloss"].mean()),
            "seconds": float(v["seconds"].mean()),
        })
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["bytes"], -p["auc_mean"])):
        p["on_front"] = bool(p["auc_mean"] > best)
        best = max(best, p["auc_mean"])
    return points


def seed_agreement(reports: Sequence[dict]) -> dict[str, dict]:
    """Per MPE setting run with two or more seeds: the share of groups on which the seeds'
    selected bit-widths agree (mean over seed pairs), from each run's ``bits_per_group``.

    Returns ``{setting: {"seeds": [...], "share_equal": float, "pairs": {"2022-2023": float}}}``.
    """
    by_setting: dict[str, dict[int, np.ndarray]] = {}
    for r in reports:
        if r.get("method") == "mpe" and r.get("bits_per_group"):
            by_setting.setdefault(str(r["setting"]), {})[int(r["seed"])] = np.asarray(r["bits_per_group"])
    out = {}
    for setting, bits in by_setting.items():
        seeds = sorted(bits)
        pairs = {f"{a}-{b}": float(np.mean(bits[a] == bits[b]))
                 for i, a in enumerate(seeds) for b in seeds[i + 1:] if bits[a].shape == bits[b].shape}
        if pairs:
            out[setting] = {"seeds": seeds, "share_equal": float(np.mean(list(pairs.values()))), "pairs": pairs}
    return out


def _methods_in_order(points: Sequence[dict]) -> list[str]:
    """The methods of ``points`` in registry order (unknown names last)."""
    names = list(dict.fromkeys(p["method"] for p in points))
    order = list(METHODS)
    return sorted(names, key=lambda m: order.index(m) if m in order else len(order))


def front_sentence(points: Sequence[dict]) -> str:
    """Which settings of each method are on the Pareto front, in words."""
    lines = []
    for method in _methods_in_order(points):
        ps = [p for p in points if p["method"] == method]
        on = [p["setting"] for p in ps if p["on_front"]]
        off = [p["setting"] for p in ps if not p["on_front"]]
        if not off:
            lines.append(f"- {method}: on the front at every setting ({', '.join(on)})")
        elif not on:
            lines.append(f"- {method}: not on the front ({', '.join(off)} dominated)")
        else:
            lines.append(f"- {method}: on the front at {', '.join(on)}; dominated at {', '.join(off)}")
    return "\n".join(lines)


def write_markdown(path: Path, points: Sequence[dict], title: str, agreement: dict[str, dict] | None = None) -> None:
    lines = [f"# {title}", "",
             "Test AUC mean ± std over seeds (early stopping on val); bytes = the export's files on disk; "
             "ratio = fp32 rows x dim x 4 / bytes; seconds = training (post: conversion; mpe: whole pipeline).", "",
             "| method | setting | bytes | ratio | test AUC | logloss | seconds | seeds | Pareto front |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in sorted(points, key=lambda p: -p["bytes"]):
        auc = f"{p['auc_mean']:.4f} ± {p['auc_std']:.4f}" if p["seeds"] > 1 else f"{p['auc_mean']:.4f}"
        lines.append(f"| {p['method']} | {p['setting']} | {p['bytes']:,.0f} | {p['ratio']:.1f}x | {auc} | "
                     f"{p['logloss']:.4f} | {p['seconds']:.1f} | {p['seeds']} | {'yes' if p['on_front'] else 'no'} |")
    lines += ["", "Pareto front (max mean AUC at <= bytes):", front_sentence(points)]
    if agreement:
        lines += ["", "MPE: share of frequency groups on which the seeds select the same bit-width "
                  "(mean over seed pairs):"]
        lines += [f"- {setting}: {a['share_equal']:.1%} (seeds {', '.join(map(str, a['seeds']))})"
                  for setting, a in agreement.items()]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def plot(path: Path, points: Sequence[dict], title: str) -> None:
    """Mean test AUC (min-max bars over seeds) against bytes, log x; the front as a black step line."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab20")
    for p in points:
        if p["method"] == "fp32":
            ax.axhline(p["auc_mean"], color="grey", ls=":", lw=1, label="fp32 AUC")
    for method in _methods_in_order(points):
        i = list(METHODS).index(method) if method in METHODS else len(METHODS)
        ps = sorted((p for p in points if p["method"] == method), key=lambda p: p["bytes"])
        x = np.array([p["bytes"] for p in ps])
        y = np.array([p["auc_mean"] for p in ps])
        err = [y - np.array([p["auc_min"] for p in ps]), np.array([p["auc_max"] for p in ps]) - y]
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, color=cmap(i % 20), label=method)
        for p in ps:
            if p["setting"] != "-":
                ax.annotate(p["setting"], (p["bytes"], p["auc_mean"]), textcoords="offset points",
                            xytext=(3, 4), fontsize=7, color=cmap(i % 20))
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["bytes"])
    if front:
        fx = [p["bytes"] for p in front]
        fy = [p["auc_mean"] for p in front]
        ax.step(fx + [max(p["bytes"] for p in points)], fy + [fy[-1]], where="post", color="black",
                ls="--", lw=1, label="Pareto front (means)")
        ax.scatter(fx, fy, s=120, facecolors="none", edgecolors="black", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes on disk (log)")
    ax.set_ylabel("test AUC (mean, min-max over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# -- CLI ------------------------------------------------------------------------------------------
def _method_list() -> str:
    lines = ["methods (NAME: kind, default settings - description):"]
    for name in METHODS:
        try:
            m = get_method(name)
            lines.append(f"  {name:7s} {m.kind:8s} {','.join(m.settings):22s} {m.description}")
        except Exception as e:  # noqa: BLE001 - --help must work even if one method is broken
            lines.append(f"  {name:7s} (cannot be imported: {type(e).__name__}: {e})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.auc_vs_size", description=__doc__,
                                epilog=_method_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    sources.add_data_arguments(p)
    add_training_arguments(p)  # the same for every method; --seed is the first of --seeds
    g = p.add_argument_group("benchmark")
    g.add_argument("--methods", nargs="+", metavar="NAME[:S1,S2]", default=None,
                   help="methods, each with optional settings overriding its defaults, e.g. fp32 lsq:8,4 mpe:x10 "
                   "(default: every registered method at its default settings; list below)")
    g.add_argument("--seeds", type=int, default=3, help="number of seeds: --seed, --seed+1, ... (default 3)")
    g.add_argument("--keep-exports", action="store_true",
                   help="keep every run's export under OUT/exports/ (default: deleted after measuring)")
    add_mpe_arguments(p, prefix="mpe-")  # the method's settings x<R> give the target ratio
    p.add_argument("--out", required=True, help="output directory (results.csv, reports/, PNG, markdown)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        print("error: --seeds must be positive", file=sys.stderr)
        return 2
    try:
        chosen = parse_methods(args.methods)
    except (ValueError, ImportError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = run_settings(args, RUN_SELECTION)
    if diff := settings_conflict(out, run_cfg):
        print(f"error: {out} holds a run with other settings {diff}; use another --out", file=sys.stderr)
        return 2
    try:
        data = sources.resolve(args, progress=not args.no_progress)
    except (sources.DataNotFoundError, ValueError, FileNotFoundError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = tqdm.write if not args.no_progress else print
    bench = Benchmark(args, data, out, log)
    try:
        for method, settings in chosen:
            check_settings(method, settings, bench.inputs(args.seed))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record_settings(out, run_cfg)
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}
    log(f"data {data.root}: {data.num_features:,} features in {len(data.fields)} fields, train {sizes['train']:,} / "
        f"val {sizes['val']:,} / test {sizes['test']:,} rows; fp32 tables {bench.fp32_bytes():,} B")

    csv_path = out / CSV
    rows = read_rows(csv_path)
    done = {(r["method"], r["setting"], r["seed"]) for r in rows}
    todo = [(seed, m, s) for seed in range(args.seed, args.seed + args.seeds) for m, ss in chosen for s in ss]
    pending = [j for j in todo if (j[1].name, j[2], str(j[0])) not in done]
    if len(pending) < len(todo):
        log(f"{len(todo) - len(pending)} of {len(todo)} runs already in {csv_path}: skipped")
    failed: list[str] = []
    for i, (seed, method, setting) in enumerate(pending, 1):
        log(f"[{i}/{len(pending)}] seed {seed} {method.name} {setting} ({method.kind}) ...")
        try:
            row = bench.run(method, setting, seed)
        except Exception as e:  # noqa: BLE001 - one broken run must not lose the others
            traceback.print_exc()
            failed.append(f"{method.name} {setting} seed {seed}: {type(e).__name__}: {e}")
            log(f"[{i}/{len(pending)}] FAILED: {failed[-1]}")
            continue
        rows.append({k: cell(row.get(k, "")) for k in COLUMNS})
        write_rows(csv_path, rows, COLUMNS)
        log(f"[{i}/{len(pending)}] seed {seed} {method.name} {setting}: {row['bytes']:,} B ({row['ratio']:.1f}x)  "
            f"test AUC {row['test_auc']:.5f}  logloss {row['test_logloss']:.5f}  val AUC {row['val_auc']:.5f}  "
            f"{row['seconds']:.1f}s")
    if rows:
        src = args.data or args.prepared or (f"synthetic {args.synthetic:,} rows" if args.synthetic else str(data.root))
        title = (f"{data.dataset} ({src}), tower {args.tower} {args.hidden or 'default'}, dim {args.dim}, "
                 f"{args.epochs} epoch(s)")
        points = summarize(rows)
        reports = [read_json(p) for p in sorted((out / "reports").glob("*.json"))]
        agreement = seed_agreement(reports)
        if agreement:
            atomic_write_json(out / AGREEMENT, agreement)
            for setting, a in agreement.items():
                log(f"mpe {setting}: seeds agree on {a['share_equal']:.1%} of the groups")
        write_markdown(out / MARKDOWN, points, f"AUC vs size: {title}", agreement)
        plot(out / PNG, points, title)
        log(f"wrote {csv_path}, {out / MARKDOWN}, {out / PNG}")
    if failed:
        print("error: runs failed (not in the CSV; a rerun retries them):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
