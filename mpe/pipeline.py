"""The MPE pipeline, one function per stage: lambda -> search -> select -> retrain -> export -> report.

``run(data, cfg, out)`` chains the stages, records each finished stage in ``stages.json``
(``mpe.run_dir.Stages``) so an interrupted run resumes, and writes the report. Under
``torchrun`` every stage trains sharded over the processes (``ctr.distributed``); every
rank selects the bit-widths from the same synchronised state and the ranks check that they
agree; rank 0 alone writes the run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ctr import distributed
from ctr.distributed import DistEnv
from ctr.model import CTRModel, FP32Embedding
from ctr.trainer import REPORT_FILE, FitResult, TrainConfig, Trainer, evaluate, trainable_parameters
from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    read_json,
    sha256_file,
)
from data.batches import PreparedDataset, SplitArrays, num_batches
from encoding.sizes import fp32_table_bytes
from mpe.bitwidths import packed_table_bytes
from mpe.config import MPEConfig, auto_multiplier_rate
from mpe.embedding import MixedPrecisionEmbedding
from mpe.exporter import export_model
from mpe.grouping import (
    frequency_groups,
    group_frequencies,
    group_penalty_weights,
    unseen_rows,
)
from mpe.report import build_report, headline, plot_bits
from mpe.run_dir import (
    BITS_PLOT,
    EXPORT_DIR,
    RETRAIN_DIR,
    SEARCH_DIR,
    SEARCH_MODEL_FILE,
    Stages,
    save_model,
)
from mpe.selection import select_argmax, select_budgeted, select_threshold

FP32_BASELINES = "fp32_baselines"  # cache of fp32 results, inside the prepared data directory


def build_model(data: PreparedDataset, cfg: MPEConfig, lam: float | None = None) -> CTRModel:
    """A fresh MPE model (seeded by ``cfg.train.seed``) grouped by ``data``'s train frequencies."""
    freq = data.frequency()
    group_of_row = frequency_groups(freq, cfg.search.groups)
    torch.manual_seed(cfg.train.seed)
    embedding = MixedPrecisionEmbedding(
        data.fields,
        data.cardinalities,
        cfg.model.dim,
        group_of_row,
        group_penalty_weights(freq, group_of_row),
        candidates=cfg.search.candidates,
        mode=cfg.search.mode,
        tau=cfg.search.tau,
        lam=cfg.lambda_value() if lam is None else lam,
        pruned_rows=unseen_rows(freq) if 0 in cfg.search.candidates else None,
        pruned_as=cfg.search.pruned_as,
    )
    return CTRModel(embedding, cfg.model.build_tower(len(data.fields)))


