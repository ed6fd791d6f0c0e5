"""The interface every compressed embedding implements, and its table export.

A compressed embedding maps a single-valued KJT batch to rows ``[B, F, D]`` like
``genlora_rec.model.FP32Embedding`` does, and can say exactly how many bytes its
serving export holds. ``num_bytes()`` must equal the payload bytes that ``export()``
writes (every file except ``header.json``); ``tests/test_baselines.py`` checks that
against the files on disk for every method.

Export layout (``write_tables``): ``OUT/header.json`` (format, schema version, method,
the JSON config needed to rebuild the module, and per file its bytes and sha256) plus one
``.npy`` file per array, written into a temporary sibling directory that then replaces
``OUT`` as a whole. ``read_tables`` verifies everything and loads without pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from data.artifacts import (
    ArtifactError,
    atomic_write_json,
    atomic_write_npy,
    json_digest,
    load_npy,
    read_json,
    safe_child,
    sha256_file,
    staged_dir,
)
from data.layout import field_offsets, global_ids
from encoding.sizes import fp32_table_bytes, npy_file_bytes

FORMAT = "ctr-compressed-tables"
SCHEMA_VERSION = 1
HEADER_FILE = "header.json"
HEADER_DIGEST = "header_sha256"
# This format's header_sha256 is over json.dumps' default separators (not the compact ones of
# ``data.artifacts.json_digest``); exports on disk depend on it.
HEADER_SEPARATORS = (", ", ": ")


class CompressedEmbedding(nn.Module):
    """Base class: KJT -> ``Tensor[B, F, D]`` plus exact size accounting and an export.

    Subclasses set ``method`` (the registry name), ``fields``, ``cardinalities`` and
    ``dim`` and implement ``forward``, ``export_arrays`` and ``export_config``. They may
    override ``extra_loss`` (a regulariser added to the BCE loss) and ``num_bytes``
    (only when ``export`` is overridden too, e.g. to reuse MPE's bit-packed format).
    """

    method: str = ""
    fields: list[str]
    cardinalities: list[int]
    dim: int

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- sizes and export ------------------------------------------------------------
    def export_arrays(self) -> dict[str, np.ndarray]:
        """The arrays a server needs to answer lookups (name -> array), as stored."""
        raise NotImplementedError

    def export_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with the arrays, rebuild the lookup."""
        raise NotImplementedError

    def num_bytes(self) -> int:
        """Exact payload bytes of ``export()`` (``.npy`` headers included, header.json not)."""
        return sum(npy_file_bytes(a.shape, a.dtype) for a in self.export_arrays().values())

    def export(self, out_dir: str | os.PathLike) -> dict[str, Any]:
        """Write the serving tables to ``out_dir`` (replaced atomically); returns the header."""
        return write_tables(out_dir, self.method, self.export_config(), self.export_arrays(), self.fields, self.dim)

    def extra_loss(self) -> torch.Tensor | None:
        return None

    # -- shared helpers --------------------------------------------------------------
    def num_rows(self) -> int:
        return sum(self.cardinalities)

    def fp32_bytes(self) -> int:
        """Bytes of the uncompressed fp32 tables this module replaces."""
        return fp32_table_bytes(self.num_rows(), self.dim)

    def global_ids(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """int64 [B, F] global row ids (field offset + local id) of a single-valued KJT."""
        return global_ids(kjt, torch.from_numpy(field_offsets(self.cardinalities)), type(self).__name__)


def _digest(header: Mapping[str, Any]) -> str:
    return json_digest(header, HEADER_DIGEST, separators=HEADER_SEPARATORS)


def write_tables(
    out_dir: str | os.PathLike,
    method: str,
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    fields: list[str],
    dim: int,
) -> dict[str, Any]:
    """Write ``arrays`` as ``NAME.npy`` files plus ``header.json`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        files = {}
        for name, array in arrays.items():
            fname = f"{name}.npy"
            atomic_write_npy(tmp / fname, np.ascontiguousarray(array))
            files[fname] = {"bytes": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
        header: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "method": method,
            "config": dict(config),
            "fields": list(fields),
            "dim": int(dim),
            "files": files,
            "total_bytes": int(sum(f["bytes"] for f in files.values())),
        }
        header[HEADER_DIGEST] = _digest(header)
        atomic_write_json(tmp / HEADER_FILE, header)
    return header


def read_tables(export_dir: str | os.PathLike, method: str | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Verify and load an export written by ``write_tables``: (header, name -> array).

    A missing, truncated, corrupted or edited file raises ``ArtifactError`` naming it;
    an export of another method than ``method`` (when given) a ``ValueError``.
    """
    root = Path(export_dir)
    path = root / HEADER_FILE
    header = read_json(path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} export")
    if header.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: unsupported schema_version {header.get('schema_version')!r} (reader knows {SCHEMA_VERSION})")
    if header.get(HEADER_DIGEST) != _digest(header):
        raise ArtifactError(f"{path}: header checksum mismatch; the header was edited or is corrupted")
    if method is not None and header.get("method") != method:
        raise ValueError(f"{export_dir}: export of method {header.get('method')!r}, not {method!r}")
    arrays = {}
    for fname, info in header["files"].items():
        file = safe_child(root, fname)
        arrays[fname.removesuffix(".npy")] = load_npy(file, info["sha256"])
    return header, arrays
