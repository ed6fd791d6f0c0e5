"""The prepared-data directory format: its file names, ``manifest.json`` and its validation.

``data.prepare`` writes a directory in this format and ``data.batches.PreparedDataset``
reads it; both take the names and the rules from here. Layout (``SCHEMA_VERSION`` 2)::

    train.parquet, val.parquet, test.parquet  label (int8) + one int32 column per field (local ids)
    vocab.parquet     field, value, id (int32), count (int64); one "<OOV>" row (id 0) per field
    frequency.npy     int64 [num_features]: train-split count of each global id
                      (global id = field_offsets[field] + local id)
    manifest.json     fields, cardinalities, offsets, parameters, input identity, row counts,
                      skipped rows, click rates, sha256 of every file, seconds; sealed with
                      its own checksum ``manifest_sha256`` (``data.artifacts.seal_json``)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data.artifacts import ArtifactError, json_digest, read_json, safe_child, verify_sha256
from data.transforms import SPLIT_NAMES

SCHEMA_VERSION = 2  # 2: manifest_sha256, the manifest's checksum of itself
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST = "manifest_sha256"
VOCAB_FILE = "vocab.parquet"
FREQUENCY_FILE = "frequency.npy"


def split_file(name: str) -> str:
    """File name of split ``name`` ('train', 'val' or 'test')."""
    return f"{name}.parquet"


OUTPUT_FILES = (*(split_file(s) for s in SPLIT_NAMES), VOCAB_FILE, FREQUENCY_FILE)  # all but the manifest


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of a prepared directory and verify every listed file's sha256.

    The manifest's own checksum (``manifest_sha256``), its schema version and the shape of
    its fields are checked first. Raises ``ArtifactError`` naming the file that is missing,
    corrupted, modified or written by an incompatible version; file names cannot leave the
    directory.
    """
    root = Path(out_dir)
    path = root / MANIFEST_FILE
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not a data.prepare manifest (no 'files' table)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}; "
            "run data.prepare again to rewrite it"
        )
    if manifest.get(MANIFEST_DIGEST) != json_digest(manifest, MANIFEST_DIGEST):
        raise ArtifactError(f"{path}: checksum mismatch ({MANIFEST_DIGEST}); the manifest was edited or is corrupted")
    try:
        fields, cards, offsets = manifest["fields"], manifest["cardinalities"], manifest["field_offsets"]
        ok = (
            isinstance(manifest["dataset"], str)
            and all(isinstance(f, str) for f in fields)
            and len(fields) == len(cards) == len(offsets)
            and all(isinstance(c, int) and c >= 1 for c in cards)
            and list(offsets) == [sum(cards[:i]) for i in range(len(cards))]
            and manifest["num_features"] == sum(cards)
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e})") from None
    if not ok:
        raise ArtifactError(f"{path}: malformed manifest (fields, cardinalities, offsets or num_features disagree)")
    for name in OUTPUT_FILES:
        if name not in manifest["files"]:
            raise ArtifactError(f"{path}: does not list {name}")
    for name, digest in manifest["files"].items():
        verify_sha256(safe_child(root, name), str(digest))
    return manifest
