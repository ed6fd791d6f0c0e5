"""Packed export: bit-exact round trip, exact sizes, tamper detection; torchrec quantized export."""

import json
from importlib.metadata import version

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from data.artifacts import ArtifactError
from encoding.sizes import fp32_table_bytes
from encoding.torchrec_rows import (
    quantize_ebc,
    tbe_weight_buffers,
    torchrec_data_type,
    torchrec_row_bytes,
    torchrec_table_bytes,
)
from mpe.bitwidths import packed_size_breakdown, packed_table_bytes
from mpe.format import bucket_file, header_digest
from mpe.quantizer import LSQQuantizer
from mpe.reader import load_packed_export
from mpe.torchrec_size import build_torchrec_quant, torchrec_quantized_bytes
from mpe.writer import write_packed_export

CANDS = (0, 1, 2, 3, 4, 5, 6, 8)
N, DIM = 3001, 7
FIELDS, OFFSETS = ["a", "b", "c"], [0, 1000, 2500]


def table(seed=0, n=N, dim=DIM, p=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dim, generator=g) * 0.003
    q = LSQQuantizer(CANDS, dim, n)
    q.init_steps(w)
    with torch.no_grad():
        q.beta.copy_(torch.randn(dim, generator=g) * 0.001)
        q.alpha.mul_(1 + 0.1 * torch.randn(len(CANDS), generator=g))
    rng = np.random.default_rng(seed)
    bits = rng.choice(CANDS, size=n, p=p)
    return w, q, bits


def indices(bits):
    return torch.from_numpy(np.searchsorted(CANDS, bits))


@pytest.fixture
def exported(tmp_path):
    w, q, bits = table(p=[0.5, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    out = tmp_path / "export"
    header = write_packed_export(out, w, bits, q, FIELDS, OFFSETS, extra_meta={"run": "t"})
    return out, header, w, q, bits


def test_roundtrip_is_bit_exact(exported):
    out, header, w, q, bits = exported
    packed = load_packed_export(out)
    expected = q.quantize_per_row(w, indices(bits)).detach()
    assert torch.equal(packed.to_dense(), expected)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, N, 777))
    assert torch.equal(packed.lookup(ids), expected[ids])
    assert packed.lookup(ids.view(7, 111)).shape == (7, 111, DIM)
    assert np.array_equal(packed.bits_per_row(), bits)
    assert torch.equal(packed.to_dense()[bits == 0], torch.zeros(int((bits == 0).sum()), DIM))
    for b in CANDS[1:]:
        assert torch.equal(packed.bucket_values(b), expected[torch.from_numpy(bits == b)])
    assert packed.fields == FIELDS and packed.field_offsets == OFFSETS
    with pytest.raises(IndexError):
        packed.lookup(torch.tensor([N]))


