"""Dense CTR towers: DNN, DeepFM and DCNv2.

Every tower maps the looked-up embeddings ``emb: Tensor[B, F, D]`` to click logits
``Tensor[B]``. Hidden layers are plain ``nn.Linear`` inside ``nn.Sequential`` so that
adapters (``genlora_rec.adapters``) can target them by name, e.g. ``r"mlp\\.\\d+"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MLPConfig:
    """Hidden sizes, BatchNorm and dropout of a multi-layer perceptron."""

    hidden: tuple[int, ...] = (1024, 512, 256)
    batch_norm: bool = True
    dropout: float = 0.0


def build_mlp(in_dim: int, config: MLPConfig) -> nn.Sequential:
    """[Linear -> (BatchNorm) -> ReLU -> (Dropout)] per hidden size; output width = last hidden size."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in config.hidden:
        layers.append(nn.Linear(width, h))
        if config.batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = h
    return nn.Sequential(*layers)


@dataclass
class DNNConfig:
    """Flattened embeddings -> MLP -> logit (the MPE paper's tower: 1024-512-256 with BN)."""

    mlp: MLPConfig = field(default_factory=MLPConfig)


@dataclass
class DeepFMConfig:
    """FM second-order interactions plus a parallel MLP on the flattened embeddings.

    The first-order (per-feature scalar) term of the original DeepFM is left out: it would
    be a second embedding table that the compression methods would also have to handle.
    """

    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(hidden=(400, 400, 400)))


@dataclass
class DCNv2Config:
    """DCN-V2: full-rank cross layers x_{l+1} = x_0 * (W x_l + b) + x_l, stacked with an MLP."""

    cross_layers: int = 3
    low_rank: int | None = None
    mlp: MLPConfig = field(default_factory=lambda: MLPConfig(hidden=(512, 256)))


TowerConfig = DNNConfig | DeepFMConfig | DCNv2Config


class DNN(nn.Module):
    """MLP over the concatenated embeddings. Input [B, F, D], output logits [B]."""

    def __init__(self, num_fields: int, dim: int, config: DNNConfig):
        super().__init__()
        self.mlp = build_mlp(num_fields * dim, config.mlp)
        self.head = nn.Linear(config.mlp.hidden[-1] if config.mlp.hidden else num_fields * dim, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(emb.flatten(1))).squeeze(-1)


class DeepFM(nn.Module):
    """FM interaction logit + MLP logit. Input [B, F, D], output logits [B]."""

    def __init__(self, num_fields: int, dim: int, config: DeepFMConfig):
        super().__init__()
        self.mlp = build_mlp(num_fields * dim, config.mlp)
        self.head = nn.Linear(config.mlp.hidden[-1] if config.mlp.hidden else num_fields * dim, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(dim=1)
        return fm + self.head(self.mlp(emb.flatten(1))).squeeze(-1)


class CrossLayer(nn.Module):
    """One DCN-V2 cross layer on x [B, K]: x0 * (W x + b) + x, W full rank or U V^T."""

    def __init__(self, width: int, low_rank: int | None):
        super().__init__()
        if low_rank is None:
            self.proj = nn.Linear(width, width)
        else:
            self.proj = nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class DCNv2(nn.Module):
    """Cross network followed by an MLP (stacked structure). Input [B, F, D], output [B]."""

    def __init__(self, num_fields: int, dim: int, config: DCNv2Config):
        super().__init__()
        width = num_fields * dim
        self.cross = nn.ModuleList(CrossLayer(width, config.low_rank) for _ in range(config.cross_layers))
        self.mlp = build_mlp(width, config.mlp)
        self.head = nn.Linear(config.mlp.hidden[-1] if config.mlp.hidden else width, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x0 = x = emb.flatten(1)
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(self.mlp(x)).squeeze(-1)


TOWERS: dict[str, tuple[type[nn.Module], type]] = {
    "dnn": (DNN, DNNConfig),
    "deepfm": (DeepFM, DeepFMConfig),
    "dcnv2": (DCNv2, DCNv2Config),
}


def build_tower(
    name: str, num_fields: int, dim: int, hidden: tuple[int, ...] | None = None
) -> nn.Module:
    """Build tower ``name`` ('dnn', 'deepfm', 'dcnv2') with default config, optionally other hidden sizes."""
    try:
        cls, config_cls = TOWERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown tower {name!r}; known towers: {', '.join(TOWERS)}") from None
    config = config_cls()
    if hidden is not None:
        config.mlp.hidden = tuple(hidden)
    return cls(num_fields, dim, config)
