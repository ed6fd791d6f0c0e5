"""Serving without this repository: the torch-only decoder (``mpe.program``) equals the packed
reader bit for bit; the ``torch.export`` program written by ``mpe.export --torch-export`` is
verified before it is loaded, runs in a process that imports only torch, and predicts exactly
what the compiled-decoder served model predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctr.model import CTRModel, ModelConfig
from ctr.trainer import predict
from data.artifacts import ArtifactError, atomic_write_json, sha256_file
from data.batches import SplitArrays
from experiments import bench_serving
from genlora_rec.towers import build_tower
from mpe import run_dir
from mpe.config import MPEConfig, SearchConfig
from mpe.embedding import MixedPrecisionEmbedding
from mpe.export import main as export_main
from mpe.format import (
    COMPILED_FILE,
    COMPILED_KEY,
    HEADER_FILE,
    PROGRAM_FILE,
    PROGRAM_KEY,
    header_digest,
)
from mpe.program import TorchPackedEmbedding, pair_plan, write_exported_program
from mpe.quantizer import LSQQuantizer
from mpe.reader import load_packed_export
from mpe.serving import load_compiled_program, load_exported_program, load_served_model
from mpe.writer import write_packed_export

ALL_BITS = (0, 1, 2, 3, 4, 5, 6)
FIELDS, CARDS = ["a", "b", "c", "d"], [300, 7, 1, 452]


def packed_table(tmp_path: Path, dim: int, cands: tuple[int, ...], n: int = 1500, seed: int = 0):
    """A written and loaded packed export of n random rows with every candidate present
    (the first and last rows pruned when 0 is a candidate, the widest next to them)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dim, generator=g) * 0.05
    q = LSQQuantizer(cands, dim, n)
    q.init_steps(w)
    with torch.no_grad():
        q.beta.copy_(torch.randn(dim, generator=g) * 0.01)
    bits = np.random.default_rng(seed).choice(cands, size=n)
    bits[[0, -1]] = cands[0]
    bits[[1, -2]] = cands[-1]
    write_packed_export(tmp_path / f"e{dim}", w, bits, q, ["x", "y"], [0, n // 3])
    return load_packed_export(tmp_path / f"e{dim}"), bits


def edge_ids(n: int, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.concatenate([[0, 1, 2, n - 3, n - 2, n - 1, n // 3 - 1, n // 3],
                                            rng.integers(0, n, 3000), [0, 0, n - 1, 5]]))


@pytest.mark.parametrize("dim, cands", [
    (16, ALL_BITS), (8, ALL_BITS), (7, ALL_BITS),  # pair tables; D = 7: every bucket code by code
    (16, (0, 2, 5, 7, 8)), (12, (0, 3, 4, 8)), (16, (1, 3)),  # mixed; no pruned rows
])
def test_torch_decoder_is_bit_exact(tmp_path, dim, cands):
    packed, bits = packed_table(tmp_path, dim, cands)
    table = TorchPackedEmbedding(packed)
    assert sorted(np.unique(bits).tolist()) == list(cands)  # every bit-width present
    ids = edge_ids(packed.num_rows)
    with torch.inference_mode():
        got = table(ids)
        assert got.dtype == torch.float32 and got.shape == (ids.numel(), dim)
        assert torch.equal(got.view(torch.int32), packed.lookup(ids).view(torch.int32))  # bits, zeros' signs too
        assert torch.equal(table(torch.arange(packed.num_rows)), packed.to_dense())
        assert torch.equal(table(ids.view(3, -1)), packed.lookup(ids).view(3, -1, dim))
        assert table(torch.zeros(0, dtype=torch.int64)).shape == (0, dim)
        assert torch.equal(table(ids[:1]), packed.lookup(ids[:1]))
        pruned = torch.from_numpy(np.flatnonzero(bits == 0))
        if pruned.numel():
            assert torch.equal(table(pruned), torch.zeros(pruned.numel(), dim))
        for bad in ([-1], [packed.num_rows]):
            with pytest.raises((IndexError, RuntimeError)):
                table(torch.tensor(bad))
    # which buckets take the pair tables and which go code by code
    planned = {p.bits for p in table.pair_plans}
    assert planned == {b for b in cands if pair_plan(0, b, dim) is not None and b > 0}
    assert {b for _, b in table.code_buckets} == {b for b in cands if b > 0} - planned
    sizes = table.byte_breakdown()
    assert sizes["codes"] == sum(packed.bucket_bytes(b).size for b in cands if b) + len(table.code_buckets)
    assert sizes["locator"] == 2 * packed.num_rows + 4 * len(cands) * -(-packed.num_rows // 256)


def test_pair_plans_cover_every_pair():
    for dim in (2, 4, 6, 8, 10, 16, 24, 32, 64):
        for b in range(1, 7):
            plan = pair_plan(0, b, dim)
            if (dim * b) % 8:
                assert plan is None
                continue
            assert plan is not None and len(plan.windows) * plan.pairs_per_window == dim // 2
            for g, terms in enumerate(plan.windows):
                start = terms[0][0] * terms[0][1]  # window's first byte
                first, last = g * plan.pairs_per_window * 2 * b, (g + 1) * plan.pairs_per_window * 2 * b
                assert 8 * start <= first and last <= 8 * start + 32 and start + 4 >= min(plan.row_bytes, last // 8)
    assert pair_plan(0, 3, 7) is None and pair_plan(0, 7, 16) is None


def test_torch_decoder_exports_and_round_trips(tmp_path):
    packed, _ = packed_table(tmp_path, 16, ALL_BITS, n=900)
    table = TorchPackedEmbedding(packed).eval()
    n = torch.export.Dim("n", min=1, max=1 << 20)
    program = torch.export.export(table, (torch.arange(10),), dynamic_shapes=({0: n},), strict=False)
    path = tmp_path / "table.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    with torch.inference_mode():
        for k in (1, 2, 5, 900, 4096):
            ids = torch.from_numpy(np.random.default_rng(k).integers(0, 900, k))
            assert torch.equal(loaded(ids), packed.lookup(ids))


# -- the served program ------------------------------------------------------------------
def make_run(root: Path, dim: int = 16) -> Path:
    """A small retrained MPE run (every bit-width 0..6 used) with a non-trivial tower."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    emb = MixedPrecisionEmbedding(FIELDS, CARDS, dim, rng.integers(0, 7, sum(CARDS)), np.ones(7), init_std=0.3)
    emb.quantizer.init_steps(emb.global_weight())
    emb.fix_bits(list(ALL_BITS))
    tower = build_tower("dnn", len(FIELDS), dim, (32, 8))
    with torch.no_grad():
        for mod in tower.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    offsets = np.concatenate([[0], np.cumsum(CARDS)[:-1]]).tolist()
    data = SimpleNamespace(fields=FIELDS, cardinalities=CARDS, field_offsets=offsets)
    cfg = MPEConfig(dataset="criteo", model=ModelConfig(dim=dim, hidden=(32, 8)), search=SearchConfig(groups=7))
    run = root / "run"
    run.mkdir()
    run_dir.save_model(CTRModel(emb, tower), cfg, data, run)
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("program")
    run = make_run(root)
    out = root / "export"
    assert export_main(["--run", str(run), "--out", str(out), "--no-torchrec", "--torch-export"]) == 0
    return out


def split_of(num: int = 3000, seed: int = 5) -> SplitArrays:
    rng = np.random.default_rng(seed)
    ids = (rng.random((num, len(CARDS))) * np.asarray(CARDS)).astype(np.int32)
    ids[0], ids[1] = 0, np.asarray(CARDS) - 1
    return SplitArrays(ids, rng.integers(0, 2, num).astype(np.float32))


def copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_cli_writes_and_records_the_program(exported):
    header = json.loads((exported / HEADER_FILE).read_text())
    entry = header[PROGRAM_KEY]
    assert header["header_sha256"] == header_digest(header)
    assert entry["file"] == PROGRAM_FILE and entry["bytes"] == (exported / PROGRAM_FILE).stat().st_size
    assert PROGRAM_FILE not in header["files"] and entry["fields"] == FIELDS and entry["cardinalities"] == CARDS
    assert "probabilities" in entry["output"] and "local_ids" in entry["input"]
    report = json.loads((exported / "export_report.json").read_text())
    assert report["program"]["sha256"] == entry["sha256"]
    # the packed reader and the served model still accept the export
    assert load_packed_export(exported).num_bytes() == header["total_bytes"]
    load_served_model(exported)


def test_program_predicts_what_the_served_model_predicts(exported):
    split = split_of()
    served = load_served_model(exported)
    want = predict(served, split, FIELDS)
    program = load_exported_program(exported).module()
    with torch.inference_mode():
        ids = torch.from_numpy(split.ids.astype(np.int64))
        got = program(ids)
        assert got.dtype == torch.float32 and got.shape == (len(split),)
        assert np.array_equal(got.double().numpy(), want)
        assert np.unique(want).size > 100  # a tower that separates the examples
        assert torch.equal(program(ids[:1]), got[:1])  # batch 1 on the dynamic dimension
        with pytest.raises(RuntimeError, match="cardinality"):
            program(torch.tensor([[CARDS[0], 0, 0, 0]]))
        with pytest.raises(RuntimeError, match="cardinality"):
            program(torch.tensor([[0, -1, 0, 0]]))


def test_program_runs_in_a_process_that_imports_only_torch(exported, tmp_path):
    split = split_of(seed=9)
    want = predict(load_served_model(exported), split, FIELDS)
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "probs.pt"
    torch.save(torch.from_numpy(split.ids.astype(np.int64)), ids_path)
    site = str(Path(torch.__file__).resolve().parents[1])
    # -S: no site initialisation, so neither this repository's editable install nor PYTHONPATH
    # is on sys.path; only torch's own directory is added
    code = (
        "import sys, importlib.util\n"
        f"sys.path.append({site!r})\n"
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('mpe', 'data', 'ctr', 'encoding', 'genlora_rec'))\n"
        f"program = torch.export.load({str(exported / PROGRAM_FILE)!r}).module()\n"
        "with torch.inference_mode():\n"
        f"    probs = program(torch.load({str(ids_path)!r}, weights_only=True))\n"
        f"torch.save(probs, {str(out_path)!r})\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in ('mpe', 'data', 'ctr', 'encoding', 'genlora_rec'))\n"
        "print('repo modules:', mods)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd="/tmp", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repo modules: []" in proc.stdout
    got = torch.load(out_path, weights_only=True)
    assert np.array_equal(got.double().numpy(), want)


def rewrite_program_entry(export: Path, **changes) -> None:
    header = json.loads((export / HEADER_FILE).read_text())
    header[PROGRAM_KEY].update(changes)
    header["header_sha256"] = header_digest(header)
    atomic_write_json(export / HEADER_FILE, header)


def test_loader_refuses_damaged_programs(exported, tmp_path):
    good = (exported / PROGRAM_FILE).read_bytes()

    bad = copy_export(exported, tmp_path / "flipped")  # one byte modified
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    (bad / PROGRAM_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_exported_program(bad)

    bad = copy_export(exported, tmp_path / "truncated")
    (bad / PROGRAM_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        load_exported_program(bad)

    bad = copy_export(exported, tmp_path / "missing")
    (bad / PROGRAM_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_exported_program(bad)

    # another torch.export program of the same size: refused by its checksum, never loaded
    bad = copy_export(exported, tmp_path / "foreign")
    other = torch.export.export(torch.nn.Linear(2, 1), (torch.zeros(1, 2),))
    torch.export.save(other, bad / "other.pt2")
    (bad / PROGRAM_FILE).write_bytes((bad / "other.pt2").read_bytes().ljust(len(good), b"\0")[: len(good)])
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_exported_program(bad)

    # a header rewritten consistently around a foreign file: checksum fine, not a program
    bad = copy_export(exported, tmp_path / "junk")
    other = torch.export.export(torch.nn.Linear(2, 1), (torch.zeros(1, 2),))
    (bad / PROGRAM_FILE).write_bytes(b"not a zip archive")
    rewrite_program_entry(bad, sha256=sha256_file(bad / PROGRAM_FILE), bytes=17)
    with pytest.raises(ArtifactError, match="not a torch.export program"):
        load_exported_program(bad)
    # ... or around another real torch.export program (float [1, 2] -> [1, 1])
    torch.export.save(other, bad / "other.pt2")
    rewrite_program_entry(bad, file="other.pt2", sha256=sha256_file(bad / "other.pt2"),
                          bytes=(bad / "other.pt2").stat().st_size)
    with pytest.raises(ArtifactError, match="not this export's served program"):
        load_exported_program(bad)

    bad = copy_export(exported, tmp_path / "escape")
    rewrite_program_entry(bad, file="../export/" + PROGRAM_FILE)
    with pytest.raises(ArtifactError, match="escapes"):
        load_exported_program(bad)

    bad = copy_export(exported, tmp_path / "edited")  # header edited without its checksum
    header = json.loads((bad / HEADER_FILE).read_text())
    header[PROGRAM_KEY]["bytes"] += 1
    (bad / HEADER_FILE).write_text(json.dumps(header))
    with pytest.raises(ArtifactError, match="header"):
        load_exported_program(bad)


@pytest.mark.slow
def test_aoti_package_predicts_what_the_served_model_predicts(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out), "--no-torchrec", "--aoti"]) == 0
    header = json.loads((out / HEADER_FILE).read_text())
    entry = header[COMPILED_KEY]
    assert header["header_sha256"] == header_digest(header)
    assert entry["file"] == COMPILED_FILE and entry["sha256"] == sha256_file(out / COMPILED_FILE)
    assert entry["compiled_from"] == header[PROGRAM_KEY]["sha256"] and entry["verified_examples"] > 0
    split = split_of(seed=7)
    want = predict(load_served_model(out), split, FIELDS)
    compiled = load_compiled_program(out)
    with torch.inference_mode():
        got = compiled(torch.from_numpy(split.ids.astype(np.int64)))
        # the decoder's integer work is exact; the fused tower may round its floats differently
        assert np.abs(got.double().numpy() - want).max() <= 1e-6
        assert 0 <= entry["max_abs_diff"] <= 1e-6
        assert torch.equal(compiled(torch.from_numpy(split.ids[:1].astype(np.int64))), got[:1])
        columns = torch.from_numpy(np.ascontiguousarray(split.ids.T.astype(np.int64))).t()  # not contiguous
        assert torch.equal(compiled(columns), got)

    bad = copy_export(out, tmp_path / "flipped")
    data = bytearray((out / COMPILED_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / COMPILED_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_compiled_program(bad)
    other = copy_export(out, tmp_path / "other_torch")
    header[COMPILED_KEY]["torch_version"] = "0.0.1"
    header["header_sha256"] = header_digest(header)
    atomic_write_json(other / HEADER_FILE, header)
    with pytest.raises(ArtifactError, match="compiled with torch 0.0.1"):
        load_compiled_program(other)
    plain = copy_export(out, tmp_path / "plain")
    del header[COMPILED_KEY]
    header["header_sha256"] = header_digest(header)
    atomic_write_json(plain / HEADER_FILE, header)
    with pytest.raises(ArtifactError, match="no compiled program recorded"):
        load_compiled_program(plain)


def test_export_without_program_stays_valid(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "export"
    assert export_main(["--run", str(run), "--out", str(out), "--no-torchrec"]) == 0
    assert PROGRAM_KEY not in json.loads((out / HEADER_FILE).read_text())
    assert not (out / PROGRAM_FILE).exists()
    load_served_model(out)
    with pytest.raises(ArtifactError, match="no exported program"):
        load_exported_program(out)
    entry = write_exported_program(out)  # added to an existing export later
    assert load_exported_program(out) is not None and entry["file"] == PROGRAM_FILE
    assert load_packed_export(out).num_bytes() == json.loads((out / HEADER_FILE).read_text())["total_bytes"]


def run_bench(out: Path, contenders: str, memory: str) -> tuple[dict, dict]:
    """(bench_serving.json, its serving rows by (method, batch)) of a tiny run at batches 1 and 32."""
    assert bench_serving.main([
        "--rows", "3000", "--fields", "3", "--batch-sizes", "1,32", "--rounds", "1", "--min-time", "0.001",
        "--contenders", contenders, "--memory", memory, "--out", str(out),
    ]) == 0
    res = json.loads((out / "bench_serving.json").read_text())
    return res, {(r["method"], r["batch_size"]): r for r in res["serving"]}


def test_bench_serving_times_the_exported_program(tmp_path):
    out = tmp_path / "bench"
    res, rows = run_bench(out, "fp32,packed,torch_export", "torch_export")
    packed = load_packed_export(out / "packed")
    for b in (1, 32):
        r = rows[("torch_export", b)]
        assert r["max_abs_diff_vs_reference"] == 0.0 and r["lookups_per_s"] > 0
        assert r["bytes"] == TorchPackedEmbedding(packed).num_bytes()
        assert r["ratio_to_fp32"] == pytest.approx(r["lookups_per_s"] / rows[("fp32", b)]["lookups_per_s"])
    program_file = out / bench_serving.PROGRAM_DIR / bench_serving.PROGRAM_NAME
    assert res["table"]["torch_export_file_bytes"] == program_file.stat().st_size
    (memory,) = res["memory"]
    assert memory["kind"] == "torch_export" and memory["table_bytes"] == program_file.stat().st_size


@pytest.mark.slow
def test_bench_serving_times_the_compiled_program(tmp_path):
    out = tmp_path / "bench"
    _, rows = run_bench(out, "fp32,packed,torch_aoti", "")
    for b in (1, 32):  # the embedding alone: integer work and gathers, exact when compiled
        r = rows[("torch_aoti", b)]
        assert r["lookups_per_s"] > 0 and r["max_abs_diff_vs_reference"] == 0.0
    assert (out / bench_serving.PROGRAM_DIR / bench_serving.COMPILED_NAME).is_file()
