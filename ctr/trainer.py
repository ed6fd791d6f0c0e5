"""The training loop every part of the toolkit uses.

Adam, shuffled mini-batches of KJTs, validation AUC a few times per epoch, early stopping
on it with the best weights kept, tqdm progress, low-memory AUC and logloss (``data.auc``), and atomic
weights-only checkpoints that ``resume=True`` continues from.

Given a ``DistEnv`` (a ``torchrun`` process group), the same loop trains the model sharded
by torchrec's ``DistributedModelParallel`` (``ctr.distributed``): each rank takes
its slice of every batch, evaluation is gathered so every rank sees the same AUC, and the
trained weights end up, unsharded, in the model passed in, on every rank.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ctr import distributed, sparse
from ctr.distributed import DistEnv
from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    read_json,
    sha256_file,
    short_error,
)
from data.auc import auc as roc_auc
from data.auc import log_loss
from data.batches import DEFAULT_SHUFFLE_BUFFER_ROWS, Rows, iter_batches, num_batches
from data.resources import check_memory

CHECKPOINT = "checkpoint.pt"
ADAGRAD_LR = 0.01  # the tables' default learning rate under Adagrad (fbgemm's CPU kernels)
REPORT_FILE = "report.json"  # the summary every run directory holds
CHECKPOINT_META = "checkpoint.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Optimisation and early-stopping settings.

    ``patience`` counts validations (``evals_per_epoch`` per epoch) without AUC gain.
    ``embedding_optimizer``: how the tables are trained (``ctr.distributed.resolve_embedding_optimizer``):
    ``"auto"`` is ``"lazy_adam"`` in one process (sparse gradients, a step updates only
    the rows it looked up: its cost does not grow with the table rows) and fbgemm's fused
    kernels when sharded (Adagrad on CPU, Adam on GPU); ``"adam"`` in one process is dense
    Adam in the model's optimizers (every row, every step); ``"adagrad"`` / ``"sgd"`` are
    stepped in the backward pass. The tables use ``embedding_lr`` (default ``lr``, and
    ``ADAGRAD_LR`` for Adagrad, whose steps shrink with the summed squared gradients) and
    ``embedding_weight_decay`` (default ``weight_decay``); with ``lazy_adam`` the L2
    applies to the rows a batch looks up.
    ``sharding``: ``"table_wise"`` or ``"row_wise"``, for multi-process runs.
    ``shuffle_buffer_rows``: rows per shuffle window (``data.batches``): the memory of
    the training batches, and how far apart in the file the rows of a batch can lie.
    """

    epochs: int = 1
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 3
    evals_per_epoch: int = 1
    eval_batch_size: int = 16384
    seed: int = 2022
    progress: bool = True
    embedding_optimizer: str = "auto"
    embedding_lr: float | None = None
    embedding_weight_decay: float | None = None
    sharding: str = "table_wise"
    shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS

    @classmethod
    def from_attributes(cls, source: object, **overrides) -> TrainConfig:
        """The settings ``source`` (an argparse namespace, an ``MPEConfig``) has under the
        same names, then ``overrides``."""
        values = {f.name: getattr(source, f.name) for f in dataclass_fields(cls) if hasattr(source, f.name)}
        return cls(**{**values, **overrides})


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters an ordinary optimizer should step: trainable, not updated in the backward
    pass and not a table with sparse gradients (the trainer's ``LazyAdam`` steps those)."""
    sparse_ids = {id(p) for p in sparse.sparse_table_parameters(model)}
    return [p for p in model.parameters()
            if p.requires_grad and not distributed.in_backward(p) and id(p) not in sparse_ids]


@dataclass
class FitResult:
    """What ``Trainer.fit`` did: best validation AUC, where, the history and timings."""

    best_auc: float
    best_logloss: float
    best_step: int
    steps: int
    seconds: float
    step_seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


@torch.no_grad()
def predict(
    model: nn.Module, split: Rows, fields: Sequence[str], batch_size: int = 16384,
    device: torch.device | None = None,
) -> np.ndarray:
    """Click probabilities float64 [N] for every row of ``split`` (model in eval mode).

    ``device``: where the batches go (a sharded model's device); default where they are built.
    """
    was_training = model.training
    model.eval()
    # One array filled in place: hundreds of small arrays kept alive between the batches'
    # large temporaries fragment the heap (measured: +0.9-2.3 GB RSS over a 4.6M-row split).
    out = np.empty(len(split), dtype=np.float64)
    start = 0
    for kjt, _ in iter_batches(split, fields, batch_size):
        probs = torch.sigmoid(model(kjt if device is None else kjt.to(device))).double().cpu().numpy()
        out[start : start + len(probs)] = probs
        start += len(probs)
    model.train(was_training)
    return out[:start]


def metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC and logloss of 0/1 ``labels`` [n] against probabilities ``probs`` [n] (``data.auc``:
    scikit-learn's figures in ~16 bytes per row); AUC is NaN when a split has one class only."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(probs).all():
        raise NonFiniteLossError("the model's predictions are NaN or infinite (its weights diverged)")
    probs = np.clip(probs, 1e-7, 1 - 1e-7)
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs), "rows": int(len(labels))}


