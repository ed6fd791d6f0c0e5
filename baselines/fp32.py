"""The uncompressed reference: torchrec fp32 tables behind the ``CompressedEmbedding`` interface.

Registry name ``"fp32"`` (kind ``"train"``, one setting ``"-"``). The export holds one
float32 ``[cardinality, D]`` array per field, ``t_<field>.npy``; ``num_bytes()`` is their
size on disk (rows x D x 4 plus one 128-byte ``.npy`` header per field).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding, read_tables
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD, FP32Embedding, table_name


class FP32Tables(CompressedEmbedding, FP32Embedding):
    """``genlora_rec.model.FP32Embedding`` (one torchrec ``EmbeddingBagCollection``) with an export.

    forward(kjt) -> Tensor[B, F, D]; ``isinstance(x, FP32Embedding)`` holds, so post-training
    methods can read ``ebc`` / ``global_weight()`` as for the plain reference model.
    """

    method = "fp32"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int = 16,
        init_std: float = DEFAULT_INIT_STD,
    ):
        FP32Embedding.__init__(self, fields, cardinalities, dim, init_std)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return FP32Embedding.forward(self, kjt)

    def num_bytes(self) -> int:
        """Payload bytes of ``export()``: the per-field ``.npy`` files."""
        return CompressedEmbedding.num_bytes(self)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``t_<field>`` -> float32 [cardinality, D], the table as trained."""
        return {
            table_name(f): self.ebc.embedding_bags[table_name(f)].weight.detach().cpu().numpy()
            for f in self.fields
        }

    def export_config(self) -> dict[str, Any]:
        return {"cardinalities": list(self.cardinalities)}

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> FP32Tables:
        """Rebuild the tables from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        emb = cls(header["fields"], header["config"]["cardinalities"], header["dim"])
        with torch.no_grad():
            for f in emb.fields:
                emb.ebc.embedding_bags[table_name(f)].weight.copy_(torch.from_numpy(arrays[table_name(f)]))
        return emb


def build(inputs: MethodInputs, setting: str) -> FP32Tables:
    """The fp32 tables for ``inputs`` (N(0, 0.003) init, drawn from torch's global RNG)."""
    if setting != "-":
        raise ValueError(f"fp32 has no settings (use '-'), got {setting!r}")
    return FP32Tables(inputs.fields, inputs.cardinalities, inputs.dim)


METHOD = Method(
    name="fp32",
    kind="train",
    settings=("-",),
    description="uncompressed fp32 torchrec EmbeddingBagCollection (the reference)",
    build=build,
)
