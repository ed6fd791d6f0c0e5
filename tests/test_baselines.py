"""The ``CompressedEmbedding`` contract, checked for every registered method.

For each method of kind train or post, at each default setting, on a tiny dataset (one
large field for the methods whose defaults reach x1000): forward gives finite float32
``[B, F, D]``; ``num_bytes()`` equals the payload bytes that ``export()`` writes;
``read_tables`` loads back exactly ``export_arrays()`` and the config; a class with
``from_export`` rebuilt from the export gives the same lookups; train methods learn (one
optimiser step with their own optimisers changes the lookup).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from baselines.base import HEADER_FILE, read_tables
from baselines.fp32 import FP32Tables
from baselines.registry import METHODS, MethodInputs, get_method
from ctr.model import CTRModel
from data.batches import to_kjt
from genlora_rec.towers import build_tower
from mpe.format import FORMAT as PACKED_FORMAT
from mpe.reader import load_packed_export

FIELDS = ["a", "b", "c", "d"]
CARD = [50, 7, 300, 1200]
DIM = 16
BATCH = 32
# Methods whose default ratios go to x1000: the tiny tables' 99,648 fp32 bytes give x1000 a
# budget of 99 bytes, less than one .npy header, so these get a large last field (the batch's
# ids stay within CARD, so the same KJT serves every method).
LARGE_CARD = [50, 7, 300, 200_000]
CONTRACT_CARD = {name: LARGE_CARD for name in ("robe", "ttrec", "hash", "cutoff")}  # settings up to x1000


def tiny_inputs(seed: int = 0, cards: list[int] = CARD) -> MethodInputs:
    """Zipf-like training counts per row (a few frequent rows, many rare or unseen ones)."""
    rng = np.random.default_rng(0)
    freq = np.concatenate([np.sort(rng.zipf(1.3, c).clip(max=10_000) - 1)[::-1] for c in cards]).astype(np.int64)
    return MethodInputs(FIELDS, list(cards), DIM, freq, seed)


def tiny_batch(seed: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, c, BATCH) for c in CARD], axis=1).astype(np.int32)
    ids[:4] = 0  # OOV rows too
    labels = torch.from_numpy((rng.random(BATCH) < 0.3).astype(np.float32))
    return to_kjt(ids, FIELDS), labels


def trained_fp32(inputs: MethodInputs) -> FP32Tables:
    """fp32 tables with spread-out rows, as after training (post-training methods convert these)."""
    torch.manual_seed(0)
    emb = get_method("fp32").build(inputs, "-")
    with torch.no_grad():
        for bag in emb.ebc.embedding_bags.values():
            bag.weight.normal_(0.0, 0.05)
    return emb


def build(name: str, setting: str):
    method = get_method(name)
    inputs = tiny_inputs(cards=CONTRACT_CARD.get(name, CARD))
    torch.manual_seed(0)
    if method.kind == "train":
        return method, method.build(inputs, setting)
    return method, method.convert(trained_fp32(inputs), inputs, setting)


def settings_of(name: str) -> list[str]:
    return list(get_method(name).settings)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_is_registered_with_settings(name: str) -> None:
    method = get_method(name)  # fails if the module is missing or the name is wrong
    assert method.name == name and method.kind in ("train", "post", "pipeline")
    assert method.settings and len(set(method.settings)) == len(method.settings)
    assert method.description
    if method.kind == "train":
        assert method.build is not None
    elif method.kind == "post":
        assert method.convert is not None


@pytest.mark.parametrize("name", list(METHODS))
def test_contract(name: str, tmp_path) -> None:
    if get_method(name).kind == "pipeline":
        pytest.skip("pipeline methods (MPE) are checked end to end in tests/test_auc_vs_size.py")
    kjt, labels = tiny_batch()
    for setting in settings_of(name):
        method, emb = build(name, setting)
        assert emb.method == name and emb.fields == FIELDS and emb.dim == DIM
        emb.eval()
        out = emb(kjt)
        assert out.shape == (BATCH, len(FIELDS), DIM) and out.dtype == torch.float32, setting
        assert torch.isfinite(out).all(), setting
        assert torch.equal(out, emb(kjt)), f"{name} {setting}: eval lookups are not deterministic"

        # num_bytes() is what export() writes, and the export loads back as written
        export_dir = tmp_path / f"{name}_{setting}"
        header = emb.export(export_dir)
        payload = {p.name: p.stat().st_size for p in export_dir.iterdir() if p.name != HEADER_FILE}
        assert set(payload) == set(header["files"]), setting
        assert sum(payload.values()) == emb.num_bytes() == header["total_bytes"], setting
        if header["format"] == PACKED_FORMAT:  # methods that reuse MPE's bit-packed export (lsq)
            assert torch.equal(load_packed_export(export_dir).lookup(emb.global_ids(kjt)), out), setting
            assert header["meta"]["config"] == json.loads(json.dumps(emb.export_config())), setting
        else:
            loaded_header, arrays = read_tables(export_dir)
            expected = emb.export_arrays()
            assert set(arrays) == set(expected), setting
            for key, array in expected.items():
                assert arrays[key].dtype == array.dtype and np.array_equal(arrays[key], array), (setting, key)
            assert loaded_header["method"] == name and loaded_header["fields"] == FIELDS and loaded_header["dim"] == DIM
            assert loaded_header["config"] == json.loads(json.dumps(emb.export_config())), setting
        if hasattr(type(emb), "from_export"):  # the export alone reproduces the lookups
            reloaded = type(emb).from_export(export_dir).eval()
            assert torch.equal(reloaded(kjt), out), f"{name} {setting}: reloaded export gives other rows"

        if method.kind == "train":
            # one training step with the method's own optimisers changes what the lookup returns
            emb.train()
            torch.manual_seed(0)
            model = CTRModel(emb, build_tower("dnn", len(FIELDS), DIM, (8,)))
            opts = method.optimizers(model, 1e-2) if method.optimizers else [torch.optim.Adam(model.parameters(), lr=1e-2)]
            emb.eval()
            before = emb(kjt).detach().clone()
            emb.train()
            for _ in range(3):
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
                extra = emb.extra_loss()
                if extra is not None:
                    assert extra.dim() == 0 and torch.isfinite(extra), setting
                    loss = loss + extra
                loss.backward()
                for opt in opts:
                    opt.step()
            emb.eval()
            assert not torch.equal(emb(kjt), before), f"{name} {setting}: training does not change the lookup"


def test_fp32_export_is_the_tables(tmp_path) -> None:
    emb = trained_fp32(tiny_inputs())
    assert emb.num_bytes() == sum(CARD) * DIM * 4 + len(FIELDS) * 128  # rows + one .npy header per field
    emb.export(tmp_path / "fp32")
    back = FP32Tables.from_export(tmp_path / "fp32")
    assert torch.equal(back.global_weight(), emb.global_weight())
    kjt, _ = tiny_batch()
    ids = emb.global_ids(kjt)
    assert torch.equal(emb(kjt), emb.global_weight()[ids])


def test_mpe_settings_are_target_ratios() -> None:
    from baselines.mpe_method import target_ratio

    assert [target_ratio(s) for s in get_method("mpe").settings] == [10.0, 50.0, 200.0, 500.0, 1000.0]
    assert target_ratio("x12.5") == 12.5
    for bad in ("10", "x1", "x", "x-3", "lam3e-4"):
        with pytest.raises(ValueError, match="target compression ratio"):
            target_ratio(bad)
