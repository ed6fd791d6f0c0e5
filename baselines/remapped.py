"""Compact fp32 tables reached through an id -> row map (hashing, QR, frequency cut-off).

``RemappedTables`` keeps one or more stored tables in a single torchrec
``EmbeddingBagCollection``; each stored table is shared by several KJT features (one per
field it serves), so the rows a subclass computes for a batch go to torchrec as an
ordinary single-valued KJT. Subclasses compute the rows (``forward``) and say how they
are stored (``export_config``); the export holds every stored table as one float32
``<table>.npy`` ``[rows, D]`` array (one ``.npy`` header per table, not per field).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from baselines.base import CompressedEmbedding
from ctr.model import DEFAULT_INIT_STD
from data.batches import to_kjt
from data.layout import field_offsets


@dataclass(frozen=True)
class StoredTable:
    """One stored table: its name, the KJT features that look it up, its rows, its init.

    ``init`` is ``"normal"`` (N(0, init_std), as the fp32 tables) or ``"ones"``.
    """

    name: str
    features: tuple[str, ...]
    rows: int
    init: str = "normal"


class RemappedTables(CompressedEmbedding):
    """Base class: stored fp32 tables in one torchrec EBC, looked up by computed rows.

    Args:
        fields, cardinalities: the fields and their vocabulary sizes (local id 0 = OOV).
        dim: embedding dimension D.
        tables: the stored tables, in lookup order.
        init_std: std of the ``"normal"`` initialisation (torch's global RNG).
    """

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        tables: Sequence[StoredTable],
        init_std: float = DEFAULT_INIT_STD,
    ):
        super().__init__()
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        if len(self.fields) != len(self.cardinalities):
            raise ValueError(f"{len(self.fields)} fields but {len(self.cardinalities)} cardinalities")
        self.tables = list(tables)
        for t in self.tables:
            if t.rows < 1:
                raise ValueError(f"stored table {t.name!r} needs at least one row, got {t.rows}")
            if t.init not in ("normal", "ones"):
                raise ValueError(f"unknown init {t.init!r} of stored table {t.name!r}")
        self.feature_names = [f for t in self.tables for f in t.features]
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    embedding_dim=self.dim,
                    num_embeddings=int(t.rows),
                    feature_names=list(t.features),
                    pooling=PoolingType.SUM,
                )
                for t in self.tables
            ],
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            for t in self.tables:
                w = self.ebc.embedding_bags[t.name].weight
                if t.init == "normal":
                    w.normal_(0.0, init_std)
                else:
                    w.fill_(1.0)
        offsets = field_offsets(self.cardinalities)
        self.register_buffer("field_offsets", torch.from_numpy(offsets), persistent=False)

    # -- lookups ------------------------------------------------------------------------
    def local_ids(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """int64 [B, F] local ids of a single-valued KJT whose keys are ``fields`` in order."""
        if list(kjt.keys()) != self.fields:
            raise ValueError(f"{type(self).__name__}: KJT keys {list(kjt.keys())} are not the fields {self.fields}")
        return self.global_ids(kjt) - self.field_offsets

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows ``[B, K]`` (one column per feature in ``feature_names`` order) -> ``[B, K, D]``."""
        if rows.shape[1] != len(self.feature_names):
            raise ValueError(f"lookup needs {len(self.feature_names)} row columns, got {rows.shape[1]}")
        out = self.ebc(to_kjt(rows, self.feature_names)).values()
        return out.view(rows.shape[0], len(self.feature_names), self.dim)

    # -- stored arrays ------------------------------------------------------------------
    def table_weight(self, name: str) -> torch.Tensor:
        """The trainable float32 [rows, D] weight of stored table ``name``."""
        return self.ebc.embedding_bags[name].weight

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``<table>`` -> float32 [rows, D], every stored table as trained."""
        return {t.name: self.table_weight(t.name).detach().cpu().numpy() for t in self.tables}

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy exported tables back into the weights (shapes must match)."""
        with torch.no_grad():
            for t in self.tables:
                a = arrays[t.name]
                if a.shape != (t.rows, self.dim) or a.dtype != np.float32:
                    raise ValueError(f"table {t.name!r}: {a.dtype} {a.shape}, expected float32 {(t.rows, self.dim)}")
                self.table_weight(t.name).copy_(torch.from_numpy(a))
