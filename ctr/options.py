"""Command-line option groups every training entry point shares (model, optimisation, tables)."""

from __future__ import annotations

import argparse

from ctr import distributed
from ctr.model import ModelConfig
from ctr.trainer import TrainConfig
from genlora_rec.towers import TOWERS

_TRAIN, _MODEL = TrainConfig(), ModelConfig()


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and optimisation options shared by every training entry point.

    Defaults are the ``ModelConfig`` / ``TrainConfig`` defaults. ``--weight-decay`` defaults
    to None: the entry point's own default (0 for the fp32 model and the baselines, the
    dataset's L2 for MPE, as the paper: ``mpe.config.DEFAULT_L2``).
    """
    g = parser.add_argument_group("model and training")
    g.add_argument("--tower", choices=sorted(TOWERS), default=_MODEL.tower, help=f"dense tower (default {_MODEL.tower})")
    g.add_argument("--hidden", type=int, nargs="+", default=None, help="tower hidden sizes (default per tower)")
    g.add_argument("--dim", type=int, default=_MODEL.dim, help=f"embedding dimension (default {_MODEL.dim})")
    g.add_argument("--epochs", type=int, default=_TRAIN.epochs, help=f"training epochs (default {_TRAIN.epochs})")
    g.add_argument("--batch-size", type=int, default=_TRAIN.batch_size, help=f"batch size (default {_TRAIN.batch_size})")
    g.add_argument("--lr", type=float, default=_TRAIN.lr, help=f"Adam learning rate (default {_TRAIN.lr:g})")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="L2 on embeddings and tower (default: 0; MPE: per dataset, 3e-6 Criteo, 0 Avazu, a schema "
                        "file's [mpe] l2, else 0)")
    g.add_argument("--patience", type=int, default=_TRAIN.patience,
                   help=f"validations without AUC gain before stopping (default {_TRAIN.patience})")
    g.add_argument("--evals-per-epoch", type=int, default=_TRAIN.evals_per_epoch,
                   help=f"validations per epoch (default {_TRAIN.evals_per_epoch})")
    g.add_argument("--seed", type=int, default=_TRAIN.seed, help=f"model seed (default {_TRAIN.seed})")
    g.add_argument("--shuffle-buffer-rows", type=int, default=_TRAIN.shuffle_buffer_rows,
                   help="rows per shuffle window: the training batches' memory, and how far apart in the file "
                        f"a batch's rows can lie (default {_TRAIN.shuffle_buffer_rows:,}; data.batches)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = parser.add_argument_group("tables and multi-process training (torchrun)")
    g.add_argument("--embedding-optimizer", choices=distributed.EMBEDDING_OPTIMIZERS, default=_TRAIN.embedding_optimizer,
                   help="optimizer of the embedding tables (default auto: in one process lazy_adam, Adam on "
                        "sparse gradients that updates only the looked-up rows; sharded, fbgemm's fused kernels: "
                        "Adam on GPU, Adagrad on CPU; adam = dense Adam over every row, for comparison)")
    g.add_argument("--embedding-lr", type=float, default=None, help="learning rate of the tables (default --lr; 0.01 with Adagrad)")
    g.add_argument("--sharding", choices=distributed.SHARDING_TYPES, default=_TRAIN.sharding,
                   help=f"how torchrun processes split the tables (default {_TRAIN.sharding}; row_wise needs nccl)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` of the options ``add_training_arguments`` defines."""
    return ModelConfig(tower=args.tower, hidden=tuple(args.hidden) if args.hidden else None, dim=args.dim)


def train_config(args: argparse.Namespace, weight_decay: float = 0.0) -> TrainConfig:
    """The ``TrainConfig`` of the options ``add_training_arguments`` defines; ``weight_decay``
    is used when ``--weight-decay`` is not given."""
    wd = weight_decay if args.weight_decay is None else args.weight_decay
    return TrainConfig.from_attributes(args, progress=not args.no_progress, weight_decay=wd)
