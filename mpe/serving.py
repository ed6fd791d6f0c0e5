"""Serve a CTR model from a bit-packed export: packed embedding lookups + the trained tower.

``load_served_model(export_dir)`` reads only weights-only / ``.npy`` / JSON files, verifies
every checksum, and returns a ``CTRModel`` whose embedding decodes rows from the packed
codes. Its predictions equal the retrained in-memory model's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctr.model import CTRModel
from data.artifacts import ArtifactError, load_torch, read_json, safe_child, short_error
from data.layout import global_ids
from genlora_rec.towers import build_tower
from mpe.reader import PackedEmbedding, load_packed_export

TOWER_FILE, TOWER_META = "tower.pt", "tower.json"


class PackedEmbeddingModule(nn.Module):
    """KJT -> Tensor[B, F, D] served from a ``PackedEmbedding`` (single-valued fields)."""

    def __init__(self, packed: PackedEmbedding, fields: Sequence[str], field_offsets: Sequence[int]):
        super().__init__()
        self.packed = packed
        self.fields = list(fields)
        self.register_buffer("field_offsets", torch.as_tensor(list(field_offsets), dtype=torch.int64))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = global_ids(kjt, self.field_offsets, "the packed embedding")
        return self.packed.lookup(ids.reshape(-1)).view(kjt.stride(), len(self.fields), -1)

    def num_bytes(self) -> int:
        return int(self.packed.num_bytes())


def load_served_model(export_dir: str | Path) -> CTRModel:
    """The export's packed embedding plugged into its tower (``tower.pt`` + ``tower.json``)."""
    export_dir = Path(export_dir)
    packed = load_packed_export(export_dir)
    meta_path = export_dir / TOWER_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise ArtifactError(f"{meta_path}: not a tower description (no sha256)")
    # the header is checksummed; the tower description must agree with it
    for key in ("fields", "field_offsets", "dim"):
        if meta.get(key) != packed.header.get(key):
            raise ArtifactError(f"{meta_path}: {key} disagrees with {export_dir / 'header.json'}; edited or mixed up")
    state = load_torch(safe_child(export_dir, meta.get("file", TOWER_FILE)), expected_sha256=meta["sha256"])
    try:
        hidden = tuple(meta["hidden"]) if meta.get("hidden") else None
        tower = build_tower(meta["tower"], len(meta["fields"]), meta["dim"], hidden)
        tower.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{export_dir / TOWER_FILE}: tower weights do not match {meta_path} ({short_error(e)})") from None
    model = CTRModel(PackedEmbeddingModule(packed, meta["fields"], meta["field_offsets"]), tower)
    return model.eval()
