"""Frequency cut-off: the first thing a user tries, raising min_count until the tables fit.

Registry name ``"cutoff"`` (kind ``"train"``, settings ``"x<R>"``). With threshold t, every
id whose training-split count (``MethodInputs.frequency``) is below t is looked up as its
field's OOV row (local id 0, always kept); the kept rows form one compact fp32 table. The
threshold is the smallest t >= 1 whose export fits fp32 bytes / R.

This is what re-running ``data.prepare`` with ``--min-count t`` would train, with one
difference and one choice:

- prepare counts over the whole file, this cut-off over the training split only (the
  vocabulary's order cannot be used to cut, since its counts include val and test rows);
- re-preparing would let the vocabulary do the remap (a smaller vocabulary, no id map).
  Here the vocabulary stays as prepared, so the export stores the remap itself and its
  bytes are counted: ``kept_ids.npy`` is the sorted set of kept global ids (OOV rows
  included), Elias-Fano coded (``mpe.packing.ef_encode``, universe N); an id's row is its
  rank in the set, a dropped id uses its field's OOV row. It costs about
  2 + log2(N / kept) bits per kept row, against 32 x D bits for the row itself.

Export: ``table.npy`` float32 [kept, D] (rows in global id order) and ``kept_ids.npy``
uint8; ``header.json`` holds the threshold and the number of kept rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from baselines.base import read_tables
from baselines.budget import budget_bytes, parse_ratio
from baselines.registry import Method, MethodInputs
from baselines.remapped import RemappedTables, StoredTable
from ctr.model import DEFAULT_INIT_STD
from data.layout import field_offsets
from encoding.packing import ef_decode, ef_encode, ef_nbytes
from encoding.sizes import npy_file_bytes


def oov_rows(cardinalities: Sequence[int]) -> np.ndarray:
    """int64 [F] global ids of the fields' OOV rows (local id 0)."""
    return field_offsets(cardinalities)


def kept_ids(frequency: np.ndarray, cardinalities: Sequence[int], min_count: int) -> np.ndarray:
    """int64 sorted global ids kept at ``min_count``: counts >= min_count, plus every OOV row."""
    keep = np.asarray(frequency) >= min_count
    keep[oov_rows(cardinalities)] = True
    return np.flatnonzero(keep).astype(np.int64)


def cutoff_bytes(num_kept: int, num_rows: int, dim: int) -> int:
    """Export bytes of ``num_kept`` kept rows out of ``num_rows``: table + Elias-Fano id set."""
    return npy_file_bytes((num_kept, dim), np.float32) + npy_file_bytes((ef_nbytes(num_kept, num_rows),), np.uint8)


def min_count_for_budget(frequency: np.ndarray, cardinalities: Sequence[int], dim: int, budget: int) -> int:
    """The smallest threshold t >= 1 whose export fits ``budget`` bytes.

    Only thresholds just above an observed count change the kept set, so those are tried in
    increasing order. ``ValueError`` when even the OOV rows alone do not fit.
    """
    freq = np.asarray(frequency, dtype=np.int64)
    n = freq.size
    is_oov = np.zeros(n, dtype=bool)
    is_oov[oov_rows(cardinalities)] = True
    counts = np.sort(freq[~is_oov])
    num_oov = int(is_oov.sum())
    candidates = np.unique(np.concatenate([[1], counts + 1]))
    kept = num_oov + counts.size - np.searchsorted(counts, candidates, side="left")
    for t, k in zip(candidates.tolist(), kept.tolist(), strict=True):
        if cutoff_bytes(k, n, dim) <= budget:
            return int(t)
    raise ValueError(
        f"a budget of {budget:,} bytes cannot hold even the {num_oov} OOV rows ({cutoff_bytes(num_oov, n, dim):,} bytes)"
    )