def evaluate(model: nn.Module, split: Rows, fields: Sequence[str], batch_size: int = 16384) -> dict[str, float]:
    """AUC / logloss of ``model`` on ``split``."""
    return metrics(split.labels, predict(model, split, fields, batch_size))


OptimizerFactory = Callable[[nn.Module], list[torch.optim.Optimizer]]


class Trainer:
    """Trains ``model`` (KJT -> logits [B]) with BCE + ``model.extra_loss()`` when it has one.

    Args:
        model: the model; ``model.extra_loss()`` (optional) is added to every step's loss,
            ``model.after_step()`` (optional) is called after every optimiser step.
        config: the ``TrainConfig``.
        optimizers: builds the optimisers from the model; default one Adam over all
            trainable parameters with ``config.lr`` and ``config.weight_decay``.
        out_dir: where ``checkpoint.pt`` is written at every validation (atomically).
        log: where progress lines go.
        dist: the process group of a multi-process run (None: one process). The model is
            then sharded for training (``ctr.distributed.shard``); checkpoints and
            ``resume`` are single-process only.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        optimizers: OptimizerFactory | None = None,
        out_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] = print,
        dist: DistEnv | None = None,
    ):
        self.target = model
        self.config = config
        self.dist = dist
        self.table_optimizer = distributed.resolve_embedding_optimizer(config.embedding_optimizer, dist)
        self.plan: list[str] = []
        self.sparse_tables: list[nn.Parameter] = []
        wd = config.weight_decay if config.embedding_weight_decay is None else config.embedding_weight_decay
        table_lr = config.embedding_lr or (ADAGRAD_LR if self.table_optimizer == "adagrad" else config.lr)
        if dist is None and self.table_optimizer in ("adam", "lazy_adam"):
            self.model = model
            if self.table_optimizer == "lazy_adam":
                self.sparse_tables = sparse.enable_sparse_gradients(model)
        else:
            # the tables get an in-backward optimizer (and shards): on a copy, so the model passed
            # in stays an ordinary module; fit() loads the trained weights back into it
            work = copy.deepcopy(model)
            distributed.optimize_tables_in_backward(work, self.table_optimizer, table_lr, wd)
            self.model = work
            if dist is not None:
                # ``model`` holds the same initial values: no third copy of the tables
                self.model, self.plan = distributed.shard(work, dist, config.sharding, init=model.state_dict())
        factory = optimizers or (
            lambda m: [torch.optim.Adam(trainable_parameters(m), lr=config.lr, weight_decay=config.weight_decay)]
        )
        self.optimizers = factory(distributed.unwrap(self.model))
        if self.sparse_tables:
            self.optimizers.append(sparse.LazyAdam(self.sparse_tables, lr=table_lr, weight_decay=wd))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        main = dist is None or dist.is_main
        self.log = log if main else (lambda _msg: None)

    def _all_optimizers(self) -> list[torch.optim.Optimizer]:
        """The step optimizers, then the tables' in-backward ones (single process)."""
        extra = [opt for p in distributed.table_parameters(self.model)
                 for opt in getattr(p, "_in_backward_optimizers", [])]
        return self.optimizers + extra

    # -- checkpointing -------------------------------------------------------------
    def _state(self, position: dict, best_state: dict, history: list[dict]) -> dict:
        return {
            "model": self.model.state_dict(),
            "best_model": best_state,
            "optimizers": [opt.state_dict() for opt in self._all_optimizers()],
            "position": position,
            "history": history,
            "config": asdict(self.config),
            "rng": torch.get_rng_state(),
        }

    def save_checkpoint(self, position: dict, best_state: dict, history: list[dict]) -> None:
        if self.out_dir is None or self.dist is not None:
            return
        path = self.out_dir / CHECKPOINT
        atomic_torch_save(path, self._state(position, best_state, history))
        atomic_write_json(self.out_dir / CHECKPOINT_META, {"file": CHECKPOINT, "sha256": sha256_file(path), "position": position})

    def load_checkpoint(self) -> tuple[dict, dict, list[dict]] | None:
        """Restore model and optimisers from ``out_dir``; None when there is no checkpoint.

        The checkpoint's sha256 (recorded in ``checkpoint.json``) is verified and it is loaded
        weights-only; a missing, corrupted, truncated or foreign checkpoint (one written for
        another model or settings) raises ``ArtifactError``.
        """
        if self.out_dir is None or not (self.out_dir / CHECKPOINT_META).exists():
            return None
        meta_path, path = self.out_dir / CHECKPOINT_META, self.out_dir / CHECKPOINT
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise ArtifactError(f"{meta_path}: not a trainer checkpoint description (no sha256)")
        state = load_torch(path, expected_sha256=meta["sha256"])
        try:
            self.model.load_state_dict(state["model"])
            for opt, s in zip(self._all_optimizers(), state["optimizers"], strict=True):
                opt.load_state_dict(s)
            torch.set_rng_state(state["rng"])
            position = state["position"]
            missing = [k for k in ("epoch", "batch", "step", "best", "bad_evals") if k not in position]
            if missing:
                raise KeyError(f"position lacks {missing}")
            return position, state["best_model"], state["history"]
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(
                f"{path}: does not fit this model and its optimisers ({short_error(e)}); it was written by a run "
                "with other settings: resume with the same settings or use a fresh output directory"
            ) from None

    # -- training ------------------------------------------------------------------
    def fit(
        self,
        train: Rows,
        val: Rows,
        fields: Sequence[str],
        resume: bool = False,
    ) -> FitResult:
        """Train with early stopping on validation AUC; the model ends with the best weights."""
        if self.sparse_tables:
            sparse.enable_sparse_gradients(self.model)
            try:
                return self._fit(train, val, fields, resume)
            finally:
                sparse.disable_sparse_gradients(self.model)  # the model leaves as an ordinary module
        return self._fit(train, val, fields, resume)

    def memory_needed(self, num_fields: int) -> int:
        """Bytes ``fit`` allocates beyond the model itself: two Adam moments and the best
        weights per parameter (tables included), and the shuffle window's ids (x3: the
        window, its gathered rows, one batch)."""
        local = sum(t.numel() * t.element_size() for t in self.model.state_dict().values()
                    if isinstance(t, torch.Tensor) and not hasattr(t, "local_shards"))
        window = self.config.shuffle_buffer_rows * (num_fields + 1) * 4
        return 3 * local + 3 * window

    def _fit(self, train: Rows, val: Rows, fields: Sequence[str], resume: bool) -> FitResult:
        cfg = self.config
        distributed.refuse_resume(resume, self.dist)
        check_memory(self.memory_needed(len(fields)), "training")
        n_batches = num_batches(len(train), cfg.batch_size)
        if self.dist is not None and len(train) - (n_batches - 1) * cfg.batch_size < self.dist.world_size:
            n_batches -= 1  # too few rows left to give every rank one (iter_batches drops it)
        if n_batches == 0:
            raise ValueError("the training split is empty")
        eval_every = max(1, math.ceil(n_batches / max(1, cfg.evals_per_epoch)))
        # the best weights, copied only when training moves on from them (None: the model's own
        # weights are the best, or no validation has run yet): one copy of the tables at most,
        # none for a run whose last validation is its best
        best_state: dict | None = None
        history: list[dict] = []
        start_epoch, start_batch, step = 0, 0, 0
        best = {"auc": -math.inf, "logloss": math.inf, "step": 0}
        bad_evals = 0
        stopped = False
        if resume and (restored := self.load_checkpoint()) is not None:
            position, best_state, history = restored
            start_epoch, start_batch, step = position["epoch"], position["batch"], position["step"]
            best, bad_evals = position["best"], position["bad_evals"]
            self.log(f"resumed from {self.out_dir / CHECKPOINT} at epoch {start_epoch}, batch {start_batch}")
            # killed right after the validation that stopped it early: nothing is left to train
            stopped = bad_evals >= cfg.patience
            if stopped:
                start_epoch = cfg.epochs
        t0 = time.perf_counter()
        step_time, timed_steps = 0.0, 0
        self.model.train()
        rank_of = (self.dist.rank, self.dist.world_size) if self.dist else None
        quiet = not cfg.progress or (self.dist is not None and not self.dist.is_main)
        for epoch in range(start_epoch, cfg.epochs):
            first = start_batch if epoch == start_epoch else 0
            batches = iter_batches(train, fields, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, rank_of=rank_of,
                                   start_batch=first, buffer_rows=cfg.shuffle_buffer_rows)
            bar = tqdm(total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=quiet,
                       leave=False, unit="batch")
            for b, (kjt, labels) in enumerate(batches, start=first):
                if best_state is None and best["step"] == step and history:
                    best_state = copy.deepcopy(self.model.state_dict())  # the next step leaves the best
                ts = time.perf_counter()
                loss = self._step(kjt, labels, step)
                step_time += time.perf_counter() - ts
                timed_steps += 1
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{len(labels) / max(1e-9, time.perf_counter() - ts):,.0f}")
                last = b + 1 == n_batches
                if (b + 1) % eval_every == 0 or last:
                    try:
                        m = self._evaluate(val, fields)
                    except NonFiniteLossError as e:
                        raise NonFiniteLossError(f"{e}: validation after step {step}{self._last_good()}") from None
                    m.update(epoch=epoch + 1, step=step, train_loss=loss)
                    history.append(m)
                    improved = m["auc"] > best["auc"] or math.isnan(best["auc"])
                    if improved:
                        best = {"auc": m["auc"], "logloss": m["logloss"], "step": step}
                        best_state = None  # the model holds the best weights until the next step
                        bad_evals = 0
                    else:
                        bad_evals += 1
                    if not quiet:
                        bar.write(f"  step {step}: val auc {m['auc']:.5f} logloss {m['logloss']:.5f}" + (" *" if improved else ""))
                    next_pos = (epoch + 1, 0) if last else (epoch, b + 1)
                    position = {"epoch": next_pos[0], "batch": next_pos[1], "step": step, "best": best, "bad_evals": bad_evals}
                    self.save_checkpoint(position, self.model.state_dict() if best_state is None else best_state, history)
                    if bad_evals >= cfg.patience:
                        stopped = True
                        break
            bar.close()
            if stopped:
                self.log(f"early stop: no validation AUC gain in {cfg.patience} validations")
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
            del best_state
        if self.model is not self.target:
            if self.dist is not None:
                distributed.load_unsharded(self.model, self.target, self.dist)
            else:
                self.target.load_state_dict(self.model.state_dict())
        return FitResult(
            best_auc=best["auc"],
            best_logloss=best["logloss"],
            best_step=best["step"],
            steps=step,
            seconds=time.perf_counter() - t0,
            step_seconds=step_time / max(1, timed_steps),
            history=history,
            stopped_early=stopped,
        )

    def _evaluate(self, split: Rows, fields: Sequence[str]) -> dict[str, float]:
        if self.dist is None:
            return evaluate(self.model, split, fields, self.config.eval_batch_size)
        distributed.average_batchnorm_stats(distributed.unwrap(self.model), self.dist)
        start, stop = distributed.eval_range(len(split), self.dist.rank, self.dist.world_size)
        local = torch.from_numpy(predict(self.model, split.subset(slice(start, stop)), fields,
                                         self.config.eval_batch_size, device=self.dist.device))
        probs = distributed.gather_predictions(local, len(split), self.dist)
        return metrics(split.labels, probs)

    def _last_good(self) -> str:
        """The message tail naming the checkpoint a ``NonFiniteLossError`` leaves in place."""
        if self.out_dir is None:
            return ""
        if not (self.out_dir / CHECKPOINT_META).exists():
            return "; no checkpoint was written before it"
        return f"; the last good checkpoint is kept: {self.out_dir / CHECKPOINT}"

    def _step(self, kjt, labels: torch.Tensor, step: int) -> float:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.dist is not None and self.dist.device.type != "cpu":
            kjt, labels = kjt.to(self.dist.device), labels.to(self.dist.device)
        logits = self.model(kjt)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        extra = getattr(distributed.unwrap(self.model), "extra_loss", None)
        if extra is not None and (penalty := extra()) is not None:
            loss = loss + penalty
        value = distributed.mean_over_ranks(float(loss.detach()), self.dist)  # every rank stops together
        if not math.isfinite(value):
            raise NonFiniteLossError(f"training loss became {value} at step {step + 1}{self._last_good()}")
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        after = getattr(distributed.unwrap(self.model), "after_step", None)
        if after is not None:
            after()
        return value
