"""Train the fp32 CTR baseline: ``python -m genlora_rec.train --dataset criteo --synthetic 200000``.

Prints and writes (``OUT/report.json``) test AUC, logloss and model bytes. Under
``torchrun --nproc_per_node=N -m genlora_rec.train ...`` the tables are sharded over the N
processes (``genlora_rec.distributed``) and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from data import sources
from data.artifacts import ArtifactError, atomic_write_json
from genlora_rec import distributed
from genlora_rec.model import CTRModel, FP32Embedding
from genlora_rec.towers import TOWERS, build_tower
from genlora_rec.trainer import NonFiniteLossError, TrainConfig, Trainer, evaluate


def add_training_arguments(
    parser: argparse.ArgumentParser,
    evals_per_epoch: int = 1,
    weight_decay: float | None = 0.0,
    weight_decay_help: str = "L2 on embeddings and tower (default 0)",
) -> None:
    """Model and optimisation options shared by the training CLIs (``mpe.search`` too)."""
    g = parser.add_argument_group("model and training")
    g.add_argument("--tower", choices=sorted(TOWERS), default="dnn", help="dense tower (default dnn)")
    g.add_argument("--hidden", type=int, nargs="+", default=None, help="tower hidden sizes (default per tower)")
    g.add_argument("--dim", type=int, default=16, help="embedding dimension (default 16)")
    g.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    g.add_argument("--batch-size", type=int, default=4096, help="batch size (default 4096)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=weight_decay_help)
    g.add_argument("--patience", type=int, default=3, help="validations without AUC gain before stopping")
    g.add_argument("--evals-per-epoch", type=int, default=evals_per_epoch,
                   help=f"validations per epoch (default {evals_per_epoch})")
    g.add_argument("--seed", type=int, default=2022, help="model seed (default 2022)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = parser.add_argument_group("tables and multi-process training (torchrun)")
    g.add_argument("--embedding-optimizer", choices=distributed.EMBEDDING_OPTIMIZERS, default="auto",
                   help="optimizer of the embedding tables (default auto: Adam with the tower, except tables "
                        "sharded on CPU, where fbgemm's fused kernels offer Adagrad)")
    g.add_argument("--embedding-lr", type=float, default=None, help="learning rate of the tables (default --lr)")
    g.add_argument("--sharding", choices=distributed.SHARDING_TYPES, default="table_wise",
                   help="how torchrun processes split the tables (default table_wise; row_wise needs nccl)")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the options ``add_training_arguments`` defines."""
    return TrainConfig.from_attributes(args, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m genlora_rec.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sources.add_data_arguments(p)
    add_training_arguments(p)
    p.add_argument("--out", default="runs/fp32", help="run directory (default runs/fp32)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dist = distributed.init_from_environment()
        return _run(args, dist)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace, dist: distributed.DistEnv | None) -> int:
    main_rank = dist is None or dist.is_main
    try:
        data = sources.resolve_once(args, progress=not args.no_progress, dist=dist)
    except (sources.DataNotFoundError, ValueError, OSError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    hidden = tuple(args.hidden) if args.hidden else None
    model = CTRModel(
        FP32Embedding(data.fields, data.cardinalities, args.dim),
        build_tower(args.tower, len(data.fields), args.dim, hidden),
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(model, train_config(args), out_dir=out, dist=dist)
        if trainer.plan and main_rank:
            print(distributed.describe_plan(trainer.plan, dist), flush=True)
        fit = trainer.fit(data.split("train"), data.split("val"), data.fields, resume=args.resume)
    except (ArtifactError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    test = evaluate(model, data.split("test"), data.fields)
    if not main_rank:
        distributed.barrier(dist)
        return 0
    report = {
        "method": "fp32",
        "dataset": data.dataset,
        "data": str(data.root),
        "tower": args.tower,
        "dim": args.dim,
        "test": test,
        "val_auc": fit.best_auc,
        "embedding_bytes": model.embedding_bytes(),
        "tower_bytes": model.tower_bytes(),
        "num_features": data.num_features,
        "steps": fit.steps,
        "step_seconds": fit.step_seconds,
        "seconds": time.perf_counter() - t0,
        "history": fit.history,
        "processes": 1 if dist is None else dist.world_size,
        "embedding_optimizer": trainer.table_optimizer,
    }
    atomic_write_json(out / "report.json", report)
    distributed.barrier(dist)
    print(
        f"fp32 {args.tower}: test AUC {test['auc']:.5f}  logloss {test['logloss']:.5f}  "
        f"embedding {report['embedding_bytes']:,} B  tower {report['tower_bytes']:,} B  -> {out / 'report.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
