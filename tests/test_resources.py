"""data.resources: a stage that cannot fit is refused before it starts, with one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from ctr.model import CTRModel, FP32Embedding
from ctr.trainer import TrainConfig, Trainer
from data.batches import SplitArrays
from data.resources import SKIP_ENV, InsufficientResourcesError, check_disk, check_memory
from genlora_rec.towers import build_tower


def test_disk_and_memory_checks_name_what_is_needed_and_what_there_is(tmp_path, monkeypatch):
    check_disk(tmp_path, 1, "a small stage")
    check_memory(1, "a small stage")
    with pytest.raises(InsufficientResourcesError, match=r"needs about 1000000\.0 GB of disk at .* GB are free"):
        check_disk(tmp_path / "not" / "yet", 10**15, "data.prepare")
    with pytest.raises(InsufficientResourcesError, match=r"training needs about 1000000\.0 GB of memory"):
        check_memory(10**15, "training")
    monkeypatch.setenv(SKIP_ENV, "1")
    check_disk(tmp_path, 10**15, "data.prepare")
    check_memory(10**15, "training")


def test_training_that_cannot_fit_is_refused_before_the_first_step(monkeypatch):
    rng = np.random.default_rng(0)
    data = SplitArrays(rng.integers(0, 10, (64, 2)).astype(np.int32), rng.random(64).astype(np.float32))
    model = CTRModel(FP32Embedding(["a", "b"], [10, 10], 4), build_tower("dnn", 2, 4, (8,)))
    trainer = Trainer(model, TrainConfig(batch_size=16, progress=False))
    assert trainer.memory_needed(2) >= 3 * (2 * 10 * 4 * 4)  # two Adam moments + the best copy of the tables
    monkeypatch.setattr("data.resources.available_memory_bytes", lambda: 1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InsufficientResourcesError, match="training needs about"):
        trainer.fit(data, data, ["a", "b"])
    assert all(np.array_equal(before[k].numpy(), v.numpy()) for k, v in model.state_dict().items())
