"""An ``mpe.search`` run directory: the retrained model, the stages of an interrupted run.

Files (names here only): ``model.pt`` (weights only) + ``model.json`` (what rebuilds the
model, with its own checksum), ``stages.json`` (the finished stages and the run's settings,
sealed), ``search_model.pt``, the trainer checkpoints under ``search/`` and ``retrain/``,
``export/`` (``mpe.format``), ``report.json`` and ``bits_vs_frequency.png``.
"""

from __future__ import annotations

from pathlib import Path

from ctr.model import CTRModel, ModelConfig
from ctr.trainer import FitResult
from data.artifacts import (
    ArtifactError,
    atomic_torch_save,
    atomic_write_json,
    load_torch,
    read_json,
    read_sealed_json,
    seal_json,
    sha256_file,
    short_error,
)
from data.batches import PreparedDataset
from mpe.config import MPEConfig
from mpe.embedding import MixedPrecisionEmbedding

MODEL_FILE, MODEL_META = "model.pt", "model.json"
MODEL_SCHEMA_VERSION = 3  # 2: meta_sha256, model.json's checksum of itself; 3: pruned_rows
STAGES_FILE, STAGES_DIGEST = "stages.json", "stages_sha256"
SEARCH_MODEL_FILE = "search_model.pt"
SEARCH_DIR, RETRAIN_DIR, EXPORT_DIR = "search", "retrain", "export"
BITS_PLOT = "bits_vs_frequency.png"


def model_description(model: CTRModel, cfg: MPEConfig, data: PreparedDataset) -> dict:
    """What rebuilds ``model`` (and serves its export): fields, sizes, candidates, tower."""
    emb: MixedPrecisionEmbedding = model.embedding
    return {
        "kind": "mpe",
        "fields": data.fields,
        "cardinalities": data.cardinalities,
        "field_offsets": data.field_offsets,
        "dim": cfg.model.dim,
        "groups": emb.num_groups,
        "candidates": list(emb.candidates),
        "mode": cfg.search.mode,
        "tau": cfg.search.tau,
        "pruned_as": emb.pruned_as,
        "tower": cfg.model.tower,
        "hidden": list(cfg.model.hidden) if cfg.model.hidden else None,
    }


def save_model(model: CTRModel, cfg: MPEConfig, data: PreparedDataset, out: Path) -> dict:
    """``model.pt`` (weights only) + ``model.json`` (what rebuilds it, and its sha256); returns the description."""
    atomic_torch_save(out / MODEL_FILE, model.state_dict())
    meta = {"schema_version": MODEL_SCHEMA_VERSION, **model_description(model, cfg, data),
            "sha256": sha256_file(out / MODEL_FILE)}
    atomic_write_json(out / MODEL_META, seal_json(meta, "meta_sha256"))
    return meta


def load_model(run_dir: str | Path) -> tuple[CTRModel, dict]:
    """Rebuild the retrained MPE model of a run directory (checksums verified, no pickle).

    ``model.json``'s own checksum and schema version and ``model.pt``'s sha256 are checked,
    and the weights must fit the description; otherwise ``ArtifactError``.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / MODEL_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("kind") != "mpe":
        raise ArtifactError(f"{meta_path}: not an MPE model description")
    if meta.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise ArtifactError(f"{meta_path}: schema_version {meta.get('schema_version')!r}, this version reads "
                            f"{MODEL_SCHEMA_VERSION}; run mpe.search again to rewrite it")
    meta = read_sealed_json(meta_path, "meta_sha256")
    try:
        state = load_torch(run_dir / MODEL_FILE, expected_sha256=str(meta["sha256"]))
        embedding = MixedPrecisionEmbedding(
            meta["fields"], meta["cardinalities"], meta["dim"],
            state["embedding.group_of_row"].numpy(), state["embedding.penalty_weights"].numpy(),
            candidates=meta["candidates"], mode=meta["mode"], tau=meta["tau"],
            pruned_rows=state["embedding.pruned_rows"].numpy(),
            pruned_as=meta.get("pruned_as", "zero"),  # runs written before the option: the zero vector
        )
        hidden = tuple(meta["hidden"]) if meta["hidden"] else None
        tower = ModelConfig(meta["tower"], hidden, meta["dim"]).build_tower(len(meta["fields"]))
        model = CTRModel(embedding, tower)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ArtifactError(f"{run_dir / MODEL_FILE}: does not match {MODEL_META} ({short_error(e)})") from None
    embedding.set_phase("fixed")
    return model, meta


class Stages:
    """``stages.json``: the finished stages of a run and the settings they were run with.

    ``Stages.open(out, cfg, resume)`` reads an interrupted run's file (own checksum and the
    same settings checked; ``ArtifactError`` otherwise) or starts empty; ``save()`` writes it
    atomically (rank 0 only: ``writer=False`` makes it a no-op).
    """

    def __init__(self, path: Path, cfg: MPEConfig, data: dict, writer: bool = True):
        self.path, self.cfg, self.data, self.writer = path, cfg, data, writer

    @classmethod
    def open(cls, out: Path, cfg: MPEConfig, resume: bool, writer: bool = True) -> Stages:
        path = out / STAGES_FILE
        return cls(path, cfg, _load_stages(path, cfg) if resume else {}, writer)

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def update(self, **values) -> None:
        """Record finished stages and write the file."""
        self.data.update(values)
        if self.writer:
            _save_stages(self.path, self.data, self.cfg)


def _load_stages(path: Path, cfg: MPEConfig) -> dict:
    """``stages.json`` of an interrupted run, checked (own checksum, same settings); {} if absent."""
    if not path.exists():
        return {}
    stages = read_json(path)
    if isinstance(stages, dict) and STAGES_DIGEST in stages:
        stages = read_sealed_json(path, STAGES_DIGEST)
    elif not isinstance(stages, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    if "config" in stages and stages["config"] != cfg.settings():
        before, now = _flat(stages["config"]), _flat(cfg.settings())
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ArtifactError(f"{path}: the interrupted run used other settings ({', '.join(diff)} differ); "
                            "resume with the same options or use another --out")
    try:
        if "search" in stages:
            FitResult(**stages["search"])
            str(stages["search_sha256"])
        if "bits" in stages:
            [int(b) for b in stages["bits"]], dict(stages["selection"])
        if "lambda" in stages:
            float(stages["lambda"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed ({e})") from None
    return stages


def _save_stages(path: Path, stages: dict, cfg: MPEConfig) -> None:
    """Atomically write ``stages.json`` with the run's settings and its own checksum."""
    stages.update(config=cfg.settings())
    atomic_write_json(path, seal_json({k: v for k, v in stages.items() if k != STAGES_DIGEST}, STAGES_DIGEST))


def _flat(d: dict, prefix: str = "") -> dict:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}."""
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
