"""Bit-width facts in one place: candidate sets, the selection threshold and size accounting.

Size accounting is exact: ``packed_table_bytes`` returns the number of payload bytes that
``mpe.writer.write_packed_export`` writes for the same bit assignment (bucket code files,
``steps.npy``, ``offset.npy`` and ``id_map.npy``; ``header.json`` is metadata and is
reported on its own). A test checks the equality against the files on disk.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from encoding.packing import id_map_nbytes
from encoding.sizes import MAX_BITS, bucket_code_bytes, npy_file_bytes
from mpe.format import ID_MAP_FILE, OFFSET_FILE, STEPS_FILE, bucket_file

DEFAULT_CANDIDATES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
# What a 0-bit (pruned) row reads as once the bits are fixed (retrain, export, serving): its
# field's row 0 (the OOV row of ``data.prepare``) where that row has bits, or the zero vector.
PRUNED_AS = ("oov", "zero")
DEFAULT_PRUNED_AS = "oov"


def oov_fields(row0_bits: np.ndarray, pruned_as: str) -> np.ndarray:
    """bool [F]: the fields whose 0-bit rows read as their row 0, given every field's row-0
    bits ``row0_bits`` int [F]: under ``"oov"`` those whose row 0 has bits > 0, under
    ``"zero"`` none (a 0-bit row is then the zero vector)."""
    if pruned_as not in PRUNED_AS:
        raise ValueError(f"pruned_as must be one of {PRUNED_AS}, got {pruned_as!r}")
    return (np.asarray(row0_bits) > 0) & (pruned_as == "oov")


def oov_alias(bits_per_row: np.ndarray, field_offsets: Iterable[int], pruned_as: str) -> np.ndarray:
    """bool [N]: the rows that read as their field's row 0 under ``pruned_as`` (the 0-bit rows
    of the ``oov_fields``). ``bits_per_row``: int [N]; ``field_offsets``: every field's row 0."""
    bits = np.asarray(bits_per_row)
    offsets = np.asarray(list(field_offsets), dtype=np.int64)
    if bits.size == 0:
        return np.zeros(bits.shape, dtype=bool)
    fields = oov_fields(bits[offsets], pruned_as)
    return (bits == 0) & np.repeat(fields, np.diff(np.append(offsets, bits.size)))


def validate_candidates(bits: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated candidate bit-widths, each an int in 0..8.

    Raises ``ValueError`` for an empty set, non-integers (bools and non-integral floats
    included) or values outside 0..8.
    """
    try:
        values = list(bits)
    except TypeError:
        raise ValueError(f"bit-width candidates must be a sequence of ints, got {bits!r}") from None
    if not values:
        raise ValueError("bit-width candidates must not be empty")
    out = []
    for b in values:
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer, float, np.floating)):
            raise ValueError(f"bit-width candidate {b!r} is not an integer")
        if isinstance(b, (float, np.floating)) and not float(b).is_integer():
            raise ValueError(f"bit-width candidate {b!r} is not an integer")
        b = int(b)
        if not 0 <= b <= MAX_BITS:
            raise ValueError(f"bit-width candidate {b} is outside 0..{MAX_BITS}")
        out.append(b)
    return tuple(sorted(set(out)))


def threshold_probability(candidates: Iterable[int]) -> float:
    """The selection threshold 1 / (2 |B|) (1/14 for seven candidates)."""
    return 1.0 / (2 * len(validate_candidates(candidates)))


def bits_to_indices(bits_per_row: np.ndarray, candidates: Iterable[int]) -> np.ndarray:
    """int64 [N] candidate index of every row's bit value; ``ValueError`` for a value not in B."""
    cands = validate_candidates(candidates)
    bits = np.asarray(bits_per_row)
    if bits.ndim != 1:
        raise ValueError(f"bits_per_row must be 1-D, got shape {bits.shape}")
    if bits.size and (bits.min() < 0 or bits.max() > MAX_BITS):
        raise ValueError(f"bit-widths must lie in 0..{MAX_BITS}")
    lut = np.full(MAX_BITS + 1, -1, dtype=np.int64)
    lut[list(cands)] = np.arange(len(cands))
    idx = lut[bits.astype(np.int64)]
    if bits.size and idx.min() < 0:
        bad = sorted(set(np.unique(bits[idx < 0]).tolist()))
        raise ValueError(f"bit-widths {bad} are not among the candidates {cands}")
    return idx


def packed_size_breakdown(bits_per_row: np.ndarray, dim: int, candidates: Iterable[int]) -> dict[str, int]:
    """Bytes per export file for this bit assignment (file name -> bytes, files that the
    export writes only). ``sum(values)`` is ``packed_table_bytes``."""

    cands = validate_candidates(candidates)
    idx = bits_to_indices(bits_per_row, cands)
    if idx.size == 0:
        raise ValueError("a packed table needs at least one row")
    counts = np.bincount(idx, minlength=len(cands))
    sizes: dict[str, int] = {}
    for b, n in zip(cands, counts.tolist(), strict=True):
        if b > 0 and n > 0:
            sizes[bucket_file(b)] = bucket_code_bytes(n, b, dim)
    sizes[STEPS_FILE] = npy_file_bytes((len(cands),), np.float32)
    sizes[OFFSET_FILE] = npy_file_bytes((int(dim),), np.float32)
    sizes[ID_MAP_FILE] = npy_file_bytes((id_map_nbytes(idx, len(cands)),), np.uint8)
    return sizes


def packed_table_bytes(bits_per_row: np.ndarray, dim: int, candidates: Iterable[int]) -> int:
    """Exact payload bytes of the bit-packed export of a table.

    Args:
        bits_per_row: int [N] bit value (not index) of every global row.
        dim: embedding dimension D.
        candidates: the candidate bit-widths B.

    Returns ``sum_b ceil(n_b * b * D / 8)`` (codes) + ``steps.npy`` + ``offset.npy`` +
    ``id_map.npy``, each .npy counted with its header, exactly as written.
    """
    return int(sum(packed_size_breakdown(bits_per_row, dim, candidates).values()))
