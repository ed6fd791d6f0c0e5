"""Uniform LSQ+ quantization-aware training: every row at the same bit-width.

Registry name ``"lsq"`` (kind ``"train"``, settings ``"8"``, ``"6"``, ``"4"``, ``"2"`` bits).
It is ``mpe.embedding.MixedPrecisionEmbedding`` with a single candidate bit-width b and one
group fixed at b from the start: fp32 master rows in a torchrec ``EmbeddingBagCollection``,
looked-up rows fake-quantized by LSQ+ (one learned step for the table, one learned offset
vector, straight-through rounding; ``mpe.quantizer``). The paper's LSQ+ baseline is this
at 6 bits.

The export is MPE's bit-packed format (``mpe.export.write_packed_export``): the codes in
one ``bucket_b{b}.bin`` (``ceil(N * D * b / 8)`` bytes), ``steps.npy``, ``offset.npy`` and
an ``id_map.npy`` of 137 bytes (9 bytes: the single bucket is implicit). ``num_bytes()`` is
``mpe.bitwidths.packed_table_bytes`` of that assignment; ``mpe.packed.load_packed_export``
reads it back and returns exactly the rows ``forward`` gives in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from baselines.base import CompressedEmbedding
from baselines.registry import Method, MethodInputs
from ctr.model import DEFAULT_INIT_STD
from ctr.trainer import trainable_parameters
from encoding.sizes import MAX_BITS
from mpe.bitwidths import packed_table_bytes
from mpe.embedding import MixedPrecisionEmbedding
from mpe.writer import write_packed_export

SETTINGS = ("8", "6", "4", "2")


def parse_bits(setting: str) -> int:
    """``"6"`` (or ``"int6"``) -> 6; ``ValueError`` unless an integer bit-width in 1..8."""
    text = setting.removeprefix("int")
    if not text.isdigit() or not 1 <= int(text) <= MAX_BITS:
        raise ValueError(f"lsq setting {setting!r} is not a bit-width in 1..8 (e.g. '8', '4')")
    return int(text)


class UniformLSQEmbedding(CompressedEmbedding, MixedPrecisionEmbedding):
    """All rows LSQ+ fake-quantized at ``bits`` bits; forward(kjt) -> Tensor[B, F, D].

    Trainable: the fp32 master rows (``ebc``), the step ``quantizer.alpha`` [1] and the
    offset ``quantizer.beta`` [D] (give the last two their own optimiser group without
    weight decay: ``optimizers``).
    """

    method = "lsq"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        bits: int,
        init_std: float = DEFAULT_INIT_STD,
    ):
        num_rows = sum(int(c) for c in cardinalities)
        MixedPrecisionEmbedding.__init__(
            self, fields, cardinalities, dim,
            group_of_row=np.zeros(num_rows, dtype=np.int64), penalty_weights=np.ones(1),
            candidates=(int(bits),), lam=0.0, init_std=init_std,
        )
        self.bits = int(bits)
        self.fix_bits([self.bits])

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return MixedPrecisionEmbedding.forward(self, kjt)

    def extra_loss(self) -> torch.Tensor | None:
        return None

    # -- sizes and export ----------------------------------------------------------------
    def num_bytes(self) -> int:
        """Payload bytes of the bit-packed export (codes + steps + offset + id map)."""
        return packed_table_bytes(self.bits_per_row(), self.dim, self.candidates)

    def export_config(self) -> dict[str, Any]:
        return {"bits": self.bits, "cardinalities": list(self.cardinalities)}

    def export(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write MPE's bit-packed export (``mpe.export``) to ``out_dir``; returns its header."""
        return write_packed_export(
            out_dir, self.global_weight(), self.bits_per_row(), self.quantizer, self.fields,
            self.field_offsets.tolist(), extra_meta={"method": self.method, "config": self.export_config()},
        )


def build(inputs: MethodInputs, setting: str) -> UniformLSQEmbedding:
    """All rows at ``setting`` bits (N(0, 0.003) init from torch's global RNG, LSQ step init)."""
    return UniformLSQEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, parse_bits(setting))


def optimizers(model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the quantizer's step and offset and Adam for rows and tower (no weight decay
    on either: the registry's factory gets no weight-decay setting), as ``mpe.search``."""
    quant = list(model.embedding.quantizer.parameters())
    quant_ids = {id(p) for p in quant}
    rest = [p for p in trainable_parameters(model) if id(p) not in quant_ids]
    return [torch.optim.Adam(quant, lr=lr), torch.optim.Adam(rest, lr=lr)]


METHOD = Method(
    name="lsq",
    kind="train",
    settings=SETTINGS,
    description="uniform LSQ+ quantization-aware training, every row at b bits (bit-packed export)",
    build=build,
    optimizers=optimizers,
)
