"""Effective rank of a matrix and parameter-count formulas for LoRA / GenLoRA adapters.

Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
EUSIPCO 2007): with singular values ``sigma_k`` and ``p_k = sigma_k / sum(sigma)``,

    erank(M) = exp(-sum_k p_k log p_k),

a real number in ``[1, min(m, n)]`` (1 for rank one, ``min(m, n)`` when all singular values are
equal). The all-zero matrix has no defined distribution; ``effective_rank`` returns 0.0 for it.

Parameter counts (``ceil`` rounds the latent length up; the last chunk is padded and cropped):

    LoRA layer:                  r * (d_in + d_out)
    GenLoRA matrix (K = r):      ceil(d/g) + r * (g + 2)
    GenLoRA matrix (K < r mix):  ceil(d/g) + r * g + 2 * K + r * K
    GenLoRA layer:               matrix(d_in) + matrix(d_out)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "effective_rank",
    "genlora_matrix_parameter_count",
    "genlora_parameter_count",
    "lora_parameter_count",
    "parameter_count",
]


def effective_rank(matrix: Tensor, eps: float = 1e-12) -> float:
    """Roy & Vetterli effective rank of ``matrix: [m, n]`` (computed in float64).

    eps: singular values at or below ``eps * max(sigma)`` count as zero. Returns 0.0 for an
    all-zero matrix.
    """
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.detach().to(torch.float64).cpu())
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    s = s[s > eps * s.max()]
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in ``module``'s parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """LoRA on one ``d_in -> d_out`` linear layer: ``r * (d_in + d_out)``."""
    return r * (d_in + d_out)


def genlora_matrix_parameter_count(d: int, r: int, group_size: int,
                                   num_rbfs: int | None = None) -> int:
    """One GenLoRA generator for ``r`` basis vectors of length ``d``.

    ``ceil(d/g) + r*(g + 2)`` with one RBF per basis vector; ``ceil(d/g) + r*g + 2K + r*K`` with
    ``K = num_rbfs`` shared RBFs and an ``r x K`` mixing matrix.
    """
    latent = math.ceil(d / group_size)
    if num_rbfs is None:
        return latent + r * (group_size + 2)
    return latent + r * group_size + 2 * num_rbfs + r * num_rbfs


def genlora_parameter_count(d_in: int, d_out: int, r: int, group_size: int,
                            num_rbfs: int | None = None) -> int:
    """GenLoRA on one ``d_in -> d_out`` linear layer: the A generator plus the B generator."""
    return (genlora_matrix_parameter_count(d_in, r, group_size, num_rbfs)
            + genlora_matrix_parameter_count(d_out, r, group_size, num_rbfs))