def mpe_optimizers(cfg: MPEConfig):
    """Adam for logits / steps / offset (no weight decay) and Adam with L2 for rows and tower."""

    def factory(model: CTRModel) -> list[torch.optim.Optimizer]:
        emb: MixedPrecisionEmbedding = model.embedding
        quant = [p for p in emb.quant_parameters() if p.requires_grad]
        quant_ids = {id(p) for p in emb.quant_parameters()}
        rest = [p for p in trainable_parameters(model) if id(p) not in quant_ids]
        return [
            torch.optim.Adam(quant, lr=cfg.train.lr),
            torch.optim.Adam(rest, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
        ]

    return factory


def stage_train_config(cfg: MPEConfig, **overrides) -> TrainConfig:
    """The trainer's settings of a search or retrain stage: the L2 goes to the rows and the
    tower only (``mpe_optimizers``), not to the precision logits, steps and offset."""
    return replace(cfg.train, weight_decay=0.0, embedding_weight_decay=cfg.train.weight_decay, **overrides)


def search(
    model: CTRModel, data: PreparedDataset, cfg: MPEConfig, out: Path | None, resume: bool = False,
    train: SplitArrays | None = None, dist: DistEnv | None = None,
) -> FitResult:
    """Learn the precision distributions (and rows, tower, steps) with the size penalty.

    ``train`` replaces the training split (the bisection of ``find_lambda`` uses a prefix).
    """
    model.embedding.set_phase("search")
    trainer = Trainer(model, stage_train_config(cfg), mpe_optimizers(cfg), out_dir=out, log=_log(cfg), dist=dist)
    if trainer.plan and dist is not None and dist.is_main and out is not None:
        print(distributed.describe_plan(trainer.plan, dist), flush=True)
    train = data.split("train") if train is None else train
    return trainer.fit(train, data.split("val"), data.fields, resume=resume)


def select(model: CTRModel, data: PreparedDataset, cfg: MPEConfig, budget_bytes: int | None) -> tuple[np.ndarray, dict]:
    """One bit-width per group from the learned distributions, by ``cfg.search.selection``."""
    emb: MixedPrecisionEmbedding = model.embedding
    probs = emb.probabilities().detach().numpy()
    if cfg.search.selection == "threshold":
        return _zero_pruned(emb, select_threshold(probs, emb.candidates)), {"strategy": "threshold"}
    if cfg.search.selection == "argmax":
        return _zero_pruned(emb, select_argmax(probs, emb.candidates)), {"strategy": "argmax"}
    val = data.split("val")

    def evaluate_bits(bits: np.ndarray) -> float:
        trial = copy.deepcopy(model)
        trial.embedding.fix_bits(bits)
        return evaluate(trial, val, data.fields)["auc"]

    def size_of(bits: np.ndarray) -> int:
        return packed_table_bytes(emb.row_bits(bits), emb.dim, emb.candidates)

    budget = budget_bytes if budget_bytes is not None else size_of(select_threshold(probs, emb.candidates))
    bits, info = select_budgeted(probs, emb.candidates, evaluate_bits, size_of, budget, cfg.search.samples, cfg.train.seed)
    info = {"strategy": "budgeted", "budget_bytes": int(budget), **info}
    return _zero_pruned(emb, bits), info


def _zero_pruned(emb: MixedPrecisionEmbedding, bits: np.ndarray) -> np.ndarray:
    """0 bits for the groups whose rows are all pruned by construction (never seen in training)."""
    return np.where(emb.pruned_groups(), 0, bits)


def retrain(
    model: CTRModel, bits: np.ndarray, data: PreparedDataset, cfg: MPEConfig,
    out: Path | None, resume: bool = False, dist: DistEnv | None = None,
) -> FitResult:
    """Rows back to their pre-search values (``build_model``'s, redrawn from ``cfg.train.seed``),
    bit-widths frozen, tower/steps/offset kept, fresh Adam."""
    emb: MixedPrecisionEmbedding = model.embedding
    emb.reinitialize_rows(cfg.train.seed)
    emb.fix_bits(bits)
    trainer = Trainer(model, stage_train_config(cfg), mpe_optimizers(cfg), out_dir=out, log=_log(cfg), dist=dist)
    return trainer.fit(data.split("train"), data.split("val"), data.fields, resume=resume)


def adjust_to_ratio(
    bits: np.ndarray, group_freq: np.ndarray, candidates: tuple[int, ...], ratio_of, target: float,
    tolerance: float = 0.1,
) -> tuple[np.ndarray, list[str]]:
    """Move bits one candidate step at a time until ``ratio_of(bits)`` is within ``tolerance`` of target.

    Too large: lower the rarest group that still has bits. Too small: raise the most frequent
    group below the top candidate. Returns the bits and a log of the moves.
    """
    bits = bits.copy()
    order = np.argsort(group_freq, kind="stable")  # rarest first
    steps: list[str] = []
    for _ in range(len(bits) * len(candidates)):
        ratio = ratio_of(bits)
        if ratio < target * (1 - tolerance):
            movable = [g for g in order if bits[g] > candidates[0]]
            if not movable:
                break
            g = movable[0]
            bits[g] = candidates[candidates.index(int(bits[g])) - 1]
        elif ratio > target * (1 + tolerance):
            movable = [g for g in order[::-1] if bits[g] < candidates[-1]]
            if not movable:
                break
            g = movable[0]
            new = candidates[candidates.index(int(bits[g])) + 1]
            trial = bits.copy()
            trial[g] = new
            if ratio_of(trial) < target * (1 - tolerance):
                break  # one more step would overshoot: the closest reachable setting
            bits = trial
        else:
            break
        steps.append(f"group {int(g)} -> {int(bits[g])} bits")
    return bits, steps


def compression_ratio(data: PreparedDataset, emb: MixedPrecisionEmbedding, bits: np.ndarray) -> float:
    """fp32 table bytes / packed bytes of ``emb``'s rows at ``bits`` [G] (pruned rows included)."""
    packed = packed_table_bytes(emb.row_bits(bits), emb.dim, emb.candidates)
    return fp32_table_bytes(data.num_features, emb.dim) / max(1, packed)


def find_lambda(data: PreparedDataset, cfg: MPEConfig, target: float,
                dist: DistEnv | None = None) -> tuple[float, list[dict]]:
    """Bisection on log(lambda) over short searches until the selected bits give ~target x."""
    train = data.split("train")
    short_train = train.subset(slice(0, max(1, int(len(train) * cfg.search.bisection_fraction))))
    short_cfg = replace(cfg, train=replace(cfg.train, epochs=1, progress=False))
    lo, hi = math.log(1e-9), math.log(1.0)
    log_lam = math.log(cfg.lambda_value())
    trials: list[dict] = []
    best = None
    for i in range(cfg.search.bisection_steps):
        model = build_model(data, short_cfg, lam=math.exp(log_lam))
        search(model, data, short_cfg, out=None, train=short_train, dist=dist)
        bits, _ = select(model, data, short_cfg, None)
        ratio = compression_ratio(data, model.embedding, bits)
        trials.append({"trial": i, "lambda": math.exp(log_lam), "ratio": ratio})
        _log(cfg, dist)(f"  lambda {math.exp(log_lam):.3g}: {ratio:.1f}x (target {target:g}x)")
        if best is None or abs(math.log(ratio / target)) < abs(math.log(best[1] / target)):
            best = (math.exp(log_lam), ratio)
        if abs(ratio / target - 1) <= 0.05:
            break
        if ratio < target:
            lo = log_lam
        else:
            hi = log_lam
        log_lam = (lo + hi) / 2
    return best[0], trials


def fp32_baseline(data: PreparedDataset, cfg: MPEConfig, dist: DistEnv | None = None) -> dict:
    """Test metrics of the fp32 model on the same data, tower, training settings and seed.

    Trained once and cached as ``<prepared dir>/fp32_baselines/<key>.json`` (key: a sha256
    of the data manifest and the settings), so runs at other lambdas or ratios reuse it.
    Returns ``{"test": {...}, "val_auc", "seconds", "steps", "cached", "key"}``.
    """
    settings = {k: v for k, v in asdict(cfg.train).items() if k != "progress"}
    key_src = {"manifest": data.manifest, "model": asdict(cfg.model), "train": settings,
               "processes": 1 if dist is None else dist.world_size}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = data.root / FP32_BASELINES / f"{key}.json"
    if path.exists():
        try:
            cached = read_json(path)
            return {**cached, "test": dict(cached["test"]), "cached": True}
        except (ArtifactError, KeyError, TypeError):
            pass  # unreadable cache: train again and overwrite it
    _log(cfg, dist)(f"fp32 baseline (same data, tower, settings, seed {cfg.train.seed}) for comparison")
    torch.manual_seed(cfg.train.seed)
    model = CTRModel(FP32Embedding(data.fields, data.cardinalities, cfg.model.dim), cfg.model.build_tower(len(data.fields)))
    fit = Trainer(model, cfg.train, log=_log(cfg, dist), dist=dist).fit(data.split("train"), data.split("val"), data.fields)
    result = {"test": evaluate(model, data.split("test"), data.fields), "val_auc": fit.best_auc,
              "seconds": fit.seconds, "steps": fit.steps, "key": key}
    if dist is None or dist.is_main:
        try:
            atomic_write_json(path, result)
        except OSError:
            pass  # a read-only prepared directory: no cache, the result is still reported
    return {**result, "cached": False}


def _log(cfg: MPEConfig, dist: DistEnv | None = None):
    quiet = not cfg.train.progress or (dist is not None and not dist.is_main)
    return (lambda _msg: None) if quiet else print


def check_ranks_agree(bits: np.ndarray, dist: DistEnv | None) -> list[str]:
    """sha256 of every rank's selected bits; ``RuntimeError`` when the ranks disagree."""
    digest = hashlib.sha256(np.asarray(bits, dtype=np.int64).tobytes()).hexdigest()[:16]
    if dist is None:
        return [digest]
    digests = [None] * dist.world_size
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks selected different bit-widths (sha256 by rank: {digests}): "
                           "their precision logits are out of sync")
    return digests

