"""Streamed batches (data.batches): every row once per epoch, seeded, rank shares, resume.

Checked on a prepared directory read from disk (``SplitFile``, row group by row group, small
row groups so a window spans many blocks) and on in-memory arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.batches import PreparedDataset, SplitArrays, iter_batches
from data.prepare import prepare
from data.synthetic import generate

ROWS = 6000


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    raw = root / "train.txt"
    generate("criteo", ROWS, raw, seed=5, progress=False)
    prepare("criteo", raw, root / "prepared", progress=False, block_size=64 << 10)
    data = PreparedDataset(root / "prepared")
    train = data.split("train")
    assert len(train.block_bounds()) > 10  # many row groups: the block order matters
    return data, train


def _row_keys(ids: np.ndarray) -> np.ndarray:
    """One int per row (its ids as bytes), to compare rows across batches."""
    return np.array([hash(r.tobytes()) for r in np.ascontiguousarray(ids, dtype=np.int64)])


def _epoch(rows, batch_size=256, **kw) -> list[tuple[np.ndarray, np.ndarray]]:
    fields = [f"f{i}" for i in range(rows.read(0, 1)[0].shape[1])]
    out = []
    for kjt, labels in iter_batches(rows, fields, batch_size, **kw):
        ids = kjt.values().view(len(fields), -1).t().numpy()
        out.append((ids, labels.numpy()))
    return out


def test_a_streamed_epoch_covers_every_row_once_and_is_seeded(split):
    _, train = split
    whole = train.arrays()
    a = _epoch(train, shuffle=True, seed=1, buffer_rows=700)
    assert [len(y) for _, y in a[:-1]] == [256] * (len(a) - 1)
    got = np.concatenate([ids for ids, _ in a])
    order = np.lexsort(got.T[::-1])
    ref = np.lexsort(whole.ids.T[::-1])
    np.testing.assert_array_equal(got[order], whole.ids[ref])
    np.testing.assert_array_equal(np.concatenate([y for _, y in a])[order], whole.labels[ref])
    b = _epoch(train, shuffle=True, seed=1, buffer_rows=700)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    c = _epoch(train, shuffle=True, seed=2, buffer_rows=700)
    assert not np.array_equal(a[0][0], c[0][0])
    # a shuffled epoch is not file order, and mixes rows from far apart in the file
    assert not np.array_equal(got, whole.ids)


def test_file_and_memory_give_the_same_rows_in_file_order(split):
    _, train = split
    from_file = np.concatenate([ids for ids, _ in _epoch(train, batch_size=1000)])
    np.testing.assert_array_equal(from_file, train.arrays().ids)


def test_ranks_hold_disjoint_equal_shares_of_every_batch(split):
    _, train = split
    world = 3
    whole = _epoch(train, shuffle=True, seed=4, buffer_rows=900)
    parts = [_epoch(train, shuffle=True, seed=4, buffer_rows=900, rank_of=(r, world)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    for b, (ids, _) in enumerate(whole):
        local = len(ids) // world
        for r in range(world):
            np.testing.assert_array_equal(parts[r][b][0], ids[r * local:(r + 1) * local])


def test_a_resumed_epoch_yields_exactly_the_remaining_batches(split):
    _, train = split
    full = _epoch(train, shuffle=True, seed=7, buffer_rows=500)
    for start in (1, 5, len(full) - 1):
        tail = _epoch(train, shuffle=True, seed=7, buffer_rows=500, start_batch=start)
        assert len(tail) == len(full) - start
        assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
                   for x, y in zip(full[start:], tail, strict=True))


def test_a_subset_streams_its_own_rows(split):
    _, train = split
    sub = train.subset(slice(1000, 2500))
    assert len(sub) == 1500
    np.testing.assert_array_equal(sub.arrays().ids, train.arrays().ids[1000:2500])
    got = np.concatenate([ids for ids, _ in _epoch(sub, shuffle=True, seed=3, buffer_rows=300)])
    assert sorted(_row_keys(got)) == sorted(_row_keys(sub.arrays().ids))
    with pytest.raises(ValueError, match="contiguous"):
        train.subset(slice(0, 10, 2))


def test_in_memory_arrays_stream_the_same_way():
    rng = np.random.default_rng(0)
    arrays = SplitArrays(rng.integers(0, 50, (40_000, 2)).astype(np.int32), rng.random(40_000).astype(np.float32))
    a = _epoch(arrays, batch_size=1000, shuffle=True, seed=3, buffer_rows=10_000)
    assert sum(len(y) for _, y in a) == 40_000
    tail = _epoch(arrays, batch_size=1000, shuffle=True, seed=3, buffer_rows=10_000, start_batch=13)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a[13:], tail, strict=True))


def test_a_split_file_refuses_ids_beyond_the_vocabulary(split, tmp_path):
    data, _ = split
    from data.artifacts import ArtifactError
    from data.batches import SplitFile
    from data.manifest import split_file

    small = [1] * len(data.fields)  # every table one row: the stored ids do not fit
    rows = SplitFile(Path(data.root) / split_file("val"), data.fields, small)
    with pytest.raises(ArtifactError, match="beyond its vocabulary"):
        rows.read(0, 10)