class CutoffEmbedding(RemappedTables):
    """Kept rows in one compact torchrec table; dropped ids read their field's OOV row.

    Args:
        fields, cardinalities, dim: as the fp32 tables.
        kept: int64 sorted global ids kept (every field's OOV row among them).
        min_count: the threshold that produced ``kept`` (recorded in the export).

    forward(kjt) -> Tensor[B, F, D].
    """

    method = "cutoff"

    def __init__(
        self,
        fields: Sequence[str],
        cardinalities: Sequence[int],
        dim: int,
        kept: np.ndarray,
        min_count: int,
        init_std: float = DEFAULT_INIT_STD,
    ):
        kept = np.asarray(kept, dtype=np.int64)
        num_rows = int(sum(int(c) for c in cardinalities))
        if kept.ndim != 1 or (kept.size and (kept[0] < 0 or kept[-1] >= num_rows or np.any(np.diff(kept) <= 0))):
            raise ValueError("kept ids must be strictly increasing global ids")
        oov = oov_rows(cardinalities)
        if not np.isin(oov, kept).all():
            raise ValueError("every field's OOV row (local id 0) must be kept")
        super().__init__(fields, cardinalities, dim, [StoredTable("table", tuple(fields), int(kept.size))], init_std)
        self.min_count = int(min_count)
        self.kept = kept
        # global id -> compact row: its rank among the kept ids, or its field's OOV row's rank
        field_of = np.repeat(np.arange(len(self.cardinalities)), self.cardinalities)
        rank = np.searchsorted(kept, np.arange(num_rows))
        hit = np.zeros(num_rows, dtype=bool)
        hit[kept] = True
        remap = np.where(hit, rank, np.searchsorted(kept, oov)[field_of]).astype(np.int64)
        self.register_buffer("remap", torch.from_numpy(remap), persistent=False)

    def rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, F] local ids -> int64 [B, F] rows of the compact table."""
        return self.remap[local_ids + self.field_offsets]

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.lookup(self.rows(self.local_ids(kjt)))

    def export_arrays(self) -> dict[str, np.ndarray]:
        """``table`` float32 [kept, D] and ``kept_ids`` uint8 (Elias-Fano set of kept global ids)."""
        arrays = super().export_arrays()
        arrays["kept_ids"] = ef_encode(self.kept, self.num_rows())
        return arrays

    def num_bytes(self) -> int:
        """Payload bytes of ``export()``, computed without encoding: ``cutoff_bytes``."""
        return cutoff_bytes(self.kept.size, self.num_rows(), self.dim)

    def export_config(self) -> dict[str, Any]:
        return {"cardinalities": self.cardinalities, "min_count": self.min_count, "num_kept": int(self.kept.size)}

    @classmethod
    def from_export(cls, export_dir: str | os.PathLike) -> CutoffEmbedding:
        """Rebuild from an ``export()`` directory (checksums verified, no pickle)."""
        header, arrays = read_tables(export_dir, cls.method)
        cfg = header["config"]
        kept = ef_decode(arrays["kept_ids"], cfg["num_kept"], sum(cfg["cardinalities"]))
        emb = cls(header["fields"], cfg["cardinalities"], header["dim"], kept, cfg["min_count"])
        emb.load_arrays({"table": arrays["table"]})
        return emb


def build(inputs: MethodInputs, setting: str) -> CutoffEmbedding:
    """The cut-off tables within ``setting`` (``"x<R>"``) for ``inputs.frequency``."""
    freq = np.asarray(inputs.frequency)
    if freq.shape != (inputs.num_rows,):
        raise ValueError(f"frequency has shape {freq.shape}, expected ({inputs.num_rows},)")
    budget = budget_bytes(inputs.fp32_bytes, parse_ratio(setting, "cutoff"))
    t = min_count_for_budget(freq, inputs.cardinalities, inputs.dim, budget)
    return CutoffEmbedding(inputs.fields, inputs.cardinalities, inputs.dim, kept_ids(freq, inputs.cardinalities, t), t)


METHOD = Method(
    name="cutoff",
    kind="train",
    settings=("x2", "x10", "x50", "x200", "x500", "x1000"),
    description="frequency cut-off: ids below the smallest training min-count that meets xR share their field's OOV row",
    build=build,
)
