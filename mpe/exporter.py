"""Export an in-memory MPE model: the bit-packed tables and the tower, verified by reloading.

``export_model(model, description, out_dir)`` writes ``mpe.writer.write_packed_export`` plus
the tower (``tower.pt`` / ``tower.json``, ``mpe.format``) and, given the prepared data, the
preprocessing and the kept-feature vocabulary (``mpe.vocabulary``: a deployable export that
``python -m mpe.predict`` scores raw rows with). The header then records the tower and the
vocabulary (sha256, bytes) and the byte breakdown (``mpe.format.byte_breakdown``). The
directory is reloaded with ``mpe.serving.load_served_model`` and, given the data, the served
model's test predictions must equal the in-memory model's bit for bit.
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
from mpe.format import (
    BYTES_KEY,
    HEADER_DIGEST,
    HEADER_FILE,
    TOWER_FILE,
    TOWER_KEY,
    TOWER_META,
    VOCAB_KEY,
    byte_breakdown,
    header_digest,
)
from mpe.serving import load_served_model
from mpe.torchrec_size import torchrec_quantized_bytes
from mpe.vocabulary import write_vocabulary
from mpe.writer import write_packed_export


def export_model(
    model: CTRModel,
    description: dict[str, Any],
    out_dir: str | os.PathLike,
    verify_data: PreparedDataset | None = None,
    torchrec: bool = True,
    extra_meta: dict[str, Any] | None = None,
    prepared: PreparedDataset | None = None,
    vocabulary: str | None = "exact",
) -> dict[str, Any]:
    """Write the export of a retrained MPE ``model`` (phase 'fixed') to ``out_dir``.

    ``description``: ``mpe.run_dir.model_description`` (fields, offsets, tower, hidden, dim).
    With ``verify_data`` the reloaded export is evaluated on the test split and must give
    exactly the in-memory model's predictions. ``prepared`` (default ``verify_data``): the
    prepared data the model was trained on, whose preprocessing and vocabulary make the export
    deployable; ``vocabulary``: ``exact`` / ``compact`` (``mpe.vocabulary``) or None for none.
    Returns sizes (and that test AUC).
    """
    emb: MixedPrecisionEmbedding = model.embedding
    out = Path(out_dir)
    header = write_packed_export(
        out, emb.global_weight(), emb.bits_per_row(), emb.quantizer, description["fields"], description["field_offsets"],
        extra_meta={**(extra_meta or {}), "bits_per_group": emb.bits_per_group().tolist()}, pruned_as=emb.pruned_as,
    )
    atomic_torch_save(out / TOWER_FILE, model.tower.state_dict())
    atomic_write_json(out / TOWER_META, {
        "file": TOWER_FILE, "sha256": sha256_file(out / TOWER_FILE), "tower": description["tower"],
        "hidden": description["hidden"], "dim": description["dim"], "fields": description["fields"], "field_offsets": description["field_offsets"],
    })
    header[TOWER_KEY] = {
        "file": TOWER_META, "sha256": sha256_file(out / TOWER_META), "bytes": (out / TOWER_META).stat().st_size,
        "weights": {"file": TOWER_FILE, "sha256": sha256_file(out / TOWER_FILE), "bytes": (out / TOWER_FILE).stat().st_size},
    }
    prepared = prepared if prepared is not None else verify_data
    if prepared is not None and vocabulary is not None:
        if list(prepared.fields) != list(description["fields"]) or prepared.num_features != header["num_rows"]:
            raise ValueError(f"{prepared.root}: not the prepared data of this model (other fields or rows)")
        header[VOCAB_KEY] = write_vocabulary(out, prepared.root, prepared.manifest, emb.bits_per_row(), vocabulary,
                                             pruned_as=emb.pruned_as)
    header[BYTES_KEY] = byte_breakdown(header)
    header["deployable_bytes"] = header[BYTES_KEY]["deployable_total"] if VOCAB_KEY in header else None
    header[HEADER_DIGEST] = header_digest(header)
    atomic_write_json(out / HEADER_FILE, header)
    served = load_served_model(out)
    result: dict[str, Any] = {"total_bytes": served.embedding.num_bytes(), "header_total_bytes": header["total_bytes"],
                              "bytes": header[BYTES_KEY], "deployable_bytes": header["deployable_bytes"]}
    if VOCAB_KEY in header:
        from mpe.predict import load_scorer  # verifies the vocabulary against this export

        load_scorer(out, model=served)
        result["vocabulary"] = {k: header[VOCAB_KEY][k] for k in ("mode", "kept_tokens", "pruned_tokens")}
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
