"""Mixed-precision embedding search: ``python -m mpe.search --dataset criteo``.

Prepares (or reuses) the data, groups features by training frequency, learns each
group's distribution over bit-widths under a size penalty, selects one bit-width per
group, retrains the embeddings from their pre-search values at those bit-widths, writes
the bit-packed export and a report (``report.json``, ``bits_vs_frequency.png``).
With ``--target-ratio R`` lambda is found by bisection over short searches so the export
is about R times smaller than the fp32 tables.

Under ``torchrun --nproc_per_node=N -m mpe.search ...`` every stage trains sharded over the
N processes (``genlora_rec.distributed``); every rank selects the bit-widths from the same
synchronised state and the ranks check that they agree; rank 0 alone writes the run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from data import sources
from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    read_json,
    read_sealed_json,
    seal_json,
    sha256_file,
    short_error,
)
from data.batches import PreparedDataset, SplitArrays
from genlora_rec import distributed
from genlora_rec.distributed import DistEnv
from genlora_rec.model import CTRModel, FP32Embedding
from genlora_rec.towers import build_tower
from genlora_rec.train import add_training_arguments
from genlora_rec.trainer import (
    FitResult,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    evaluate,
    trainable_parameters,
)
from mpe.bitwidths import (
    DEFAULT_CANDIDATES,
    fp32_table_bytes,
    packed_table_bytes,
    validate_candidates,
)
from mpe.embedding import MODES, MixedPrecisionEmbedding
from mpe.grouping import (
    frequency_groups,
    group_frequencies,
    group_penalty_weights,
    spearman,
    unseen_rows,
)
from mpe.selection import select_argmax, select_budgeted, select_threshold

DEFAULT_LAMBDA = {"criteo": 3e-4, "avazu": 2e-6}
DEFAULT_L2 = {"criteo": 3e-6, "avazu": 0.0}
SELECTIONS = ("threshold", "argmax", "budgeted")
MODEL_FILE, MODEL_META = "model.pt", "model.json"
MODEL_SCHEMA_VERSION = 3  # 2: meta_sha256, model.json's checksum of itself; 3: pruned_rows
STAGES_FILE, STAGES_DIGEST = "stages.json", "stages_sha256"
FP32_BASELINES = "fp32_baselines"  # cache of fp32 results, inside the prepared data directory


@dataclass
class MPEConfig:
    """Everything that defines an MPE run besides the data."""

    dataset: str = "criteo"
    lam: float | None = None
    target_ratio: float | None = None
    groups: int = 128
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    mode: str = "expected"
    tau: float = 3e-3
    selection: str = "threshold"
    samples: int = 16
    tower: str = "dnn"
    hidden: tuple[int, ...] | None = None
    dim: int = 16
    epochs: int = 1
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float | None = None
    patience: int = 3
    evals_per_epoch: int = 1
    seed: int = 2022
    bisection_steps: int = 6
    bisection_fraction: float = 0.25
    fp32_baseline: bool = True
    embedding_optimizer: str = "auto"
    embedding_lr: float | None = None
    sharding: str = "table_wise"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def lambda_value(self) -> float:
        return self.lam if self.lam is not None else DEFAULT_LAMBDA[self.dataset]

    def l2(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_L2[self.dataset]


def build_model(data: PreparedDataset, cfg: MPEConfig, lam: float | None = None) -> CTRModel:
    """A fresh MPE model (seeded by ``cfg.seed``) grouped by ``data``'s train frequencies."""
    freq = data.frequency()
    group_of_row = frequency_groups(freq, cfg.groups)
    candidates = validate_candidates(cfg.candidates)
    torch.manual_seed(cfg.seed)
    embedding = MixedPrecisionEmbedding(
        data.fields,
        data.cardinalities,
        cfg.dim,
        group_of_row,
        group_penalty_weights(freq, group_of_row),
        candidates=cfg.candidates,
        mode=cfg.mode,
        tau=cfg.tau,
        lam=cfg.lambda_value() if lam is None else lam,
        pruned_rows=unseen_rows(freq) if 0 in candidates else None,
    )
    tower = build_tower(cfg.tower, len(data.fields), cfg.dim, cfg.hidden)
    return CTRModel(embedding, tower)


