"""Multi-process training: batch slicing, gathering, key order, and a real 2-process
``torchrun -m mpe.search`` over gloo against the single-process run with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr import distributed
from ctr.distributed import DistEnv
from ctr.model import field_rows
from data.batches import SplitArrays, iter_batches

ROOT = Path(__file__).resolve().parents[1]


def _env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank, world, rank, torch.device("cpu"), "gloo")


def test_rank_slices_are_disjoint_equal_and_cover_the_batch():
    split = SplitArrays(np.arange(23 * 2, dtype=np.int32).reshape(23, 2), np.zeros(23, dtype=np.float32))
    per_rank = [list(iter_batches(split, ["a", "b"], 10, shuffle=True, seed=3, rank_of=(r, 3))) for r in range(3)]
    whole = list(iter_batches(split, ["a", "b"], 10, shuffle=True, seed=3))
    # 10, 10, 3 rows: 3 rows each, 3 each, 1 each; every rank the same number of batches
    assert [len(p) for p in per_rank] == [3, 3, 3]
    for b, (kjt, _) in enumerate(whole):
        full = kjt.values().view(2, -1)[0]
        parts = [per_rank[r][b][0].values().view(2, -1)[0] for r in range(3)]
        assert len({len(p) for p in parts}) == 1
        got = torch.cat(parts)
        assert torch.equal(got, full[: len(got)])
    # a last batch smaller than the world is dropped on every rank
    tiny = SplitArrays(split.ids[:21], split.labels[:21])
    assert [len(list(iter_batches(tiny, ["a", "b"], 10, rank_of=(r, 3)))) for r in range(3)] == [2, 2, 2]


def test_eval_ranges_are_contiguous_and_cover_the_split_in_order():
    for rows, world in ((11, 4), (2, 4), (0, 3), (4_600_000, 2)):
        ranges = [distributed.eval_range(rows, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_field_rows_reorders_sharded_keys():
    from torchrec import KeyedTensor

    b, d = 3, 2
    a, c, bb = (torch.full((b, d), float(v)) for v in (1, 3, 2))
    kt = KeyedTensor(keys=["a", "c", "b"], length_per_key=[d, d, d], values=torch.cat([a, c, bb], dim=1))
    rows = field_rows(kt, ["a", "b", "c"], d)
    assert rows.shape == (b, 3, d)
    assert rows[:, :, 0].tolist() == [[1.0, 2.0, 3.0]] * b


def test_embedding_optimizer_choice():
    cpu2 = _env(0, 2)
    assert distributed.resolve_embedding_optimizer("auto", None) == "lazy_adam"
    assert distributed.resolve_embedding_optimizer("adam", None) == "adam"
    assert distributed.resolve_embedding_optimizer("auto", cpu2) == "adagrad"
    with pytest.raises(ValueError, match="single-process"):
        distributed.resolve_embedding_optimizer("lazy_adam", cpu2)
    with pytest.raises(ValueError, match="no fused Adam"):
        distributed.resolve_embedding_optimizer("adam", cpu2)
    with pytest.raises(ValueError, match="unknown embedding optimizer"):
        distributed.resolve_embedding_optimizer("lamb", None)


def test_single_process_in_backward_table_optimizer_trains_and_leaves_the_model_plain():
    """--embedding-optimizer adagrad in one process: tables stepped in backward, on a copy."""
    from ctr.model import CTRModel, FP32Embedding
    from ctr.trainer import TrainConfig, Trainer
    from genlora_rec.towers import build_tower

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, size=(600, 2)).astype(np.int32)
    labels = (ids[:, 0] % 2).astype(np.float32)
    split = SplitArrays(ids, labels)
    torch.manual_seed(0)
    model = CTRModel(FP32Embedding(["a", "b"], [20, 20], 8), build_tower("dnn", 2, 8, (8,)))
    before = model.embedding.global_weight()
    cfg = TrainConfig(epochs=3, batch_size=100, lr=1e-2, embedding_optimizer="adagrad", embedding_lr=0.1,
                      progress=False)
    fit = Trainer(model, cfg).fit(split, split, ["a", "b"])
    assert fit.best_auc > 0.9
    assert not torch.equal(model.embedding.global_weight(), before)
    assert not any(distributed.in_backward(p) for p in model.parameters())


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_two_process_search_matches_single_process(tmp_path):
    common = ["--dataset", "criteo", "--synthetic", "20000", "--hidden", "64", "32", "--batch-size", "1000",
              "--groups", "16", "--epochs", "2", "--embedding-optimizer", "adagrad", "--embedding-lr", "0.01",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    _run([sys.executable, "-m", "mpe.search", *common, "--out", str(tmp_path / "one")], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "mpe.search", *common, "--out", str(tmp_path / "two")], tmp_path)
    assert "sharding plan (2 processes, gloo)" in two.stdout and "table_wise" in two.stdout

    one_r = json.loads((tmp_path / "one" / "report.json").read_text())
    two_r = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one_r["processes"] == 1 and two_r["processes"] == 2
    d = two_r["distributed"]
    assert d["world_size"] == 2 and d["backend"] == "gloo" and d["embedding_optimizer"] == "adagrad"
    digests = d["bits_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks chose the same bits
    for stage in ("search", "retrain"):
        losses = [h["train_loss"] for h in two_r["history"][stage]]
        assert np.mean(losses[-2:]) < losses[0], (stage, losses)
    # the same model, data and seed: the sharded run lands close to the single-process one
    assert two_r["test"]["auc"] > 0.65
    assert abs(two_r["test"]["auc"] - one_r["test"]["auc"]) < 0.03
    assert two_r["export_test_auc"] == pytest.approx(two_r["test"]["auc"], abs=1e-9)
    # rank 0 alone wrote the run: one report, one export, nothing per rank
    names = {p.name for p in (tmp_path / "two").iterdir()}
    assert {"report.json", "model.pt", "model.json", "export"} <= names
    assert not any("rank" in n for n in names)