# -- the stages of ``run`` ------------------------------------------------------------------


def uses_multiplier(cfg: MPEConfig) -> bool:
    """Whether the search adapts lambda to ``--target-ratio``'s budget (``mpe.multiplier``)."""
    return bool(cfg.search.target_ratio) and cfg.search.budget == "multiplier"


def budget_bytes(data: PreparedDataset, cfg: MPEConfig) -> int | None:
    """The export's byte budget of ``--target-ratio`` (fp32 table bytes / R), or None."""
    target = cfg.search.target_ratio
    return int(fp32_table_bytes(data.num_features, cfg.model.dim) / target) if target else None


def attach_multiplier(model: CTRModel, data: PreparedDataset, cfg: MPEConfig) -> float:
    """Make the search's lambda the budget multiplier; returns its rate (per step)."""
    steps = num_batches(len(data.split("train")), cfg.train.batch_size) * cfg.train.epochs
    rate = cfg.search.multiplier_rate or auto_multiplier_rate(steps)
    model.embedding.set_budget(budget_bytes(data, cfg), rate)
    return rate


def stage_lambda(data: PreparedDataset, cfg: MPEConfig, stages: Stages, dist: DistEnv | None) -> tuple[float, list[dict]]:
    """lambda: given, or found by bisection for ``--target-ratio`` (recorded); with the
    multiplier, the search's starting lambda."""
    if "lambda" in stages:
        return float(stages["lambda"]), stages.get("lambda_trials", [])
    if not cfg.search.target_ratio or uses_multiplier(cfg):
        return cfg.lambda_value(), []
    _log(cfg, dist)(f"finding lambda for {cfg.search.target_ratio:g}x by bisection "
                    f"({cfg.search.bisection_steps} short searches)")
    lam, trials = find_lambda(data, cfg, cfg.search.target_ratio, dist)
    stages.update(lambda_trials=trials, **{"lambda": lam})
    return lam, trials


