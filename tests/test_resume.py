"""Interrupted runs and numerical faults.

A real ``python -m mpe.search`` is killed with SIGKILL during the search and again during the
retrain, resumed with ``--resume`` each time, and must end with exactly the result of an
uninterrupted run with the same seed. The trainer keeps its last good checkpoint when the loss
or the predictions become NaN/inf, and refuses to resume from a checkpoint or a stage file that
belongs to other settings.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctr.model import CTRModel, FP32Embedding
from ctr.trainer import CHECKPOINT, CHECKPOINT_META, NonFiniteLossError, TrainConfig, Trainer
from data.artifacts import ArtifactError, atomic_write_json, read_json
from data.batches import SplitArrays
from genlora_rec.towers import build_tower
from mpe import run_dir
from mpe.config import MPEConfig, SearchConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "criteo", "--synthetic", "8000", "--hidden", "16", "--batch-size", "400", "--groups", "8",
        "--epochs", "2", "--evals-per-epoch", "4", "--seed", "7", "--target-ratio", "30"]  # budget multiplier


# One intra-op thread: with two OpenMP threads on a busy 2-core machine a step here takes ~60x
# longer (spin-waiting threads). Multi-threaded determinism is checked in-process below.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def mpe_search(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mpe.search", *TINY, "--cache-dir", str(cache), "--out", str(out), *extra]


def kill_when(cmd: list[str], ready: Callable[[], bool], log: Path, timeout: float = 300) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds (it must not finish first)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if ready():
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == -signal.SIGKILL, f"the run ended on its own (rc {rc}) before the kill point:\n{log.read_text()[-3000:]}"


def run_to_end(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_sigkilled_search_resumes_to_the_same_bits(tmp_path):
    cache = tmp_path / "cache"
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    run_to_end(mpe_search(ref_out, cache, "--no-progress"))  # also generates and prepares the data
    ref = json.loads((ref_out / "report.json").read_text())

    # 1) killed during the search, right after its first checkpoint
    kill_when(mpe_search(out, cache), lambda: (out / "search" / CHECKPOINT_META).exists(), tmp_path / "kill1.log")
    stages = read_json(out / "stages.json") if (out / "stages.json").exists() else {}
    assert "search" not in stages and not (out / "report.json").exists()

    # 2) resumed, then killed during the retrain: the search stage is recorded by then
    kill_when(mpe_search(out, cache, "--resume"), lambda: (out / "retrain" / CHECKPOINT_META).exists(),
              tmp_path / "kill2.log")
    assert f"resumed from {out / 'search' / CHECKPOINT}" in (tmp_path / "kill2.log").read_text()
    assert {"search", "bits"} <= set(read_json(out / "stages.json")) and not (out / "report.json").exists()

    # 3) resumed to the end
    log = run_to_end(mpe_search(out, cache, "--resume"))
    assert f"resumed from {out / 'retrain' / CHECKPOINT}" in log
    got = json.loads((out / "report.json").read_text())
    assert got["bits_per_group"] == ref["bits_per_group"]
    assert got["probabilities"] == ref["probabilities"]
    assert got["budget_multiplier"] == ref["budget_multiplier"]  # its state resumed from the checkpoint
    for key in ("search_val_auc", "retrain_val_auc", "packed_bytes"):
        assert got[key] == ref[key], key
    assert got["test"] == ref["test"]
    assert (out / "export" / "header.json").is_file()


def test_mpe_gradients_are_deterministic_with_threads():
    """Same batch, same weights -> bit-identical gradients, also with 2 intra-op threads (the
    backward of advanced indexing by group used to sum in a varying order, so a resumed search
    drifted from an uninterrupted one and could select other bits)."""
    from data.batches import to_kjt
    from mpe.embedding import MixedPrecisionEmbedding

    cards = [500] * 8
    rng = np.random.default_rng(0)
    group_of_row = rng.integers(0, 8, sum(cards))
    ids = np.stack([rng.integers(0, c, 2000) for c in cards], axis=1)
    kjt = to_kjt(ids, [f"f{i}" for i in range(8)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for phase in ("search", "fixed"):
            grads = []
            for _ in range(3):
                torch.manual_seed(0)
                emb = MixedPrecisionEmbedding([f"f{i}" for i in range(8)], cards, 16, group_of_row, np.ones(8))
                if phase == "fixed":
                    emb.fix_bits(np.arange(8) % 7)
                (emb(kjt) * torch.linspace(-1, 1, 16)).sum().backward()
                grads.append([p.grad.clone() for p in emb.parameters() if p.grad is not None])
            assert all(torch.equal(a, b) for g in grads[1:] for a, b in zip(grads[0], g, strict=True)), phase
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# trainer: resume corner cases, foreign checkpoints, NaN
# ---------------------------------------------------------------------------------------------
FIELDS, CARD = ["a", "b", "c"], [11, 7, 5]


def planted(n: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, c, n) for c in CARD], axis=1).astype(np.int32)
    p = 1 / (1 + np.exp(-(ids[:, 0] % 3 - 1.0) * 2))
    return SplitArrays(ids, (rng.random(n) < p).astype(np.float32))


def small_model(seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    return CTRModel(FP32Embedding(FIELDS, CARD, 4), build_tower("dnn", 3, 4, (8,)))


def test_resume_after_early_stop_trains_no_further(tmp_path):
    train, val = planted(1000, 1), planted(300, 2)
    cfg = TrainConfig(epochs=3, batch_size=100, lr=0.0, patience=1, evals_per_epoch=5, progress=False)
    first = Trainer(small_model(), cfg, out_dir=tmp_path).fit(train, val, FIELDS)
    assert first.stopped_early and first.steps < 30  # lr 0: no gain after the first validation
    # as if killed right after the validation that stopped it: the saved position says "go on"
    resumed = Trainer(small_model(), cfg, out_dir=tmp_path).fit(train, val, FIELDS, resume=True)
    assert resumed.steps == first.steps and resumed.stopped_early


def test_foreign_or_damaged_checkpoint_is_a_clear_error(tmp_path):
    train, val = planted(400, 1), planted(200, 2)
    cfg = TrainConfig(epochs=1, batch_size=100, progress=False)
    Trainer(small_model(), cfg, out_dir=tmp_path).fit(train, val, FIELDS)
    other = CTRModel(FP32Embedding(FIELDS, CARD, 4), build_tower("dnn", 3, 4, (16,)))
    with pytest.raises(ArtifactError, match="does not fit this model"):
        Trainer(other, cfg, out_dir=tmp_path).fit(train, val, FIELDS, resume=True)
    meta = read_json(tmp_path / CHECKPOINT_META)
    del meta["sha256"]
    atomic_write_json(tmp_path / CHECKPOINT_META, meta)
    with pytest.raises(ArtifactError, match="no sha256"):
        Trainer(small_model(), cfg, out_dir=tmp_path).fit(train, val, FIELDS, resume=True)


class NaNAfter(nn.Module):
    """A ``CTRModel`` whose ``extra_loss`` becomes NaN from training step ``bad_step`` (1-based)."""

    def __init__(self, model: CTRModel, bad_step: int):
        super().__init__()
        self.model, self.bad_step, self.calls = model, bad_step, 0

    def forward(self, kjt):
        return self.model(kjt)

    def extra_loss(self) -> torch.Tensor:
        self.calls += 1
        return torch.tensor(math.nan if self.calls >= self.bad_step else 0.0)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    train, val = planted(1000, 1), planted(200, 2)
    cfg = TrainConfig(epochs=1, batch_size=100, evals_per_epoch=5, patience=99, progress=False)
    model = NaNAfter(small_model(), bad_step=7)  # validations after steps 2, 4, 6
    with pytest.raises(NonFiniteLossError) as e:
        Trainer(model, cfg, out_dir=tmp_path).fit(train, val, FIELDS)
    assert "training loss became nan at step 7" in str(e.value)
    assert f"last good checkpoint is kept: {tmp_path / CHECKPOINT}" in str(e.value)
    assert read_json(tmp_path / CHECKPOINT_META)["position"]["step"] == 6
    good = NaNAfter(small_model(), bad_step=10**9)
    position, _, history = Trainer(good, cfg, out_dir=tmp_path).load_checkpoint()
    assert position["step"] == 6 and len(history) == 3
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_nan_predictions_stop_at_the_validation(tmp_path):
    train, val = planted(400, 1), planted(200, 2)
    model = small_model()

    def poison(module, inputs, output):  # finite while training, NaN in eval mode
        return output if module.training else output * math.nan

    model.tower.register_forward_hook(poison)
    cfg = TrainConfig(epochs=1, batch_size=100, evals_per_epoch=2, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"NaN or infinite.*validation after step 2; no checkpoint"):
        Trainer(model, cfg, out_dir=tmp_path).fit(train, val, FIELDS)
    assert not (tmp_path / CHECKPOINT).exists()


# ---------------------------------------------------------------------------------------------
# mpe.search stages.json
# ---------------------------------------------------------------------------------------------
def test_stages_refuse_other_settings_and_edits(tmp_path):
    cfg = MPEConfig(search=SearchConfig(groups=8), train=TrainConfig(epochs=2))
    path = tmp_path / "stages.json"
    run_dir._save_stages(path, {"bits": [1] * 8, "selection": {"strategy": "threshold"}}, cfg)
    assert run_dir._load_stages(path, cfg)["bits"] == [1] * 8
    assert run_dir._load_stages(path, MPEConfig(search=SearchConfig(groups=8), train=TrainConfig(epochs=2, progress=False)))
    with pytest.raises(ArtifactError, match=r"other settings \(search.groups, train.epochs differ\)"):
        run_dir._load_stages(path, MPEConfig(search=SearchConfig(groups=16), train=TrainConfig(epochs=3)))
    stages = read_json(path)
    stages["bits"] = [6] * 8
    atomic_write_json(path, stages)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        run_dir._load_stages(path, cfg)
    path.write_text('{"bits": [1, 2')  # truncated
    with pytest.raises(ArtifactError, match="not valid JSON"):
        run_dir._load_stages(path, cfg)
    assert run_dir._load_stages(tmp_path / "absent.json", cfg) == {}