def mpe_optimizers(cfg: MPEConfig):
    """Adam for logits / steps / offset (no weight decay) and Adam with L2 for rows and tower."""

    def factory(model: CTRModel) -> list[torch.optim.Optimizer]:
        emb: MixedPrecisionEmbedding = model.embedding
        quant = [p for p in emb.quant_parameters() if p.requires_grad]
        quant_ids = {id(p) for p in emb.quant_parameters()}
        rest = [p for p in trainable_parameters(model) if id(p) not in quant_ids]
        return [
            torch.optim.Adam(quant, lr=cfg.lr),
            torch.optim.Adam(rest, lr=cfg.lr, weight_decay=cfg.l2()),
        ]

    return factory


def train_config(cfg: MPEConfig, epochs: int | None = None) -> TrainConfig:
    """The trainer's settings of an MPE stage; L2 goes to the rows and tower only (``mpe_optimizers``)."""
    extra = {} if epochs is None else {"epochs": epochs}
    return TrainConfig.from_attributes(cfg, weight_decay=0.0, embedding_weight_decay=cfg.l2(), **extra)


def search(
    model: CTRModel, data: PreparedDataset, cfg: MPEConfig, out: Path | None, resume: bool = False,
    train: SplitArrays | None = None, dist: DistEnv | None = None,
) -> FitResult:
    """Learn the precision distributions (and rows, tower, steps) with the size penalty.

    ``train`` replaces the training split (the bisection of ``find_lambda`` uses a prefix).
    """
    model.embedding.set_phase("search")
    trainer = Trainer(model, train_config(cfg), mpe_optimizers(cfg), out_dir=out, log=_log(cfg), dist=dist)
    if trainer.plan and dist is not None and dist.is_main and out is not None:
        print(distributed.describe_plan(trainer.plan, dist), flush=True)
    train = data.split("train") if train is None else train
    return trainer.fit(train, data.split("val"), data.fields, resume=resume)


def select(model: CTRModel, data: PreparedDataset, cfg: MPEConfig, budget_bytes: int | None) -> tuple[np.ndarray, dict]:
    """One bit-width per group from the learned distributions, by ``cfg.selection``."""
    emb: MixedPrecisionEmbedding = model.embedding
    probs = emb.probabilities().detach().numpy()
    if cfg.selection == "threshold":
        return _zero_pruned(emb, select_threshold(probs, emb.candidates)), {"strategy": "threshold"}
    if cfg.selection == "argmax":
        return _zero_pruned(emb, select_argmax(probs, emb.candidates)), {"strategy": "argmax"}
    val = data.split("val")

    def evaluate_bits(bits: np.ndarray) -> float:
        trial = copy.deepcopy(model)
        trial.embedding.fix_bits(bits)
        return evaluate(trial, val, data.fields)["auc"]

    def size_of(bits: np.ndarray) -> int:
        return packed_table_bytes(emb.row_bits(bits), emb.dim, emb.candidates)

    budget = budget_bytes if budget_bytes is not None else size_of(select_threshold(probs, emb.candidates))
    bits, info = select_budgeted(probs, emb.candidates, evaluate_bits, size_of, budget, cfg.samples, cfg.seed)
    info = {"strategy": "budgeted", "budget_bytes": int(budget), **info}
    return _zero_pruned(emb, bits), info


def _zero_pruned(emb: MixedPrecisionEmbedding, bits: np.ndarray) -> np.ndarray:
    """0 bits for the groups whose rows are all pruned by construction (never seen in training)."""
    return np.where(emb.pruned_groups(), 0, bits) if 0 in emb.candidates else bits


