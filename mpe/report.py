"""The report of an MPE run: ``report.json``'s content, its summary lines and the bits plot."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ctr import distributed
from ctr.distributed import DistEnv
from ctr.model import CTRModel
from ctr.trainer import FitResult
from data.batches import PreparedDataset
from encoding.sizes import fp32_table_bytes
from mpe.config import MPEConfig
from mpe.embedding import MixedPrecisionEmbedding
from mpe.grouping import group_frequencies, spearman


def build_report(
    data: PreparedDataset, cfg: MPEConfig, model: CTRModel, *, lam: float, bits: np.ndarray, probs: np.ndarray,
    test: dict, fp32: dict | None, export: dict, search_fit: FitResult, retrain_fit: FitResult, selection: dict,
    trials: list[dict], seconds: float, budget: dict | None = None, dist: DistEnv | None = None,
    rank_digests: list[str] | None = None,
) -> dict:
    """``report.json`` of a finished run: metrics, bytes, bits, penalty weights, timings.

    ``lam``: the search's lambda (with the budget multiplier: its final value; ``budget``
    is then the multiplier's record).
    """
    emb: MixedPrecisionEmbedding = model.embedding
    fp32_bytes = fp32_table_bytes(data.num_features, cfg.model.dim)
    sel_info = selection
    freq = data.frequency()
    group_of_row = emb.group_of_row.numpy()
    gfreq = group_frequencies(freq, group_of_row)
    row_bits = emb.row_bits(bits)
    mean_bits_row = float(np.mean(row_bits)) if len(row_bits) else 0.0
    weights = emb.penalty_weights.double().numpy()
    seen = ~emb.pruned_groups()
    report = {
        "method": "mpe",
        "dataset": data.dataset,
        "data": str(data.root),
        "config": {**asdict(cfg), "lambda": lam},
        "test": test,
        "fp32_test": None if fp32 is None else fp32["test"],
        "fp32_baseline": None if fp32 is None else {k: v for k, v in fp32.items() if k != "test"},
        "search_val_auc": search_fit.best_auc,
        "retrain_val_auc": retrain_fit.best_auc,
        "fp32_bytes": fp32_bytes,
        "packed_bytes": export["total_bytes"],
        "compression_ratio": fp32_bytes / export["total_bytes"],
        "mean_bits_per_row": mean_bits_row,
        "paper_ratio_32_over_mean_bits": 32 / mean_bits_row if mean_bits_row > 0 else math.inf,
        "torchrec_quant_bytes": export.get("torchrec_quant_bytes"),
        "bytes": export.get("bytes"),
        "deployable_bytes": export.get("deployable_bytes"),
        "vocabulary": export.get("vocabulary"),
        "tower_bytes": model.tower_bytes(),
        "export_test_auc": export["test_auc"],
        "bits_per_group": [int(b) for b in bits],
        "unseen_rows": {"rows": int(emb.pruned_rows.sum()), "groups_all_unseen": int((~seen).sum()),
                        "note": "rows never seen in training are pruned (0 bits) by construction"},
        "pruned_as": {"mode": emb.pruned_as, "rows_read_as_oov": int(emb.read_as_oov.sum()),
                      "rows_at_0_bits": int((emb.bits_per_row() == 0).sum()),
                      "note": "'oov': a 0-bit row reads as its field's OOV row (row 0) where that row has bits; "
                              "'zero': as the zero vector (the paper's)"},
        "penalty_weights": weights.tolist(),
        "penalty_weight_sum": float(weights.sum()),
        "spearman_frequency_bits": _finite_or_none(spearman(gfreq[seen], bits[seen].astype(np.float64)))
        if seen.sum() > 1 else None,
        "probabilities": probs.round(4).tolist(),
        "group_mean_frequency": gfreq.tolist(),
        "selection": sel_info,
        "lambda_trials": trials,
        "budget_multiplier": budget,
        "timings": {
            "search_seconds": search_fit.seconds,
            "search_step_seconds": search_fit.step_seconds,
            "retrain_seconds": retrain_fit.seconds,
            "retrain_step_seconds": retrain_fit.step_seconds,
            "total_seconds": seconds,
        },
        "history": {"search": search_fit.history, "retrain": retrain_fit.history},
        "processes": 1 if dist is None else dist.world_size,
    }
    if dist is not None:
        report["distributed"] = {
            "world_size": dist.world_size, "backend": dist.backend, "sharding": cfg.train.sharding,
            "embedding_optimizer": distributed.resolve_embedding_optimizer(cfg.train.embedding_optimizer, dist),
            "bits_sha256_by_rank": rank_digests,
        }
    return report


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def headline(report: dict) -> str:
    """One line: the ratio, the test AUC and, when measured, the fp32 model's."""
    line = f"{report['compression_ratio']:.1f}x at test AUC {report['test']['auc']:.4f}"
    if report.get("fp32_test"):
        line += f", fp32 {report['fp32_test']['auc']:.4f}"
    return line


