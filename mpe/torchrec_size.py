"""A second export: the MPE buckets as torchrec quantized tables (fbgemm n-bit rowwise TBE).

Every used bit bucket b > 0 becomes one table of a torchrec quantized
``EmbeddingBagCollection`` (``torchrec.quant``), at the narrowest torchrec type that holds
b bits: 1-2 -> INT2, 3-4 -> INT4, 5-8 -> INT8. Pruned rows are omitted (looked up as zeros).
The table rows are the MPE dequantized values (``code * step + offset``) re-quantized by
fbgemm's rowwise asymmetric scheme (per row: fp16 scale and bias, ``2^k`` levels between
the row's min and max), so lookups are close to the packed export's, not bit-exact.

Sizes are read from the module itself: the bytes of the TBE weight buffers
(``weights_host`` + ``weights_dev`` + ``weights_uvm``), which include the 4 bytes of fp16
scale/bias per row, the row alignment (``row_alignment``, torchrec's default 16 bytes)
and the 128-byte alignment of every table. Measured with torchrec 1.8.0 /
fbgemm-gpu-cpu 1.8.0 on CPU at D = 16, default alignment 16: INT8 32 bytes per row,
INT4 16, INT2 16 (``ceil(D * k / 8) + 4`` rounded up to 16); at D = 64: 80, 48, 32.
Note that the state_dict weight of an INT4/INT2 table is a ``UInt4Tensor`` /
``UInt2Tensor`` whose shape counts 4- / 2-bit units ([N, 32] / [N, 64] at D = 16), which
reads like 32 or 64 bytes per row if taken for bytes; its uint8 storage is 16 bytes per
row. torchrec has no global id -> (table, row) remapping for this layout, so the export
reuses the packed export's Elias-Fano id map; its bytes are reported separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from encoding.torchrec_rows import (
    DEFAULT_ROW_ALIGNMENT,
    quantize_ebc,
    tbe_weight_buffers,
    torchrec_data_type,
    torchrec_row_bytes,
    torchrec_table_bytes,
)
from mpe.format import ID_MAP_FILE
from mpe.reader import PackedEmbedding


@dataclass(frozen=True)
class QuantTable:
    """One bucket's torchrec table."""

    bits: int
    data_type: DataType
    rows: int
    name: str
    feature: str


class TorchrecQuantEmbedding:
    """MPE buckets served by a torchrec quantized EmbeddingBagCollection.

    ``lookup(global_ids) -> Tensor[n, D]``; ``weight_bytes()`` = measured TBE weight
    storage; ``num_bytes()`` = weights + id map.
    """

    def __init__(
        self,
        qebc: QuantEmbeddingBagCollection | None,
        tables: list[QuantTable],
        locate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        candidates: tuple[int, ...],
        num_rows: int,
        dim: int,
        id_map_bytes: int,
        row_alignment: int,
    ):
        self.qebc, self.tables, self._locate = qebc, tables, locate
        self.candidates, self.num_rows, self.dim = candidates, num_rows, dim
        self.id_map_bytes, self.row_alignment = int(id_map_bytes), row_alignment

    def _tbes(self) -> list[torch.nn.Module]:
        return [] if self.qebc is None else list(self.qebc._emb_modules)

    def weight_bytes(self) -> int:
        """Measured bytes of the quantized weights (codes + scale/bias + alignment)."""
        return 0 if self.qebc is None else sum(int(b.nbytes) for b in tbe_weight_buffers(self.qebc))

    def metadata_bytes(self) -> int:
        """Bytes of the TBE's other buffers (offsets, types, ...): small, not per row."""
        skip = {"weights_host", "weights_dev", "weights_uvm"}
        return sum(int(b.nbytes) for m in self._tbes() for n, b in m.named_buffers() if n not in skip)

    def num_bytes(self) -> int:
        """Weights + id map: what serving these tables needs per row."""
        return self.weight_bytes() + self.id_map_bytes

    def size_report(self) -> dict:
        """Bytes by component and per table, with the formula's prediction for comparison."""
        per_table = [
            {
                "bits": t.bits,
                "torchrec_type": t.data_type.name,
                "rows": t.rows,
                "row_bytes": torchrec_row_bytes(t.bits, self.dim, self.row_alignment),
                "table_bytes": torchrec_table_bytes(t.rows, t.bits, self.dim, self.row_alignment),
            }
            for t in self.tables
        ]
        return {
            "weight_bytes": self.weight_bytes(),
            "predicted_weight_bytes": sum(t["table_bytes"] for t in per_table),
            "id_map_bytes": self.id_map_bytes,
            "metadata_bytes": self.metadata_bytes(),
            "total_bytes": self.num_bytes(),
            "row_alignment": self.row_alignment,
            "tables": per_table,
        }

    @torch.no_grad()
    def lookup(self, global_ids: Tensor) -> Tensor:
        """float32 [n, D] rows of ``global_ids`` (LongTensor [n]); pruned rows are zeros."""
        ids = torch.as_tensor(global_ids).reshape(-1).cpu().numpy().astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"ids must lie in 0..{self.num_rows - 1}")
        out = torch.zeros(ids.size, self.dim, dtype=torch.float32)
        if self.qebc is None or ids.size == 0:
            return out
        bucket, rank = self._locate(ids)
        bits = np.asarray(self.candidates, dtype=np.int64)[bucket]
        values, lengths = [], []
        for t in self.tables:
            hit = bits == t.bits
            values.append(torch.from_numpy(rank[hit]))
            lengths.append(torch.from_numpy(hit.astype(np.int64)))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[t.feature for t in self.tables], values=torch.cat(values), lengths=torch.cat(lengths)
        )
        pooled = self.qebc(kjt)
        for t in self.tables:
            out += pooled[t.feature].to(torch.float32)
        return out

    __call__ = lookup


def build_torchrec_quant(packed: PackedEmbedding, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> TorchrecQuantEmbedding:
    """torchrec quantized tables, one per used bit bucket of the loaded packed export."""
    rows = packed.bucket_rows()
    tables = [
        QuantTable(b, torchrec_data_type(b), rows[b], f"mpe_b{b}", f"mpe_b{b}")
        for b in packed.candidates
        if b > 0 and rows[b] > 0
    ]
    qebc = None
    if tables:
        ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=t.name,
                    embedding_dim=packed.dim,
                    num_embeddings=t.rows,
                    feature_names=[t.feature],
                    pooling=PoolingType.SUM,
                )
                for t in tables
            ],
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            for t in tables:
                ebc.embedding_bags[t.name].weight.copy_(packed.bucket_values(t.bits))
        qebc = quantize_ebc(ebc, {t.name: t.data_type for t in tables}, row_alignment)
    return TorchrecQuantEmbedding(
        qebc,
        tables,
        packed.locate,
        packed.candidates,
        packed.num_rows,
        packed.dim,
        packed.file_bytes(ID_MAP_FILE),
        int(row_alignment),
    )


def torchrec_quantized_bytes(packed: PackedEmbedding, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> dict:
    """Build the torchrec tables for ``packed`` and report their measured bytes
    (``size_report``: weight_bytes, id_map_bytes, total_bytes, per-table figures)."""
    return build_torchrec_quant(packed, row_alignment).size_report()
