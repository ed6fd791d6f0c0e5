"""The one configuration of an MPE run, built the same way by every entry point.

``MPEConfig`` composes the model (``ctr.model.ModelConfig``), the training settings
(``ctr.trainer.TrainConfig``) and what the search adds (``SearchConfig``).
``MPEConfig.from_args`` builds it from the options of ``ctr.options.add_training_arguments``
and ``add_mpe_arguments``; ``mpe.search``, ``experiments.auc_vs_size`` and
``experiments.adapt`` all call it, so the benchmarks measure the MPE the CLI runs. The
argparse defaults are the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from ctr.model import ModelConfig
from ctr.options import model_config, train_config
from ctr.trainer import TrainConfig
from data.schema import DEFAULT_MPE_LAMBDA, SCHEMAS, get_schema
from mpe.bitwidths import DEFAULT_CANDIDATES, DEFAULT_PRUNED_AS, PRUNED_AS, validate_candidates
from mpe.embedding import MODES

# The paper's, as the shipped schema files give them ([mpe] lambda / l2 of data/schemas/*.toml); a
# schema file's dataset has its own, DEFAULT_MPE_LAMBDA / DEFAULT_MPE_L2 when it gives none.
DEFAULT_LAMBDA = {name: s.mpe_lambda for name, s in SCHEMAS.items()}
DEFAULT_L2 = {name: s.mpe_l2 for name, s in SCHEMAS.items()}  # L2 on rows and tower
SELECTIONS = ("threshold", "argmax", "budgeted")
BUDGET_METHODS = ("multiplier", "bisection")


@dataclass
class SearchConfig:
    """What MPE adds to training: groups, candidates, the size penalty and the selection.

    ``lam`` None: the dataset's default (``DEFAULT_LAMBDA``, a schema file's ``[mpe] lambda``).
    ``target_ratio``: make the export about R x smaller than fp32. ``budget="multiplier"``:
    in one search, lambda (starting from ``lam``) is a Lagrange multiplier adapted after
    every step (``mpe.multiplier``; ``multiplier_rate`` None: ``auto_multiplier_rate``);
    ``"bisection"``: lambda is found first by bisection over ``bisection_steps`` short
    searches on ``bisection_fraction`` of the training split. ``pruned_as``: what a 0-bit row
    reads as in the retrain and the export (``mpe.embedding``): its field's OOV row
    (``"oov"``) or the zero vector (``"zero"``, the paper's).
    """

    lam: float | None = None
    target_ratio: float | None = None
    groups: int = 128
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    mode: str = "expected"
    tau: float = 3e-3
    selection: str = "threshold"
    samples: int = 16
    budget: str = "multiplier"
    multiplier_rate: float | None = None
    bisection_steps: int = 6
    bisection_fraction: float = 0.25
    pruned_as: str = DEFAULT_PRUNED_AS

    def __post_init__(self) -> None:
        self.candidates = validate_candidates(self.candidates)
        if self.mode not in MODES:
            raise ValueError(f"unknown search mode {self.mode!r}; expected one of {MODES}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; expected one of {SELECTIONS}")
        if self.groups < 1:
            raise ValueError(f"--groups must be >= 1, got {self.groups}")
        if self.budget not in BUDGET_METHODS:
            raise ValueError(f"unknown budget method {self.budget!r}; expected one of {BUDGET_METHODS}")
        if self.pruned_as not in PRUNED_AS:
            raise ValueError(f"unknown --pruned-as {self.pruned_as!r}; expected one of {PRUNED_AS}")
        if self.multiplier_rate is not None and not self.multiplier_rate > 0:
            raise ValueError(f"--multiplier-rate must be > 0, got {self.multiplier_rate}")


def auto_multiplier_rate(steps: int) -> float:
    """The multiplier's rate for a search of ``steps`` steps: log(lambda) can move by 20
    (a factor 5e8) within the search, at least 0.01 and at most 0.1 per step."""
    return min(0.1, max(0.01, 20.0 / max(1, steps)))


@dataclass
class MPEConfig:
    """Everything that defines an MPE run besides the data.

    ``train.weight_decay`` is the L2 on rows and tower (the precision logits, steps and
    offset have none); ``fp32_baseline``: also train the fp32 model of the same settings for
    comparison (cached, see ``mpe.pipeline.fp32_baseline``).
    """

    dataset: str = "criteo"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(weight_decay=DEFAULT_L2["criteo"]))
    search: SearchConfig = field(default_factory=SearchConfig)
    fp32_baseline: bool = True

    def lambda_value(self) -> float:
        """lambda, or the dataset's default when none was given."""
        return self.search.lam if self.search.lam is not None else get_schema(self.dataset).mpe_lambda

    @classmethod
    def from_args(cls, args: argparse.Namespace, dataset: str | None = None, seed: int | None = None,
                  fp32_baseline: bool | None = None, **search_overrides) -> MPEConfig:
        """The config of parsed ``add_training_arguments`` + ``add_mpe_arguments`` options.

        ``dataset``: the resolved dataset name (default ``args.dataset``: a name or a schema file);
        ``--weight-decay`` absent means the dataset's L2 (``DEFAULT_L2``, a schema file's
        ``[mpe] l2``). ``seed`` replaces ``--seed`` (a benchmark's run of several seeds), ``fp32_baseline`` the CLI's ``--no-fp32-baseline``, and
        ``search_overrides`` the search fields (a benchmark's target ratio, say).
        """
        schema = get_schema(dataset or args.dataset)  # ValueError naming the known datasets
        name = schema.name
        search = SearchConfig(
            lam=args.lam, target_ratio=args.target_ratio, groups=args.groups, candidates=tuple(args.bits),
            mode=args.mode, tau=args.tau, selection=args.selection, samples=args.samples,
            budget=args.budget, multiplier_rate=args.multiplier_rate,
            bisection_steps=args.bisection_steps, bisection_fraction=args.bisection_fraction,
            pruned_as=args.pruned_as,
        )
        train = train_config(args, weight_decay=schema.mpe_l2)
        if fp32_baseline is None:
            fp32_baseline = not getattr(args, "no_fp32_baseline", False)
        return cls(
            dataset=name, model=model_config(args),
            train=train if seed is None else dataclasses.replace(train, seed=seed),
            search=dataclasses.replace(search, **search_overrides), fp32_baseline=fp32_baseline,
        )

    def settings(self) -> dict:
        """The settings a resumed run must share with the interrupted one (JSON form): all
        fields but the progress display and the fp32 comparison."""
        d = dataclasses.asdict(self)
        d.pop("fp32_baseline")
        d["train"].pop("progress")
        return json.loads(json.dumps(d))


_SEARCH = SearchConfig()


def add_mpe_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The MPE options; ``prefix`` (``"mpe-"`` in the benchmarks) only renames the flags,
    the destinations stay the same so ``MPEConfig.from_args`` reads them alike."""
    g = parser.add_argument_group("MPE")
    s = _SEARCH

    def add(flag: str, **kw) -> None:
        g.add_argument(f"--{prefix}{flag}", **kw)

    add("lambda", dest="lam", type=float, default=s.lam,
        help=f"size-penalty coefficient (default per dataset: {DEFAULT_LAMBDA}; a schema file's [mpe] lambda, "
             f"else {DEFAULT_MPE_LAMBDA:g})")
    add("target-ratio", dest="target_ratio", type=float, default=s.target_ratio,
        help="find lambda so the export is ~R x smaller than fp32")
    add("groups", dest="groups", type=int, default=s.groups, help=f"frequency groups (default {s.groups})")
    add("bits", dest="bits", type=int, nargs="+", default=list(s.candidates),
        help=f"candidate bit-widths (default {' '.join(map(str, s.candidates))}; 0 = pruned)")
    add("mode", dest="mode", choices=MODES, default=s.mode,
        help=f"search mode: expected mixture (reference) or Gumbel sample (default {s.mode})")
    add("tau", dest="tau", type=float, default=s.tau,
        help=f"softmax temperature of the precision logits (default {s.tau:g})")
    add("selection", dest="selection", choices=SELECTIONS, default=s.selection,
        help=f"how bits are chosen from the distributions (default {s.selection})")
    add("samples", dest="samples", type=int, default=s.samples,
        help=f"budgeted selection: assignments drawn (default {s.samples})")
    add("budget", dest="budget", choices=BUDGET_METHODS, default=s.budget,
        help="--target-ratio: how lambda meets the size budget: 'multiplier' adapts it during the one "
             "search (a Lagrange multiplier), 'bisection' first runs short searches to find it "
             f"(default {s.budget})")
    add("multiplier-rate", dest="multiplier_rate", type=float, default=s.multiplier_rate,
        help="--budget multiplier: largest change of log(lambda) per step (default: 20 / search steps, "
             "clipped to [0.01, 0.1])")
    add("pruned-as", dest="pruned_as", choices=PRUNED_AS, default=s.pruned_as,
        help="what a pruned (0-bit) feature reads as after the search, in the retrain and the export: its "
             "field's OOV row, like a rare or unseen value, so the export's vocabulary holds only the kept "
             f"values ('oov'), or the zero vector, the paper's ('zero'; default {s.pruned_as})")
    add("bisection-steps", dest="bisection_steps", type=int, default=s.bisection_steps,
        help=f"--target-ratio: short searches of the lambda bisection (default {s.bisection_steps})")
    add("bisection-fraction", dest="bisection_fraction", type=float, default=s.bisection_fraction,
        help=f"--target-ratio: share of the training split each short search sees (default {s.bisection_fraction:g})")
