"""torchrec / fbgemm n-bit rowwise tables: their row layout, sizes and quantization.

Row layout measured with torchrec 1.8.0 / fbgemm-gpu-cpu 1.8.0 on CPU (``tests`` check it
against the bytes of the TBE buffers torchrec allocates): ``ceil(D * k / 8)`` bytes of
codes + 4 bytes of fp16 scale/bias per row, rounded up to ``row_alignment`` (default 16),
every table aligned to 128 bytes.
"""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import DataType, QuantConfig
from torchrec.quant.embedding_modules import (
    MODULE_ATTR_ROW_ALIGNMENT_INT,
)
from torchrec.quant.embedding_modules import (
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)

from encoding.sizes import MAX_BITS

DEFAULT_ROW_ALIGNMENT = 16
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per row
TABLE_ALIGNMENT = 128  # fbgemm aligns every table to a 128-byte cache line
_DATA_BITS = {DataType.INT2: 2, DataType.INT4: 4, DataType.INT8: 8}
_QDTYPE = {DataType.INT2: torch.quint2x4, DataType.INT4: torch.quint4x2, DataType.INT8: torch.quint8}


def torchrec_data_type(bits: int) -> DataType:
    """The narrowest torchrec n-bit type holding ``bits`` (1..8) bits."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"no torchrec n-bit type for {bits} bits (1..{MAX_BITS})")
    return DataType.INT2 if bits <= 2 else DataType.INT4 if bits <= 4 else DataType.INT8


def torchrec_row_bytes(bits: int, dim: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """fbgemm's rounded row size: ``ceil(D * k / 8) + 4`` rounded up to ``row_alignment``."""
    k = _DATA_BITS[torchrec_data_type(bits)]
    raw = (dim * k + 7) // 8 + SCALE_BIAS_BYTES
    return -(-raw // row_alignment) * row_alignment


def torchrec_table_bytes(rows: int, bits: int, dim: int, row_alignment: int = DEFAULT_ROW_ALIGNMENT) -> int:
    """Bytes fbgemm allocates for one table (rows x row size, aligned to 128 bytes)."""
    raw = int(rows) * torchrec_row_bytes(bits, dim, row_alignment)
    return -(-raw // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def quantize_ebc(
    ebc: EmbeddingBagCollection,
    data_types: dict[str, DataType],
    row_alignment: int = DEFAULT_ROW_ALIGNMENT,
) -> QuantEmbeddingBagCollection:
    """torchrec's quantized copy of the float ``ebc`` (fbgemm n-bit rowwise TBE, fp32 output).

    ``data_types``: table name -> INT8 / INT4 / INT2 for every table. ``ebc`` gets a
    ``qconfig`` attribute (pass a copy to keep it untouched). Raises ``RuntimeError`` if
    torchrec does not store a table at the type asked for.
    """
    ebc.qconfig = QuantConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.quint8),
        per_table_weight_dtype={name: _QDTYPE[t] for name, t in data_types.items()},
    )
    setattr(ebc, MODULE_ATTR_ROW_ALIGNMENT_INT, int(row_alignment))
    qebc = QuantEmbeddingBagCollection.from_float(ebc)
    got = {c.name: c.data_type for c in qebc.embedding_bag_configs()}
    if got != dict(data_types):
        raise RuntimeError(f"torchrec quantized the tables as {got}, expected {dict(data_types)}")
    return qebc


def tbe_weight_buffers(qebc: QuantEmbeddingBagCollection) -> list[torch.Tensor]:
    """The uint8 weight buffers of every fbgemm TBE of ``qebc`` (host, device and UVM; the
    empty ones included): codes + fp16 scale/bias + row and table alignment, as stored."""
    return [getattr(m, n) for m in qebc._emb_modules for n in ("weights_host", "weights_dev", "weights_uvm")]
