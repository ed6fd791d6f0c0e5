"""Export an in-memory MPE model: the bit-packed tables and the tower, verified by reloading.

``export_model(model, description, out_dir)`` writes ``mpe.writer.write_packed_export`` plus
the tower (``tower.pt`` / ``tower.json``, ``mpe.format``), reloads the directory with
``mpe.serving.load_served_model`` and, given the data, checks that the served model's test
predictions equal the in-memory model's bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ctr.model import CTRModel
from ctr.trainer import metrics, predict
from data.artifacts import atomic_torch_save, atomic_write_json, sha256_file
from data.batches import PreparedDataset
from mpe.embedding import MixedPrecisionEmbedding
from mpe.format import TOWER_FILE, TOWER_META
from mpe.serving import load_served_model
from mpe.torchrec_size import torchrec_quantized_bytes
from mpe.writer import write_packed_export


def export_model(
    model: CTRModel,
    description: dict[str, Any],
    out_dir: str | os.PathLike,
    verify_data: PreparedDataset | None = None,
    torchrec: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the export of a retrained MPE ``model`` (phase 'fixed') to ``out_dir``.

    ``description``: ``mpe.run_dir.model_description`` (fields, offsets, tower, hidden, dim).
    With ``verify_data`` the reloaded export is evaluated on the test split and must give
    exactly the in-memory model's predictions. Returns sizes (and that test AUC).
    """
    emb: MixedPrecisionEmbedding = model.embedding
    out = Path(out_dir)
    header = write_packed_export(
        out, emb.global_weight(), emb.bits_per_row(), emb.quantizer, description["fields"], description["field_offsets"],
        extra_meta={**(extra_meta or {}), "bits_per_group": emb.bits_per_group().tolist()},
    )
    atomic_torch_save(out / TOWER_FILE, model.tower.state_dict())
    atomic_write_json(out / TOWER_META, {
        "file": TOWER_FILE, "sha256": sha256_file(out / TOWER_FILE), "tower": description["tower"],
        "hidden": description["hidden"], "dim": description["dim"], "fields": description["fields"], "field_offsets": description["field_offsets"],
    })
    served = load_served_model(out)
    result: dict[str, Any] = {"total_bytes": served.embedding.num_bytes(), "header_total_bytes": header["total_bytes"]}
    if torchrec:
        result["torchrec_quant"] = torchrec_quantized_bytes(served.embedding.packed)
        result["torchrec_quant_bytes"] = result["torchrec_quant"]["total_bytes"]
    if verify_data is not None:
        test = verify_data.split("test")
        model.eval()
        p_mem = predict(model, test, verify_data.fields)
        p_served = predict(served, test, verify_data.fields)
        if not np.array_equal(p_mem, p_served):
            raise RuntimeError(
                f"{out}: predictions from the loaded export differ from the in-memory model "
                f"(max |diff| {np.abs(p_mem - p_served).max():.3g})"
            )
        result["test_auc"] = metrics(test.labels, p_served)["auc"]
    return result
