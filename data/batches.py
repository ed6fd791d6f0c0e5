"""Prepared data -> model batches, in bounded memory.

``PreparedDataset`` opens a directory written by ``python -m data.prepare`` (manifest,
parquet splits, frequency array). A split is a ``SplitFile``: rows are read from its
parquet file row group by row group, never all at once. ``iter_batches`` turns a split
(a ``SplitFile`` or an in-memory ``SplitArrays``, both ``Rows``) into torchrec
``KeyedJaggedTensor`` batches, the one batch format of the toolkit.

Shuffling (``iter_batches(shuffle=True)``) is a two-level shuffle, deterministic for a seed:

1. the split's blocks (parquet row groups: about 20k rows each as ``data.prepare`` writes
   them; ``BLOCK_ROWS`` rows for in-memory arrays) are put in a random order;
2. consecutive blocks of that order are gathered into windows of at least
   ``buffer_rows`` rows (the shuffle buffer), and the rows of each window are permuted.

A batch therefore mixes rows of about ``buffer_rows / block rows`` random blocks of the
file; when the split holds at most ``buffer_rows`` rows, the order is a uniform
permutation of the whole split. Memory is one window of ids (``buffer_rows`` x fields x 4
bytes: 160 MB for Criteo at the default 2**20) plus one block, whatever the row count.
Under torchrun each rank keeps only its own ``B // world`` rows of every global batch of
B rows (it reads every block of a window, and holds only its share). ``start_batch``
resumes an epoch: the batches from there are exactly those of the uninterrupted epoch,
and the windows before it are not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.artifacts import ArtifactError, load_npy
from data.manifest import FREQUENCY_FILE, load_manifest, split_file
from data.transforms import SPLIT_NAMES

BLOCK_ROWS = 1 << 14  # block size of in-memory arrays (files use their row groups)
DEFAULT_SHUFFLE_BUFFER_ROWS = 1 << 20


class Rows(Protocol):
    """A split's rows, readable by contiguous range: what ``iter_batches`` consumes."""

    def __len__(self) -> int: ...

    @property
    def labels(self) -> np.ndarray:
        """float32 [N] click labels (small: one byte per row on disk)."""
        ...

    def block_bounds(self) -> np.ndarray:
        """int64 [blocks + 1]: the row offsets of the split's blocks, 0 first, N last."""
        ...

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop``: (ids int32 [n, F], labels float32 [n])."""
        ...

    def subset(self, index: slice) -> Rows:
        """The rows of a contiguous ``slice`` (step 1) as a split of their own."""
        ...

    def arrays(self) -> SplitArrays:
        """All the rows in memory (for small splits and subsets only)."""
        ...


def _range_of(index: slice, n: int) -> tuple[int, int]:
    start, stop, step = index.indices(n)
    if step != 1:
        raise ValueError("a split subset must be a contiguous slice (step 1)")
    return start, max(start, stop)


@dataclass
class SplitArrays:
    """One split held as numpy arrays (small data, tests, derived splits).

    Attributes:
        ids: int32 [N, F] per-field local feature ids (0 = the field's OOV id).
        labels: float32 [N] click labels in {0, 1}.
    """

    ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def block_bounds(self) -> np.ndarray:
        n = len(self)
        return np.unique(np.r_[np.arange(0, n, BLOCK_ROWS), n]).astype(np.int64)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[start:stop], self.labels[start:stop]

    def subset(self, index: np.ndarray | slice) -> SplitArrays:
        """Rows selected by ``index`` (a slice or an index array)."""
        return SplitArrays(self.ids[index], self.labels[index])

    def arrays(self) -> SplitArrays:
        return self


class SplitFile:
    """A split's parquet file (label + one int32 column per field), read by row group.

    Args:
        path: the split's parquet file.
        fields: the field columns, in model order.
        cardinalities: rows of every field's table; an id beyond it raises ``ArtifactError``.
        rows: the row range ``(start, stop)`` of the file this split covers (default all).
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str], cardinalities: Sequence[int],
                 rows: tuple[int, int] | None = None):
        self.path = Path(path)
        self.fields = list(fields)
        self.cardinalities = np.asarray(cardinalities, dtype=np.int64)
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._group_bounds = np.r_[0, np.cumsum(counts, dtype=np.int64)].astype(np.int64)
        total = int(self._group_bounds[-1])
        self._lo, self._hi = (0, total) if rows is None else rows
        if not 0 <= self._lo <= self._hi <= total:
            raise ValueError(f"{self.path}: row range {rows} outside 0..{total}")
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            column = pq.read_table(self.path, columns=["label"]).column("label").to_numpy()
            self._labels = column[self._lo:self._hi].astype(np.float32)
        return self._labels

    def block_bounds(self) -> np.ndarray:
        inner = self._group_bounds[(self._group_bounds > self._lo) & (self._group_bounds < self._hi)]
        return np.r_[self._lo, inner, self._hi].astype(np.int64) - self._lo if len(self) else np.zeros(1, np.int64)

    def _group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is not None and self._cached[0] == g:
            return self._cached[1], self._cached[2]
        table = self._file.read_row_group(g, columns=["label", *self.fields])
        ids = np.empty((table.num_rows, len(self.fields)), dtype=np.int32)
        for j, f in enumerate(self.fields):
            ids[:, j] = table.column(f).to_numpy()
        labels = table.column("label").to_numpy().astype(np.float32)
        if len(ids) and (bad := ids.max(axis=0) >= self.cardinalities).any():
            f = self.fields[int(np.argmax(bad))]
            raise ArtifactError(f"{self.path}: row group {g}: field {f} holds ids beyond its vocabulary")
        self._cached = (g, ids, labels)
        return ids, labels

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._lo + start, self._lo + min(stop, len(self))
        if hi <= lo:
            return np.zeros((0, len(self.fields)), np.int32), np.zeros(0, np.float32)
        first = int(np.searchsorted(self._group_bounds, lo, side="right")) - 1
        last = int(np.searchsorted(self._group_bounds, hi, side="left")) - 1
        parts_ids, parts_labels = [], []
        for g in range(first, last + 1):
            ids, labels = self._group(g)
            base = int(self._group_bounds[g])
            a, b = max(lo, base) - base, min(hi, base + len(labels)) - base
            parts_ids.append(ids[a:b])
            parts_labels.append(labels[a:b])
        if len(parts_ids) == 1:
            return parts_ids[0], parts_labels[0]
        return np.concatenate(parts_ids), np.concatenate(parts_labels)

    def subset(self, index: slice) -> SplitFile:
        start, stop = _range_of(index, len(self))
        return SplitFile(self.path, self.fields, self.cardinalities, (self._lo + start, self._lo + stop))

    def arrays(self) -> SplitArrays:
        """All the rows of this range in memory (for small splits and subsets only)."""
        ids, labels = self.read(0, len(self))
        return SplitArrays(np.array(ids), np.array(labels))


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
        self._frequency: np.ndarray | None = None
        self._splits: dict[str, SplitFile] = {}

    def split(self, name: str) -> SplitFile:
        """Split ``name`` ('train', 'val' or 'test'), read from disk block by block (opened
        once: its file metadata and, once read, its labels are kept)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        if name not in self._splits:
            split = SplitFile(self.root / split_file(name), self.fields, self.cardinalities)
            expected = self.manifest["rows"][name]
            if len(split) != expected:
                raise ArtifactError(f"{split.path}: {len(split)} rows, the manifest says {expected}")
            self._splits[name] = split
        return self._splits[name]

    def frequency(self) -> np.ndarray:
        """int64 [num_features]: train-split count of every global feature id (read once)."""
        if self._frequency is None:
            path = self.root / FREQUENCY_FILE
            freq = load_npy(path, self.manifest["files"][FREQUENCY_FILE])
            if freq.shape != (self.num_features,):
                raise ArtifactError(f"{path}: shape {freq.shape}, expected ({self.num_features},)")
            self._frequency = freq
        return self._frequency


def to_kjt(ids: np.ndarray | torch.Tensor, fields: Sequence[str]) -> KeyedJaggedTensor:
    """int [B, F] single-valued ids -> a ``KeyedJaggedTensor`` with one id per (field, example)."""
    ids_t = torch.as_tensor(ids)
    batch, num_fields = ids_t.shape
    if num_fields != len(fields):
        raise ValueError(f"ids have {num_fields} columns but {len(fields)} fields were given")
    values = ids_t.t().reshape(-1).to(torch.int64)
    lengths = torch.ones(batch * num_fields, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(fields), values=values, lengths=lengths)


def _batch(ids: np.ndarray, labels: np.ndarray, fields: Sequence[str]) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    return to_kjt(ids, fields), torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))


def _rank_range(start: int, stop: int, rank_of: tuple[int, int] | None) -> tuple[int, int]:
    """This rank's part ``[a, b)`` of the global batch ``[start, stop)``."""
    if rank_of is None:
        return start, stop
    rank, world = rank_of
    local = (stop - start) // world
    return start + rank * local, start + (rank + 1) * local


