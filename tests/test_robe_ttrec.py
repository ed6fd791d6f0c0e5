"""ROBE-Z and TT-Rec: the rows they read, their sizes at a budget, gradients, learning.

The registry's contract (bytes on disk, reload) is in ``tests/test_baselines.py``; here each
method's own promise: ROBE reads the block the documented hash points to, TT-Rec's row is the
product of its core slices, both fill x10 / x100 / x1000 budgets without exceeding them,
gradients reach the stored parameters and a short training run learns planted click data.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from baselines.budget import budget_bytes
from baselines.registry import MethodInputs, get_method
from baselines.robe import (
    DEFAULT_BLOCK,
    ROBE_PRIME,
    RobeEmbedding,
    robe_bytes,
    robe_hash_params,
    robe_size,
)
from baselines.ttrec import (
    DEFAULT_RANK,
    MAX_RANK,
    TTEmbedding,
    fit_rank,
    tt_dim_shape,
    tt_export_bytes,
    tt_num_params,
    tt_ranks,
    tt_row_shape,
    tt_rows,
)
from ctr.model import DEFAULT_INIT_STD, CTRModel
from data.batches import to_kjt
from genlora_rec.towers import build_tower

DIM = 16
# the field sizes of the benchmark's 1M-row synthetic Criteo file (272,184 rows after min count 2)
CRITEO_1M = [38, 118, 73, 41, 315, 150, 69, 51, 109, 12, 32, 17, 54, 1461, 584, 30383, 28094, 306, 26,
             10187, 634, 4, 24844, 5684, 32765, 3195, 28, 12014, 25986, 11, 5653, 2175, 6, 20708, 20, 16,
             38009, 107, 28205]


def inputs_for(cards: list[int], dim: int = DIM, seed: int = 0) -> MethodInputs:
    fields = [f"f{i}" for i in range(len(cards))]
    return MethodInputs(fields, cards, dim, np.ones(sum(cards), dtype=np.int64), seed)


def offsets(cards: list[int]) -> list[int]:
    return [0, *itertools.accumulate(cards)][:-1]


# -- ROBE-Z ------------------------------------------------------------------------------------
def test_robe_hash_params_are_seeded_and_in_range() -> None:
    a = robe_hash_params(7)
    assert a.dtype == np.int64 and a.shape == (4,)
    assert np.array_equal(a, robe_hash_params(7)) and not np.array_equal(a, robe_hash_params(8))
    prime, mult, add_c, add = (int(v) for v in a)
    assert prime == ROBE_PRIME and 0 < mult < prime and 0 <= add_c < prime and 0 <= add < prime


@pytest.mark.parametrize("block", [1, 3, 4, 8])
def test_robe_row_is_the_hashed_blocks(block: int) -> None:
    """Every value of every row is read where the documented formula says (hand computation)."""
    cards, dim, size = [5, 9], 8, 37
    params = np.array([ROBE_PRIME, 1_234_567, 89_101, 4_242], dtype=np.int64)
    torch.manual_seed(0)
    emb = RobeEmbedding(["a", "b"], cards, dim, size, block, hash_params=params)
    ids = np.array([[0, 0], [4, 8], [2, 3]])
    out = emb(to_kjt(ids, ["a", "b"])).detach()
    array = emb.array.detach()
    prime, a, b, k = (int(v) for v in params)
    for row, col in itertools.product(range(ids.shape[0]), range(2)):
        g = offsets(cards)[col] + int(ids[row, col])
        for j in range(dim):
            start = ((a * g + b * (j // block) + k) % prime) % (size - block + 1)
            assert out[row, col, j] == array[start + j % block], (g, j)


def test_robe_default_block_is_one_window_per_row() -> None:
    """At D = 16 the default Z = min(32, D) = 16: a row is 16 consecutive array values."""
    emb = get_method("robe").build(inputs_for([100, 2000]), "x10")
    assert emb.block == min(DEFAULT_BLOCK, DIM) == 16
    pos = emb.positions(torch.arange(2100))
    assert torch.equal(pos - pos[:, :1], torch.arange(DIM).expand(2100, DIM))
    assert int(pos.min()) >= 0 and int(pos.max()) < emb.size


@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_robe_array_fills_the_budget(ratio: int) -> None:
    inputs = inputs_for(CRITEO_1M)
    budget = budget_bytes(inputs.fp32_bytes, ratio)
    emb = get_method("robe").build(inputs, f"x{ratio}")
    assert emb.num_bytes() == robe_bytes(emb.size) <= budget < robe_bytes(emb.size + 1)
    assert inputs.fp32_bytes / emb.num_bytes() >= ratio


def test_robe_refuses_a_budget_below_one_block() -> None:
    with pytest.raises(ValueError, match="less than one block"):
        robe_size(robe_bytes(15), 16)
    assert robe_size(robe_bytes(16), 16) == 16


def test_robe_gradient_lands_on_the_read_positions() -> None:
    torch.manual_seed(0)
    emb = RobeEmbedding(["a"], [50], 8, 64, 4, seed=3)
    ids = np.array([[3], [3], [17]])
    emb(to_kjt(ids, ["a"])).sum().backward()
    expected = torch.zeros(64)
    expected.index_put_((emb.positions(torch.tensor([3, 3, 17])).reshape(-1),), torch.ones(24), accumulate=True)
    assert torch.equal(emb.array.grad, expected)


def test_robe_export_reloads_the_trained_array(tmp_path) -> None:
    torch.manual_seed(0)
    emb = get_method("robe").build(inputs_for([30, 400], seed=5), "x20")
    with torch.no_grad():
        emb.array.normal_(0.0, 0.1)
    emb.export(tmp_path / "robe")
    back = RobeEmbedding.from_export(tmp_path / "robe")
    kjt = to_kjt(np.array([[1, 2], [29, 399]]), ["f0", "f1"])
    assert torch.equal(back(kjt), emb(kjt))
    assert np.array_equal(back.hash_params.numpy(), robe_hash_params(5))


# -- TT-Rec ------------------------------------------------------------------------------------
def test_tt_shapes() -> None:
    assert tt_row_shape(1200) == (11, 11, 10)
    assert tt_row_shape(1) == (1, 1, 1)
    for n in [*range(1, 300), 1200, 38009, 10**6, 10**6 + 1]:
        p = tt_row_shape(n)
        assert p[0] * p[1] * p[2] >= n and (p[0] - 1) ** 3 < n, n  # covers n, p1 = ceil(n^(1/3))
    assert tt_dim_shape(16) == (2, 2, 4) and tt_dim_shape(8) == (2, 2, 2) and tt_dim_shape(7) == (1, 1, 7)
    # r (p1 q1 + p3 q3) + r^2 p2 q2
    assert tt_num_params(1200, 16, 16) == 16 * (11 * 2 + 10 * 4) + 16 * 16 * 11 * 2


def test_tt_row_is_the_core_product() -> None:
    """Both ways of computing rows equal the explicit sum over the two inner ranks of the three
    core entries; the forward uses them for TT fields and the dense rows for the others."""
    torch.manual_seed(0)
    emb = TTEmbedding(["a", "b"], [7, 60], 8, [0, 3])
    p1, p2, p3 = emb.row_shapes[1]
    q1, q2, q3 = emb.dim_shape
    assert (p1, p2, p3) == (4, 4, 4) and (q1, q2, q3) == (2, 2, 2)
    g1, g2, g3 = (c.detach().double() for c in emb.field_cores(1))
    expected = torch.zeros(60, q1, q2, q3, dtype=torch.float64)
    for i in range(60):
        i1, i2, i3 = i // (p2 * p3), (i // p3) % p2, i % p3
        for j1, j2, j3, s, t in itertools.product(range(q1), range(q2), range(q3), range(3), range(3)):
            expected[i, j1, j2, j3] += g1[i1, 0, j1, s] * g2[i2, s, j2, t] * g3[i3, t, j3, 0]
    expected = expected.reshape(60, -1)
    for whole_table in (True, False):
        rows = tt_rows(emb.field_cores(1), torch.arange(60), whole_table=whole_table).detach().double()
        assert torch.allclose(rows, expected, rtol=1e-5, atol=1e-9), whole_table
    assert torch.allclose(emb.field_table(1).detach().double(), expected, rtol=1e-5, atol=1e-9)
    ids = np.array([[0, 0], [6, 59], [2, 37]])
    out = emb(to_kjt(ids, ["a", "b"])).detach().double()
    assert torch.allclose(out[:, 1], expected[ids[:, 1]], rtol=1e-5, atol=1e-9)
    assert torch.equal(out[:, 0], emb.dense.detach().double()[ids[:, 0]])  # the dense field


def test_tt_init_gives_rows_with_the_fp32_std() -> None:
    torch.manual_seed(0)
    emb = TTEmbedding(["a"], [20_000], DIM, [DEFAULT_RANK])
    rows = emb.field_table(0).detach()
    assert abs(float(rows.mean())) < 0.2 * DEFAULT_INIT_STD
    assert 0.7 * DEFAULT_INIT_STD < float(rows.std()) < 1.3 * DEFAULT_INIT_STD


def test_tt_small_tables_stay_dense() -> None:
    ranks = tt_ranks([4, 50, 300, 38009], DIM, DEFAULT_RANK)
    assert ranks == [0, 0, DEFAULT_RANK, DEFAULT_RANK]  # 50 x 16 = 800 floats < 2,432 for the cores
    emb = get_method("ttrec").build(inputs_for([4, 50, 300, 38009]), "r16")
    assert emb.ranks == ranks and tuple(emb.dense.shape) == (54, DIM)


@pytest.mark.parametrize("ratio", [10, 100, 1000])
def test_tt_rank_fills_the_budget(ratio: int) -> None:
    inputs = inputs_for(CRITEO_1M)
    budget = budget_bytes(inputs.fp32_bytes, ratio)
    emb = get_method("ttrec").build(inputs, f"x{ratio}")
    rank = max(emb.ranks)
    assert emb.num_bytes() == tt_export_bytes(CRITEO_1M, DIM, emb.ranks) <= budget
    assert inputs.fp32_bytes / emb.num_bytes() >= ratio
    assert rank == MAX_RANK or tt_export_bytes(CRITEO_1M, DIM, tt_ranks(CRITEO_1M, DIM, rank + 1)) > budget
    assert set(emb.ranks) <= {0, rank}


def test_tt_refuses_a_budget_below_rank_one() -> None:
    smallest = tt_export_bytes([50, 7, 300, 1200], DIM, tt_ranks([50, 7, 300, 1200], DIM, 1))
    with pytest.raises(ValueError, match="rank 1"):
        fit_rank([50, 7, 300, 1200], DIM, smallest - 1)
    assert fit_rank([50, 7, 300, 1200], DIM, smallest) == 1
    with pytest.raises(ValueError, match="TT rank"):
        get_method("ttrec").build(inputs_for([50]), "rank16")


def test_tt_gradients_reach_every_core_and_the_dense_rows() -> None:
    torch.manual_seed(0)
    emb = TTEmbedding(["a", "b"], [7, 500], DIM, [0, 4])
    emb(to_kjt(np.array([[1, 10], [2, 499]]), ["a", "b"])).square().sum().backward()
    for core in emb.field_cores(1):
        assert core.grad is not None and torch.count_nonzero(core.grad) > 0
    touched = torch.count_nonzero(emb.dense.grad.abs().sum(1))
    assert touched == 2  # rows 1 and 2 of the dense field


def test_tt_both_ways_give_the_same_gradients() -> None:
    torch.manual_seed(0)
    emb = TTEmbedding(["a"], [500], DIM, [5])
    ids, weight = torch.tensor([0, 17, 17, 499]), torch.randn(4, DIM)
    grads = []
    for whole_table in (True, False):
        emb.zero_grad()
        (tt_rows(emb.field_cores(0), ids, whole_table=whole_table) * weight).sum().backward()
        grads.append([c.grad.clone() for c in emb.field_cores(0)])
    for by_table, by_id in zip(*grads, strict=True):
        assert torch.allclose(by_table, by_id, rtol=1e-5, atol=1e-9)


def test_tt_export_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    emb = get_method("ttrec").build(inputs_for([9, 3000], seed=1), "x20")
    with torch.no_grad():
        for p in emb.parameters():
            p.normal_(0.0, 0.3)
    emb.export(tmp_path / "tt")
    back = TTEmbedding.from_export(tmp_path / "tt")
    kjt = to_kjt(np.array([[0, 0], [8, 2999], [4, 1234]]), ["f0", "f1"])
    assert back.ranks == emb.ranks and torch.equal(back(kjt), emb(kjt))


# -- both: a short training run learns planted clicks ------------------------------------------
@pytest.mark.parametrize(("name", "setting"), [("robe", "x4"), ("ttrec", "x4")])
def test_training_learns_planted_clicks(name: str, setting: str) -> None:
    cards = [400, 60]
    rng = np.random.default_rng(0)
    weights = [rng.normal(0.0, 1.5, c) for c in cards]  # planted per-id logits

    def batch(n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.stack([rng.integers(0, c, n) for c in cards], axis=1)
        logit = weights[0][ids[:, 0]] + weights[1][ids[:, 1]]
        return ids, (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

    torch.manual_seed(0)
    inputs = MethodInputs(["a", "b"], cards, 8, np.ones(sum(cards), dtype=np.int64), 0)
    model = CTRModel(get_method(name).build(inputs, setting), build_tower("dnn", 2, 8, (16,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    test_ids, test_labels = batch(4000)
    for _ in range(150):
        ids, labels = batch(256)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(to_kjt(ids, ["a", "b"])), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        scores = model(to_kjt(test_ids, ["a", "b"])).numpy()
    oracle = roc_auc_score(test_labels, weights[0][test_ids[:, 0]] + weights[1][test_ids[:, 1]])
    auc = roc_auc_score(test_labels, scores)
    assert auc > 0.5 + 0.7 * (oracle - 0.5), (auc, oracle)
