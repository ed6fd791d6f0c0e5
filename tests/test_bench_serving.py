"""experiments.bench_serving at a tiny size: the output files are complete and consistent
(ratios, bytes, sanity diffs), never the timings themselves."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from experiments import bench_serving


def test_mpe_like_bits_follow_frequency():
    cards = bench_serving.field_cardinalities(1003, 3)
    assert cards == [335, 334, 334]
    perms = bench_serving.zipf_permutations(cards, 0)
    bits = bench_serving.mpe_like_bits(cards, perms, 1.2, [0.5, 0.25, 0.25])
    assert bits.shape == (1003,) and np.bincount(bits).tolist() == [502, 250, 251]
    # the most frequent row of every field (rank 0) gets the most bits
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]])
    assert all(bits[o + p[0]] == 2 for o, p in zip(offsets, perms, strict=True))


def test_bench_serving_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench_serving.main([
        "--rows", "3000", "--fields", "3", "--batch-sizes", "1,32", "--rounds", "1", "--min-time", "0.001",
        "--memory", "fp32,packed", "--out", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "shared machine" in printed

    res = json.loads((out / "bench_serving.json").read_text())
    assert "shared machine" in res["machine"]["note"]
    table = res["table"]
    assert sum(table["cardinalities"]) == 3000 and table["dim"] == 16
    assert sum(table["rows_per_bits"].values()) == 3000

    serving = res["serving"]
    assert {(r["method"], r["batch_size"]) for r in serving} == {
        (m, b) for m in bench_serving.DEFAULT_CONTENDERS for b in (1, 32)}
    by = {(r["method"], r["batch_size"]): r for r in serving}
    fp32_bytes = 3000 * 16 * 4
    for (_m, b), r in by.items():
        fp32 = by[("fp32", b)]
        assert r["lookups_per_s"] > 0 and r["lookups_per_batch"] == b * 3
        assert r["ratio_to_fp32"] == pytest.approx(r["lookups_per_s"] / fp32["lookups_per_s"])
        assert r["compression_vs_fp32"] == pytest.approx(fp32_bytes / r["bytes"])
        assert r["us_per_batch"] == pytest.approx(1e6 * b * 3 / r["lookups_per_s"])
    assert by[("fp32", 1)]["ratio_to_fp32"] == 1.0 and by[("fp32", 1)]["bytes"] == fp32_bytes
    assert by[("packed", 1)]["bytes"] == table["packed_total_bytes"] < fp32_bytes / 10
    assert by[("ptq_int8", 1)]["bytes"] == table["ptq_weight_bytes"]["ptq_int8"]
    assert by[("ptq_int4", 1)]["bytes"] < by[("ptq_int8", 1)]["bytes"] < fp32_bytes
    # the contenders serve the same table: exact for fp32 and packed, close for the quantized ones
    assert by[("fp32", 1)]["max_abs_diff_vs_reference"] == 0.0
    assert by[("packed", 1)]["max_abs_diff_vs_reference"] == 0.0
    for m in ("mpe_torchrec", "ptq_int8", "ptq_int4"):
        assert by[(m, 1)]["max_abs_diff_vs_reference"] < 0.01

    memory = {m["kind"]: m for m in res["memory"]}
    assert set(memory) == {"fp32", "packed"}
    assert memory["fp32"]["table_bytes"] == fp32_bytes
    assert memory["packed"]["table_bytes"] == table["packed_total_bytes"]
    for m in memory.values():
        assert m["peak_rss_mb"] >= m["baseline_peak_mb"] > 0
        assert m["load_peak_delta_mb"] == pytest.approx(m["peak_rss_mb"] - m["baseline_peak_mb"])
    # loading 3,000 fp32 rows into torchrec tables raises the peak over the post-import baseline
    # (measured 3.4 MiB; packed 1.7 MiB), so the ratio is measured, not the None of a zero fp32 delta
    fp32_delta = memory["fp32"]["load_peak_delta_mb"]
    assert fp32_delta > 0, memory["fp32"]
    assert memory["fp32"]["peak_delta_ratio_to_fp32"] == 1.0
    packed_ratio = memory["packed"]["peak_delta_ratio_to_fp32"]
    assert math.isfinite(packed_ratio) and packed_ratio > 0, memory["packed"]
    assert packed_ratio == pytest.approx(memory["packed"]["load_peak_delta_mb"] / fp32_delta)

    with open(out / "bench_serving.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(serving) and {r["method"] for r in rows} == set(bench_serving.DEFAULT_CONTENDERS)
    with open(out / "bench_serving_memory.csv") as f:
        assert {r["kind"] for r in csv.DictReader(f)} == {"fp32", "packed"}
