"""Load a bit-packed export (``mpe.export``) and serve rows from it without unpacking the table.

``load_packed_export(dir)`` checks the header (format, schema version, its own checksum),
confines every file name to the directory, and verifies the size and sha256 of every file
before reading it; any problem raises ``ArtifactError`` naming the file. Lookups decode only
the requested rows: a small C loop (``packed_decode.c``, compiled on first use by
``mpe/native.py``) reads each row's codes from its bytes; where no C compiler is available
the same values come from numpy (each distinct id once, whole rows gathered and cut into codes).

To find a row without searching the id map at every lookup, loading builds a small
locator: the bucket of every row (1 byte), its rank among its bucket's rows within its
block of 256 rows (1 byte), and every bucket's count before each block (4 bytes per bucket
per block): about 2.1 bytes per row in memory (fp32 rows take 4 x dim), nothing on disk.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data.artifacts import ArtifactError, load_npy, read_json, safe_child, verify_sha256
from encoding.packing import KIND_IMPLICIT, IdSet, decode_id_map, unpack_codes
from encoding.sizes import bucket_code_bytes
from mpe.bitwidths import PRUNED_AS, oov_fields, validate_candidates
from mpe.format import (
    FORMAT,
    HEADER_DIGEST,
    HEADER_FILE,
    ID_MAP_FILE,
    OFFSET_FILE,
    SCHEMA_VERSION,
    STEPS_FILE,
    bucket_file,
    header_digest,
)
from mpe.native import row_decoder
from mpe.quantizer import _dequant

LOCATOR_BLOCK = 256  # rows per block of the in-memory locator (the in-block rank fits a byte)


def _gather_unsigned(buf: np.ndarray, rows: np.ndarray, dim: int, bits: int) -> np.ndarray:
    """uint8 [n, dim] offset-binary codes of ``rows`` from a packed bucket ``buf`` (padded by one byte)."""
    n = len(rows)
    group = bits // math.gcd(bits, 8)  # bytes that hold a whole number of codes (<= 7)
    per_group = 8 // math.gcd(bits, 8)  # codes in them
    if (dim * bits) % 8 == 0 and dim % per_group == 0:
        # rows start on byte boundaries: gather whole rows, read each group of bytes as one
        # little-endian integer and cut it into its codes
        width = dim * bits // 8
        row_bytes = buf[: (buf.size - 1) // width * width].reshape(-1, width)[rows]
        grp = row_bytes.reshape(n, dim // per_group, group).astype(np.uint64)
        value = np.bitwise_or.reduce(grp << (np.uint64(8) * np.arange(group, dtype=np.uint64)), axis=2)
        codes = (value[:, :, None] >> (np.uint64(bits) * np.arange(per_group, dtype=np.uint64))) & np.uint64(
            (1 << bits) - 1)
        return codes.reshape(n, dim).astype(np.uint8)
    pos = (rows[:, None] * dim + np.arange(dim, dtype=np.int64)) * bits
    byte, shift = pos >> 3, (pos & 7).astype(np.uint16)
    word = buf[byte].astype(np.uint16) | (buf[byte + 1].astype(np.uint16) << np.uint16(8))
    return ((word >> shift) & np.uint16((1 << bits) - 1)).astype(np.uint8)


def _gather_codes(buf: np.ndarray, rows: np.ndarray, dim: int, bits: int) -> np.ndarray:
    """int16 [n, dim] signed codes of ``rows`` from a packed bucket ``buf`` (padded by one byte)."""
    return _gather_unsigned(buf, rows, dim, bits).astype(np.int16) - np.int16(1 << (bits - 1))


class PackedEmbedding:
    """A packed table: ``lookup(ids) -> Tensor[n, D]`` decodes only the requested rows.

    Attributes: ``dim``, ``num_rows``, ``candidates``, ``fields``, ``field_offsets``,
    ``steps`` (float32 [|B|]), ``offset`` (float32 [D]), ``header`` (the parsed header).
    """

    def __init__(
        self,
        header: dict[str, Any],
        steps: np.ndarray,
        offset: np.ndarray,
        kinds: list[int],
        sets: dict[int, IdSet],
        buckets: dict[int, np.ndarray],
    ):
        self.header = header
        self.dim = int(header["dim"])
        self.num_rows = int(header["num_rows"])
        self.candidates = tuple(int(b) for b in header["candidates"])
        self.fields = list(header["fields"])
        self.field_offsets = [int(o) for o in header["field_offsets"]]
        self.steps = torch.from_numpy(np.array(steps, dtype=np.float32))
        self.offset = torch.from_numpy(np.array(offset, dtype=np.float32))
        self._implicit = kinds.index(KIND_IMPLICIT)
        self._sets = sets
        self._buckets = {i: np.concatenate([b, np.zeros(1, dtype=np.uint8)]) for i, b in buckets.items()}
        self._bucket_of, self._in_block, self._block_base = self._build_locator()
        # per bucket: code * step for every offset-binary code (the first half of _dequant)
        self._scaled = {
            i: _dequant(torch.arange(1 << b, dtype=torch.float32) - float(1 << (b - 1)), self.steps[i],
                        torch.zeros(())).numpy()
            for i, b in enumerate(self.candidates) if i in self._buckets
        }
        self._offset_np = self.offset.numpy()
        self._native = _NativeTables(self)
        self.pruned_as = str(header.get("pruned_as", "zero"))
        zero = self.candidates.index(0) if 0 in self.candidates else -1
        self.zero_bucket = zero
        row0 = np.asarray([self.candidates[b] for b in self._bucket_of[self.field_offsets]], dtype=np.int64)
        # bool [F]: the fields whose 0-bit rows read as their row 0 (``mpe.bitwidths.oov_fields``)
        self.oov_fields = oov_fields(row0, self.pruned_as) if zero >= 0 else np.zeros(len(self.fields), dtype=bool)

    def resolve(self, ids: Tensor) -> Tensor:
        """int64 [B, F] global ids (field order) with every 0-bit row of an ``oov_fields`` field
        replaced by that field's row 0: the rows a model reading by field looks up."""
        if not self.oov_fields.any():
            return ids
        offsets = torch.as_tensor(self.field_offsets, dtype=torch.int64)
        pruned = torch.from_numpy(self._bucket_of).index_select(0, ids.reshape(-1)).view(ids.shape) == self.zero_bucket
        alias = pruned & torch.from_numpy(self.oov_fields)
        return torch.where(alias, offsets.expand_as(ids), ids)

    def _build_locator(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 [N] bucket, uint8 [N] rank within its block, int32 [blocks, |B|] count before)."""
        n, k = self.num_rows, len(self.candidates)
        bucket, rank = self.locate(np.arange(n, dtype=np.int64))
        blocks = -(-n // LOCATOR_BLOCK)
        base = np.zeros((blocks, k), dtype=np.int64)
        starts = np.arange(blocks) * LOCATOR_BLOCK
        for i in range(k):
            base[:, i] = np.searchsorted(np.flatnonzero(bucket == i), starts)
        in_block = rank - base[np.arange(n) // LOCATOR_BLOCK, bucket]
        return bucket.astype(np.uint8), in_block.astype(np.uint8), base.astype(np.int32)

    def num_bytes(self) -> int:
        """Payload bytes on disk (codes + steps + offset + id map), as verified at load."""
        return int(sum(int(f["bytes"]) for f in self.header["files"].values()))

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidate index int64 [n], row within its bucket int64 [n]) of global ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        bucket = np.full(ids.shape, self._implicit, dtype=np.int64)
        rank = np.zeros(ids.shape, dtype=np.int64)
        stored_before = np.zeros(ids.shape, dtype=np.int64)
        for i, s in self._sets.items():
            less, hit = s.rank(ids)
            bucket[hit], rank[hit] = i, less[hit]
            stored_before += less
        implicit = bucket == self._implicit
        rank[implicit] = ids[implicit] - stored_before[implicit]
        return bucket, rank

    def lookup(self, global_ids: Tensor) -> Tensor:
        """float32 [n, D] rows of ``global_ids`` (LongTensor [n]; any shape S gives [*S, D]).

        A b-bit row is ``code * steps[b] + offset``; a pruned row is the zero vector (a model
        reading by field first maps some of them to their field's row 0: ``resolve``). Rows
        are found through the locator, then every bucket's codes are gathered at once.
        """
        ids_t = torch.as_tensor(global_ids)
        ids = np.ascontiguousarray(ids_t.detach().cpu().numpy().astype(np.int64, copy=False).reshape(-1))
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"ids must lie in 0..{self.num_rows - 1}")
        if self._native.decode is not None:
            return torch.from_numpy(self._native(ids)).view(*ids_t.shape, self.dim)
        return torch.from_numpy(self._decode_numpy(ids)).view(*ids_t.shape, self.dim)

    __call__ = lookup

    def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, D] rows of valid ``ids`` in numpy (the reference the C decoder matches)."""
        # CTR traffic repeats its frequent ids: decode each distinct id once
        ids, inverse = np.unique(ids, return_inverse=True)
        bucket = self._bucket_of[ids]
        rank = self._block_base[ids // LOCATOR_BLOCK, bucket].astype(np.int64) + self._in_block[ids]
        out = np.zeros((ids.size, self.dim), dtype=np.float32)
        order = np.argsort(bucket, kind="stable")  # the positions of each bucket's ids, together
        counts = np.bincount(bucket, minlength=len(self.candidates))
        ends = np.cumsum(counts)
        starts = ends - counts
        for i, buf in self._buckets.items():
            sel = order[starts[i] : ends[i]]
            if sel.size == 0:
                continue
            u = _gather_unsigned(buf, rank[sel], self.dim, self.candidates[i])
            out[sel] = self._scaled[i][u] + self._offset_np  # == code * step + offset (_dequant)
        return out[inverse.reshape(-1)]

    def bucket_rows(self) -> dict[int, int]:
        """Bit value -> number of rows stored at it (pruned rows under 0)."""
        return {int(b): int(n) for b, n in self.header["bucket_rows"].items()}

    def bucket_values(self, bits: int) -> Tensor:
        """float32 [n_b, D]: every row stored at ``bits`` (> 0) bits, in ascending global id
        order, decoded (the same values ``lookup`` returns for them)."""
        i = self.candidates.index(int(bits))
        if i not in self._buckets:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        n = self.bucket_rows()[int(bits)]
        codes = torch.from_numpy(unpack_codes(self._buckets[i][:-1], n, self.dim, int(bits)))
        return _dequant(codes.to(torch.float32), self.steps[i], self.offset)

    def bucket_bytes(self, bits: int) -> np.ndarray:
        """uint8: the packed codes of the rows stored at ``bits`` (> 0) bits, exactly as in
        ``bucket_b{bits}.bin`` (empty when no row is stored there). A read-only view."""
        i = self.candidates.index(int(bits))
        if i not in self._buckets:
            return np.zeros(0, dtype=np.uint8)
        view = self._buckets[i][:-1]
        view.flags.writeable = False
        return view

    def code_values(self, bits: int) -> np.ndarray:
        """float32 [2^bits]: ``code * steps[b]`` for every offset-binary code of a stored
        bucket (the decoder's table; a row element is ``code_values(b)[u] + offset[j]``)."""
        i = self.candidates.index(int(bits))
        if i not in self._scaled:
            raise ValueError(f"no rows are stored at {bits} bits")
        return self._scaled[i].copy()

    def locator(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the in-memory locator: (uint8 [N] candidate index of every row, uint8 [N]
        its rank among its bucket's rows within its block of ``LOCATOR_BLOCK`` rows, int32
        [blocks, |B|] every bucket's row count before each block)."""
        return self._bucket_of.copy(), self._in_block.copy(), self._block_base.copy()

    def file_bytes(self, name: str) -> int:
        """Bytes of one payload file (e.g. ``id_map.npy``) as recorded and verified."""
        return int(self.header["files"][name]["bytes"])

    def bits_per_row(self) -> np.ndarray:
        """int64 [N] bit-width of every row."""
        bucket, _ = self.locate(np.arange(self.num_rows))
        return np.asarray(self.candidates, dtype=np.int64)[bucket]

    def to_dense(self) -> Tensor:
        """float32 [N, D]: every row decoded (for tests and small tables)."""
        return self.lookup(torch.arange(self.num_rows))


class _NativeTables:
    """Calls the compiled decoder (``mpe/native.py``) on a table's arrays. Holds no ctypes
    state (pointers are taken at each call), so a model holding it deep-copies."""

    def __init__(self, table: PackedEmbedding):
        self.table = table
        self.bits = np.asarray(table.candidates, dtype=np.int32)

    @property
    def decode(self):

        return row_decoder()

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        t, k = self.table, len(self.table.candidates)
        bufs = (ctypes.c_void_p * k)(*[t._buckets[i].ctypes.data if i in t._buckets else None for i in range(k)])
        luts = (ctypes.c_void_p * k)(*[t._scaled[i].ctypes.data if i in t._scaled else None for i in range(k)])
        out = np.empty((ids.size, t.dim), dtype=np.float32)
        self.decode(ids.ctypes.data, ids.size, t._bucket_of.ctypes.data, t._in_block.ctypes.data,
                    t._block_base.ctypes.data, LOCATOR_BLOCK, k, bufs, self.bits.ctypes.data, luts,
                    t._offset_np.ctypes.data, t.dim, out.ctypes.data)
        return out


def _fail(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: {why}")


def _read_header(root: Path) -> dict[str, Any]:
    path = root / HEADER_FILE
    header = read_json(path)
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    if header.get("format") != FORMAT:
        raise _fail(path, f"not an {FORMAT} export (format {header.get('format')!r})")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise _fail(
            path, f"unsupported schema_version {header.get('schema_version')!r} (this reader knows {SCHEMA_VERSION})"
        )
    if header.get(HEADER_DIGEST) != header_digest(header):
        raise _fail(path, "header checksum mismatch; the header was edited or is corrupted")
    try:
        dim, num_rows = int(header["dim"]), int(header["num_rows"])
        cands = validate_candidates(header["candidates"])
        if list(cands) != list(header["candidates"]) or dim < 1 or num_rows < 1:
            raise ValueError("bad dim, num_rows or candidates")
        counts = {int(b): int(n) for b, n in header["bucket_rows"].items()}
        if sorted(counts) != list(cands) or sum(counts.values()) != num_rows or min(counts.values()) < 0:
            raise ValueError("bucket_rows do not cover the candidates and rows")
        if not isinstance(header["files"], dict) or len(header["fields"]) != len(header["field_offsets"]):
            raise ValueError("bad files or fields")
        for info in header["files"].values():
            int(info["bytes"]), str(info["sha256"])
        if header.get("pruned_as", "zero") not in PRUNED_AS:
            raise ValueError(f"pruned_as {header.get('pruned_as')!r} is not one of {PRUNED_AS}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _fail(path, f"malformed header ({e})") from None
    return header


def read_header(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The verified ``header.json`` of an export (format, schema version, its own checksum,
    well-formed fields); ``ArtifactError`` otherwise. Reads no other file."""
    return _read_header(Path(export_dir))


def load_packed_export(export_dir: str | os.PathLike) -> PackedEmbedding:
    """Verify and load the export in ``export_dir``; ``ArtifactError`` names the bad file."""
    root = Path(export_dir)
    header = _read_header(root)
    cands = tuple(header["candidates"])
    dim, num_rows = int(header["dim"]), int(header["num_rows"])
    counts = {int(b): int(n) for b, n in header["bucket_rows"].items()}
    expected = {bucket_file(b) for b, n in counts.items() if b > 0 and n > 0} | {STEPS_FILE, OFFSET_FILE, ID_MAP_FILE}

    files: dict[str, Path] = {}
    for name, info in header["files"].items():
        path = safe_child(root, name)
        if not path.is_file():
            raise _fail(path, "file is missing")
        size = path.stat().st_size
        if size != int(info["bytes"]):
            raise _fail(path, f"has {size} bytes, the header records {info['bytes']}; truncated or modified")
        verify_sha256(path, info["sha256"])
        files[name] = path
    if set(files) != expected:
        missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
        raise _fail(root / HEADER_FILE, f"file list does not match the buckets (missing {missing}, unexpected {extra})")

    steps = load_npy(files[STEPS_FILE])
    if steps.dtype != np.float32 or steps.shape != (len(cands),):
        raise _fail(files[STEPS_FILE], f"expected float32 [{len(cands)}], got {steps.dtype} {steps.shape}")
    offset = load_npy(files[OFFSET_FILE])
    if offset.dtype != np.float32 or offset.shape != (dim,):
        raise _fail(files[OFFSET_FILE], f"expected float32 [{dim}], got {offset.dtype} {offset.shape}")
    blob = load_npy(files[ID_MAP_FILE])
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise _fail(files[ID_MAP_FILE], f"expected a 1-D uint8 array, got {blob.dtype} {blob.shape}")
    try:
        kinds, sets = decode_id_map(blob, num_rows, len(cands))
    except ValueError as e:
        raise _fail(files[ID_MAP_FILE], f"id map does not decode ({e})") from None
    stored = {i: s.count for i, s in sets.items()}
    implicit = kinds.index(KIND_IMPLICIT)
    stored[implicit] = num_rows - sum(stored.values())
    for i, b in enumerate(cands):
        if stored.get(i, 0) != counts[b]:
            raise _fail(files[ID_MAP_FILE], f"id map holds {stored.get(i, 0)} rows at {b} bits, the header {counts[b]}")

    buckets: dict[int, np.ndarray] = {}
    for i, b in enumerate(cands):
        if b == 0 or counts[b] == 0:
            continue
        path = files[bucket_file(b)]
        buf = np.fromfile(path, dtype=np.uint8)
        if buf.size != bucket_code_bytes(counts[b], b, dim):
            raise _fail(path, f"has {buf.size} bytes, {counts[b]} rows at {b} bits need {bucket_code_bytes(counts[b], b, dim)}")
        buckets[i] = buf
    return PackedEmbedding(header, steps, offset, kinds, sets, buckets)
