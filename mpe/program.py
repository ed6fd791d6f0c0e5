"""Serving without this repository: the packed export decoded by torch operations only, and the
whole served model captured by ``torch.export`` into one ``.pt2`` file.

``TorchPackedEmbedding(packed)`` is an ``nn.Module`` whose buffers are built from a loaded
export (``mpe.reader.load_packed_export``); ``forward(global_ids int64 [n]) -> float32 [n, D]``
equals ``PackedEmbedding.lookup`` bit for bit. It holds:

- the packed codes of every bucket, byte for byte as in ``bucket_b{b}.bin`` (viewed as
  ``[rows, row bytes]`` in the widest integer type that divides a row);
- the locator of ``mpe.reader`` as tensors: uint8 [N] bucket, uint8 [N] rank within the
  row's block of 256 rows, int32 [blocks, |B|] every bucket's count before each block
  (2 + 4 |B| / 256 bytes per row), so ``row in bucket = block_base[id // 256, b] + in_block[id]``;
- per bucket and pair position h a table of every pair of codes (2b bits) -> the two
  decoded floats ``code * step_b + offset[2h], ...`` as one int64 (``4^b x D / 2 x 8`` bytes
  per bucket: 256 KiB at b = 6, D = 16); entry 0 is (0, 0) for pruned rows.

A lookup locates every id (three gathers), groups the ids by bucket (a stable ``torch.sort``
of the uint8 buckets, ``searchsorted`` for the group bounds) and, for every stored bucket,
gathers its rows' words, assembles 32-bit windows from them (a window holds whole pairs),
cuts the windows into 2b-bit pairs with shifts and a mask (planar: one plane per pair
position, so each op runs over the bucket's rows contiguously), adds the position's table
base and copies these int32 indices to the ids' rows; one gather of the pair table then gives
every row, pruned ones (index 0) included. Buckets where that does not apply (odd D, rows not
ending on a byte, b > 6, a pair table over ``PAIR_TABLE_LIMIT``) are decoded code by code (two
byte gathers per code) and copied in afterwards. The values are the reader's: ``code * step``
in float32 (``PackedEmbedding.code_values``), plus the offset in float32.

Each step is one ATen kernel and a full pass over its data, where the compiled decoder does a
row in registers: on the development machine the exported program does 0.26-0.39x the
lookups/s of an fp32 ``EmbeddingBagCollection`` at batch 4096, the other core loaded
(``experiments.bench_serving``). ``write_compiled_program`` compiles it with AOTInductor
(``served_program_aoti.pt2``), which fuses the element-wise ops of each bucket: 1.5x the
exported program in the same run (0.39x fp32).

``ServedProgram`` maps per-field local ids int64 [B, F] (the field offsets are baked in;
every id is checked against its field's cardinality) to click probabilities float32 [B]
(``sigmoid`` of the tower's logits). ``write_exported_program(export_dir)`` builds it from
the export (all checksums verified by ``mpe.serving.load_served_model``), captures it with
``torch.export.export`` (dynamic batch dimension), saves ``served_program.pt2``
(``mpe.format.PROGRAM_FILE``) with ``torch.export.save``, loads it back through
``mpe.serving.load_exported_program`` and checks that its probabilities equal the served
model's (compiled decoder) bit for bit, then records its sha256 and bytes in the header.

Little-endian hosts only (the byte views assume it), like the ``.npy`` files of the export.
"""

from __future__ import annotations

import io
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data.artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from data.batches import to_kjt
from mpe.format import (
    COMPILED_FILE,
    COMPILED_FORMAT,
    COMPILED_KEY,
    HEADER_DIGEST,
    HEADER_FILE,
    PROGRAM_FILE,
    PROGRAM_FORMAT,
    PROGRAM_KEY,
    PROGRAM_SCHEMA_VERSION,
    header_digest,
)
from mpe.reader import LOCATOR_BLOCK, PackedEmbedding, read_header
from mpe.serving import load_compiled_program, load_exported_program, load_served_model

PAIR_TABLE_LIMIT = 1 << 20  # bytes of one bucket's pair table above which it is decoded code by code
PROGRAM_INPUT = "local_ids: int64 [B, F], each field's own ids (field order of `fields`); field offsets baked in"
PROGRAM_OUTPUT = "click probabilities: float32 [B] (sigmoid of the tower's logits)"
_WIDE = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
COMPILED_TOLERANCE = 1e-6  # largest |probability difference| of the AOTInductor package vs the served model
_CHECK_ROWS = 512  # random examples checked at export, besides every field's first and last id