def stage_search(model: CTRModel, data: PreparedDataset, cfg: MPEConfig, stages: Stages, out: Path,
                 resume: bool, dist: DistEnv | None) -> FitResult:
    """The search, or its recorded result and weights."""
    if "search" in stages:
        model.load_state_dict(load_torch(out / SEARCH_MODEL_FILE, stages["search_sha256"]))
        return FitResult(**stages["search"])
    fit = search(model, data, cfg, out / SEARCH_DIR, resume=resume, dist=dist)
    if stages.writer:
        atomic_torch_save(out / SEARCH_MODEL_FILE, model.state_dict())
        stages.update(search=asdict(fit), search_sha256=sha256_file(out / SEARCH_MODEL_FILE))
    return fit


def stage_multiplier(model: CTRModel, data: PreparedDataset, cfg: MPEConfig, stages: Stages,
                     out: Path, resume: bool, dist: DistEnv | None) -> tuple[FitResult, dict | None]:
    """The search; with the budget multiplier, also its record (rate, lambda at the end,
    trace), after which the model is a plain MPE model at that final lambda."""
    emb: MixedPrecisionEmbedding = model.embedding
    if not uses_multiplier(cfg):
        return stage_search(model, data, cfg, stages, out, resume, dist), None
    rate = attach_multiplier(model, data, cfg)
    fit = stage_search(model, data, cfg, stages, out, resume, dist)
    record = {"method": "multiplier", "rate": rate, "budget_bytes": budget_bytes(data, cfg),
              "lambda_start": cfg.lambda_value(), "trace": emb.multiplier.history()}
    record["lambda_end"] = emb.clear_budget()
    _log(cfg, dist)(f"budget multiplier: lambda {record['lambda_start']:.3g} -> {record['lambda_end']:.3g} "
                    f"(rate {rate:.3g} per step)")
    return fit, record