def test_sizes_on_disk_equal_size_model(exported):
    out, header, w, q, bits = exported
    on_disk = {name: (out / name).stat().st_size for name in header["files"]}
    assert on_disk == packed_size_breakdown(bits, DIM, CANDS)
    assert sum(on_disk.values()) == header["total_bytes"] == packed_table_bytes(bits, DIM, CANDS)
    assert load_packed_export(out).num_bytes() == header["total_bytes"]
    for b in CANDS[1:]:
        assert on_disk[bucket_file(b)] == -(-int((bits == b).sum()) * b * DIM // 8)
    assert header["fp32_bytes"] == fp32_table_bytes(N, DIM)
    assert header["bucket_rows"] == {str(b): int((bits == b).sum()) for b in CANDS}
    assert header["meta"] == {"run": "t"} and header["schema_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([*header["files"], "header.json"])


def test_all_pruned_and_reexport(tmp_path):
    w, q, _ = table(n=50)
    bits = np.zeros(50, dtype=np.int64)
    header = write_packed_export(tmp_path / "e", w, bits, q, ["x"], [0])
    packed = load_packed_export(tmp_path / "e")
    assert torch.equal(packed.to_dense(), torch.zeros(50, DIM))
    assert header["total_bytes"] == packed_table_bytes(bits, DIM, CANDS) > 0
    bits[:10] = 8  # writing again replaces the directory as a whole
    write_packed_export(tmp_path / "e", w, bits, q, ["x"], [0])
    assert torch.equal(load_packed_export(tmp_path / "e").to_dense(), q.quantize_per_row(w, indices(bits)).detach())
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


def test_high_compression_id_map_stays_small(tmp_path):
    # 95% pruned, the rest at 3 bits: codes ~0.3 bytes per row on average
    n, dim = 20000, 16
    w = torch.randn(n, dim) * 0.003
    q = LSQQuantizer(CANDS, dim, n)
    bits = np.where(np.random.default_rng(0).random(n) < 0.95, 0, 3)
    sizes = packed_size_breakdown(bits, dim, CANDS)
    assert sizes["id_map.npy"] < 0.5 * n / 8 + 200  # < 0.5 bits per row
    assert fp32_table_bytes(n, dim) / packed_table_bytes(bits, dim, CANDS) > 150
    write_packed_export(tmp_path / "e", w, bits, q, ["x"], [0])
    assert load_packed_export(tmp_path / "e").num_bytes() == sum(sizes.values())


def rewrite_header(out, edit):
    header = json.loads((out / "header.json").read_text())
    edit(header)
    header["header_sha256"] = header_digest(header)
    (out / "header.json").write_text(json.dumps(header))


def flip_byte(path, at=0):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def expect_error(out, name):
    with pytest.raises(ArtifactError) as e:
        load_packed_export(out)
    assert name in str(e.value)


def test_corrupted_byte(exported):
    out, *_ = exported
    flip_byte(out / "bucket_b3.bin", 5)
    expect_error(out, "bucket_b3.bin")


def test_truncated_file(exported):
    out, *_ = exported
    data = (out / "id_map.npy").read_bytes()
    (out / "id_map.npy").write_bytes(data[:-3])
    expect_error(out, "id_map.npy")


def test_missing_file(exported):
    out, *_ = exported
    (out / "steps.npy").unlink()
    expect_error(out, "steps.npy")


def test_missing_or_corrupt_header(exported):
    out, *_ = exported
    (out / "header.json").write_text("{ not json")
    expect_error(out, "header.json")
    (out / "header.json").unlink()
    expect_error(out, "header.json")


def test_tampered_header(exported):
    out, *_ = exported
    header = json.loads((out / "header.json").read_text())
    header["bucket_rows"]["3"] += 1  # edited without updating the header checksum
    (out / "header.json").write_text(json.dumps(header))
    expect_error(out, "header.json")


def test_tampered_header_with_recomputed_digest(exported):
    out, *_ = exported

    def edit(h):
        h["files"]["offset.npy"]["sha256"] = "0" * 64

    rewrite_header(out, edit)
    expect_error(out, "offset.npy")


def test_tampered_file_list(exported):
    out, *_ = exported
    rewrite_header(out, lambda h: h["files"].pop("bucket_b5.bin"))
    expect_error(out, "header.json")


def test_path_escaping_name(exported):
    out, *_ = exported
    (out.parent / "evil.bin").write_bytes(b"x")

    def edit(h):
        h["files"]["../evil.bin"] = {"sha256": "0" * 64, "bytes": 1}

    rewrite_header(out, edit)
    expect_error(out, "../evil.bin")


def test_unsupported_schema_version(exported):
    out, *_ = exported
    rewrite_header(out, lambda h: h.update(schema_version=99))
    expect_error(out, "schema_version")


def test_invalid_inputs(tmp_path):
    w, q, bits = table(n=40)
    with pytest.raises(ValueError):
        write_packed_export(tmp_path / "e", w, bits[:-1], q, ["x"], [0])
    with pytest.raises(ValueError):
        write_packed_export(tmp_path / "e", w, np.full(40, 7), q, ["x"], [0])  # 7 not a candidate
    with pytest.raises(ValueError):
        write_packed_export(tmp_path / "e", w, bits, q, ["x", "y"], [0, 50])
    assert not (tmp_path / "e").exists() and list(tmp_path.iterdir()) == []


# -- torchrec quantized export -----------------------------------------------------------
def tbe_bytes(rows: int, bits: int, dim: int) -> int:
    """Bytes of the fbgemm weight buffers torchrec allocates for one quantized table."""
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])],
        device=torch.device("cpu"),
    )
    return sum(b.nbytes for b in tbe_weight_buffers(quantize_ebc(ebc, {"t": torchrec_data_type(bits)})))


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_torchrec_row_bytes_are_what_torchrec_allocates(bits, dim):
    """The pinned row formula (torchrec 1.8: 32/16/16 B at D = 16, 80/48/32 B at D = 64 for
    INT8/INT4/INT2) against the buffers the installed torchrec really allocates."""
    row = torchrec_row_bytes(bits, dim)
    layout = f"torchrec {version('torchrec')} / fbgemm-gpu {version('fbgemm-gpu-cpu')}"
    # 128 rows: the 128-byte table alignment is a no-op, so the buffer is 128 torchrec rows
    got = tbe_bytes(128, bits, dim)
    assert got == 128 * row, (
        f"{layout} stores {got / 128:g} B per {bits}-bit row at D = {dim}, the formula of "
        f"encoding/torchrec_rows.py (measured on torchrec 1.8) says {row}: update torchrec_row_bytes")
    # 13 rows: rounded up to the table alignment
    got = tbe_bytes(13, bits, dim)
    assert got == torchrec_table_bytes(13, bits, dim), f"{layout}: 13 rows take {got} B"


