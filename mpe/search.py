"""Mixed-precision embedding search: ``python -m mpe.search --dataset criteo``.

Prepares (or reuses) the data, groups features by training frequency, learns each
group's distribution over bit-widths under a size penalty, selects one bit-width per
group, retrains the embeddings from their pre-search values at those bit-widths, writes
the bit-packed export and a report (``report.json``, ``bits_vs_frequency.png``), with the
test AUC of the fp32 model of the same data, tower and seed beside it.
With ``--target-ratio R`` the export is made about R times smaller than the fp32 tables:
lambda is adapted during the one search as the Lagrange multiplier of that byte budget
(``mpe.multiplier``), or found first by bisection over short searches (``--budget bisection``).

Under ``torchrun --nproc_per_node=N -m mpe.search ...`` every stage trains sharded over the
N processes; rank 0 alone writes the run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ctr import distributed
from ctr.options import add_training_arguments
from ctr.trainer import NonFiniteLossError
from data import sources
from data.artifacts import ArtifactError
from mpe.config import MPEConfig, add_mpe_arguments
from mpe.pipeline import FP32_BASELINES, run
from mpe.report import headline, summary_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpe.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sources.add_data_arguments(p)
    add_mpe_arguments(p)
    add_training_arguments(p)
    p.add_argument("--out", default=None, help="run directory (default runs/mpe_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-fp32-baseline", action="store_true",
                   help="skip the fp32 model trained on the same data, tower and seed for comparison "
                        f"(trained once, then cached in the prepared data's {FP32_BASELINES}/)")
    return p


def config_from_args(args: argparse.Namespace, dataset: str | None = None) -> MPEConfig:
    """This CLI's config: ``MPEConfig.from_args``, as every entry point builds it."""
    return MPEConfig.from_args(args, dataset=dataset)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dist = None
    try:
        cfg = config_from_args(args)
        dist = distributed.init_from_environment()
        data = sources.resolve_once(args, progress=cfg.train.progress, dist=dist)
        cfg = replace(cfg, dataset=data.dataset)
        out = Path(args.out or f"runs/mpe_{data.dataset}")
        report = run(data, cfg, out, resume=args.resume, dist=dist)
    except (sources.DataNotFoundError, ValueError, OSError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if dist is None or dist.is_main:
        print(f"\nMPE on {data.dataset} -> {out}: {headline(report)}\n{summary_table(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
