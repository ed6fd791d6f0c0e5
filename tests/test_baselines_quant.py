"""The quantization baselines: uniform LSQ+ (``lsq``), torchrec PTQ (``ptq``) and ALPT (``alpt``).

On a tiny synthetic Avazu-format dataset (generated and prepared once per session): forward
shapes, training lowers the loss, ``num_bytes()`` is what ``export()`` writes, bytes shrink
with the bits, an export read back gives the same lookups; ALPT's weights stay integer codes
(no fp32 copy) and move by stochastic rounding; PTQ's rows stay within rowwise quantization
error of the fp32 rows and take the bytes torchrec really allocates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from baselines.alpt import ALPTEmbedding, ALPTOptimizer
from baselines.base import HEADER_FILE
from baselines.ptq import TorchrecPTQEmbedding
from baselines.registry import MethodInputs, get_method
from baselines.uniform import UniformLSQEmbedding
from ctr.model import CTRModel
from data.batches import PreparedDataset, iter_batches, to_kjt
from data.prepare import prepare
from data.synthetic import generate
from encoding.sizes import bucket_code_bytes, npy_file_bytes
from encoding.torchrec_rows import torchrec_row_bytes
from genlora_rec.towers import build_tower
from mpe.reader import load_packed_export

DIM = 16  # the project default; at D = 8 torchrec stores INT8, INT4 and INT2 rows in 16 bytes alike
QUANT = ["lsq", "ptq", "alpt"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedDataset:
    """4,000 synthetic Avazu rows (24 fields, ~3,000 rows in all tables), prepared."""
    tmp = tmp_path_factory.mktemp("quant_data")
    generate("avazu", 4000, tmp / "raw.csv", seed=3, progress=False)
    prepare("avazu", tmp / "raw.csv", tmp / "prepared", progress=False)
    return PreparedDataset(tmp / "prepared")


def inputs(data: PreparedDataset) -> MethodInputs:
    return MethodInputs(list(data.fields), list(data.cardinalities), DIM, data.frequency(), seed=0)


def first_batch(data: PreparedDataset, size: int = 512):
    return next(iter_batches(data.split("train"), data.fields, size))


def tower(data: PreparedDataset) -> torch.nn.Module:
    return build_tower("dnn", len(data.fields), DIM, (16,))


def fp32_model(data: PreparedDataset, steps: int = 10) -> CTRModel:
    """An fp32 model trained for a few steps (the input of the post-training method)."""
    torch.manual_seed(0)
    model = CTRModel(get_method("fp32").build(inputs(data), "-"), tower(data))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = list(iter_batches(data.split("train"), data.fields, 256))
    for i in range(steps):
        kjt, labels = batches[i % len(batches)]
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels).backward()
        opt.step()
    model.eval()
    return model


def make(name: str, setting: str, data: PreparedDataset, fp32: CTRModel | None = None):
    """(model, optimisers) for ``name`` at ``setting``, seeded."""
    method = get_method(name)
    torch.manual_seed(0)
    if method.kind == "post":
        emb = method.convert(copy.deepcopy(fp32.embedding), inputs(data), setting)
        return CTRModel(emb, copy.deepcopy(fp32.tower)), []
    model = CTRModel(method.build(inputs(data), setting), tower(data))
    opts = method.optimizers(model, 1e-2) if method.optimizers else [torch.optim.Adam(model.parameters(), lr=1e-2)]
    return model, opts


def train_steps(model: CTRModel, opts, kjt, labels, steps: int) -> list[float]:
    model.train()
    losses = []
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def payload_bytes(export_dir) -> int:
    return sum(p.stat().st_size for p in export_dir.iterdir() if p.name != HEADER_FILE)


@pytest.fixture(scope="module")
def fp32(data) -> CTRModel:
    return fp32_model(data)


# -- every method ------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANT)
def test_forward_export_and_read_back(name, data, fp32, tmp_path) -> None:
    kjt, _ = first_batch(data)
    sizes = {}
    for setting in get_method(name).settings:
        model, _ = make(name, setting, data, fp32)
        emb = model.embedding
        emb.eval()
        out = emb(kjt)
        assert out.shape == (kjt.stride(), len(data.fields), DIM) and out.dtype == torch.float32
        header = emb.export(tmp_path / setting)
        assert payload_bytes(tmp_path / setting) == emb.num_bytes() == header["total_bytes"], setting
        sizes[setting] = emb.num_bytes()
        if name == "lsq":
            back = load_packed_export(tmp_path / setting).lookup(emb.global_ids(kjt))
        elif name == "ptq":
            back = TorchrecPTQEmbedding.from_export(tmp_path / setting).eval()(kjt)
        else:
            back = ALPTEmbedding.from_export(tmp_path / setting).eval()(kjt)
        assert torch.equal(back, out), f"{name} {setting}: the export read back gives other rows"
    # settings are listed from the widest to the narrowest bit-width
    values = list(sizes.values())
    if name == "ptq":  # torchrec: INT4 and INT2 rows take the same bytes at small D (scale/bias + alignment)
        rows = [torchrec_row_bytes(b, DIM) for b in (8, 4, 2)]  # pinned layout: 32, 16, 16 at D = 16
        assert values[0] > values[1] >= values[2], sizes
        assert (values[1] == values[2]) == (rows[1] == rows[2]), (sizes, rows)
    else:
        assert all(a > b for a, b in zip(values, values[1:], strict=False)), sizes
    assert values[0] < inputs(data).fp32_bytes


@pytest.mark.parametrize(("name", "setting"), [("lsq", "4"), ("alpt", "int8"), ("alpt", "int4")])
def test_training_lowers_the_loss(name, setting, data) -> None:
    kjt, labels = first_batch(data, 256)
    model, opts = make(name, setting, data)
    losses = train_steps(model, opts, kjt, labels, 12)
    assert losses[-1] < 0.7 * losses[0], losses


def test_bits_parse_and_reject() -> None:
    from baselines import alpt, ptq, uniform

    assert [uniform.parse_bits(s) for s in ("8", "int6", "1")] == [8, 6, 1]
    assert [alpt.parse_bits(s) for s in ("int8", "int4", "6")] == [8, 4, 6]
    for bad in ("0", "9", "x8", "", "int"):
        with pytest.raises(ValueError, match="lsq setting"):
            uniform.parse_bits(bad)
    for bad in ("int1", "int16", "fp8"):
        with pytest.raises(ValueError, match="alpt setting"):
            alpt.parse_bits(bad)
    with pytest.raises(ValueError, match="ptq setting"):
        ptq.parse_data_type("int3")


# -- lsq ---------------------------------------------------------------------------------
def test_lsq_is_mpe_at_one_bit_width(data, tmp_path) -> None:
    model, _ = make("lsq", "4", data)
    emb: UniformLSQEmbedding = model.embedding
    assert emb.candidates == (4,) and set(emb.bits_per_row().tolist()) == {4}
    emb.eval()
    kjt, _ = first_batch(data)
    out = emb(kjt)
    # every looked-up value is code * step + offset with a 4-bit code
    codes = (out - emb.quantizer.beta.detach()) / emb.quantizer.steps().detach()
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -8.001 and codes.max() <= 7.001
    header = emb.export(tmp_path / "e")
    n = emb.num_rows()
    assert header["files"]["bucket_b4.bin"]["bytes"] == bucket_code_bytes(n, 4, DIM) == (n * DIM * 4 + 7) // 8
    assert load_packed_export(tmp_path / "e").bucket_rows() == {4: n}
    # the quantizer's step and offset have their own optimiser
    opts = get_method("lsq").optimizers(model, 1e-3)
    assert {id(p) for p in opts[0].param_groups[0]["params"]} == {id(p) for p in emb.quantizer.parameters()}


# -- ptq ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "bits"), [("int8", 8), ("int4", 4), ("int2", 2)])
def test_ptq_error_and_measured_bytes(setting, bits, data, fp32) -> None:
    model, _ = make("ptq", setting, data, fp32)
    emb: TorchrecPTQEmbedding = model.embedding
    assert emb.data_type.name == setting.upper()  # torchrec keeps INT2 as INT2
    ref = fp32.embedding.global_weight()
    deq = emb.dequantized_weight(chunk=100)
    lo, hi = ref.min(1, keepdim=True).values, ref.max(1, keepdim=True).values
    # rowwise asymmetric: half a level of (max - min) / (2^k - 1), plus fp16 scale/bias rounding
    bound = 0.5 * (hi - lo) / (2**bits - 1) + (lo.abs() + (hi - lo)) * 2.0**-10
    assert ((deq - ref).abs() <= bound).all()
    assert ((deq - ref).abs() > 0).any()  # really quantized
    # lookups are the dequantized rows
    kjt, _ = first_batch(data)
    emb.eval()
    assert torch.equal(emb(kjt), deq[emb.global_ids(kjt)])
    # the export is torchrec's buffer: rows of the pinned layout's `row_bytes` (codes + 4 B fp16
    # scale/bias, 16 B aligned: 32 / 16 / 16 B at D = 16 on torchrec 1.8), each table starting on the
    # next 128-byte boundary; the table offsets and the buffer size are torchrec's own
    row_bytes = torchrec_row_bytes(bits, DIM)
    assert emb.size_report()["row_bytes"] == row_bytes
    offsets = emb.export_config()["weights_offsets"]
    ends = [-(-(o + c * row_bytes) // 128) * 128 for o, c in zip(offsets, emb.cardinalities, strict=True)]
    assert offsets == [0, *ends[:-1]], f"torchrec's table offsets do not follow rows of {row_bytes} B"
    assert emb.weight_bytes() == ends[-1]
    assert emb.num_bytes() == npy_file_bytes((emb.weight_bytes(),), np.uint8)


def test_ptq_keeps_the_fp32_model_untouched(data, fp32) -> None:
    before = fp32.embedding.global_weight().clone()
    make("ptq", "int4", data, fp32)
    get_method("ptq").convert(fp32.embedding, inputs(data), "int2")
    assert torch.equal(fp32.embedding.global_weight(), before)
    with pytest.raises(TypeError, match="fp32"):
        get_method("ptq").convert(torch.nn.Linear(2, 2), inputs(data), "int8")


# -- alpt --------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["int8", "int4"])
def test_alpt_weights_stay_integer_codes(setting, data) -> None:
    kjt, labels = first_batch(data)
    model, opts = make("alpt", setting, data)
    emb: ALPTEmbedding = model.embedding
    bits = int(setting[3:])
    before = emb.codes.clone()
    step_before = emb.step.detach().clone()
    train_steps(model, opts, kjt, labels, 5)
    # no fp32 copy of the table anywhere in the module: the rows are int8 codes
    big = [n for n, t in [*emb.named_parameters(), *emb.named_buffers()] if t.numel() >= emb.num_rows()]
    assert big == ["codes"] and emb.codes.dtype == torch.int8
    assert emb.codes.min() >= -(2 ** (bits - 1)) and emb.codes.max() <= 2 ** (bits - 1) - 1
    # the looked-up rows changed, the others did not; the steps were learned
    ids = torch.unique(emb.global_ids(kjt))
    untouched = torch.ones(emb.num_rows(), dtype=torch.bool)
    untouched[ids] = False
    assert not torch.equal(emb.codes[ids], before[ids])
    assert torch.equal(emb.codes[untouched], before[untouched])
    assert not torch.equal(emb.step.detach(), step_before) and (emb.step > 0).all()
    # lookups are codes * step of the field, on the grid
    emb.eval()
    out = emb(kjt)
    on_grid = out / emb.step.detach()[None, :, None]
    assert torch.equal(on_grid.round(), emb.codes[emb.global_ids(kjt)].float())
    assert torch.equal(emb.dequantized_weight()[emb.global_ids(kjt)], out)


def test_alpt_rounds_stochastically(data) -> None:
    """An update of a tenth of a step moves about a tenth of the codes (nearest rounding: none)."""
    kjt, labels = first_batch(data)
    model, _ = make("alpt", "int8", data)
    emb: ALPTEmbedding = model.embedding
    lr = 0.1 * float(emb.step.detach().min())  # Adam's first update is lr * sign(g)
    opt = ALPTOptimizer(emb, lr=lr, seed=1)
    before = emb.codes.clone()
    ids = torch.unique(emb.global_ids(kjt))
    model.train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(kjt), labels).backward()
    opt.step()
    changed = (emb.codes[ids] != before[ids]).float().mean().item()
    assert 0.02 < changed < 0.2, changed
    assert (emb.codes[ids].int() - before[ids].int()).abs().max() <= 1


def test_alpt_optimizer_state_resumes(data) -> None:
    """The rounding generator and the moments are in ``state_dict()``: a resumed optimiser
    makes exactly the update an uninterrupted one makes."""
    kjt, labels = first_batch(data)
    model, opts = make("alpt", "int4", data)
    train_steps(model, opts, kjt, labels, 2)
    snapshot = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts]
    train_steps(model, opts, kjt, labels, 2)
    expected = model.embedding.codes.clone()

    model2, opts2 = make("alpt", "int4", data)
    model2.load_state_dict(snapshot[0])
    for opt, state in zip(opts2, snapshot[1], strict=True):
        opt.load_state_dict(state)
    train_steps(model2, opts2, kjt, labels, 2)
    assert torch.equal(model2.embedding.codes, expected)


def test_alpt_bytes_are_packed_codes_and_steps(data) -> None:
    for setting, bits in (("int8", 8), ("int4", 4)):
        model, _ = make("alpt", setting, data)
        emb = model.embedding
        n = emb.num_rows()
        assert emb.num_bytes() == (128 + (n * DIM * bits + 7) // 8) + (128 + 4 * len(data.fields))
        arrays = emb.export_arrays()
        assert arrays["codes"].dtype == np.uint8 and arrays["codes"].size == (n * DIM * bits + 7) // 8
    with pytest.raises(ValueError, match="alpt"):
        get_method("alpt").build(inputs(data), "fp16")


def test_alpt_kjt_roundtrip_matches_ids(data) -> None:
    """``global_ids`` of a hand-built batch picks each field's own rows."""
    model, _ = make("alpt", "int8", data)
    emb = model.embedding.eval()
    ids = np.array([[c - 1 for c in data.cardinalities], [0] * len(data.fields)], dtype=np.int32)
    out = emb(to_kjt(ids, data.fields))
    offsets = np.concatenate([[0], np.cumsum(data.cardinalities)[:-1]])
    assert torch.equal(out, emb.dequantized_weight()[torch.from_numpy(ids + offsets).long()])


