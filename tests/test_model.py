"""Towers, the fp32 torchrec embedding, KJT batching and the trainer on in-memory data."""

import numpy as np
import pytest
import torch

from ctr.model import CTRModel, FP32Embedding
from ctr.trainer import NonFiniteLossError, TrainConfig, Trainer, evaluate
from data.batches import SplitArrays, iter_batches, to_kjt
from genlora_rec.towers import build_tower

FIELDS = ["a", "b", "c"]
CARD = [7, 11, 5]


def planted(n: int, seed: int) -> SplitArrays:
    """Labels depend on field a's id and an a x b interaction: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, c, n) for c in CARD], axis=1).astype(np.int32)
    logit = (ids[:, 0] - 3) * 0.8 + np.where((ids[:, 0] + ids[:, 1]) % 2 == 0, 1.0, -1.0)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return SplitArrays(ids, labels)


def test_kjt_layout_matches_ids():
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int32)
    kjt = to_kjt(ids, FIELDS)
    assert kjt.keys() == FIELDS
    assert kjt["b"].values().tolist() == [2, 5]
    assert kjt.stride() == 2


def test_fp32_embedding_returns_rows_per_field():
    torch.manual_seed(0)
    emb = FP32Embedding(FIELDS, CARD, dim=4)
    ids = np.array([[1, 2, 3], [6, 10, 4]], dtype=np.int32)
    out = emb(to_kjt(ids, FIELDS))
    assert out.shape == (2, 3, 4)
    w = emb.global_weight()
    assert torch.equal(out[1, 1], w[7 + 10])
    assert emb.num_bytes() == sum(CARD) * 4 * 4


@pytest.mark.parametrize("tower", ["dnn", "deepfm", "dcnv2"])
def test_towers_shapes_and_gradients(tower):
    torch.manual_seed(0)
    t = build_tower(tower, num_fields=3, dim=4, hidden=(8, 4))
    x = torch.randn(5, 3, 4, requires_grad=True)
    y = t(x)
    assert y.shape == (5,)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_tower_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tower 'mlp'"):
        build_tower("mlp", 3, 4)


def test_trainer_learns_planted_signal_and_keeps_best(tmp_path):
    torch.manual_seed(0)
    train, val, test = planted(6000, 1), planted(1000, 2), planted(1000, 3)
    model = CTRModel(FP32Embedding(FIELDS, CARD, 8), build_tower("dnn", 3, 8, (32, 16)))
    before = evaluate(model, test, FIELDS)["auc"]
    cfg = TrainConfig(epochs=4, batch_size=256, lr=3e-3, progress=False, evals_per_epoch=2)
    fit = Trainer(model, cfg, out_dir=tmp_path).fit(train, val, FIELDS)
    after = evaluate(model, test, FIELDS)
    assert after["auc"] > 0.75 > before + 0.1
    assert fit.best_auc == max(h["auc"] for h in fit.history)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "checkpoint.json").exists()


def test_trainer_resume_continues_to_same_weights(tmp_path):
    train, val = planted(2000, 1), planted(500, 2)

    def run(epochs, out, resume=False):
        torch.manual_seed(0)
        model = CTRModel(FP32Embedding(FIELDS, CARD, 4), build_tower("dnn", 3, 4, (8,)))
        cfg = TrainConfig(epochs=epochs, batch_size=200, progress=False, patience=99)
        Trainer(model, cfg, out_dir=out).fit(train, val, FIELDS, resume=resume)
        return model

    full = run(2, tmp_path / "full")
    run(1, tmp_path / "part")
    resumed = run(2, tmp_path / "part", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def test_nan_loss_stops_with_step():
    train = planted(500, 1)
    model = CTRModel(FP32Embedding(FIELDS, CARD, 4), build_tower("dnn", 3, 4, (8,)))
    with torch.no_grad():
        model.tower.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        Trainer(model, TrainConfig(batch_size=100, progress=False)).fit(train, train, FIELDS)


def test_iter_batches_covers_every_row_once():
    data = planted(1003, 0)
    seen = sum(len(y) for _, y in iter_batches(data, FIELDS, 100, shuffle=True, seed=3))
    assert seen == 1003
