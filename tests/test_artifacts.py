"""Every artefact read back is checked: corrupted, truncated, tampered, pickled or path-escaping
files give one clear ``ArtifactError`` (the CLIs print it as one line), never a raw traceback and
never code execution.

Covered here: the MPE run (``model.json`` + ``model.pt``), the export's tower (``tower.json`` +
``tower.pt``), the prepared-data manifest, trainer checkpoints and adapters. The packed tables
of the export have their own tests in ``test_export.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctr.model import CTRModel, FP32Embedding, ModelConfig
from ctr.trainer import CHECKPOINT, CHECKPOINT_META, TrainConfig, Trainer
from data.artifacts import (
    ArtifactError,
    atomic_write_json,
    read_json,
    safe_child,
    seal_json,
    sha256_file,
)
from data.manifest import load_manifest
from data.prepare import prepare
from genlora_rec.towers import build_tower
from mpe import run_dir, search
from mpe.config import MPEConfig, SearchConfig
from mpe.embedding import MixedPrecisionEmbedding
from mpe.export import main as export_main
from mpe.exporter import export_model
from mpe.format import TOWER_FILE, TOWER_META
from mpe.serving import load_served_model

REPO = Path(__file__).resolve().parents[1]
FIELDS, CARDS, DIM = ["a", "b", "c"], [13, 7, 29], 4


class Payload:
    """Pickles to a call that would create a marker file: loading must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> str:
    """Overwrite ``path`` with a checkpoint holding a code-running pickle; returns its sha256."""
    torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, path)
    return sha256_file(path)


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def mpe_run(tmp_path) -> Path:
    """A tiny retrained MPE run directory (model.pt + model.json), as ``mpe.search`` writes it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    group_of_row = rng.integers(0, 4, sum(CARDS))
    emb = MixedPrecisionEmbedding(FIELDS, CARDS, DIM, group_of_row, np.ones(4))
    emb.fix_bits([0, 2, 4, 6])
    model = CTRModel(emb, build_tower("dnn", len(FIELDS), DIM, (8,)))
    offsets = [0, CARDS[0], CARDS[0] + CARDS[1]]
    data = SimpleNamespace(fields=FIELDS, cardinalities=CARDS, field_offsets=offsets)
    cfg = MPEConfig(dataset="criteo", model=ModelConfig(dim=DIM, hidden=(8,)), search=SearchConfig(groups=4))
    run = tmp_path / "run"
    run.mkdir()
    run_dir.save_model(model, cfg, data, run)
    return run


# ---------------------------------------------------------------------------------------------
# MPE run: model.json + model.pt
# ---------------------------------------------------------------------------------------------
def test_mpe_model_round_trip_and_damage(mpe_run):
    model, meta = run_dir.load_model(mpe_run)
    assert meta["schema_version"] == run_dir.MODEL_SCHEMA_VERSION and model.embedding.phase == "fixed"
    weights, meta_path = mpe_run / run_dir.MODEL_FILE, mpe_run / run_dir.MODEL_META
    good_w, good_m = weights.read_bytes(), meta_path.read_text()

    flip_byte(weights)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        run_dir.load_model(mpe_run)
    weights.write_bytes(good_w[: len(good_w) // 3])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        run_dir.load_model(mpe_run)
    weights.write_bytes(good_w)

    meta_path.write_text(good_m[: len(good_m) // 2])  # truncated JSON
    with pytest.raises(ArtifactError, match="not valid JSON"):
        run_dir.load_model(mpe_run)
    meta = json.loads(good_m)
    atomic_write_json(meta_path, {**meta, "dim": 8})  # edited without its checksum
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        run_dir.load_model(mpe_run)
    atomic_write_json(meta_path, seal_json({**meta, "cardinalities": [13, 7, 30]}, "meta_sha256"))
    with pytest.raises(ArtifactError, match="does not match model.json"):  # consistent JSON, other weights
        run_dir.load_model(mpe_run)
    atomic_write_json(meta_path, seal_json({**meta, "schema_version": 1}, "meta_sha256"))
    with pytest.raises(ArtifactError, match="schema_version 1"):
        run_dir.load_model(mpe_run)
    atomic_write_json(meta_path, seal_json({k: v for k, v in meta.items() if k != "tower"}, "meta_sha256"))
    with pytest.raises(ArtifactError, match="does not match"):
        run_dir.load_model(mpe_run)


def test_mpe_model_pickle_payload_never_runs(mpe_run, tmp_path):
    marker = tmp_path / "pwned"
    sha = plant_pickle(mpe_run / run_dir.MODEL_FILE, marker)
    meta = read_json(mpe_run / run_dir.MODEL_META)
    atomic_write_json(mpe_run / run_dir.MODEL_META, seal_json({**meta, "sha256": sha}, "meta_sha256"))
    with pytest.raises(ArtifactError, match="weights-only"):
        run_dir.load_model(mpe_run)
    assert not marker.exists()


def test_export_cli_prints_one_line_for_a_damaged_run(mpe_run, capsys):
    flip_byte(mpe_run / run_dir.MODEL_FILE)
    assert export_main(["--run", str(mpe_run), "--out", str(mpe_run / "export"), "--no-torchrec"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model.pt" in err
    assert not (mpe_run / "export").exists()


# ---------------------------------------------------------------------------------------------
# export: tower.json + tower.pt
# ---------------------------------------------------------------------------------------------
def test_served_tower_is_checked(mpe_run, tmp_path):
    export = mpe_run / "export"
    model, meta = run_dir.load_model(mpe_run)
    export_model(model, meta, export, torchrec=False)
    load_served_model(export)
    meta = read_json(export / TOWER_META)

    atomic_write_json(export / TOWER_META, {**meta, "field_offsets": [0, 13, 21]})
    with pytest.raises(ArtifactError, match="field_offsets disagrees"):
        load_served_model(export)
    atomic_write_json(export / TOWER_META, {**meta, "file": "../run/model.pt"})
    with pytest.raises(ArtifactError, match="escapes"):
        load_served_model(export)
    atomic_write_json(export / TOWER_META, {**meta, "hidden": [16]})
    with pytest.raises(ArtifactError, match="tower weights do not match"):
        load_served_model(export)
    atomic_write_json(export / TOWER_META, meta)
    flip_byte(export / TOWER_FILE)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_served_model(export)

    marker = tmp_path / "pwned"
    sha = plant_pickle(export / TOWER_FILE, marker)
    atomic_write_json(export / TOWER_META, {**meta, "sha256": sha})
    with pytest.raises(ArtifactError, match="weights-only"):
        load_served_model(export)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# prepared data: manifest.json
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared_bytes(tmp_path_factory, criteo_sample) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("prep") / "out"
    src = out.parent / "in.txt"
    with open(criteo_sample) as f:
        src.write_text("".join(next(f) for _ in range(300)))
    prepare("criteo", src, out, progress=False)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def prepared_dir(tmp_path: Path, files: dict[str, bytes]) -> Path:
    out = tmp_path / "prepared"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def test_manifest_tampering_and_path_escape(prepared_bytes, tmp_path):
    out = prepared_dir(tmp_path, prepared_bytes)
    manifest = load_manifest(out)
    assert manifest["schema_version"] == 2 and "manifest_sha256" in manifest

    atomic_write_json(out / "manifest.json", {**manifest, "cardinalities": [2] * 39})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_manifest(out)
    (tmp_path / "secret.npy").write_bytes(prepared_bytes["frequency.npy"])
    files = {**manifest["files"], "../secret.npy": manifest["files"]["frequency.npy"]}
    atomic_write_json(out / "manifest.json", seal_json({**manifest, "files": files}, "manifest_sha256"))
    with pytest.raises(ArtifactError, match="escapes the artefact directory"):
        load_manifest(out)
    files = {**manifest["files"], "/etc/passwd": "0" * 64}
    atomic_write_json(out / "manifest.json", seal_json({**manifest, "files": files}, "manifest_sha256"))
    with pytest.raises(ArtifactError, match="escapes the artefact directory"):
        load_manifest(out)
    atomic_write_json(out / "manifest.json", seal_json({**manifest, "num_features": 5}, "manifest_sha256"))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        load_manifest(out)
    atomic_write_json(out / "manifest.json", seal_json({k: v for k, v in manifest.items() if k != "fields"},
                                                       "manifest_sha256"))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        load_manifest(out)
    atomic_write_json(out / "manifest.json", seal_json({**manifest, "schema_version": 1}, "manifest_sha256"))
    with pytest.raises(ArtifactError, match="schema_version 1, expected 2"):
        load_manifest(out)
    (out / "manifest.json").write_bytes(prepared_bytes["manifest.json"][:100])
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(out)


def test_prepared_data_files_truncated(prepared_bytes, tmp_path):
    out = prepared_dir(tmp_path, prepared_bytes)
    data = prepared_bytes["train.parquet"]
    (out / "train.parquet").write_bytes(data[: len(data) - 10])
    with pytest.raises(ArtifactError, match=r"train\.parquet: checksum mismatch"):
        load_manifest(out)


def test_training_cli_one_line_for_damaged_prepared_dir(prepared_bytes, tmp_path, capsys):
    from ctr.train_fp32 import main as train_main

    out = prepared_dir(tmp_path, prepared_bytes)
    flip_byte(out / "frequency.npy", 0.9)
    args = ["--dataset", "criteo", "--prepared", str(out), "--out", str(tmp_path / "run"), "--no-progress"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "frequency.npy" in err
    assert search.main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# trainer checkpoints
# ---------------------------------------------------------------------------------------------
def _fit(out: Path, resume: bool = False):
    rng = np.random.default_rng(0)
    from data.batches import SplitArrays

    split = SplitArrays(np.stack([rng.integers(0, c, 300) for c in CARDS], 1).astype(np.int32),
                        (rng.random(300) < 0.3).astype(np.float32))
    torch.manual_seed(0)
    model = CTRModel(FP32Embedding(FIELDS, CARDS, DIM), build_tower("dnn", 3, DIM, (8,)))
    return Trainer(model, TrainConfig(batch_size=100, progress=False), out_dir=out).fit(split, split, FIELDS,
                                                                                        resume=resume)


def test_checkpoint_corrupted_truncated_or_pickled(tmp_path):
    _fit(tmp_path)
    ckpt, good = tmp_path / CHECKPOINT, (tmp_path / CHECKPOINT).read_bytes()
    flip_byte(ckpt)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        _fit(tmp_path, resume=True)
    ckpt.write_bytes(good[:1000])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        _fit(tmp_path, resume=True)
    (tmp_path / CHECKPOINT_META).write_text('{"sha256": ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        _fit(tmp_path, resume=True)
    marker = tmp_path / "pwned"
    sha = plant_pickle(ckpt, marker)
    atomic_write_json(tmp_path / CHECKPOINT_META, {"file": CHECKPOINT, "sha256": sha})
    with pytest.raises(ArtifactError, match="weights-only"):
        _fit(tmp_path, resume=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------
def test_adapter_escape_version_and_pickle(tmp_path):
    from torch import nn

    from genlora_rec.adapters import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        inject_adapters,
        load_adapter,
        save_adapter,
    )
    from genlora_rec.lora import LoRAConfig

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))

    meta = save_adapter(inject_adapters(base(), LoRAConfig(r=2), r"\d+"), tmp_path)
    load_adapter(base(), tmp_path)
    (tmp_path.parent / "outside.pt").write_bytes((tmp_path / WEIGHTS_FILE).read_bytes())
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json({**meta, "weights_file": "../outside.pt"}, "config_sha256"))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        load_adapter(base(), tmp_path)
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json({**meta, "format_version": 1}, "config_sha256"))
    with pytest.raises(ArtifactError, match="unsupported format_version 1"):
        load_adapter(base(), tmp_path)
    atomic_write_json(tmp_path / CONFIG_FILE, {**meta, "config": {**meta["config"], "alpha": 99.0}})
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_adapter(base(), tmp_path)
    marker = tmp_path / "pwned"
    sha = plant_pickle(tmp_path / WEIGHTS_FILE, marker)
    atomic_write_json(tmp_path / CONFIG_FILE, seal_json({**meta, "weights_sha256": sha}, "config_sha256"))
    with pytest.raises(ArtifactError, match="weights-only"):
        load_adapter(base(), tmp_path)
    assert not marker.exists()


def test_safe_child_confines_names(tmp_path):
    assert safe_child(tmp_path, "a/b.npy") == (tmp_path / "a" / "b.npy").resolve()
    (tmp_path / "link").symlink_to("/etc")
    for name in ("../x", "/etc/passwd", "a/../../x", "link/passwd", "", "a\x00b"):
        with pytest.raises(ArtifactError):
            safe_child(tmp_path, name)


# ---------------------------------------------------------------------------------------------
# a real CLI process: one line, exit status 2, no abort at interpreter exit
# ---------------------------------------------------------------------------------------------
def test_search_cli_process_bad_rows_one_line(criteo_sample, tmp_path):
    with open(criteo_sample, "rb") as f:
        rows = [next(f) for _ in range(50)]
    rows[9] = rows[9][:40] + b"\xff\n"  # a short line that also holds a byte that is not UTF-8
    src = tmp_path / "train.txt"
    src.write_bytes(b"".join(rows))
    proc = subprocess.run(
        [sys.executable, "-m", "mpe.search", "--dataset", "criteo", "--data", str(src), "--cache-dir",
         str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr  # 134 was an abort in pyarrow at interpreter exit
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.txt:10: column "), proc.stderr
    assert "not UTF-8" in lines[0]
    assert not (tmp_path / "run" / "report.json").exists()
