"""Write the bit-packed export of a mixed-precision table (the format: ``mpe.format``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.artifacts import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_npy,
    sha256_file,
    staged_dir,
)
from encoding.packing import encode_id_map, pack_codes
from encoding.sizes import fp32_table_bytes
from mpe.bitwidths import PRUNED_AS, bits_to_indices, packed_size_breakdown
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
from mpe.quantizer import LSQQuantizer

_ROW_CHUNK = 1 << 18  # rows quantized at a time; a multiple of 8 so chunks end on a byte


def _check_fields(field_names: Sequence[str], field_offsets: Sequence[int], num_rows: int) -> None:
    if len(field_names) != len(field_offsets):
        raise ValueError(f"{len(field_names)} field names for {len(field_offsets)} offsets")
    offs = [int(o) for o in field_offsets]
    if offs and (offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:], strict=False)) or offs[-1] >= num_rows):
        raise ValueError(f"field offsets {offs} must start at 0, increase and stay below {num_rows}")


def bucket_codes(weight: torch.Tensor, rows: np.ndarray, bit_index: int, quantizer: LSQQuantizer) -> np.ndarray:
    """uint8: the packed codes of ``weight[rows]`` [n, D] at candidate ``bit_index``."""
    bits = quantizer.candidates[bit_index]
    parts = []
    for start in range(0, rows.size, _ROW_CHUNK):
        sel = torch.from_numpy(rows[start : start + _ROW_CHUNK])
        idx = torch.full((sel.numel(),), bit_index, dtype=torch.int64)
        codes = quantizer.codes(weight[sel], idx).numpy()
        parts.append(pack_codes(codes, bits))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def write_packed_export(
    out_dir: str | os.PathLike,
    weight: torch.Tensor,
    bits_per_row: np.ndarray,
    quantizer: LSQQuantizer,
    field_names: Sequence[str],
    field_offsets: Sequence[int],
    extra_meta: dict[str, Any] | None = None,
    pruned_as: str = "zero",
) -> dict[str, Any]:
    """Write the bit-packed export of ``weight`` [N, D] (fp32 master rows) at ``bits_per_row``
    (int [N], bit values) and return its header.

    The files are written into a temporary sibling directory which then replaces
    ``out_dir`` as a whole (an existing ``out_dir`` and everything in it is replaced).
    ``extra_meta`` (JSON-serialisable) is stored under ``header["meta"]``; ``pruned_as``
    (``mpe.bitwidths.PRUNED_AS``) under ``header["pruned_as"]``: what a 0-bit row reads as.
    """
    out = Path(out_dir)
    weight = weight.detach().to(torch.float32).cpu()
    if weight.dim() != 2 or weight.shape[1] != quantizer.dim:
        raise ValueError(f"weight must be [N, {quantizer.dim}], got {tuple(weight.shape)}")
    num_rows, dim = int(weight.shape[0]), quantizer.dim
    if pruned_as not in PRUNED_AS:
        raise ValueError(f"pruned_as must be one of {PRUNED_AS}, got {pruned_as!r}")
    bits = np.asarray(bits_per_row)
    if bits.shape != (num_rows,):
        raise ValueError(f"bits_per_row has shape {bits.shape}, expected ({num_rows},)")
    cands = quantizer.candidates
    idx = bits_to_indices(bits, cands)
    _check_fields(field_names, field_offsets, num_rows)
    counts = np.bincount(idx, minlength=len(cands))

    with staged_dir(out) as tmp:
        names = []
        for i, b in enumerate(cands):
            if b > 0 and counts[i] > 0:
                name = bucket_file(b)
                atomic_write_bytes(tmp / name, bucket_codes(weight, np.flatnonzero(idx == i), i, quantizer).tobytes())
                names.append(name)
        with torch.no_grad():
            steps = quantizer.steps().detach().to(torch.float32).cpu().numpy()
            offset = quantizer.beta.detach().to(torch.float32).cpu().numpy()
        atomic_write_npy(tmp / STEPS_FILE, np.ascontiguousarray(steps))
        atomic_write_npy(tmp / OFFSET_FILE, np.ascontiguousarray(offset))
        atomic_write_npy(tmp / ID_MAP_FILE, encode_id_map(idx, len(cands)))
        names += [STEPS_FILE, OFFSET_FILE, ID_MAP_FILE]

        files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        total = sum(f["bytes"] for f in files.values())
        expected = packed_size_breakdown(bits, dim, cands)
        if {n: f["bytes"] for n, f in files.items()} != expected:
            raise RuntimeError(f"export sizes {files} differ from the size model {expected}")
        fp32 = fp32_table_bytes(num_rows, dim)
        header: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "dim": dim,
            "num_rows": num_rows,
            "candidates": list(cands),
            "fields": list(field_names),
            "field_offsets": [int(o) for o in field_offsets],
            "bucket_rows": {str(b): int(n) for b, n in zip(cands, counts.tolist(), strict=True)},
            "files": files,
            "total_bytes": int(total),
            "fp32_bytes": int(fp32),
            "compression_ratio": fp32 / total,
            "mean_bits_per_row": float(np.mean(bits)),
            "pruned_as": pruned_as,
            "meta": dict(extra_meta or {}),
        }
        header[HEADER_DIGEST] = header_digest(header)
        atomic_write_json(tmp / HEADER_FILE, header)
    return header