def _windows(sizes: np.ndarray, buffer_rows: int) -> list[tuple[int, int]]:
    """Consecutive runs ``(i, j)`` of blocks holding at least ``buffer_rows`` rows (the last may hold fewer)."""
    out, i, total = [], 0, 0
    for j, s in enumerate(sizes.tolist()):
        total += s
        if total >= buffer_rows:
            out.append((i, j + 1))
            i, total = j + 1, 0
    if i < len(sizes):
        out.append((i, len(sizes)))
    return out


def _gather(split: Rows, bounds: np.ndarray, blocks: np.ndarray, need: np.ndarray,
            num_fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Window-local rows ``need`` (of the window made of ``blocks`` in that order), read block by block."""
    sizes = bounds[blocks + 1] - bounds[blocks]
    starts = np.r_[0, np.cumsum(sizes)]
    block_of = np.searchsorted(starts, need, side="right") - 1
    ids = np.empty((len(need), num_fields), dtype=np.int32)
    labels = np.empty(len(need), dtype=np.float32)
    order = np.argsort(block_of, kind="stable")
    cuts = np.searchsorted(block_of[order], np.arange(len(blocks) + 1))
    for k, b in enumerate(blocks.tolist()):
        sel = order[cuts[k]:cuts[k + 1]]
        if len(sel) == 0:
            continue
        block_ids, block_labels = split.read(int(bounds[b]), int(bounds[b + 1]))
        rows = need[sel] - starts[k]
        ids[sel] = block_ids[rows]
        labels[sel] = block_labels[rows]
    return ids, labels


def _shuffled(split: Rows, batch_size: int, seed: int, rank_of: tuple[int, int] | None, start_batch: int,
              buffer_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    n = len(split)
    bounds = split.block_bounds()
    order = np.random.default_rng(seed).permutation(len(bounds) - 1)
    sizes = (bounds[order + 1] - bounds[order]).astype(np.int64)
    skip = start_batch * batch_size
    num_fields: int | None = None
    pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    cum = 0
    for w, (i, j) in enumerate(_windows(sizes, max(1, buffer_rows))):
        size = int(sizes[i:j].sum())
        end = cum + size
        if end <= skip:
            cum = end
            continue
        perm = np.random.default_rng([seed, w]).permutation(size)
        pos = np.arange(cum, end, dtype=np.int64)
        keep = pos >= skip
        if rank_of is not None:
            rank, world = rank_of
            first = (pos // batch_size) * batch_size
            local = (np.minimum(batch_size, n - first)) // world
            off = pos - first
            keep &= (off >= rank * local) & (off < (rank + 1) * local)
        if num_fields is None:
            num_fields = split.read(0, 1)[0].shape[1]
        ids, labels = _gather(split, bounds, order[i:j], perm[keep], num_fields)
        batch_of = pos[keep] // batch_size
        if pending is not None:
            ids, labels = np.concatenate([pending[0], ids]), np.concatenate([pending[1], labels])
            batch_of = np.concatenate([pending[2], batch_of])
        complete = end // batch_size if end < n else -(-n // batch_size)
        done = int(np.searchsorted(batch_of, complete))
        if done:
            first_b = int(batch_of[0])
            cuts = np.searchsorted(batch_of[:done], np.arange(first_b, int(batch_of[done - 1]) + 2))
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                if b > a:
                    yield ids[a:b], labels[a:b]
        pending = (ids[done:], labels[done:], batch_of[done:])
        cum = end


def iter_batches(
    split: Rows,
    fields: Sequence[str],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rank_of: tuple[int, int] | None = None,
    start_batch: int = 0,
    buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
) -> Iterator[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """Yield ``(kjt, labels[B])`` batches over ``split``, reading it block by block.

    ``shuffle``: the seeded block + shuffle-buffer order of the module docstring
    (``buffer_rows`` rows per window); otherwise file order.
    ``rank_of=(rank, world)``: yield only this rank's ``B // world`` rows of every global
    batch of B rows (the same size on every rank; the at most ``world - 1`` rows left over
    from a batch are not used, and a last batch of fewer than ``world`` rows is dropped).
    ``start_batch``: skip the first batches of the epoch without reading them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(split)
    if shuffle:
        for ids, labels in _shuffled(split, batch_size, seed, rank_of, start_batch, buffer_rows):
            yield _batch(ids, labels, fields)
        return
    for start in range(start_batch * batch_size, n, batch_size):
        a, b = _rank_range(start, min(n, start + batch_size), rank_of)
        if b <= a:
            return
        yield _batch(*split.read(a, b), fields)


def num_batches(n_rows: int, batch_size: int) -> int:
    """Number of batches ``iter_batches`` yields for ``n_rows`` rows."""
    return (n_rows + batch_size - 1) // batch_size
