"""The CTR model: an embedding module (KJT -> [B, F, D]) followed by a dense tower."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)

from encoding.sizes import FP32_BYTES, fp32_table_bytes
from genlora_rec.towers import build_tower

DEFAULT_INIT_STD = 0.003  # the MPE reference's N(0, 0.003) embedding init


@dataclass
class ModelConfig:
    """The dense tower and the embedding width of a CTR model.

    ``hidden``: the tower's hidden sizes (None: the tower's own default).
    """

    tower: str = "dnn"
    hidden: tuple[int, ...] | None = None
    dim: int = 16

    def build_tower(self, num_fields: int) -> nn.Module:
        """A fresh tower for ``num_fields`` fields of ``dim``-wide rows: [B, F, D] -> logits [B]."""
        return build_tower(self.tower, num_fields, self.dim, self.hidden)


def table_name(field: str) -> str:
    """Name of the embedding table that holds ``field``'s rows."""
    return f"t_{field}"


def build_ebc(
    fields: Sequence[str],
    cardinalities: Sequence[int],
    dim: int,
    init_std: float = DEFAULT_INIT_STD,
    device: torch.device | str = "cpu",
) -> EmbeddingBagCollection:
    """A torchrec ``EmbeddingBagCollection`` with one sum-pooled table per field, N(0, init_std) rows."""
    if len(fields) != len(cardinalities):
        raise ValueError(f"{len(fields)} fields but {len(cardinalities)} cardinalities")
    tables = [
        EmbeddingBagConfig(
            name=table_name(f),
            embedding_dim=dim,
            num_embeddings=int(c),
            feature_names=[f],
            pooling=PoolingType.SUM,
        )
        for f, c in zip(fields, cardinalities, strict=True)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
    with torch.no_grad():
        for bag in ebc.embedding_bags.values():
            bag.weight.normal_(0.0, init_std)
    return ebc


def field_rows(pooled: KeyedTensor, fields: Sequence[str], dim: int) -> torch.Tensor:
    """An EBC's pooled output as Tensor[B, F, D] in ``fields`` order.

    A sharded EBC returns its keys grouped by the rank that holds them, not in config order.
    """
    values = pooled.values()
    keys = pooled.keys()
    rows = values.view(-1, len(keys), dim)
    if list(keys) == list(fields):
        return rows
    order = [keys.index(f) for f in fields]
    return rows[:, order]


class FP32Embedding(nn.Module):
    """The uncompressed reference: one fp32 torchrec table per field.

    forward(kjt) -> Tensor[B, F, D]; fields are single-valued, so each pooled bag is the row.
    """

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int = 16,
        init_std: float = DEFAULT_INIT_STD,
    ):
        super().__init__()
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = dim
        self.ebc = build_ebc(self.fields, self.cardinalities, dim, init_std)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return field_rows(self.ebc(kjt), self.fields, self.dim)

    def num_rows(self) -> int:
        return sum(self.cardinalities)

    def num_bytes(self) -> int:
        """Bytes of the fp32 tables as stored: rows x dim x 4."""
        return fp32_table_bytes(self.num_rows(), self.dim)

    def global_weight(self) -> torch.Tensor:
        """All fields' rows concatenated in field order: Tensor[N, D] (a copy)."""
        return torch.cat([self.ebc.embedding_bags[table_name(f)].weight.detach() for f in self.fields])


class CTRModel(nn.Module):
    """embedding (KJT -> [B, F, D]) then tower ([B, F, D] -> logits [B])."""

    def __init__(self, embedding: nn.Module, tower: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.tower = tower

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.tower(self.embedding(kjt))

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the BCE loss (e.g. MPE's size penalty); None when there is none."""
        fn = getattr(self.embedding, "extra_loss", None)
        return fn() if fn is not None else None

    def after_step(self) -> None:
        """Called by the trainer after every optimiser step (e.g. MPE's budget multiplier)."""
        fn = getattr(self.embedding, "after_step", None)
        if fn is not None:
            fn()

    def embedding_bytes(self) -> int:
        return int(self.embedding.num_bytes())

    def tower_bytes(self) -> int:
        """fp32 bytes of the tower's parameters and buffers (BatchNorm statistics included)."""
        n = sum(p.numel() for p in self.tower.parameters())
        n += sum(b.numel() for b in self.tower.buffers() if b.is_floating_point())
        return n * FP32_BYTES  # fp32 parameters
