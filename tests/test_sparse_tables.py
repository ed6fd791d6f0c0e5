"""Sparse table gradients (ctr.sparse.enable_sparse_gradients) and LazyAdam on a torchrec EBC."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from ctr.model import build_ebc, field_rows
from ctr.sparse import (
    LazyAdam,
    disable_sparse_gradients,
    enable_sparse_gradients,
    sparse_table_parameters,
)
from data.batches import to_kjt

FIELDS = ["a", "b", "c"]
DIM = 4


class Tiny(nn.Module):
    """EBC (one table per field) -> [B, F, D] -> flatten -> linear -> logits [B]."""

    def __init__(self, cardinalities: list[int], dim: int = DIM, init_std: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.ebc = build_ebc(FIELDS, cardinalities, dim, init_std=init_std)
        self.head = nn.Linear(len(FIELDS) * dim, 1)

    def forward(self, ids: np.ndarray) -> torch.Tensor:
        rows = field_rows(self.ebc(to_kjt(ids, FIELDS)), FIELDS, self.dim)
        return self.head(rows.flatten(1)).squeeze(1)


def _tables(model: Tiny) -> list[torch.Tensor]:
    return [bag.weight for bag in model.ebc.embedding_bags.values()]


def _all_rows_batch(rng: np.random.Generator, cards: list[int], batch: int) -> np.ndarray:
    """ids [batch, F] in which every row of every table occurs at least once (with duplicates)."""
    cols = []
    for c in cards:
        col = np.concatenate([rng.permutation(c), rng.integers(0, c, batch - c)])
        cols.append(rng.permutation(col))
    return np.stack(cols, axis=1).astype(np.int64)


def _batches(seed: int, cards: list[int], batch: int, steps: int, high: list[int] | None = None):
    """``steps`` (ids [batch, F], labels [batch]) pairs; ids of field f in [0, high[f])."""
    rng = np.random.default_rng(seed)
    high = high or cards
    out = []
    for _ in range(steps):
        ids = np.stack([rng.integers(0, h, batch) for h in high], axis=1)
        out.append((ids, torch.as_tensor(rng.integers(0, 2, batch), dtype=torch.float32)))
    return out


def _train(model: Tiny, opt: torch.optim.Optimizer, batches) -> None:
    for ids, labels in batches:
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
        loss.backward()
        opt.step()


def _pair(cards: list[int], seed: int = 0) -> tuple[Tiny, Tiny]:
    """Two identical models: the first with sparse table gradients, the second dense."""
    torch.manual_seed(seed)
    sparse = Tiny(cards)
    dense = copy.deepcopy(sparse)
    enable_sparse_gradients(sparse)
    return sparse, dense


def test_enable_gives_sparse_grads_and_disable_restores_dense() -> None:
    torch.manual_seed(0)
    model = Tiny([5, 7, 3])
    assert sparse_table_parameters(model) == []
    tables = enable_sparse_gradients(model)
    assert [id(t) for t in tables] == [id(t) for t in _tables(model)]
    assert [id(t) for t in sparse_table_parameters(model)] == [id(t) for t in tables]
    ids = np.array([[1, 2, 0], [1, 3, 0], [4, 2, 2]])
    model(ids).sum().backward()
    for t, col in zip(tables, ids.T, strict=True):
        assert t.grad is not None and t.grad.is_sparse
        assert t.grad.shape == t.shape
        # uncoalesced: one entry per lookup, duplicates included
        assert not t.grad.is_coalesced() and t.grad._nnz() == len(col)
        assert set(t.grad.coalesce().indices()[0].tolist()) == set(col.tolist())
    assert model.head.weight.grad is not None and not model.head.weight.grad.is_sparse

    disable_sparse_gradients(model)
    assert sparse_table_parameters(model) == []
    model.zero_grad()
    model(ids).sum().backward()
    assert all(not t.grad.is_sparse for t in tables)


def test_sparse_grad_equals_dense_grad() -> None:
    sparse, dense = _pair([5, 7, 3])
    ids = np.array([[1, 2, 0], [1, 3, 0], [4, 2, 2], [1, 6, 1]])
    sparse(ids).square().sum().backward()
    dense(ids).square().sum().backward()
    for s, d in zip(_tables(sparse), _tables(dense), strict=True):
        torch.testing.assert_close(s.grad.to_dense(), d.grad)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lazy_adam_equals_adam_when_every_row_is_looked_up(weight_decay: float) -> None:
    cards = [5, 8, 3]
    sparse, dense = _pair(cards)
    lazy = LazyAdam(sparse.parameters(), lr=0.01, weight_decay=weight_decay)
    adam = torch.optim.Adam(dense.parameters(), lr=0.01, weight_decay=weight_decay, foreach=False)
    rng = np.random.default_rng(1)
    for step in range(25):
        ids = _all_rows_batch(rng, cards, 16)
        labels = torch.as_tensor(rng.integers(0, 2, 16), dtype=torch.float32)
        _train(sparse, lazy, [(ids, labels)])
        _train(dense, adam, [(ids, labels)])
        assert all(t.grad.is_sparse for t in _tables(sparse))
        if step in (0, 24):  # one step (the weight-decay check) and many
            for ps, pd in zip(sparse.parameters(), dense.parameters(), strict=True):
                torch.testing.assert_close(ps, pd)
    for ps, pd in zip(sparse.parameters(), dense.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(lazy.state[ps][key], adam.state[pd][key])
        assert float(lazy.state[ps]["step"]) == float(adam.state[pd]["step"]) == 25


def test_rows_never_looked_up_are_unchanged() -> None:
    cards, seen = [10, 12, 6], [4, 5, 6]  # ids of each field only in [0, seen)
    sparse, dense = _pair(cards)
    before = [t.detach().clone() for t in _tables(sparse)]
    lazy = LazyAdam(sparse.parameters(), lr=0.01, weight_decay=0.1)
    adam = torch.optim.Adam(dense.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    batches = _batches(2, cards, 32, 10, high=seen)
    _train(sparse, lazy, batches)
    _train(dense, adam, batches)
    for t, td, b, n in zip(_tables(sparse), _tables(dense), before, seen, strict=True):
        st = lazy.state[t]
        torch.testing.assert_close(t[n:], b[n:], rtol=0, atol=0)
        assert torch.count_nonzero(st["exp_avg"][n:]) == 0
        assert torch.count_nonzero(st["exp_avg_sq"][n:]) == 0
        assert not torch.equal(t[:n], b[:n])  # looked-up rows did move
        if n < len(b):  # dense Adam's weight decay moves the unseen rows too
            assert not torch.equal(td[n:], b[n:])


def test_checkpoint_resume_is_bit_exact() -> None:
    cards = [20, 9, 13]
    batches = _batches(3, cards, 24, 7, high=[15, 9, 10])  # some rows never seen
    k = 3

    def fresh() -> tuple[Tiny, LazyAdam]:
        torch.manual_seed(0)
        model = Tiny(cards)
        enable_sparse_gradients(model)
        return model, LazyAdam(model.parameters(), lr=0.02, weight_decay=0.01)

    model, opt = fresh()
    _train(model, opt, batches[:k])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, batches[k:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed, ropt = fresh()
    _train(resumed, ropt, batches[:1])  # perturb, so that the restore really has to overwrite
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    _train(resumed, ropt, batches[k:])

    for (name, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], ropt.state[b][key]), key


def test_lazy_adam_trains_a_logistic_model() -> None:
    cards = [50, 30, 20]
    rng = np.random.default_rng(4)
    true_w = [rng.normal(0.0, 1.5, c) for c in cards]
    torch.manual_seed(0)
    ebc = build_ebc(FIELDS, cards, 1, init_std=0.01)
    tables = enable_sparse_gradients(ebc)
    bias = nn.Parameter(torch.zeros(()))
    opt = LazyAdam([*tables, bias], lr=0.05)

    def batch(n: int) -> tuple[np.ndarray, torch.Tensor]:
        ids = np.stack([rng.integers(0, c, n) for c in cards], axis=1)
        logit = sum(w[ids[:, f]] for f, w in enumerate(true_w))
        labels = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        return ids, torch.as_tensor(labels, dtype=torch.float32)

    def loss_of(ids: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
        logits = field_rows(ebc(to_kjt(ids, FIELDS)), FIELDS, 1).sum(dim=(1, 2)) + bias
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    held_out = batch(4096)
    with torch.no_grad():
        initial = loss_of(*held_out).item()
    for _ in range(200):
        opt.zero_grad()
        loss_of(*batch(256)).backward()
        assert tables[0].grad.is_sparse
        opt.step()
    with torch.no_grad():
        final = loss_of(*held_out).item()
    assert final < 0.9 * initial, (initial, final)


def test_lazy_adam_rejects_bad_arguments_and_non_row_sparse_grads() -> None:
    p = nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(ValueError):
        LazyAdam([p], lr=-1.0)
    with pytest.raises(ValueError):
        LazyAdam([p], betas=(1.0, 0.999))
    opt = LazyAdam([p])
    p.grad = torch.ones(4, 2).to_sparse()  # two sparse dimensions
    with pytest.raises(ValueError, match="row-sparse"):
        opt.step()


# -- the trainer's lazy-Adam path (the single-process default) ---------------------------------
def _planted_split(n: int, seed: int):
    from data.batches import SplitArrays

    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, c, n) for c in (50, 40, 30)], axis=1).astype(np.int32)
    p = 1 / (1 + np.exp(-((ids[:, 0] % 5) - 2.0)))
    return SplitArrays(ids, (rng.random(n) < p).astype(np.float32))


def _ctr_model():
    from ctr.model import CTRModel, FP32Embedding
    from genlora_rec.towers import build_tower

    torch.manual_seed(0)
    return CTRModel(FP32Embedding(FIELDS, [50, 40, 30], DIM), build_tower("dnn", 3, DIM, (8,)))


def test_the_trainer_default_trains_the_tables_lazily_and_learns():
    from ctr.trainer import TrainConfig, Trainer, evaluate

    train, val = _planted_split(4000, 1), _planted_split(1000, 2)
    model = _ctr_model()
    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=100, lr=1e-2, progress=False))
    assert trainer.table_optimizer == "lazy_adam" and len(trainer.sparse_tables) == 3
    assert any(isinstance(o, LazyAdam) for o in trainer.optimizers)
    fit = trainer.fit(train, val, FIELDS)
    assert fit.best_auc > 0.7 and evaluate(model, val, FIELDS)["auc"] == pytest.approx(fit.best_auc)
    assert sparse_table_parameters(model) == []  # the model leaves as an ordinary module


def test_a_run_interrupted_mid_epoch_resumes_bit_exactly(tmp_path, monkeypatch):
    from ctr.trainer import TrainConfig, Trainer

    train, val = _planted_split(2000, 3), _planted_split(500, 4)
    cfg = TrainConfig(epochs=2, batch_size=100, lr=1e-2, evals_per_epoch=4, progress=False)
    ref = _ctr_model()
    Trainer(ref, cfg, out_dir=tmp_path / "ref").fit(train, val, FIELDS)

    class Interrupted(Exception):
        pass

    step = Trainer._step

    def dies_at_step_8(self, kjt, labels, i):
        if i == 7:  # after the checkpoint of step 5, in the middle of epoch 1
            raise Interrupted
        return step(self, kjt, labels, i)

    monkeypatch.setattr(Trainer, "_step", dies_at_step_8)
    with pytest.raises(Interrupted):
        Trainer(_ctr_model(), cfg, out_dir=tmp_path / "run").fit(train, val, FIELDS)
    monkeypatch.setattr(Trainer, "_step", step)
    got = _ctr_model()
    Trainer(got, cfg, out_dir=tmp_path / "run").fit(train, val, FIELDS, resume=True)
    for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
