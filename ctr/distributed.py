"""Multi-process training on torchrec's ``DistributedModelParallel``.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` / ``MASTER_PORT``): every process builds the same model from the same
seed, then ``shard`` hands it to torchrec, which

- shards the embedding tables (every ``EmbeddingBagCollection`` in the model) table-wise
  or row-wise over the ranks, as the planner chooses within ``--sharding``; the tables
  are trained by fbgemm's fused kernels with the optimizer applied in the backward pass
  (``apply_optimizer_in_backward``);
- wraps the rest (dense tower, MPE logits, quantizer steps and offset) in
  ``DistributedDataParallel``: every rank holds a full copy and gradients are averaged,
  so those parameters are identical on every rank after every step.

The backend is nccl when CUDA is available (one GPU per process, ``LOCAL_RANK``) and gloo
on CPU. fbgemm's CPU kernels have no fused Adam: on CPU the sharded tables are trained
with Adagrad (``resolve_embedding_optimizer``), on GPU with Adam; one process trains them
with a lazy Adam on sparse gradients (``ctr.sparse``).

Every rank takes its own ``1/world`` slice of each global batch (``data.batches.iter_batches``
with ``rank_of``; it holds only those rows), so a step sees ``--batch-size`` examples in all. Evaluation is sharded the same way and the
predictions are gathered on every rank, so every rank computes the same AUC and takes
the same early-stopping decision. BatchNorm statistics are per rank under DDP; they are
averaged over the ranks before every evaluation (``average_batchnorm_stats``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

SHARDING_TYPES = ("table_wise", "row_wise")
EMBEDDING_OPTIMIZERS = ("auto", "lazy_adam", "adam", "adagrad", "sgd")
_OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a process group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(backend: str | None = None) -> DistEnv | None:
    """Join the torchrun process group; None when this is a single process.

    ``backend`` defaults to nccl with CUDA and gloo without.
    """
    if not launched_by_torchrun():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv | None) -> None:
    if env is not None:
        dist.barrier()


def refuse_resume(resume: bool, env: DistEnv | None) -> None:
    """``ValueError`` for ``--resume`` in a multi-process run (checkpoints are single-process)."""
    if resume and env is not None:
        raise ValueError("--resume is single-process only: a multi-process run restarts from the beginning")


def describe_plan(lines: list[str], env: DistEnv) -> str:
    """The one line a CLI prints about the planner's choice (``shard``'s ``plan_lines``)."""
    return f"sharding plan ({env.world_size} processes, {env.backend}): " + "; ".join(lines)


def resolve_embedding_optimizer(name: str, env: DistEnv | None) -> str:
    """The tables' optimizer ``name`` stands for in this process group.

    ``auto``: in one process ``lazy_adam`` (sparse gradients, only the looked-up rows are
    updated: ``ctr.sparse``); sharded, fbgemm's fused kernels: Adam on GPU, Adagrad on CPU
    (fbgemm's CPU kernels have no fused Adam). ``adam`` in one process is dense Adam over
    every row at every step (the cost grows with the table rows; kept for comparison).
    """
    if name not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"unknown embedding optimizer {name!r}; expected one of {EMBEDDING_OPTIMIZERS}")
    if name == "auto":
        if env is None:
            return "lazy_adam"
        return "adagrad" if env.device.type == "cpu" else "adam"
    if name == "lazy_adam" and env is not None:
        raise ValueError("lazy_adam is the single-process table optimizer; sharded tables use fbgemm's fused "
                         "kernels: --embedding-optimizer auto (Adam on GPU, Adagrad on CPU)")
    if name == "adam" and env is not None and env.device.type == "cpu":
        raise ValueError("fbgemm's CPU kernels have no fused Adam for sharded tables: "
                         "use --embedding-optimizer adagrad (or auto) on CPU, or run on GPUs")
    return name


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every ``EmbeddingBagCollection`` in ``model`` (the tables)."""
    return [p for m in model.modules() if isinstance(m, EmbeddingBagCollection) for p in m.parameters()]


def optimize_tables_in_backward(model: nn.Module, name: str, lr: float, weight_decay: float) -> None:
    """Give the tables their own optimizer, stepped in the backward pass (torchrec's way:
    the sharder turns it into fbgemm's fused update). The trainer's optimizers skip them."""
    kwargs = {"lr": lr, "weight_decay": weight_decay}
    apply_optimizer_in_backward(_OPTIMIZER_CLASSES[name], table_parameters(model), kwargs)


def in_backward(param: nn.Parameter) -> bool:
    """True for a parameter updated by an optimizer in the backward pass."""
    return hasattr(param, "_in_backward_optimizers")


def shard(model: nn.Module, env: DistEnv, sharding: str = "table_wise", init: dict[str, torch.Tensor] | None = None):
    """Wrap ``model`` in ``DistributedModelParallel`` (in place: its tables become sharded).

    The tables must already have their in-backward optimizer. The rows every rank holds
    are then overwritten with ``init`` (an unsharded state dict of the same keys; default a
    copy of ``model``'s own), so the sharded model starts from exactly the single-process
    initialisation. Returns ``(dmp, plan_lines)``.
    """
    if sharding not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding {sharding!r}; expected one of {SHARDING_TYPES}")
    if sharding == "row_wise" and env.backend == "gloo":
        raise ValueError("row-wise sharding needs reduce-scatter, which gloo (CPU) lacks: "
                         "use --sharding table_wise on CPU, row_wise on GPUs (nccl)")
    if init is None:
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tables = {name: m for name, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}
    constraints = {
        cfg.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"])
        for ebc in tables.values() for cfg in ebc.embedding_bag_configs()
    }
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    pg = dist.GroupMember.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(pg), device=env.device, plan=plan, sharders=sharders,
    )
    load_full_state(dmp, init)
    lines = []
    for path, params in plan.plan.items():
        for table, ps in params.items():  # type: ignore[union-attr]
            lines.append(f"{path}.{table}: {ps.sharding_type} on ranks {ps.ranks} ({ps.compute_kernel})")
    return dmp, lines