def test_torchrec_export_close_to_packed(tmp_path):
    w, q, bits = table(seed=3, n=2000, dim=16)
    write_packed_export(tmp_path / "e", w, bits, q, ["x"], [0])
    packed = load_packed_export(tmp_path / "e")
    tq = build_torchrec_quant(packed)
    report = tq.size_report()
    assert report["weight_bytes"] == report["predicted_weight_bytes"] > 0
    assert report["total_bytes"] == report["weight_bytes"] + packed.file_bytes("id_map.npy")
    assert {t["bits"]: t["torchrec_type"] for t in report["tables"]} == {
        1: "INT2", 2: "INT2", 3: "INT4", 4: "INT4", 5: "INT8", 6: "INT8", 8: "INT8"
    }
    assert torchrec_quantized_bytes(packed)["weight_bytes"] == report["weight_bytes"]

    ids = torch.arange(2000)
    ref, got = packed.lookup(ids), tq.lookup(ids)
    assert got.shape == (2000, 16)
    for b in CANDS:
        rows = torch.from_numpy(bits == b)
        if b == 0:
            assert torch.equal(got[rows], torch.zeros_like(got[rows]))
            continue
        k = {1: 2, 2: 2, 3: 4, 4: 4}.get(b, 8)
        r = ref[rows]
        span = (r.max(1).values - r.min(1).values)[:, None]
        tol = 0.5 * span / (2**k - 1) + 2**-10 * (r.abs().max(1).values[:, None] + span) + 1e-7
        assert torch.all((got[rows] - r).abs() <= tol), b
        if k == 8:
            assert (got[rows] - r).abs().max() < 1e-4


@pytest.mark.parametrize("dim", [7, 16])
def test_compiled_and_numpy_decoders_agree_bit_for_bit(tmp_path, dim):
    from mpe.native import build_error, row_decoder

    if row_decoder() is None:
        pytest.skip(f"no compiled decoder here: {build_error()}")
    w, q, bits = table(seed=3, dim=dim, p=[0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    write_packed_export(tmp_path / "e", w, bits, q, FIELDS, OFFSETS)
    packed = load_packed_export(tmp_path / "e")
    assert packed._native.decode is not None
    expected = q.quantize_per_row(w, indices(bits)).detach()
    ids = np.random.default_rng(2).integers(0, N, 5000)
    native = packed._native(ids)
    assert np.array_equal(native, packed._decode_numpy(ids))
    assert torch.equal(torch.from_numpy(native), expected[torch.from_numpy(ids)])
    assert torch.equal(packed.to_dense(), expected)


def test_numpy_decoder_is_the_fallback(tmp_path, monkeypatch):
    import mpe.native

    monkeypatch.setattr(mpe.native, "_state", {})
    monkeypatch.setenv("MPE_NATIVE", "0")
    w, q, bits = table(seed=4)
    write_packed_export(tmp_path / "e", w, bits, q, FIELDS, OFFSETS)
    packed = load_packed_export(tmp_path / "e")
    assert packed._native.decode is None and "MPE_NATIVE=0" in mpe.native.build_error()
    assert torch.equal(packed.to_dense(), q.quantize_per_row(w, indices(bits)).detach())


def test_packed_table_deep_copies_and_the_copy_serves(exported):
    import copy

    out, _, w, q, bits = exported
    packed = load_packed_export(out)
    twin = copy.deepcopy(packed)
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, N, 300))
    assert torch.equal(twin.lookup(ids), packed.lookup(ids))