def stage_select(model: CTRModel, data: PreparedDataset, cfg: MPEConfig, stages: Stages) -> tuple[np.ndarray, dict]:
    """One bit-width per group (moved to the byte budget of ``--target-ratio``), or the recorded one."""
    if "bits" in stages:
        return np.asarray(stages["bits"], dtype=np.int64), stages["selection"]
    emb: MixedPrecisionEmbedding = model.embedding
    target = cfg.search.target_ratio
    bits, info = select(model, data, cfg, budget_bytes(data, cfg))
    if target:
        bits, moves = adjust_to_ratio(
            bits, group_frequencies(data.frequency(), emb.group_of_row.numpy()), emb.candidates,
            lambda b: compression_ratio(data, emb, b), target,
        )
        bits = _zero_pruned(emb, bits)
        info = {**info, "budget_adjustments": moves}
    stages.update(bits=[int(b) for b in bits], selection=info)
    return bits, info


def run(data: PreparedDataset, cfg: MPEConfig, out: Path, resume: bool = False,
        dist: DistEnv | None = None) -> dict:
    """Search -> select -> retrain -> evaluate -> export; returns (and writes) the report.

    With ``dist`` (a torchrun process group) every rank trains its shard and returns the
    report; only rank 0 writes files, and ``resume`` is refused.
    """
    distributed.refuse_resume(resume, dist)
    main = dist is None or dist.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = _log(cfg, dist)
    t0 = time.perf_counter()
    stages = Stages.open(out, cfg, resume, writer=main)
    lam, trials = stage_lambda(data, cfg, stages, dist)
    model = build_model(data, cfg, lam=lam)
    emb: MixedPrecisionEmbedding = model.embedding
    log(f"MPE search on {data.dataset}: {data.num_features:,} features in {emb.num_groups} groups, "
        f"bits {list(emb.candidates)}, mode {cfg.search.mode}, lambda {lam:.3g}")
    search_fit, budget_record = stage_multiplier(model, data, cfg, stages, out, resume, dist)
    if budget_record is not None:
        lam = budget_record["lambda_end"]
    probs = emb.probabilities().detach().numpy()
    bits, sel_info = stage_select(model, data, cfg, stages)
    rank_digests = check_ranks_agree(bits, dist)
    log(f"selected ({cfg.search.selection}): mean {float(np.mean(bits)):.3f} bits per group")
    retrain_fit = retrain(model, bits, data, cfg, out / RETRAIN_DIR, resume=resume, dist=dist)
    test = evaluate(model, data.split("test"), data.fields)
    fp32 = fp32_baseline(data, cfg, dist) if cfg.fp32_baseline else None
    if not main:
        distributed.barrier(dist)  # rank 0 writes the run
        return {"method": "mpe", "test": test, "bits_per_group": [int(b) for b in bits], "rank": dist.rank}
    description = save_model(model, cfg, data, out)
    export = export_model(model, description, out / EXPORT_DIR, verify_data=data,
                          extra_meta={"run": str(out.resolve())})
    report = build_report(
        data, cfg, model, lam=lam, bits=bits, probs=probs, test=test, fp32=fp32, export=export,
        search_fit=search_fit, retrain_fit=retrain_fit, selection=sel_info, trials=trials, budget=budget_record,
        seconds=time.perf_counter() - t0, dist=dist, rank_digests=rank_digests,
    )
    atomic_write_json(out / REPORT_FILE, report)
    plot_bits(out / BITS_PLOT, np.asarray(report["group_mean_frequency"]), bits, f"MPE on {data.dataset}: {headline(report)}")
    distributed.barrier(dist)
    return report
