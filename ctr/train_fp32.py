"""Train the fp32 CTR baseline: ``python -m ctr.train_fp32 --dataset criteo --synthetic 200000``.

Prints and writes (``OUT/report.json``) test AUC, logloss and model bytes. Under
``torchrun --nproc_per_node=N -m ctr.train_fp32 ...`` the tables are sharded over the N
processes (``ctr.distributed``) and rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ctr import distributed
from ctr.model import CTRModel, FP32Embedding
from ctr.options import add_training_arguments, model_config, train_config
from ctr.trainer import REPORT_FILE, NonFiniteLossError, Trainer, evaluate
from data import sources
from data.artifacts import ArtifactError, atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ctr.train_fp32", description=__doc__,
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
    model_cfg = model_config(args)
    model = CTRModel(FP32Embedding(data.fields, data.cardinalities, model_cfg.dim), model_cfg.build_tower(len(data.fields)))
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
        "timings": {"train_seconds": fit.seconds, "step_seconds": fit.step_seconds},
        "history": fit.history,
        "processes": 1 if dist is None else dist.world_size,
        "embedding_optimizer": trainer.table_optimizer,
    }
    atomic_write_json(out / REPORT_FILE, report)
    distributed.barrier(dist)
    print(
        f"fp32 {args.tower}: test AUC {test['auc']:.5f}  logloss {test['logloss']:.5f}  "
        f"embedding {report['embedding_bytes']:,} B  tower {report['tower_bytes']:,} B  -> {out / REPORT_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