@dataclass(frozen=True)
class _PairPlan:
    """How one bucket's rows are cut into pairs of codes: ``windows[g]`` lists the terms
    (word bytes, word index, shift) whose OR is the g-th 32-bit window of a row, and every
    window holds ``pairs_per_window`` consecutive pairs. Rows are stored as words of
    ``word_bytes`` bytes (the widest of 4, 2, 1 dividing a row)."""

    index: int
    bits: int
    row_bytes: int
    word_bytes: int
    windows: tuple[tuple[tuple[int, int, int], ...], ...]
    pairs_per_window: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _window_terms(o: int, row_bytes: int, word_bytes: int) -> tuple[tuple[int, int, int], ...]:
    """Terms assembling the 32-bit window at byte ``o`` of a row (bytes past the row are 0)."""
    ws = next(w for w in (4, 2, 1) if w <= word_bytes and o % w == 0)
    end = min(o + 4, row_bytes)
    return tuple((ws, o // ws + t, 8 * ws * t) for t in range(4 // ws) if o + ws * t < end)


def pair_plan(index: int, bits: int, dim: int) -> _PairPlan | None:
    """The window layout of a ``bits``-bit bucket's rows (fewest windows, then fewest terms),
    or None when the bucket is decoded code by code (odd D, rows not ending on a byte, b > 6)."""
    if dim % 2 or (dim * bits) % 8 or not 1 <= bits <= 6:
        return None
    row_bytes, pairs, pair_bits = dim * bits // 8, dim // 2, 2 * bits
    word_bytes = next(w for w in (4, 2, 1) if row_bytes % w == 0)
    best: tuple[tuple[int, int], _PairPlan] | None = None
    for per in _divisors(pairs):
        for align in (4, 2, 1):
            windows = []
            for g in range(pairs // per):
                start, end = g * per * pair_bits, (g + 1) * per * pair_bits
                o = start // (8 * align) * align  # first byte of the window
                if end > 8 * o + 32:
                    break
                windows.append(_window_terms(o, row_bytes, word_bytes))
            else:
                cost = (len(windows), sum(len(w) for w in windows))
                if best is None or cost < best[0]:
                    best = (cost, _PairPlan(index, bits, row_bytes, word_bytes, tuple(windows), per))
    return None if best is None else best[1]


class TorchPackedEmbedding(nn.Module):
    """Rows of a packed export decoded by torch operations only (see the module docstring).

    ``forward(global_ids)``: int64 ids of any shape S (each in 0..N-1; others raise) ->
    float32 [*S, D], equal to ``packed.lookup`` bit for bit. Capturable by ``torch.export``.
    """

    def __init__(self, packed: PackedEmbedding, pair_table_limit: int = PAIR_TABLE_LIMIT):
        super().__init__()
        if sys.byteorder != "little":
            raise NotImplementedError("the torch decoder reads the packed bytes as little-endian words")
        if LOCATOR_BLOCK != 256:
            raise NotImplementedError("the torch decoder assumes locator blocks of 256 rows")
        self.dim, self.num_rows = packed.dim, packed.num_rows
        self.candidates = packed.candidates
        dim = self.dim
        bucket_of, in_block, block_base = packed.locator()
        self.register_buffer("bucket_of", torch.from_numpy(bucket_of))
        self.register_buffer("in_block", torch.from_numpy(in_block))
        self.register_buffer("block_base", torch.from_numpy(np.ascontiguousarray(block_base.reshape(-1))))
        self.register_buffer("offset", packed.offset.clone())
        offset = packed.offset.numpy()
        rows = packed.bucket_rows()

        self.pair_plans: list[_PairPlan] = []
        self.code_buckets: list[tuple[int, int]] = []  # (candidate index, bits) decoded code by code
        tables = [np.zeros(1, dtype=np.int64)]  # entry 0: the pair (0.0, 0.0) of pruned rows
        size = 1
        for i, b in enumerate(self.candidates):
            if b == 0 or rows[b] == 0:
                continue
            codes = packed.bucket_bytes(b)
            values = packed.code_values(b)
            plan = pair_plan(i, b, dim)
            if plan is not None and (dim // 2) * (4 ** b) * 8 > pair_table_limit:
                plan = None
            if plan is None:
                self.register_buffer(f"codes{i}", torch.from_numpy(np.concatenate([codes, np.zeros(1, np.uint8)])))
                self.register_buffer(f"values{i}", torch.from_numpy(values))
                self.code_buckets.append((i, b))
                continue
            words = torch.from_numpy(codes.copy()).view(_WIDE[plan.word_bytes])
            self.register_buffer(f"codes{i}", words.view(rows[b], plan.row_bytes // plan.word_bytes))
            pair = np.arange(1 << (2 * b))
            low, high = values[pair & ((1 << b) - 1)], values[pair >> b]
            for h in range(dim // 2):  # the reader's sum: values[u] + offset[j], in float32
                two = np.stack([low + offset[2 * h], high + offset[2 * h + 1]], axis=1).astype(np.float32)
                tables.append(np.ascontiguousarray(two).reshape(-1).view(np.int64))
            base = size + (np.arange(dim // 2, dtype=np.int64) << (2 * b))
            size += (dim // 2) << (2 * b)
            per = plan.pairs_per_window
            shifts = [[(g * per + t) * 2 * b - 8 * w[0][0] * w[0][1] for t in range(per)]
                      for g, w in enumerate(plan.windows)]
            self.register_buffer(f"shift{i}", torch.tensor(shifts, dtype=torch.int32).unsqueeze(2))
            self.register_buffer(f"base{i}", torch.from_numpy(base.astype(np.int32).reshape(len(plan.windows), per, 1)))
            self.pair_plans.append(plan)
        if size >= 1 << 31:
            raise ValueError("pair tables too large for int32 indices")
        self.register_buffer("pair_table", torch.from_numpy(np.concatenate(tables)))
        self.register_buffer("positions", torch.arange(dim, dtype=torch.int64))
        self.register_buffer("bucket_ids", torch.arange(len(self.candidates) + 1, dtype=torch.uint8))

    # -- sizes -----------------------------------------------------------------------------
    def byte_breakdown(self) -> dict[str, int]:
        """Bytes of every kind of buffer (codes = the packed bucket files, + 1 padding byte per
        bucket decoded code by code)."""
        def nbytes(t: Tensor) -> int:
            return t.numel() * t.element_size()

        codes = sum(nbytes(t) for n, t in self.named_buffers() if n.startswith("codes"))
        locator = nbytes(self.bucket_of) + nbytes(self.in_block) + nbytes(self.block_base)
        tables = nbytes(self.pair_table) + sum(nbytes(t) for n, t in self.named_buffers() if n.startswith("values"))
        small = sum(nbytes(t) for n, t in self.named_buffers()) - codes - locator - tables
        return {"codes": codes, "locator": locator, "tables": tables, "small": small,
                "total": codes + locator + tables + small}

    def num_bytes(self) -> int:
        return self.byte_breakdown()["total"]

    # -- decoding --------------------------------------------------------------------------
    def _pair_indices(self, plan: _PairPlan, rank: Tensor) -> Tensor:
        """int32 [D/2, m]: pair-table indices of the rows ``rank`` of one bucket, one plane per
        pair position (planar, so every shift and mask runs over m contiguous values)."""
        i, b = plan.index, plan.bits
        words = getattr(self, f"codes{i}").index_select(0, rank)  # [m, row words]
        views = {w: words.view(_WIDE[w]) for w in (4, 2, 1) if w <= plan.word_bytes}
        windows = []
        for terms in plan.windows:
            w = None
            for ws, col, shift in terms:
                x = views[ws][:, col].to(torch.int32)
                if ws == 2 and shift + 16 < 32:  # drop the sign extension of an int16 word
                    x = x & 0xFFFF
                if shift:
                    x = x << shift
                w = x if w is None else w | x
            windows.append(w)
        win = torch.stack(windows, 0).unsqueeze(1)  # [windows, 1, m]
        pairs = ((win >> getattr(self, f"shift{i}")) & ((1 << (2 * b)) - 1)) + getattr(self, f"base{i}")
        return pairs.view(self.dim // 2, -1)

    def _code_values(self, i: int, b: int, rank: Tensor) -> Tensor:
        """float32 [m, D]: rows ``rank`` of bucket i decoded code by code (two byte gathers each)."""
        codes = getattr(self, f"codes{i}")
        pos = (rank.to(torch.int64).unsqueeze(1) * self.dim + self.positions) * b
        byte = pos >> 3
        word = codes[byte].to(torch.int32) | (codes[byte + 1].to(torch.int32) << 8)
        u = (word >> (pos & 7).to(torch.int32)) & ((1 << b) - 1)
        return getattr(self, f"values{i}").index_select(0, u.reshape(-1)).view(-1, self.dim) + self.offset

    def forward(self, global_ids: Tensor) -> Tensor:
        ids = global_ids.reshape(-1)
        n, dim, k = ids.shape[0], self.dim, len(self.candidates)
        bucket = self.bucket_of.index_select(0, ids)  # index_select refuses ids outside 0..N-1
        rank = self.block_base.index_select(0, (ids >> 8) * k + bucket) + self.in_block.index_select(0, ids)
        grouped, order = torch.sort(bucket, stable=True)  # the ids grouped by bucket, in id order
        starts = torch.searchsorted(grouped, self.bucket_ids).tolist()  # where every bucket's ids begin
        counts = []
        for i in range(k):
            torch._check(0 <= starts[i])
            torch._check(starts[i] <= starts[i + 1])
            torch._check(starts[i + 1] <= n)
            counts.append(starts[i + 1] - starts[i])
        # every bucket decodes its ids' rows contiguously in grouped order; one gather by the
        # inverse permutation then puts them back in id order (no per-bucket scatter)
        grouped_rank = rank.index_select(0, order)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n, dtype=order.dtype))
        plans = {plan.index: plan for plan in self.pair_plans}
        code_buckets = dict(self.code_buckets)
        # per bucket, in grouped order: its ids' D/2 pair-table indices (0, the zero pair, for
        # pruned rows and rows decoded code by code) and, where some bucket is decoded code by
        # code, their values (zeros for the others)
        pair_parts, code_parts = [], []
        for i in range(k):
            r = grouped_rank.narrow(0, starts[i], counts[i])
            if plans:
                pair_parts.append(self._pair_indices(plans[i], r).t() if i in plans
                                  else torch.zeros(counts[i], dim // 2, dtype=torch.int32))
            if code_buckets:
                code_parts.append(self._code_values(i, code_buckets[i], r) if i in code_buckets
                                  else torch.zeros(counts[i], dim, dtype=torch.float32))
        if pair_parts:
            index = torch.cat(pair_parts, 0).index_select(0, inverse).view(-1)
            out = self.pair_table.index_select(0, index).view(torch.float32).view(n, dim)
        else:
            out = torch.zeros(n, dim, dtype=torch.float32)
        if code_parts:
            out = out + torch.cat(code_parts, 0).index_select(0, inverse)
        return out.view(global_ids.shape + (dim,))


class FieldEmbedding(nn.Module):
    """Per-field local ids int64 [B, F] -> float32 [B, F, D] through a ``TorchPackedEmbedding``
    (field offsets baked in; an id outside its field's 0..cardinality-1 raises). A 0-bit row of
    an ``oov_fields`` field (bool [F], ``PackedEmbedding.oov_fields``) reads as the field's row
    0, as ``PackedEmbedding.resolve`` maps it."""

    def __init__(self, table: TorchPackedEmbedding, field_offsets: Sequence[int], oov_fields: Sequence[bool] | None = None):
        super().__init__()
        offsets = [int(o) for o in field_offsets]
        cards = [b - a for a, b in zip(offsets, offsets[1:] + [table.num_rows], strict=True)]
        self.table = table
        self.register_buffer("field_offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("cardinalities", torch.tensor(cards, dtype=torch.int64))
        alias = [bool(x) for x in oov_fields] if oov_fields is not None else [False] * len(offsets)
        self.aliased = any(alias)
        self.register_buffer("oov_fields", torch.tensor(alias, dtype=torch.bool))
        zero = table.candidates.index(0) if 0 in table.candidates else 255
        self.register_buffer("zero_bucket", torch.tensor(zero, dtype=torch.uint8))

    def forward(self, local_ids: Tensor) -> Tensor:
        inside = ((local_ids >= 0) & (local_ids < self.cardinalities)).all()
        torch._assert_async(inside, "local ids must lie in 0..cardinality-1 of their field")
        ids = local_ids + self.field_offsets
        if self.aliased:
            pruned = self.table.bucket_of.index_select(0, ids.reshape(-1)).view_as(ids) == self.zero_bucket
            ids = torch.where(pruned & self.oov_fields, self.field_offsets.expand_as(ids), ids)
        rows = self.table(ids.reshape(-1))
        return rows.view(local_ids.shape[0], local_ids.shape[1], self.table.dim)


class ServedProgram(nn.Module):
    """local ids int64 [B, F] -> click probabilities float32 [B]: decode + tower + sigmoid."""

    def __init__(self, embedding: FieldEmbedding, tower: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.tower = tower

    def forward(self, local_ids: Tensor) -> Tensor:
        return torch.sigmoid(self.tower(self.embedding(local_ids)))


def capture(module: nn.Module, num_fields: int) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a [B, F]-ids module with a dynamic batch dimension."""
    example = torch.zeros(4, num_fields, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=1 << 26)
    return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},), strict=False)


def capture_embedding(packed: PackedEmbedding, field_offsets: Sequence[int]) -> torch.export.ExportedProgram:
    """The embedding alone as a ``torch.export`` program: local ids int64 [B, F] -> float32
    [B, F, D] (what ``experiments.bench_serving`` times against the other lookups)."""
    module = FieldEmbedding(TorchPackedEmbedding(packed), field_offsets, packed.oov_fields.tolist())
    return capture(module, len(list(field_offsets)))


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """The ``.pt2`` bytes ``torch.export.save`` writes for ``program``."""
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def check_ids(field_offsets: Sequence[int], num_rows: int, rows: int = _CHECK_ROWS, seed: int = 0) -> np.ndarray:
    """int64 [2 + rows, F] local ids: every field's first id, its last id, then random ids."""
    offsets = list(field_offsets)
    cards = np.asarray([b - a for a, b in zip(offsets, offsets[1:] + [num_rows], strict=True)], dtype=np.int64)
    rng = np.random.default_rng(seed)
    rand = (rng.random((rows, len(offsets))) * cards).astype(np.int64)
    return np.concatenate([np.zeros((1, len(offsets)), np.int64), (cards - 1)[None], rand])


def build_served_program(export_dir: str | os.PathLike) -> tuple[ServedProgram, nn.Module]:
    """(the torch-only ``ServedProgram``, the compiled-decoder served model) of an export."""
    served = load_served_model(export_dir)
    emb = served.embedding
    table = TorchPackedEmbedding(emb.packed)
    program = ServedProgram(FieldEmbedding(table, emb.field_offsets.tolist(), emb.packed.oov_fields.tolist()),
                            served.tower).eval()
    for p in program.parameters():  # served, never trained: no autograd graph when called
        p.requires_grad_(False)
    return program, served


@torch.inference_mode()
def _served_probs(served: nn.Module, fields: Sequence[str], ids: np.ndarray) -> Tensor:
    return torch.sigmoid(served(to_kjt(ids, fields)))


def write_exported_program(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Capture, save and verify ``served_program.pt2`` in ``export_dir``; record it in the
    header; return the header entry. ``RuntimeError`` if it does not reproduce the served
    model bit for bit (then nothing is recorded)."""
    root = Path(export_dir)
    program, served = build_served_program(root)
    table, fields = program.embedding.table, served.embedding.fields
    ids_np = check_ids(served.embedding.field_offsets.tolist(), table.num_rows)
    ids = torch.from_numpy(ids_np)
    with torch.inference_mode():
        global_ids = (ids + program.embedding.field_offsets).reshape(-1)
        if not torch.equal(table(global_ids), served.embedding.packed.lookup(global_ids)):
            raise RuntimeError(f"{root}: the torch decoder differs from the packed reader")
    exported = capture(program, len(fields))
    atomic_write_bytes(root / PROGRAM_FILE, program_bytes(exported))

    header = read_header(root)
    entry = {
        "format": PROGRAM_FORMAT, "schema_version": PROGRAM_SCHEMA_VERSION, "file": PROGRAM_FILE,
        "sha256": sha256_file(root / PROGRAM_FILE), "bytes": (root / PROGRAM_FILE).stat().st_size,
        "input": PROGRAM_INPUT, "output": PROGRAM_OUTPUT, "fields": list(fields),
        "cardinalities": program.embedding.cardinalities.tolist(), "dynamic_dims": {"local_ids": {"0": "batch"}},
        "torch_version": torch.__version__, "decoder_bytes": table.byte_breakdown(),
        "verified_examples": int(ids.shape[0]),
    }

    def verify() -> dict[str, Any]:  # through the loader users call: checksum first, then torch.export.load
        loaded = load_exported_program(root).module()
        with torch.inference_mode():
            got = loaded(ids)
        want = _served_probs(served, fields, ids_np)
        if not torch.equal(got, want):
            diff = float((got.double() - want.double()).abs().max())
            raise RuntimeError(f"{root}: the exported program's probabilities differ from the served model "
                               f"(max |diff| {diff:.3g})")
        return {}

    _record_verified(root, header, PROGRAM_KEY, entry, root / PROGRAM_FILE, verify)
    return entry


def _record_verified(root: Path, header: dict[str, Any], key: str, entry: dict[str, Any], path: Path,
                     verify: Callable[[], dict[str, Any]]) -> None:
    """Record ``entry`` under ``key`` in the export's header, then run ``verify`` (which loads
    ``path`` through that header) and add the fields it returns to ``entry``. If it raises,
    the header is restored and ``path`` removed: nothing is recorded."""
    header_with = {**header, key: entry}
    header_with[HEADER_DIGEST] = header_digest(header_with)
    atomic_write_json(root / HEADER_FILE, header_with)
    try:
        extra = verify()
    except BaseException:
        header[HEADER_DIGEST] = header_digest(header)
        atomic_write_json(root / HEADER_FILE, header)
        path.unlink(missing_ok=True)
        raise
    if extra:
        entry.update(extra)
        header_with[HEADER_DIGEST] = header_digest(header_with)
        atomic_write_json(root / HEADER_FILE, header_with)



def compile_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """AOTInductor-compile ``program`` into the package ``path`` (written atomically): the same
    graph, its torch ops fused into native loops (needs a C++ compiler now, not when served)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_compiled_program(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Compile the export's verified ``served_program.pt2`` (``write_exported_program`` first)
    with AOTInductor into ``served_program_aoti.pt2``, record it in the header, reload it
    through ``mpe.serving.load_compiled_program`` and check its probabilities against the served
    model's; return the header entry. The decoder is integer work and gathers, but the compiler
    fuses the tower's float ops in its own order, so the probabilities may differ in the last
    bits: the largest difference is recorded (``max_abs_diff``) and must stay within
    ``COMPILED_TOLERANCE``, else ``RuntimeError`` and nothing is recorded."""
    root = Path(export_dir)
    program = load_exported_program(root)
    header = read_header(root)
    t0 = time.perf_counter()
    compile_program(program, root / COMPILED_FILE)
    seconds = round(time.perf_counter() - t0, 1)
    served = load_served_model(root)
    ids_np = check_ids(served.embedding.field_offsets.tolist(), served.embedding.packed.num_rows)
    entry = {
        "format": COMPILED_FORMAT, "schema_version": PROGRAM_SCHEMA_VERSION, "file": COMPILED_FILE,
        "sha256": sha256_file(root / COMPILED_FILE), "bytes": (root / COMPILED_FILE).stat().st_size,
        "compiled_from": header[PROGRAM_KEY]["sha256"], "input": PROGRAM_INPUT, "output": PROGRAM_OUTPUT,
        "torch_version": torch.__version__, "machine": platform.machine(),
        "compile_seconds": seconds, "verified_examples": int(ids_np.shape[0]),
    }

    def verify() -> dict[str, Any]:
        with torch.inference_mode():
            got = load_compiled_program(root)(torch.from_numpy(ids_np))
        want = _served_probs(served, served.embedding.fields, ids_np)
        diff = float((got.double() - want.double()).abs().max())
        if not diff <= COMPILED_TOLERANCE:
            raise RuntimeError(f"{root}: the compiled program's probabilities differ from the served model "
                               f"(max |diff| {diff:.3g} > {COMPILED_TOLERANCE:g})")
        return {"max_abs_diff": diff}

    _record_verified(root, header, COMPILED_KEY, entry, root / COMPILED_FILE, verify)
    return entry
