"""Post-training rowwise quantization with torchrec's quantized embedding modules.

Registry name ``"ptq"`` (kind ``"post"``, settings ``"int8"``, ``"int4"``, ``"int2"``). The
trained fp32 ``EmbeddingBagCollection`` is converted by ``torchrec.quant``'s
``EmbeddingBagCollection.from_float`` (through ``mpe.torchrec_export.quantize_ebc``) into
fbgemm n-bit rowwise tables: per row an fp16 scale and bias and ``2^k`` levels between the
row's min and max, codes packed k bits each. Lookups (``forward``) run fbgemm's quantized
kernel; the tower is kept as trained.

Sizes are measured, not modelled: the export holds torchrec's weight buffer itself
(``weights.npy``, uint8: every table's rows back to back, each row 4 bytes of fp16
scale/bias then ``ceil(D * k / 8)`` bytes of codes, padded to the 16-byte row alignment,
every table starting on a 128-byte boundary). Measured with torchrec 1.8.0 /
fbgemm-gpu-cpu 1.8.0 at D = 16: 32 bytes per row at INT8 (2x smaller than fp32), 16 at
INT4 and also 16 at INT2 (4x): the scale/bias and the row alignment take what INT2 would
save. INT2 does come back as INT2 (``quantize_ebc`` checks every table's type), not as the
fp32 rows DESIGN.md section 5 reports.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from baselines.base import CompressedEmbedding, read_tables
from baselines.registry import Method, MethodInputs
from ctr.model import FP32Embedding, table_name
from encoding.torchrec_rows import (
    DEFAULT_ROW_ALIGNMENT,
    quantize_ebc,
    tbe_weight_buffers,
    torchrec_row_bytes,
)

DATA_TYPES = {"int8": DataType.INT8, "int4": DataType.INT4, "int2": DataType.INT2}
_BITS = {DataType.INT8: 8, DataType.INT4: 4, DataType.INT2: 2}


def parse_data_type(setting: str) -> DataType:
    """``"int4"`` -> ``DataType.INT4``; ``ValueError`` for anything but int8 / int4 / int2."""
    if setting not in DATA_TYPES:
        raise ValueError(f"ptq setting {setting!r} is not one of {', '.join(DATA_TYPES)}")
    return DATA_TYPES[setting]


class TorchrecPTQEmbedding(CompressedEmbedding):
    """A torchrec quantized ``EmbeddingBagCollection`` (one n-bit table per field).

    forward(kjt) -> Tensor[B, F, D] (float32) through fbgemm's n-bit kernel.
    ``export_arrays()`` is the TBE weight buffer as torchrec stores it (uint8).
    """

    method = "ptq"

    def __init__(
        self,
        qebc: QuantEmbeddingBagCollection,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        data_type: DataType,
        row_alignment: int = DEFAULT_ROW_ALIGNMENT,
    ):
        super().__init__()
        self.qebc = qebc
        self.fields = list(fields)
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = int(dim)
        self.data_type = data_type
        self.row_alignment = int(row_alignment)
        self._weights()  # exactly one TBE buffer holds the tables

    @classmethod
    def from_float(
        cls, fp32: FP32Embedding, data_type: DataType, row_alignment: int = DEFAULT_ROW_ALIGNMENT
    ) -> TorchrecPTQEmbedding:
        """Quantize a trained fp32 embedding (its ``ebc`` is copied, not modified)."""
        if not isinstance(fp32, FP32Embedding):
            raise TypeError(f"ptq converts an fp32 torchrec embedding, got {type(fp32).__name__}")
        ebc = copy.deepcopy(fp32.ebc).cpu()
        qebc = quantize_ebc(ebc, {table_name(f): data_type for f in fp32.fields}, row_alignment)
        return cls(qebc, fp32.fields, fp32.cardinalities, fp32.dim, data_type, row_alignment)

    # -- lookups -------------------------------------------------------------------------
    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        self.global_ids(kjt)  # refuses multi-hot bags (they would be pooled)
        return self.qebc(kjt).values().to(torch.float32).view(-1, len(self.fields), self.dim)

    @torch.no_grad()
    def dequantized_weight(self, chunk: int = 1 << 16) -> torch.Tensor:
        """float32 [N, D]: every row as the quantized kernel returns it (field order)."""
        parts = []
        for f, card in zip(self.fields, self.cardinalities, strict=True):
            for start in range(0, card, chunk):
                n = min(chunk, card - start)
                lengths = torch.zeros(len(self.fields), n, dtype=torch.int32)
                lengths[self.fields.index(f)] = 1
                kjt = KeyedJaggedTensor.from_lengths_sync(
                    keys=self.fields, values=torch.arange(start, start + n), lengths=lengths.reshape(-1)
                )
                parts.append(self.qebc(kjt)[f].to(torch.float32))
        return torch.cat(parts)

    # -- sizes and export ----------------------------------------------------------------
    def _weights(self) -> torch.Tensor:
        bufs = [b for b in tbe_weight_buffers(self.qebc) if b.numel() > 0]
        if len(bufs) != 1:
            raise RuntimeError(f"expected the tables in one fbgemm weight buffer, torchrec made {len(bufs)}")
        return bufs[0]

    def _weights_offsets(self) -> list[int]:
        return [int(o) for o in self.qebc._emb_modules[0].weights_offsets.tolist()]

    def weight_bytes(self) -> int:
        """Measured bytes of torchrec's quantized weights (codes, scale/bias, alignment)."""
        return int(self._weights().nbytes)

    def size_report(self) -> dict[str, Any]:
        """Measured bytes, bytes per row, and the fp32 bytes they replace."""
        return {
            "data_type": self.data_type.name,
            "weight_bytes": self.weight_bytes(),
            "row_bytes": torchrec_row_bytes(_BITS[self.data_type], self.dim, self.row_alignment),
            "bytes_per_row": self.weight_bytes() / self.num_rows(),
            "fp32_bytes": self.fp32_bytes(),
            "export_bytes": self.num_bytes(),
        }

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``weights``: uint8 [weight_bytes], torchrec's TBE weight buffer byte for byte."""
        return {"weights": self._weights().detach().cpu().numpy()}

    def export_config(self) -> dict[str, Any]:
        return {
            "data_type": self.data_type.name,
            "cardinalities": list(self.cardinalities),
            "row_alignment": self.row_alignment,
            "weights_offsets": self._weights_offsets(),
        }

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> TorchrecPTQEmbedding:
        """Rebuild the quantized tables from ``export()`` (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        data_type = DataType[cfg["data_type"]]
        shell = FP32Embedding(header["fields"], cfg["cardinalities"], header["dim"], init_std=0.0)
        emb = cls.from_float(shell, data_type, cfg["row_alignment"])
        target = emb._weights()
        if emb._weights_offsets() != cfg["weights_offsets"] or arrays["weights"].shape != tuple(target.shape):
            raise ValueError(f"{export_dir}: the weight layout differs from the one torchrec builds here")
        with torch.no_grad():
            target.copy_(torch.from_numpy(arrays["weights"]))
        return emb


def convert(fp32: nn.Module, inputs: MethodInputs, setting: str) -> TorchrecPTQEmbedding:
    """Quantize the trained fp32 embedding ``fp32`` rowwise at ``setting`` (int8/int4/int2)."""
    return TorchrecPTQEmbedding.from_float(fp32, parse_data_type(setting))


METHOD = Method(
    name="ptq",
    kind="post",
    settings=tuple(DATA_TYPES),
    description="post-training rowwise int8/int4/int2 with torchrec's quantized EBC (fbgemm; fp16 scale/bias per row)",
    convert=convert,
)