def retrain(
    model: CTRModel, init_weight: torch.Tensor, bits: np.ndarray, data: PreparedDataset, cfg: MPEConfig,
    out: Path | None, resume: bool = False, dist: DistEnv | None = None,
) -> FitResult:
    """Rows back to their pre-search values, bit-widths frozen, tower/steps/offset kept, fresh Adam."""
    emb: MixedPrecisionEmbedding = model.embedding
    emb.load_global_weight(init_weight)
    emb.fix_bits(bits)
    trainer = Trainer(model, train_config(cfg), mpe_optimizers(cfg), out_dir=out, log=_log(cfg), dist=dist)
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
    short_train = train.subset(slice(0, max(1, int(len(train) * cfg.bisection_fraction))))
    short_cfg = replace(cfg, epochs=1, progress=False)
    lo, hi = math.log(1e-9), math.log(1.0)
    lam = cfg.lam if cfg.lam is not None else DEFAULT_LAMBDA[cfg.dataset]
    log_lam = math.log(lam)
    trials: list[dict] = []
    best = None
    for i in range(cfg.bisection_steps):
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
    train_cfg = TrainConfig.from_attributes(cfg, weight_decay=cfg.l2())
    settings = {k: v for k, v in asdict(train_cfg).items() if k != "progress"}
    key_src = {"manifest": data.manifest, "tower": cfg.tower, "hidden": list(cfg.hidden or []), "dim": cfg.dim,
               "train": settings, "processes": 1 if dist is None else dist.world_size}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = data.root / FP32_BASELINES / f"{key}.json"
    if path.exists():
        try:
            cached = read_json(path)
            return {**cached, "test": dict(cached["test"]), "cached": True}
        except (ArtifactError, KeyError, TypeError):
            pass  # unreadable cache: train again and overwrite it
    _log(cfg, dist)(f"fp32 baseline (same data, tower, settings, seed {cfg.seed}) for comparison")
    torch.manual_seed(cfg.seed)
    model = CTRModel(FP32Embedding(data.fields, data.cardinalities, cfg.dim),
                     build_tower(cfg.tower, len(data.fields), cfg.dim, cfg.hidden))
    fit = Trainer(model, train_cfg, log=_log(cfg, dist), dist=dist).fit(data.split("train"), data.split("val"), data.fields)
    result = {"test": evaluate(model, data.split("test"), data.fields), "val_auc": fit.best_auc,
              "seconds": fit.seconds, "steps": fit.steps, "key": key}
    if dist is None or dist.is_main:
        try:
            atomic_write_json(path, result)
        except OSError:
            pass  # a read-only prepared directory: no cache, the result is still reported
    return {**result, "cached": False}


def _log(cfg: MPEConfig, dist: DistEnv | None = None):
    quiet = not cfg.progress or (dist is not None and not dist.is_main)
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


# -- run directory ------------------------------------------------------------------------
def save_model(model: CTRModel, cfg: MPEConfig, data: PreparedDataset, out: Path) -> None:
    """``model.pt`` (weights only) + ``model.json`` (what rebuilds it, and its sha256)."""
    atomic_torch_save(out / MODEL_FILE, model.state_dict())
    emb: MixedPrecisionEmbedding = model.embedding
    atomic_write_json(out / MODEL_META, seal_json({
        "schema_version": MODEL_SCHEMA_VERSION,
        "kind": "mpe",
        "fields": data.fields,
        "cardinalities": data.cardinalities,
        "field_offsets": data.field_offsets,
        "dim": cfg.dim,
        "groups": emb.num_groups,
        "candidates": list(emb.candidates),
        "mode": cfg.mode,
        "tau": cfg.tau,
        "tower": cfg.tower,
        "hidden": list(cfg.hidden) if cfg.hidden else None,
        "sha256": sha256_file(out / MODEL_FILE),
    }, "meta_sha256"))


def load_model(run_dir: str | Path) -> tuple[CTRModel, dict]:
    """Rebuild the retrained MPE model of a run directory (checksums verified, no pickle).

    ``model.json``'s own checksum and schema version and ``model.pt``'s sha256 are checked,
    and the weights must fit the description; otherwise ``ArtifactError``.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / MODEL_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("kind") != "mpe":
        raise ArtifactError(f"{meta_path}: not an MPE model description")
    if meta.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise ArtifactError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, this version reads "
                            f"{MODEL_SCHEMA_VERSION}; run mpe.search again to rewrite it")
    meta = read_sealed_json(meta_path, "meta_sha256")
    try:
        state = load_torch(run_dir / MODEL_FILE, expected_sha256=str(meta["sha256"]))
        embedding = MixedPrecisionEmbedding(
            meta["fields"], meta["cardinalities"], meta["dim"],
            state["embedding.group_of_row"].numpy(), state["embedding.penalty_weights"].numpy(),
            candidates=meta["candidates"], mode=meta["mode"], tau=meta["tau"],
            pruned_rows=state["embedding.pruned_rows"].numpy(),
        )
        hidden = tuple(meta["hidden"]) if meta["hidden"] else None
        tower = build_tower(meta["tower"], len(meta["fields"]), meta["dim"], hidden)
        model = CTRModel(embedding, tower)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ArtifactError(f"{run_dir / MODEL_FILE}: does not match {MODEL_META} ({short_error(e)})") from None
    embedding.set_phase("fixed")
    return model, meta


def _stage_config(cfg: MPEConfig) -> dict:
    """The settings a resumed run must share with the interrupted one (JSON form)."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("progress", "fp32_baseline")}))


