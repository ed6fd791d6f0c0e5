"""Adaptation benchmark: frozen embeddings, adapters on the dense tower, data that drifts in time.

    python -m experiments.adapt --dataset avazu --synthetic 500000 --days 10 --drift 0.5 --out runs/adapt

Protocol (the split is always ``--split time``, i.e. file order):
  train (first 80%)  pretrain an fp32 model (embedding + tower), once per seed;
  val   (next 10%)   adaptation data: first half trains the adapter, second half early-stops it;
  test  (last 10%)   reported AUC / logloss.

With ``--embedding mpe`` the pretrained model is an MPE run instead (``mpe.pipeline.run`` on the
same splits at ``--mpe-target-ratio``): the adapters then sit on the tower of the model served
from its bit-packed export, whose embedding is read-only by construction.

Every method starts from a deep copy of the pretrained model with the embedding frozen and the
BatchNorm layers kept in eval mode (their pretrained statistics), then adapts with Adam over its
trainable parameters only:

  none      no update (the pretrained model as is)
  head      only the last linear layer ``head``
  full      the whole tower
  lora      LoRA on every ``mlp.<i>`` Linear and ``head`` at each rank of --ranks (setting ``r<r>``)
  genlora   GenLoRA on the same layers at the LoRA parameter budget of each rank (setting
            ``budget_r<r>``): group size --group-size and the largest GenLoRA rank (at most
            --genlora-max-rank) whose parameter count is <= that of LoRA at rank r; once the
            rank is at that cap, the group size doubles while the cap still fits the budget.

Per (method, setting, seed) ``OUT/results.csv`` gets one row: trainable parameters, the LoRA
budget, the adapter's rank / group size, the effective rank (Roy & Vetterli) of the adapted
layers' weight updates (mean over layers; for ``full`` the update is W_new - W_old; empty for
none / head), test AUC, logloss and seconds. The CSV is rewritten atomically after every row, and
rows already in it are skipped, so an interrupted run resumes where it stopped (pretrained models
are kept as ``OUT/pretrained_seed<S>.pt``). Also written: ``auc_vs_params.png``,
``rank_vs_params.png`` and ``results.md`` (means +- std over seeds).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ctr.model import CTRModel, FP32Embedding
from ctr.options import add_training_arguments, train_config
from ctr.trainer import REPORT_FILE, TrainConfig, Trainer, evaluate
from data import sources
from data.artifacts import (
    atomic_torch_save,
    atomic_write_bytes,
    load_torch,
)
from data.batches import Rows
from experiments.results_csv import (
    cell,
    number,
    read_rows,
    record_settings,
    run_settings,
    settings_conflict,
    write_rows,
)
from genlora_rec.adapters import (
    adapter_layers,
    find_target_modules,
    inject_adapters,
    trainable_parameter_count,
)
from genlora_rec.effective_rank import effective_rank, genlora_parameter_count, lora_parameter_count
from genlora_rec.genlora import GenLoRAConfig
from genlora_rec.lora import LoRAConfig
from genlora_rec.towers import build_tower
from mpe.config import MPEConfig, add_mpe_arguments
from mpe.pipeline import run as run_mpe
from mpe.run_dir import EXPORT_DIR
from mpe.serving import load_served_model

METHODS = ("none", "head", "full", "lora", "genlora")
TARGETS = r"mlp\.\d+|head"
COLUMNS = (
    "dataset", "method", "setting", "seed", "trainable_params", "budget_params", "rank", "group_size",
    "effective_rank", "test_auc", "test_logloss", "val_auc", "lr", "steps", "seconds",
)
# options that only choose which runs to do (or how to show them); every other option must
# match for OUT to be resumed
RUN_SELECTION = ("out", "methods", "ranks", "seed", "seeds", "no_progress", "cache_dir")
DEFAULT_MPE_RATIO = 10.0


# -- model helpers ----------------------------------------------------------------------------
class BatchNormStatsFrozen(nn.Module):
    """A model wrapper whose ``train()`` leaves the BatchNorm layers in eval mode (their running
    statistics stay frozen while the adapters train)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, kjt):
        return self.model(kjt)

    def train(self, mode: bool = True) -> BatchNormStatsFrozen:
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def target_shapes(tower: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every Linear layer the adapters target."""
    mods = dict(tower.named_modules())
    return [(mods[n].in_features, mods[n].out_features) for n in find_target_modules(tower, TARGETS)]


def lora_budget(shapes: Sequence[tuple[int, int]], r: int) -> int:
    return sum(lora_parameter_count(i, o, r) for i, o in shapes)


def genlora_for_budget(shapes: Sequence[tuple[int, int]], budget: int, group_size: int,
                       max_rank: int) -> tuple[int, int] | None:
    """GenLoRA ``(rank, group size)`` for a parameter ``budget``; None if rank 1 does not fit.

    Rank first: the largest rank <= ``max_rank`` that fits with ``group_size``. When the rank
    reaches ``max_rank`` with budget to spare, the group size doubles as long as the rank can
    stay at ``max_rank`` (larger groups: richer basis vectors at the same rank).
    """
    def fit(g: int) -> int | None:
        best = None
        for r in range(1, max_rank + 1):
            if sum(genlora_parameter_count(i, o, r, g) for i, o in shapes) <= budget:
                best = r
        return best

    widest = max(max(i, o) for i, o in shapes)
    chosen, g = None, group_size
    while g <= widest:
        r = fit(g)
        if r is None or (chosen is not None and r < max_rank):
            break
        chosen = (r, g)
        if r < max_rank:
            break
        g *= 2
    return chosen


def mean_effective_rank(deltas: Sequence[torch.Tensor]) -> float:
    return float(np.mean([effective_rank(d) for d in deltas])) if deltas else float("nan")


def linear_weights(tower: nn.Module) -> dict[str, torch.Tensor]:
    mods = dict(tower.named_modules())
    return {n: mods[n].weight.detach().clone() for n in find_target_modules(tower, TARGETS)}


# -- results file -----------------------------------------------------------------------------
# -- benchmark --------------------------------------------------------------------------------
def jobs(methods: Sequence[str], ranks: Sequence[int]) -> list[tuple[str, str, int | None]]:
    out: list[tuple[str, str, int | None]] = []
    for m in methods:
        if m in ("none", "head", "full"):
            out.append((m, "-", None))
        elif m == "lora":
            out += [(m, f"r{r}", r) for r in ranks]
        else:
            out += [(m, f"budget_r{r}", r) for r in ranks]
    return out


def pretrain(args, data, seed: int, out: Path, log) -> CTRModel:
    """The pretrained model of ``seed``: fp32, or MPE served from its export (``--embedding``)."""
    if args.embedding == "mpe":
        return pretrain_mpe(args, data, seed, out, log)
    torch.manual_seed(seed)
    hidden = tuple(args.hidden) if args.hidden else None
    model = CTRModel(FP32Embedding(data.fields, data.cardinalities, args.dim),
                     build_tower(args.tower, len(data.fields), args.dim, hidden))
    path = out / f"pretrained_seed{seed}.pt"
    if path.exists():
        model.load_state_dict(load_torch(path)["model"])
        log(f"seed {seed}: pretrained model loaded from {path}")
        return model
    cfg = dataclasses.replace(train_config(args), seed=seed)
    t0 = time.perf_counter()
    # early-stop pretraining on the second (held-out) half of the adaptation window
    _, adapt_val = adapt_halves(data.split("val"))
    Trainer(model, cfg, log=log).fit(data.split("train"), adapt_val, data.fields)
    atomic_torch_save(path, {"model": model.state_dict()})
    log(f"seed {seed}: pretrained in {time.perf_counter() - t0:.1f}s -> {path}")
    return model


def mpe_config(args: argparse.Namespace, dataset: str, seed: int) -> MPEConfig:
    """The MPE pretraining of ``seed``: ``MPEConfig.from_args``, as the CLI builds it (target
    ``--mpe-target-ratio``); no fp32 comparison (the ``none`` rows on fp32 are the benchmark's)."""
    return MPEConfig.from_args(args, dataset=dataset, seed=seed, fp32_baseline=False)


def pretrain_mpe(args, data, seed: int, out: Path, log) -> CTRModel:
    """MPE search + retrain at ``--mpe-target-ratio`` (resumable), served from its bit-packed export.

    ``mpe.pipeline.run`` early-stops on the whole val split, i.e. on the adaptation window too;
    the test split stays unseen.
    """
    run_dir = out / f"mpe_seed{seed}"
    if not (run_dir / REPORT_FILE).exists():
        cfg = mpe_config(args, data.dataset, seed)
        t0 = time.perf_counter()
        run_mpe(data, cfg, run_dir, resume=True)
        log(f"seed {seed}: MPE pretrained in {time.perf_counter() - t0:.1f}s -> {run_dir}")
    model = load_served_model(run_dir / EXPORT_DIR)
    log(f"seed {seed}: MPE export {model.embedding_bytes():,} B from {run_dir / EXPORT_DIR}")
    return model


def adapt_halves(val: Rows) -> tuple[Rows, Rows]:
    half = len(val) // 2
    return val.subset(slice(0, half)), val.subset(slice(half, len(val)))


def run_one(args, data, base: CTRModel, method: str, rank: int | None, seed: int) -> dict:
    """Adapt a copy of ``base`` with ``method`` and return its result row (without dataset/setting)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    tower = model.tower
    shapes = target_shapes(tower)
    row: dict = {"budget_params": "", "rank": "", "group_size": ""}
    if method == "head":
        for p in tower.head.parameters():
            p.requires_grad_(True)
    elif method == "full":
        for p in tower.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        inject_adapters(tower, LoRAConfig(r=rank, alpha=args.alpha), TARGETS)
        row.update(budget_params=lora_budget(shapes, rank), rank=rank)
    elif method == "genlora":
        budget = lora_budget(shapes, rank)
        chosen = genlora_for_budget(shapes, budget, args.group_size, args.genlora_max_rank)
        if chosen is None:
            raise ValueError(f"GenLoRA with group size {args.group_size} does not fit the LoRA r={rank} budget")
        g_rank, g_size = chosen
        inject_adapters(tower, GenLoRAConfig(r=g_rank, alpha=args.alpha, group_size=g_size), TARGETS)
        row.update(budget_params=budget, rank=g_rank, group_size=g_size)
    for p in model.embedding.parameters():  # the embeddings stay frozen whatever the method
        p.requires_grad_(False)
    before = linear_weights(tower) if method == "full" else {}
    wrapped = BatchNormStatsFrozen(model)
    trainable = trainable_parameter_count(model)["trainable"]
    t0 = time.perf_counter()
    fit, best_lr = None, float("nan")
    if method != "none":
        adapt_train, adapt_val = adapt_halves(data.split("val"))
        start = copy.deepcopy(wrapped.state_dict())
        best_state = None
        for lr in args.adapt_lr:  # several rates: keep the one with the best early-stopping AUC
            wrapped.load_state_dict(start)
            torch.manual_seed(seed)
            params = [p for p in wrapped.parameters() if p.requires_grad]
            cfg = TrainConfig(epochs=args.adapt_epochs, batch_size=args.adapt_batch_size, lr=lr,
                              patience=args.adapt_patience, evals_per_epoch=args.adapt_evals_per_epoch,
                              seed=seed, progress=not args.no_progress)
            trainer = Trainer(wrapped, cfg, optimizers=lambda m, ps=params, lr=lr: [torch.optim.Adam(ps, lr=lr)],
                              log=lambda s: None)
            result = trainer.fit(adapt_train, adapt_val, data.fields)
            if fit is None or result.best_auc > fit.best_auc:
                fit, best_lr, best_state = result, lr, copy.deepcopy(wrapped.state_dict())
        wrapped.load_state_dict(best_state)
    wrapped.eval()
    test = evaluate(wrapped, data.split("test"), data.fields)
    seconds = time.perf_counter() - t0
    if method in ("lora", "genlora"):
        erank = mean_effective_rank([layer.delta_weight().detach() for layer in adapter_layers(tower).values()])
    elif method == "full":
        after = linear_weights(tower)
        erank = mean_effective_rank([after[n] - before[n] for n in before])
    else:
        erank = float("nan")
    row.update(trainable_params=trainable, effective_rank=erank, test_auc=test["auc"],
               test_logloss=test["logloss"], val_auc=fit.best_auc if fit else float("nan"),
               steps=fit.steps if fit else 0, lr=best_lr, seconds=seconds)
    return row


# -- reports ------------------------------------------------------------------------------------
def summarize(rows: Sequence[dict[str, str]]) -> list[dict]:
    """One entry per (method, setting), in first-seen order, with per-seed value lists."""
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        g = groups.setdefault((r["method"], r["setting"]), {"method": r["method"], "setting": r["setting"],
                                                             "rank": r.get("rank", ""), "vals": {}})
        for k in ("trainable_params", "budget_params", "effective_rank", "test_auc", "test_logloss", "seconds"):
            g["vals"].setdefault(k, []).append(number(r.get(k, "")))
    return list(groups.values())


def _ms(vals: list[float], digits: int) -> str:
    v = np.asarray(vals, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return "-"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


def write_markdown(path: Path, rows: Sequence[dict[str, str]], header: str) -> None:
    lines = [header, "",
             "| method | setting | adapter rank | trainable params | LoRA budget | effective rank | test AUC | "
             "test logloss | seconds | seeds |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in summarize(rows):
        v = g["vals"]
        budget = v["budget_params"][0]
        lines.append(
            f"| {g['method']} | {g['setting']} | {g['rank'] or '-'} | {int(np.nanmean(v['trainable_params'])):,} | "
            f"{'-' if math.isnan(budget) else f'{int(budget):,}'} | {_ms(v['effective_rank'], 2)} | "
            f"{_ms(v['test_auc'], 4)} | {_ms(v['test_logloss'], 4)} | {_ms(v['seconds'], 1)} | "
            f"{len(v['test_auc'])} |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def plot(out: Path, rows: Sequence[dict[str, str]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summarize(rows)
    by_method: dict[str, list[dict]] = {}
    for g in groups:
        by_method.setdefault(g["method"], []).append(g)
    colors = {"none": "grey", "head": "tab:green", "full": "tab:red", "lora": "tab:blue", "genlora": "tab:orange"}
    for name, key, ylabel in (("auc_vs_params.png", "test_auc", "test AUC"),
                              ("rank_vs_params.png", "effective_rank", "effective rank of dW (mean over layers)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, gs in by_method.items():
            x = np.array([np.nanmean(g["vals"]["trainable_params"]) for g in gs])
            ys = [np.asarray(g["vals"][key], dtype=float) for g in gs]
            if all(np.isnan(y).all() for y in ys):
                continue
            mean = np.array([np.nanmean(y) for y in ys])
            lo = mean - np.array([np.nanmin(y) for y in ys])
            hi = np.array([np.nanmax(y) for y in ys]) - mean
            if method == "none" or (x <= 0).all():
                ax.axhline(mean[0], color=colors.get(method), ls="--", label=f"{method} (0 params)")
                continue
            order = np.argsort(x)
            ax.errorbar(x[order], mean[order], yerr=[lo[order], hi[order]], marker="o", capsize=3,
                        color=colors.get(method), label=method)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())


# -- CLI ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.adapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sources.add_data_arguments(p)
    add_training_arguments(p)  # pretraining; --seed is the first of --seeds
    g = p.add_argument_group("embedding")
    g.add_argument("--embedding", choices=("fp32", "mpe"), default="fp32",
                   help="frozen embedding under the adapters: fp32 tables or MPE's bit-packed export (default fp32)")
    add_mpe_arguments(p, prefix="mpe-")  # --embedding mpe: the pretraining's MPE options
    p.set_defaults(target_ratio=DEFAULT_MPE_RATIO)
    g = p.add_argument_group("adaptation")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods (default all)")
    g.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="LoRA ranks / GenLoRA budgets")
    g.add_argument("--seeds", type=int, default=3, help="number of seeds: --seed, --seed+1, ... (default 3)")
    g.add_argument("--adapt-epochs", type=int, default=5, help="adaptation epochs over the first val half (default 5)")
    g.add_argument("--adapt-batch-size", type=int, default=1024, help="adaptation batch size (default 1024)")
    g.add_argument("--adapt-lr", type=float, nargs="+", default=[1e-3],
                   help="adaptation Adam learning rate(s) (default 1e-3); with several, each method keeps "
                   "the rate with the best early-stopping AUC (column lr)")
    g.add_argument("--adapt-patience", type=int, default=3, help="adaptation: validations without AUC gain")
    g.add_argument("--adapt-evals-per-epoch", type=int, default=2, help="adaptation validations per epoch")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA / GenLoRA alpha (update scaled by alpha/r)")
    g.add_argument("--group-size", type=int, default=8,
                   help="GenLoRA group size g (default 8; doubled when the rank cap leaves budget unused)")
    g.add_argument("--genlora-max-rank", type=int, default=64, help="largest GenLoRA rank tried (default 64)")
    p.add_argument("--out", required=True, help="output directory (results.csv, PNGs, results.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.split = "time"  # the protocol needs file order: pretrain early, adapt next, test last
    if args.seeds < 1 or any(r < 1 for r in args.ranks):
        print("error: --seeds and --ranks must be positive", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = run_settings(args, RUN_SELECTION)
    if diff := settings_conflict(out, run_cfg):
        print(f"error: {out} holds a run with other settings {diff}; use another --out", file=sys.stderr)
        return 2
    try:
        data = sources.resolve(args, progress=not args.no_progress)
    except (sources.DataNotFoundError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record_settings(out, run_cfg)
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}
    log = tqdm.write if not args.no_progress else print
    log(f"data {data.root}: train {sizes['train']:,} / adapt {sizes['val'] // 2:,} + "
        f"{sizes['val'] - sizes['val'] // 2:,} / test {sizes['test']:,} rows (time split)")
    if min(sizes.values()) < 2:
        print("error: a split is empty; give more rows", file=sys.stderr)
        return 2

    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    done = {(r["method"], r["setting"], r["seed"]) for r in rows}
    todo = [(seed, m, s, r) for seed in range(args.seed, args.seed + args.seeds)
            for m, s, r in jobs(args.methods, args.ranks)]
    pending = [j for j in todo if (j[1], j[2], str(j[0])) not in done]
    if len(pending) < len(todo):
        log(f"{len(todo) - len(pending)} of {len(todo)} rows already in {csv_path}: skipped")
    bar = tqdm(total=len(pending), desc="adapt", disable=args.no_progress)
    bases: dict[int, CTRModel] = {}
    for seed, method, setting, rank in pending:
        if seed not in bases:
            bases = {seed: pretrain(args, data, seed, out, log)}
        bar.set_postfix(seed=seed, method=method, setting=setting)
        row = run_one(args, data, bases[seed], method, rank, seed)
        row.update(dataset=data.dataset, method=method, setting=setting, seed=seed)
        rows.append({k: cell(row.get(k, "")) for k in COLUMNS})
        write_rows(csv_path, rows, COLUMNS)
        log(f"seed {seed} {method:8s} {setting:11s} params {row['trainable_params']:>9,}  "
            f"erank {cell(row['effective_rank']) or '-':>7s}  test AUC {row['test_auc']:.5f}  "
            f"logloss {row['test_logloss']:.5f}  {row['seconds']:.1f}s")
        bar.update(1)
    bar.close()
    if not rows:
        print("nothing to report", file=sys.stderr)
        return 1
    src = args.data or (f"synthetic {args.synthetic} rows, {args.days} days, drift {args.drift:g}"
                        if args.synthetic else str(data.root))
    emb = "fp32 embeddings" if args.embedding == "fp32" else f"MPE {args.target_ratio:g}x export embeddings"
    title = f"{data.dataset} ({src}), {emb}, tower {args.tower} {args.hidden or 'default'}, time split"
    write_rows(csv_path, rows, COLUMNS)
    write_markdown(out / "results.md", rows, f"Adaptation benchmark: {title}")
    plot(out, rows, title)
    log(f"wrote {csv_path}, {out / 'results.md'}, {out / 'auc_vs_params.png'}, {out / 'rank_vs_params.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
