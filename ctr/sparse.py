"""Sparse gradients for torchrec embedding tables and a lazy Adam that updates only looked-up rows.

In one process the tables of an ``EmbeddingBagCollection`` get dense gradients by default,
so a dense optimizer step reads and writes every row of every table. ``enable_sparse_gradients``
switches each table's ``nn.EmbeddingBag`` to sparse (COO) gradients, and ``LazyAdam`` then
updates only the rows present in a batch: the cost of a step grows with the number of ids in
the batch, not with the number of rows in the tables.

The sparse gradient of an ``nn.EmbeddingBag`` is a hybrid COO tensor of shape [N, D] with one
sparse dimension (indices [1, nnz]) and dense values [nnz, D]; it is *not* coalesced: an id
that occurs k times in a batch appears k times. ``LazyAdam`` coalesces it (summing the
duplicates) before updating, so a row gets exactly the gradient that dense autograd would give.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection


class LazyAdam(torch.optim.Optimizer):
    """Adam that, for a sparse gradient, updates only the rows present in it.

    Dense gradients get plain Adam (the formula of ``torch.optim.Adam(foreach=False)``), so one
    optimizer can hold both the embedding tables and the dense tower.

    For a row-sparse gradient of a parameter ``p`` [N, ...] (COO with one sparse dimension, as
    ``nn.EmbeddingBag(sparse=True)`` produces) the gradient is coalesced into unique row indices
    ``idx`` [R] and values ``g`` [R, ...], then only those rows of ``p``, ``exp_avg`` and
    ``exp_avg_sq`` are read and written. The bias correction uses one step counter per parameter,
    incremented at every step in which the parameter has a gradient (as ``torch.optim.SparseAdam``
    and TensorFlow's LazyAdam do), not a per-row count. When every row is in every gradient and
    ``weight_decay=0`` the result equals ``torch.optim.Adam`` up to float rounding.

    ``weight_decay`` is L2 added to the gradient (Adam's coupled form, not AdamW). On a sparse
    gradient it is *lazy*: it is added to the looked-up rows only (``g + weight_decay * p[idx]``);
    rows absent from a batch are not decayed, unlike dense Adam, whose ``weight_decay`` moves
    every row at every step.

    State per parameter: ``exp_avg`` and ``exp_avg_sq`` (dense, the shape of ``p``) and ``step``
    (a float32 scalar tensor, as in ``torch.optim.Adam``); it round-trips exactly through
    ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            weight_decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                hp = _Step(beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt)
                if p.grad.is_sparse:
                    _sparse_update(p, p.grad, state, hp)
                else:
                    _adam(p, state["exp_avg"], state["exp_avg_sq"], p.grad, hp)
        return loss


@dataclass(frozen=True)
class _Step:
    """The hyperparameters of one Adam step of one parameter."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step_size: float
    bias_correction2_sqrt: float


def _adam(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, hp: _Step) -> None:
    """Adam in place on ``p`` and its moments (all of ``grad``'s shape), in torch.optim.Adam's
    single-tensor order of operations."""
    if hp.weight_decay != 0:
        grad = grad.add(p, alpha=hp.weight_decay)
    exp_avg.lerp_(grad, 1 - hp.beta1)
    exp_avg_sq.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
    denom = (exp_avg_sq.sqrt() / hp.bias_correction2_sqrt).add_(hp.eps)
    p.addcdiv_(exp_avg, denom, value=-hp.step_size)


def _sparse_update(p: torch.Tensor, grad: torch.Tensor, state: dict, hp: _Step) -> None:
    """Adam restricted to the rows of a row-sparse COO ``grad`` [N, ...] (indices [1, nnz])."""
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"LazyAdam needs row-sparse gradients (one sparse dimension); got sparse_dim={grad.sparse_dim()}"
        )
    grad = grad.coalesce()
    idx = grad.indices()[0]  # [R], unique and sorted after coalesce
    g = grad.values()  # [R, ...]
    rows = p.index_select(0, idx)
    m = state["exp_avg"].index_select(0, idx)
    v = state["exp_avg_sq"].index_select(0, idx)
    _adam(rows, m, v, g, hp)
    state["exp_avg"].index_copy_(0, idx, m)
    state["exp_avg_sq"].index_copy_(0, idx, v)
    p.index_copy_(0, idx, rows)


def _table_bags(model: nn.Module) -> list[nn.EmbeddingBag]:
    """Every ``nn.EmbeddingBag`` of every torchrec ``EmbeddingBagCollection`` in ``model``, once each."""
    bags: list[nn.EmbeddingBag] = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, EmbeddingBagCollection):
            continue
        for bag in module.embedding_bags.values():
            if isinstance(bag, nn.EmbeddingBag) and id(bag) not in seen:
                seen.add(id(bag))
                bags.append(bag)
    return bags


def enable_sparse_gradients(model: nn.Module) -> list[nn.Parameter]:
    """Make every table of every ``EmbeddingBagCollection`` in ``model`` produce sparse gradients.

    Sets ``sparse = True`` on each table's ``nn.EmbeddingBag``; its ``weight.grad`` [N, D] is then
    a COO tensor holding only the looked-up rows. Returns those weights (the tables), in module
    order, e.g. to give them to ``LazyAdam``: torch's dense optimizers reject sparse gradients.
    """
    bags = _table_bags(model)
    for bag in bags:
        bag.sparse = True
    return [bag.weight for bag in bags]


def disable_sparse_gradients(model: nn.Module) -> None:
    """Undo ``enable_sparse_gradients``: the tables of ``model``'s EBCs get dense gradients again."""
    for bag in _table_bags(model):
        bag.sparse = False


def sparse_table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights [N, D] of the ``nn.EmbeddingBag`` modules in ``model`` whose ``sparse`` is True.

    Any such bag counts, inside an ``EmbeddingBagCollection`` or not: these are the parameters
    whose gradients will be sparse.
    """
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.EmbeddingBag) and module.sparse and id(module.weight) not in seen:
            seen.add(id(module.weight))
            params.append(module.weight)
    return params