def _load_stages(path: Path, cfg: MPEConfig) -> dict:
    """``stages.json`` of an interrupted run, checked (own checksum, same settings); {} if absent."""
    if not path.exists():
        return {}
    stages = read_json(path)
    if isinstance(stages, dict) and STAGES_DIGEST in stages:
        stages = read_sealed_json(path, STAGES_DIGEST)
    elif not isinstance(stages, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    if "config" in stages and stages["config"] != _stage_config(cfg):
        before, now = stages["config"], _stage_config(cfg)
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ArtifactError(f"{path}: the interrupted run used other settings ({', '.join(diff)} differ); "
                            "resume with the same options or use another --out")
    try:
        if "search" in stages:
            FitResult(**stages["search"])
            str(stages["search_sha256"])
        if "bits" in stages:
            [int(b) for b in stages["bits"]], dict(stages["selection"])
        if "lambda" in stages:
            float(stages["lambda"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed ({e})") from None
    return stages


def _save_stages(path: Path, stages: dict, cfg: MPEConfig) -> None:
    """Atomically write ``stages.json`` with the run's settings and its own checksum."""
    stages.update(config=_stage_config(cfg))
    atomic_write_json(path, seal_json({k: v for k, v in stages.items() if k != STAGES_DIGEST}, STAGES_DIGEST))


def plot_bits(path: Path, group_freq: np.ndarray, bits: np.ndarray, title: str) -> None:
    """PNG of the chosen bit-width of each group against its mean training frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(np.maximum(group_freq, 1e-1), bits, where="mid", color="tab:blue")
    ax.scatter(np.maximum(group_freq, 1e-1), bits, s=10, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("mean training count of the group's features (log)")
    ax.set_ylabel("chosen bit-width")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run(data: PreparedDataset, cfg: MPEConfig, out: Path, resume: bool = False,
        dist: DistEnv | None = None) -> dict:
    """Search -> select -> retrain -> evaluate -> export; returns (and writes) the report.

    With ``dist`` (a torchrun process group) every rank trains its shard and returns the
    report; only rank 0 writes files, and ``resume`` is refused.
    """
    from mpe.export import export_run

    distributed.refuse_resume(resume, dist)
    main = dist is None or dist.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = _log(cfg, dist)
    t0 = time.perf_counter()
    stages_path = out / STAGES_FILE
    stages = _load_stages(stages_path, cfg) if resume else {}
    fp32_bytes = fp32_table_bytes(data.num_features, cfg.dim)
    trials: list[dict] = stages.get("lambda_trials", [])
    lam = stages.get("lambda", cfg.lambda_value())
    if cfg.target_ratio and "lambda" not in stages:
        log(f"finding lambda for {cfg.target_ratio:g}x by bisection ({cfg.bisection_steps} short searches)")
        lam, trials = find_lambda(data, cfg, cfg.target_ratio, dist)
        stages.update(lambda_trials=trials, **{"lambda": lam})
        if main:
            _save_stages(stages_path, stages, cfg)
    model = build_model(data, cfg, lam=lam)
    emb: MixedPrecisionEmbedding = model.embedding
    init_weight = emb.global_weight()
    log(f"MPE search on {data.dataset}: {data.num_features:,} features in {emb.num_groups} groups, "
        f"bits {list(emb.candidates)}, mode {cfg.mode}, lambda {lam:.3g}")
    if "search" in stages:
        search_fit = FitResult(**stages["search"])
        model.load_state_dict(load_torch(out / "search_model.pt", stages["search_sha256"]))
    else:
        search_fit = search(model, data, cfg, out / "search", resume=resume, dist=dist)
        if main:
            atomic_torch_save(out / "search_model.pt", model.state_dict())
            stages.update(search=asdict(search_fit), search_sha256=sha256_file(out / "search_model.pt"))
            _save_stages(stages_path, stages, cfg)
    probs = emb.probabilities().detach().numpy()
    budget = int(fp32_bytes / cfg.target_ratio) if cfg.target_ratio else None
    if "bits" in stages:
        bits, sel_info = np.asarray(stages["bits"], dtype=np.int64), stages["selection"]
    else:
        bits, sel_info = select(model, data, cfg, budget)
        if cfg.target_ratio:
            bits, moves = adjust_to_ratio(
                bits, group_frequencies(data.frequency(), emb.group_of_row.numpy()), emb.candidates,
                lambda b: compression_ratio(data, emb, _zero_pruned(emb, b)), cfg.target_ratio,
            )
            bits = _zero_pruned(emb, bits)
            sel_info = {**sel_info, "budget_adjustments": moves}
        stages.update(bits=[int(b) for b in bits], selection=sel_info)
        if main:
            _save_stages(stages_path, stages, cfg)
    rank_digests = check_ranks_agree(bits, dist)
    log(f"selected ({cfg.selection}): mean {float(np.mean(bits)):.3f} bits per group")
    retrain_fit = retrain(model, init_weight, bits, data, cfg, out / "retrain", resume=resume, dist=dist)
    test = evaluate(model, data.split("test"), data.fields)
    fp32 = fp32_baseline(data, cfg, dist) if cfg.fp32_baseline else None
    if not main:
        distributed.barrier(dist)  # rank 0 writes the run
        return {"method": "mpe", "test": test, "bits_per_group": [int(b) for b in bits], "rank": dist.rank}
    save_model(model, cfg, data, out)
    export = export_run(out, out / "export", verify_data=data)
    freq = data.frequency()
    group_of_row = emb.group_of_row.numpy()
    gfreq = group_frequencies(freq, group_of_row)
    row_bits = emb.row_bits(bits)
    mean_bits_row = float(np.mean(row_bits)) if len(row_bits) else 0.0
    weights = emb.penalty_weights.double().numpy()
    seen = ~emb.pruned_groups()
    report = {
        "method": "mpe",
        "dataset": data.dataset,
        "data": str(data.root),
        "config": {**asdict(cfg), "lambda": lam},
        "test": test,
        "fp32_test": None if fp32 is None else fp32["test"],
        "fp32_baseline": None if fp32 is None else {k: v for k, v in fp32.items() if k != "test"},
        "search_val_auc": search_fit.best_auc,
        "retrain_val_auc": retrain_fit.best_auc,
        "fp32_bytes": fp32_bytes,
        "packed_bytes": export["total_bytes"],
        "compression_ratio": fp32_bytes / export["total_bytes"],
        "mean_bits_per_row": mean_bits_row,
        "paper_ratio_32_over_mean_bits": 32 / mean_bits_row if mean_bits_row > 0 else math.inf,
        "torchrec_quant_bytes": export.get("torchrec_quant_bytes"),
        "tower_bytes": model.tower_bytes(),
        "export_test_auc": export["test_auc"],
        "bits_per_group": [int(b) for b in bits],
        "unseen_rows": {"rows": int(emb.pruned_rows.sum()), "groups_all_unseen": int((~seen).sum()),
                        "note": "rows never seen in training are pruned (0 bits) by construction"},
        "penalty_weights": weights.tolist(),
        "penalty_weight_sum": float(weights.sum()),
        "spearman_frequency_bits": _finite_or_none(spearman(gfreq[seen], bits[seen].astype(np.float64)))
        if seen.sum() > 1 else None,
        "probabilities": probs.round(4).tolist(),
        "group_mean_frequency": gfreq.tolist(),
        "selection": sel_info,
        "lambda_trials": trials,
        "timings": {
            "search_seconds": search_fit.seconds,
            "search_step_seconds": search_fit.step_seconds,
            "retrain_seconds": retrain_fit.seconds,
            "retrain_step_seconds": retrain_fit.step_seconds,
            "total_seconds": time.perf_counter() - t0,
        },
        "history": {"search": search_fit.history, "retrain": retrain_fit.history},
        "processes": 1 if dist is None else dist.world_size,
    }
    if dist is not None:
        report["distributed"] = {
            "world_size": dist.world_size, "backend": dist.backend, "sharding": cfg.sharding,
            "embedding_optimizer": distributed.resolve_embedding_optimizer(cfg.embedding_optimizer, dist),
            "bits_sha256_by_rank": rank_digests,
        }
    atomic_write_json(out / "report.json", report)
    plot_bits(out / "bits_vs_frequency.png", gfreq, bits,
              f"MPE on {data.dataset}: {headline(report)}")
    distributed.barrier(dist)
    return report


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def headline(report: dict) -> str:
    """One line: the ratio, the test AUC and, when measured, the fp32 model's."""
    line = f"{report['compression_ratio']:.1f}x at test AUC {report['test']['auc']:.4f}"
    if report.get("fp32_test"):
        line += f", fp32 {report['fp32_test']['auc']:.4f}"
    return line


def summary_table(report: dict) -> str:
    t = report["test"]
    rows = [
        ("test AUC", f"{t['auc']:.5f}"),
        ("test logloss", f"{t['logloss']:.5f}"),
        ("AUC from loaded export", f"{report['export_test_auc']:.5f}"),
        ("fp32 table bytes", f"{report['fp32_bytes']:,}"),
        ("packed export bytes", f"{report['packed_bytes']:,}"),
        ("compression ratio (bytes)", f"{report['compression_ratio']:.1f}x"),
        ("mean bits per row (32/mean)", f"{report['mean_bits_per_row']:.3f} ({report['paper_ratio_32_over_mean_bits']:.1f}x)"),
        ("search step / retrain step", f"{report['timings']['search_step_seconds'] * 1e3:.1f} ms / {report['timings']['retrain_step_seconds'] * 1e3:.1f} ms"),
        ("total time", f"{report['timings']['total_seconds']:.1f} s"),
    ]
    if report.get("fp32_test"):
        f = report["fp32_test"]
        rows.insert(2, ("fp32 test AUC / logloss", f"{f['auc']:.5f} / {f['logloss']:.5f} (same data, tower, seed)"))
    sp = report.get("spearman_frequency_bits")
    rows.append(("spearman(frequency, bits)", "n/a" if sp is None else f"{sp:.3f} over the groups seen in training"))
    rows.append(("penalty weights: sum", f"{report['penalty_weight_sum']:.2f} over {len(report['penalty_weights'])} groups"))
    if report.get("torchrec_quant_bytes"):
        rows.insert(6 if report.get("fp32_test") else 5, ("torchrec rowwise-quant bytes", f"{report['torchrec_quant_bytes']:,}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpe.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sources.add_data_arguments(p)
    g = p.add_argument_group("MPE")
    g.add_argument("--lambda", dest="lam", type=float, default=None,
                   help=f"size-penalty coefficient (default per dataset: {DEFAULT_LAMBDA})")
    g.add_argument("--target-ratio", type=float, default=None, help="find lambda so the export is ~R x smaller than fp32")
    g.add_argument("--groups", type=int, default=128, help="frequency groups (default 128)")
    g.add_argument("--bits", type=int, nargs="+", default=list(DEFAULT_CANDIDATES), help="candidate bit-widths (default 0..6; 0 = pruned)")
    g.add_argument("--mode", choices=MODES, default="expected", help="search mode: expected mixture (reference) or Gumbel sample")
    g.add_argument("--tau", type=float, default=3e-3, help="softmax temperature of the precision logits (default 3e-3)")
    g.add_argument("--selection", choices=SELECTIONS, default="threshold", help="how bits are chosen from the distributions")
    g.add_argument("--samples", type=int, default=16, help="budgeted selection: assignments drawn (default 16)")
    add_training_arguments(p, evals_per_epoch=1, weight_decay=None,
                           weight_decay_help=f"L2 on rows and tower (default per dataset: {DEFAULT_L2})")
    p.add_argument("--out", default=None, help="run directory (default runs/mpe_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-fp32-baseline", action="store_true",
                   help="skip the fp32 model trained on the same data, tower and seed for comparison "
                        f"(trained once, then cached in the prepared data's {FP32_BASELINES}/)")
    return p


def config_from_args(args: argparse.Namespace) -> MPEConfig:
    return MPEConfig(
        dataset=args.dataset, lam=args.lam, target_ratio=args.target_ratio, groups=args.groups,
        candidates=validate_candidates(args.bits), mode=args.mode, tau=args.tau, selection=args.selection,
        samples=args.samples, tower=args.tower, hidden=tuple(args.hidden) if args.hidden else None,
        dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, evals_per_epoch=args.evals_per_epoch,
        patience=args.patience, weight_decay=args.weight_decay, seed=args.seed, progress=not args.no_progress,
        embedding_optimizer=args.embedding_optimizer, embedding_lr=args.embedding_lr, sharding=args.sharding,
        fp32_baseline=not args.no_fp32_baseline,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = None
    try:
        cfg = config_from_args(args)
        dist = distributed.init_from_environment()
        data = sources.resolve_once(args, progress=cfg.progress, dist=dist)
        cfg.dataset = data.dataset
        out = Path(args.out or f"runs/mpe_{data.dataset}")
        report = run(data, cfg, out, resume=args.resume, dist=dist)
    except (sources.DataNotFoundError, ValueError, OSError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if dist is None or dist.is_main:
        print(f"\nMPE on {data.dataset} -> {out}: {headline(report)}\n{summary_table(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
