"""MPE behaves like the paper: frequency decides the bits, seeds agree, unseen rows are pruned."""


import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctr.model import table_name
from data import sources
from mpe import pipeline, search
from mpe.bitwidths import packed_table_bytes
from mpe.config import MPEConfig
from mpe.embedding import MixedPrecisionEmbedding
from mpe.grouping import group_frequencies, spearman


def test_unseen_rows_look_up_as_zero_and_take_no_bytes():
    torch.manual_seed(0)
    pruned = np.array([False, True, False, False, True, False])  # field a rows 0-2, field b rows 3-5
    emb = MixedPrecisionEmbedding(["a", "b"], [3, 3], 4, np.array([0, 0, 1, 1, 0, 1]), np.ones(2),
                                  pruned_rows=pruned, pruned_as="zero")
    emb.fix_bits([4, 6])
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 2, 0, 1]), torch.ones(4, dtype=torch.int32))
    rows = emb(kjt)  # example 0: rows a1 (pruned), b0 (= global 3); example 1: a2, b1 (= global 4, pruned)
    assert torch.equal(rows[0, 0], torch.zeros(4)) and torch.equal(rows[1, 1], torch.zeros(4))
    assert rows[0, 1].abs().sum() > 0 and rows[1, 0].abs().sum() > 0
    assert emb.bits_per_row().tolist() == [4, 0, 6, 6, 0, 6]
    assert emb.num_bytes() == packed_table_bytes(np.array([4, 0, 6, 6, 0, 6]), 4, emb.candidates)
    assert emb.pruned_groups().tolist() == [False, False]
    with pytest.raises(ValueError, match="0 among the candidate"):
        MixedPrecisionEmbedding(["a"], [2], 4, np.array([0, 0]), np.ones(1), candidates=(2, 4),
                                pruned_rows=np.array([True, False]))


def test_pruned_rows_read_as_their_fields_oov_row():
    # field a rows 0-2 (row 0 in group 1: 4 bits), field b rows 3-5 (row 3 in group 0: pruned)
    torch.manual_seed(0)
    emb = MixedPrecisionEmbedding(["a", "b"], [3, 3], 4, np.array([1, 0, 1, 0, 0, 1]), np.ones(2))
    assert emb.pruned_as == "oov"
    emb.fix_bits([0, 4])
    assert emb.read_as_oov.tolist() == [False, True, False, False, False, False]
    kjt = KeyedJaggedTensor.from_lengths_sync(["a", "b"], torch.tensor([1, 0, 1, 2]), torch.ones(4, dtype=torch.int32))
    rows = emb(kjt)  # example 0: a1 (pruned, a0 has bits), a0; example 1: b1 (pruned, b0 too), b2
    assert torch.equal(rows[0, 0], rows[1, 0]) and rows[0, 0].abs().sum() > 0
    assert torch.equal(rows[0, 1], torch.zeros(4))
    rows[0, 0].sum().backward()  # the gradient of a1's lookup reaches the OOV row a0, not a1
    grad = emb.ebc.embedding_bags[table_name("a")].weight.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    zero = MixedPrecisionEmbedding(["a", "b"], [3, 3], 4, np.array([1, 0, 1, 0, 0, 1]), np.ones(2), pruned_as="zero")
    zero.fix_bits([0, 4])
    assert not zero.read_as_oov.any() and torch.equal(zero(kjt)[0, 0], torch.zeros(4))
    emb.set_phase("search")  # the search reads every row as itself
    assert not emb.read_as_oov.any()


@pytest.mark.slow
def test_selection_follows_frequency_and_is_stable_across_seeds(tmp_path):
    """At a fixed lambda on the synthetic generator (Zipf frequencies, rare values carry
    weaker effects) two seeds choose the same bits for >= 90% of the groups, and the bits
    rise with frequency (Spearman >= 0.3 over the groups seen in training; measured 0.37
    and 0.43, 60 of 64 groups equal).

    With the penalty weights of the earlier version (C_min collapsed to 1 by the one group
    never seen in training) the same run kept 1.5-1.9 mean bits per row instead of 0.2 and
    the two seeds agreed on 14 of the 64 groups (22%).
    """
    args = search.build_parser().parse_args([
        "--dataset", "criteo", "--synthetic", "50000", "--cache-dir", str(tmp_path), "--no-progress",
        "--groups", "64", "--hidden", "64", "32", "--batch-size", "1000", "--epochs", "2", "--lambda", "1e-2",
    ])
    data = sources.resolve(args, progress=False)
    chosen, correlations = [], []
    for seed in (2022, 2023):
        cfg = MPEConfig.from_args(args, dataset=data.dataset, seed=seed)
        model = pipeline.build_model(data, cfg)
        pipeline.search(model, data, cfg, out=None)
        bits, _ = pipeline.select(model, data, cfg, None)
        emb = model.embedding
        gfreq = group_frequencies(data.frequency(), emb.group_of_row.numpy())
        seen = ~emb.pruned_groups()
        correlations.append(spearman(gfreq[seen], bits[seen].astype(np.float64)))
        chosen.append(bits)
        weights = emb.penalty_weights.numpy()
        counts = gfreq * np.bincount(emb.group_of_row.numpy())
        c_min = counts[counts > 0].min()
        assert weights[counts > 0] == pytest.approx(c_min / counts[counts > 0], rel=1e-5)
        assert np.all(weights[counts == 0] == 1)
        assert np.all(bits[~seen] == 0)
    agree = float(np.mean(chosen[0] == chosen[1]))
    assert agree >= 0.9, (agree, [b.tolist() for b in chosen])
    assert min(correlations) >= 0.3, (correlations, [b.tolist() for b in chosen])
    for bits in chosen:  # the rarer half never keeps more bits than the more frequent half
        assert bits[:32].mean() <= bits[32:].mean()


def test_retrain_rows_restart_from_the_pre_search_init():
    # the retrain redraws build_model's initial rows from the seed instead of keeping a copy
    torch.manual_seed(7)
    emb = MixedPrecisionEmbedding(["a", "b"], [5, 4], 4, np.zeros(9, dtype=np.int64), np.ones(1))
    init = emb.global_weight()
    emb.load_global_weight(torch.randn(9, 4))
    state = torch.get_rng_state()
    emb.reinitialize_rows(7)
    assert torch.equal(emb.global_weight(), init)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    emb.reinitialize_rows(8)
    assert not torch.equal(emb.global_weight(), init)