def _is_sharded(value) -> bool:
    return hasattr(value, "local_shards")


def load_full_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded state dict into ``dmp``: each rank writes its own shards."""
    state = dmp.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not _is_sharded(value):
                state[key] = full[key]
                continue
            for shard in value.local_shards():
                r, c = shard.metadata.shard_offsets
                h, w = shard.tensor.shape
                shard.tensor.copy_(full[key][r : r + h, c : c + w])
    # the shards of a state dict are not always views of the fused kernel's weights:
    # load_state_dict is what writes them there
    dmp.load_state_dict(state)


def load_unsharded(dmp: nn.Module, target: nn.Module, env: DistEnv) -> None:
    """Copy ``dmp``'s state into the unsharded ``target`` (same keys) on every rank: each table
    is gathered on rank 0 and broadcast straight into ``target``'s own tensor (no second full
    copy); the dense part is the same on every rank already."""
    into = target.state_dict()
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            dst = into[key]
            if not _is_sharded(value):
                dst.copy_(value)
                continue
            buf = dst if env.device.type == "cpu" else torch.empty(value.size(), dtype=value.dtype, device=env.device)
            value.gather(dst=0, out=buf if env.is_main else None)
            dist.broadcast(buf, src=0)
            if buf is not dst:
                dst.copy_(buf)


def eval_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of an evaluation split of ``rows`` rows."""
    return rows * rank // world, rows * (rank + 1) // world


def gather_predictions(local: torch.Tensor, rows: int, env: DistEnv) -> np.ndarray:
    """float64 [rows]: every rank's predictions (its ``eval_range``) gathered on every rank, in split order.

    The shares are padded to one length for ``all_gather`` and the padding dropped.
    """
    lengths = [b - a for a, b in (eval_range(rows, r, env.world_size) for r in range(env.world_size))]
    length = max(1, max(lengths))
    padded = torch.zeros(length, dtype=torch.float64, device=env.device)
    padded[: len(local)] = local.to(device=env.device, dtype=torch.float64)
    gathered = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, lengths, strict=True)]).cpu().numpy()


def average_batchnorm_stats(model: nn.Module, env: DistEnv) -> None:
    """Average the BatchNorm statistics of ``model`` over the ranks (only those: other
    buffers are the same on every rank or, in the sharded tables, different by design)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for buf in m.buffers():
                    if buf.is_floating_point():
                        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                        buf.div_(env.world_size)


def mean_over_ranks(value: float, env: DistEnv | None) -> float:
    """The mean of ``value`` over the ranks (NaN when any rank's is NaN or infinite)."""
    if env is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / env.world_size


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a ``DistributedModelParallel`` (itself otherwise)."""
    return model.module if isinstance(model, DistributedModelParallel) else model

