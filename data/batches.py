"""Prepared data -> model batches.

``PreparedDataset`` opens a directory written by ``python -m data.prepare`` (manifest,
parquet splits, frequency array) and ``iter_batches`` turns a split into torchrec
``KeyedJaggedTensor`` batches, the one batch format of the toolkit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.artifacts import ArtifactError, load_npy
from data.manifest import FREQUENCY_FILE, load_manifest, split_file
from data.transforms import SPLIT_NAMES


@dataclass
class SplitArrays:
    """One split held as numpy arrays.

    Attributes:
        ids: int32 [N, F] per-field local feature ids (0 = the field's OOV id).
        labels: float32 [N] click labels in {0, 1}.
    """

    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray | slice) -> SplitArrays:
        """Rows selected by ``index`` (a slice or an index array)."""
        return SplitArrays(self.ids[index], self.labels[index])


class PreparedDataset:
    """A directory written by ``data.prepare``; every file's checksum is verified on open."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest: dict = load_manifest(self.root)
        self.fields: list[str] = list(self.manifest["fields"])
        self.cardinalities: list[int] = [int(c) for c in self.manifest["cardinalities"]]
        self.field_offsets: list[int] = [int(o) for o in self.manifest["field_offsets"]]
        self.num_features: int = int(self.manifest["num_features"])
        self.dataset: str = self.manifest["dataset"]
        self._cache: dict[str, SplitArrays] = {}

    def split(self, name: str) -> SplitArrays:
        """Load split ``name`` ('train', 'val' or 'test') as int32 ids and float32 labels."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        if name not in self._cache:
            path = self.root / split_file(name)
            table = pq.read_table(path, columns=["label", *self.fields])
            if table.num_rows == 0:
                ids = np.zeros((0, len(self.fields)), dtype=np.int32)
            else:
                ids = np.stack(
                    [table.column(f).to_numpy().astype(np.int32, copy=False) for f in self.fields],
                    axis=1,
                )
            labels = table.column("label").to_numpy().astype(np.float32)
            bad = ids.max(axis=0, initial=0) >= np.asarray(self.cardinalities)
            if bad.any():
                f = self.fields[int(np.argmax(bad))]
                raise ArtifactError(f"{path}: field {f} holds ids beyond its vocabulary")
            self._cache[name] = SplitArrays(ids, labels)
        return self._cache[name]

    def frequency(self) -> np.ndarray:
        """int64 [num_features]: train-split count of every global feature id."""
        path = self.root / FREQUENCY_FILE
        freq = load_npy(path, self.manifest["files"][FREQUENCY_FILE])
        if freq.shape != (self.num_features,):
            raise ArtifactError(f"{path}: shape {freq.shape}, expected ({self.num_features},)")
        return freq


def to_kjt(ids: np.ndarray | torch.Tensor, fields: Sequence[str]) -> KeyedJaggedTensor:
    """int [B, F] single-valued ids -> a ``KeyedJaggedTensor`` with one id per (field, example)."""
    ids_t = torch.as_tensor(ids)
    batch, num_fields = ids_t.shape
    if num_fields != len(fields):
        raise ValueError(f"ids have {num_fields} columns but {len(fields)} fields were given")
    values = ids_t.t().reshape(-1).to(torch.int64)
    lengths = torch.ones(batch * num_fields, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(fields), values=values, lengths=lengths)


def iter_batches(
    split: SplitArrays,
    fields: Sequence[str],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rank_of: tuple[int, int] | None = None,
) -> Iterator[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """Yield ``(kjt, labels[B])`` batches over ``split``; a seeded permutation when ``shuffle``.

    ``rank_of=(rank, world)``: yield only this rank's ``B // world`` rows of every global
    batch of B rows (the same size on every rank; the at most ``world - 1`` rows left over
    from a batch are not used, and a last batch of fewer than ``world`` rows is dropped).
    """
    n = len(split)
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if rank_of is not None:
            rank, world = rank_of
            local = (stop - start) // world
            if local == 0:
                return
            start, stop = start + rank * local, start + (rank + 1) * local
        index = order[start:stop] if order is not None else slice(start, stop)
        part = split.subset(index)
        yield to_kjt(part.ids, fields), torch.from_numpy(np.ascontiguousarray(part.labels))


def num_batches(n_rows: int, batch_size: int) -> int:
    """Number of batches ``iter_batches`` yields for ``n_rows`` rows."""
    return (n_rows + batch_size - 1) // batch_size