def test_alpt_step_follows_its_lsq_gradient() -> None:
    """Rows pushed beyond the code range make their field's step grow; rows left inside,
    with updates smaller than half a level, make it shrink (finer resolution)."""
    fields, card = ["a", "b"], [20, 20]
    torch.manual_seed(0)
    emb = ALPTEmbedding(fields, card, 4, bits=4, init_std=0.01)
    with torch.no_grad():
        emb.codes[:20] = 7  # field a: saturated at the top code
        emb.codes[20:] = 2  # field b: inside the range
    opt = ALPTOptimizer(emb, lr=1e-3, seed=0)  # Adam: each row moves by ~lr << half a level
    kjt = to_kjt(np.stack([np.arange(20), np.arange(20)], axis=1), fields)
    before = emb.step.detach().clone()
    emb.train()
    for _ in range(3):
        out = emb(kjt)
        (-out[:, 0].sum() + out[:, 1].sum()).backward()  # field a wants larger values, b smaller ones
        opt.step()
    assert emb.step[0] > before[0] and emb.step[1] < before[1], (before, emb.step)


@pytest.mark.parametrize(("setting", "bits"), [("int8", 8), ("int4", 4), ("int2", 2)])
def test_ptq_export_is_fbgemm_rows(setting, bits, data, fp32) -> None:
    """The exported buffer decodes with numpy alone: per row fp16 scale, fp16 bias, then the
    k-bit codes LSB first, then zero padding; value = code * scale + bias."""
    model, _ = make("ptq", setting, data, fp32)
    emb: TorchrecPTQEmbedding = model.embedding
    buf, cfg = emb.export_arrays()["weights"], emb.export_config()
    row_bytes, code_bytes = emb.size_report()["row_bytes"], DIM * bits // 8
    tables = []
    for offset, card in zip(cfg["weights_offsets"], cfg["cardinalities"], strict=True):
        rows = buf[offset : offset + card * row_bytes].reshape(card, row_bytes)
        scale_bias = rows[:, :4].copy().view(np.float16).astype(np.float32)
        bitplanes = np.unpackbits(rows[:, 4 : 4 + code_bytes], axis=1, bitorder="little").reshape(card, DIM, bits)
        codes = bitplanes @ (1 << np.arange(bits))
        tables.append(codes * scale_bias[:, :1] + scale_bias[:, 1:])
        assert not rows[:, 4 + code_bytes :].any()
    assert np.array_equal(np.concatenate(tables).astype(np.float32), emb.dequantized_weight(chunk=500).numpy())
