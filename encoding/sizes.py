"""Byte-size facts shared by every export: fp32 tables, signed b-bit codes, ``.npy`` files."""

from __future__ import annotations

import io
import math

import numpy as np

MAX_BITS = 8  # the widest code any packed format here stores
FP32_BYTES = 4


def code_range(bits: int) -> tuple[int, int]:
    """Signed integer code range ``(-2^(b-1), 2^(b-1) - 1)`` of a b-bit row; (0, 0) for b = 0."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bit-width {bits} is outside 0..{MAX_BITS}")
    if bits == 0:
        return 0, 0
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def packed_nbytes(count: int, width: int) -> int:
    """Bytes of ``count`` values of ``width`` bits packed back to back: ``ceil(count * width / 8)``."""
    return (int(count) * int(width) + 7) // 8


def bucket_code_bytes(num_rows: int, bits: int, dim: int) -> int:
    """Bytes of a bucket file: ``ceil(num_rows * bits * dim / 8)`` (rows are packed back to
    back, so a row need not end on a byte boundary; the total is rounded up once)."""
    return packed_nbytes(int(num_rows) * int(dim), bits)


def npy_file_bytes(shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    """Exact size of ``np.save`` of an array of this shape and dtype (header + data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.tell() + int(math.prod(shape)) * np.dtype(dtype).itemsize


def fp32_table_bytes(num_rows: int, dim: int) -> int:
    """Bytes of the uncompressed fp32 table: ``num_rows * dim * 4``."""
    return int(num_rows) * int(dim) * FP32_BYTES
