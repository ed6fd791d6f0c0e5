"""Every entry point that runs MPE builds the same configuration for the same arguments."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import adapt, auc_vs_size
from mpe import search
from mpe.config import DEFAULT_L2, MPEConfig

COMMON = ["--dataset", "criteo", "--synthetic", "1000", "--hidden", "64", "32", "--epochs", "2",
          "--batch-size", "512", "--seed", "7"]


def configs(extra: list[str], mpe_extra: list[str]) -> dict[str, MPEConfig]:
    """The MPE config of ``mpe.search``, ``experiments.auc_vs_size`` (setting x20) and
    ``experiments.adapt`` (``--embedding mpe``) for the same options."""
    cli = search.config_from_args(search.build_parser().parse_args(
        [*COMMON, *extra, "--target-ratio", "20", *[a.replace("--mpe-", "--") for a in mpe_extra]]))
    bench = auc_vs_size.mpe_config(auc_vs_size.build_parser().parse_args(
        [*COMMON, *extra, *mpe_extra, "--out", "unused"]), "criteo", "x20", seed=7)
    adapted = adapt.mpe_config(adapt.build_parser().parse_args(
        [*COMMON, *extra, *mpe_extra, "--embedding", "mpe", "--mpe-target-ratio", "20", "--out", "unused"]),
        "criteo", seed=7)
    return {"mpe.search": cli, "auc_vs_size": bench, "adapt": adapted}


@pytest.mark.parametrize("extra, mpe_extra", [
    ([], []),
    (["--weight-decay", "1e-5", "--evals-per-epoch", "3", "--patience", "5", "--lr", "0.002"],
     ["--mpe-groups", "32", "--mpe-mode", "sample", "--mpe-tau", "0.01", "--mpe-bits", "0", "2", "4"]),
])
def test_the_three_entry_points_configure_mpe_alike(extra: list[str], mpe_extra: list[str]) -> None:
    built = configs(extra, mpe_extra)
    reference = built["mpe.search"].settings()
    for name, cfg in built.items():
        assert cfg.settings() == reference, name
    assert built["mpe.search"].search.target_ratio == 20


def test_defaults_are_the_dataclass_defaults_and_the_paper_l2() -> None:
    cfg = configs([], [])["mpe.search"]
    default = MPEConfig()
    assert cfg.search == dataclasses.replace(default.search, target_ratio=20)
    assert cfg.train.weight_decay == DEFAULT_L2["criteo"] == 3e-6
    assert cfg.train.evals_per_epoch == default.train.evals_per_epoch == 1
    avazu = search.config_from_args(search.build_parser().parse_args(["--dataset", "avazu"]))
    assert avazu.train.weight_decay == DEFAULT_L2["avazu"] == 0.0
    assert avazu.lambda_value() == 2e-6
