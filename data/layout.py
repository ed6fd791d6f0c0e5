"""Where every field's rows sit in the one global table: field offsets and global ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchrec import KeyedJaggedTensor


def field_offsets(cardinalities: Sequence[int]) -> np.ndarray:
    """int64 [F]: the global id of every field's row 0 (fields concatenated in order)."""
    cards = np.asarray(cardinalities, dtype=np.int64)
    return np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64) if cards.size else np.zeros(0, np.int64)


def global_ids(kjt: KeyedJaggedTensor, offsets: torch.Tensor, owner: str = "this embedding") -> torch.Tensor:
    """int64 [B, F] global row ids (field offset + local id) of a single-valued KJT.

    ``offsets``: int64 [F] (``field_offsets`` as a tensor). Multi-hot bags raise ``ValueError``:
    pooling them before a per-row transform (quantization, pruning) would be wrong.
    """
    batch, num_fields = kjt.stride(), offsets.numel()
    values = kjt.values()
    if values.numel() != batch * num_fields:
        raise ValueError(f"{owner} takes single-valued fields (one id per field and example); "
                         "multi-hot bags need an unpooled EmbeddingCollection")
    return values.view(num_fields, batch).t().to(torch.int64) + offsets.to(values.device)