def summary_table(report: dict) -> str:
    t = report["test"]
    rows = [
        ("test AUC", f"{t['auc']:.5f}"),
        ("test logloss", f"{t['logloss']:.5f}"),
        ("AUC from loaded export", f"{report['export_test_auc']:.5f}"),
        ("fp32 table bytes", f"{report['fp32_bytes']:,}"),
        ("packed export bytes", f"{report['packed_bytes']:,}"),
        ("compression ratio (bytes)", f"{report['compression_ratio']:.1f}x"),
        ("mean bits per row (32/mean)", f"{report['mean_bits_per_row']:.3f} ({report['paper_ratio_32_over_mean_bits']:.1f}x)"),
        ("search step / retrain step", f"{report['timings']['search_step_seconds'] * 1e3:.1f} ms / {report['timings']['retrain_step_seconds'] * 1e3:.1f} ms"),
        ("total time", f"{report['timings']['total_seconds']:.1f} s"),
    ]
    if report.get("fp32_test"):
        f = report["fp32_test"]
        rows.insert(2, ("fp32 test AUC / logloss", f"{f['auc']:.5f} / {f['logloss']:.5f} (same data, tower, seed)"))
    sp = report.get("spearman_frequency_bits")
    rows.append(("spearman(frequency, bits)", "n/a" if sp is None else f"{sp:.3f} over the groups seen in training"))
    rows.append(("penalty weights: sum", f"{report['penalty_weight_sum']:.2f} over {len(report['penalty_weights'])} groups"))
    if report.get("torchrec_quant_bytes"):
        rows.insert(6 if report.get("fp32_test") else 5, ("torchrec rowwise-quant bytes", f"{report['torchrec_quant_bytes']:,}"))
    b = report.get("bytes")
    if b:  # the export's parts, one a line (mpe.format.byte_breakdown)
        at = next(i for i, (k, _) in enumerate(rows) if k == "packed export bytes")
        parts = [("  codes", b["codes"]), ("  id map", b["id_map"]), ("  steps / offset", b["steps_offset"]),
                 ("vocabulary + preprocessing bytes", b["vocabulary"]), ("tower bytes", b["tower"])]
        if report.get("deployable_bytes") is not None:
            parts.append(("deployable bytes (scores a raw row)", report["deployable_bytes"]))
        rows[at + 1 : at + 1] = [(k, f"{v:,}") for k, v in parts]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def plot_bits(path: Path, group_freq: np.ndarray, bits: np.ndarray, title: str) -> None:
    """PNG of the chosen bit-width of each group against its mean training frequency."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(np.maximum(group_freq, 1e-1), bits, where="mid", color="tab:blue")
    ax.scatter(np.maximum(group_freq, 1e-1), bits, s=10, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("mean training count of the group's features (log)")
    ax.set_ylabel("chosen bit-width")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
