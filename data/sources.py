"""Where a run's data comes from: the user's raw files, a prepared directory, or the synthetic default.

Every CLI resolves its data here, so ``--data`` (one file, or several files / globs read as
one stream in order), ``--train/--val/--test`` (pre-split files), ``--prepared`` and
``--synthetic`` mean the same thing everywhere. Prepared output is cached under ``cache_dir``
keyed by every input file's path and the preprocessing parameters (``data.prepare`` reuses a
matching directory when the files' sizes and mtimes match too).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data.artifacts import ArtifactError
from data.batches import PreparedDataset
from data.prepare import (
    INPUT_HELP,
    MIN_COUNT_HELP,
    SPLIT_HELP,
    add_presplit_arguments,
    input_files,
    input_options,
    prepare,
    resolve_split,
)
from data.reader import ON_BAD_ROWS
from data.schema import SCHEMAS, DatasetSchema, get_schema, register_schema, schema_from_dict
from data.synthetic import GENERATOR_VERSION, generate
from data.synthetic_schema import SCHEMA_GENERATOR_VERSION, SUFFIX
from data.transforms import SPLIT_METHODS

DEFAULT_CACHE = Path("runs") / "cache"
RAW_NAMES = {"criteo": ("train.txt",), "avazu": ("train", "train.csv", "train.gz")}


class DataNotFoundError(RuntimeError):
    """No data was given and no real file was found; the message says how to get some."""


class InputList(list):
    """The paths of ``--data``: a list that prints as the paths, space-separated (for titles)."""

    def __str__(self) -> str:
        return " ".join(str(p) for p in self)


class _StoreInputs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, InputList(values))


def add_data_arguments(parser: argparse.ArgumentParser, synthetic_default: int | None = None) -> None:
    """The data options every CLI shares."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, metavar="criteo|avazu|SCHEMA",
                   help=f"dataset format: {' or '.join(SCHEMAS)}, or the path of a schema file describing your own "
                   "data (.toml or .json; README, 'Your own data')")
    g.add_argument(
        "--data", nargs="+", metavar="FILE", action=_StoreInputs, default=None,
        help="the real raw file(s) (Criteo train.txt / day_N, Avazu train). " + INPUT_HELP,
    )
    add_presplit_arguments(g)
    g.add_argument("--prepared", metavar="DIR", help="a directory already written by `python -m data.prepare`")
    g.add_argument(
        "--synthetic",
        metavar="ROWS",
        type=int,
        default=None,
        help="generate a synthetic file of ROWS rows in the real format (the embedded default"
        + (f"; {synthetic_default} when nothing else is given)" if synthetic_default else ")"),
    )
    g.add_argument("--days", type=int, default=1, help="synthetic: number of days (time order)")
    g.add_argument("--drift", type=float, default=0.0, help="synthetic: click-model drift between days")
    g.add_argument("--min-count", type=int, default=None, help=MIN_COUNT_HELP)
    g.add_argument("--split", choices=SPLIT_METHODS, default=None, help=SPLIT_HELP)
    g.add_argument("--data-seed", type=int, default=2022, help="split and synthetic-data seed (default 2022)")
    g.add_argument("--on-bad-rows", choices=ON_BAD_ROWS, default="error", help="malformed rows: stop or skip")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"where prepared data is cached (default {DEFAULT_CACHE})")


def find_real_file(dataset: str) -> Path | None:
    """A raw file in the conventional places (``$MPE_DATA_DIR/<dataset>/`` or ``datasets/<dataset>/``);
    a schema file's dataset has none."""
    if dataset not in RAW_NAMES:
        return None
    roots = [Path(os.environ["MPE_DATA_DIR"])] if os.environ.get("MPE_DATA_DIR") else []
    roots.append(Path("datasets"))
    for root in roots:
        for name in RAW_NAMES[dataset]:
            if (root / dataset / name).is_file():
                return root / dataset / name
    return None


def how_to_get(dataset: str) -> str:
    if dataset not in RAW_NAMES:
        return (f"no {dataset} data given: pass --data FILE... (the layout the schema file describes) or "
                "--synthetic ROWS for a synthetic file in that layout")
    hint = {
        "criteo": "the Criteo Display Advertising Challenge train.txt (Kaggle, ~11 GB, 45.8M rows)",
        "avazu": "the Avazu CTR Prediction train file (Kaggle, ~6 GB, 40.4M rows)",
    }[dataset]
    return (
        f"no {dataset} data given and none found in $MPE_DATA_DIR/{dataset}/ or datasets/{dataset}/.\n"
        f"  real data: download {hint}, then pass --data /path/to/{RAW_NAMES[dataset][0]}\n"
        f"  synthetic default (same raw format, planted click model): add --synthetic 200000"
    )


def synthetic_file(cache_dir: str | os.PathLike, dataset: str, rows: int, days: int = 1, drift: float = 0.0,
                   seed: int = 2022) -> Path:
    """Where the synthetic file of these generator arguments is cached (a schema file's dataset:
    keyed by its schema's digest too)."""
    schema = get_schema(dataset)
    if not schema.builtin:
        stem = f"{_cache_name(schema)}_sv{SCHEMA_GENERATOR_VERSION}"
        return Path(cache_dir) / "synthetic" / f"{stem}_{rows}rows_{days}d_drift{drift:g}_s{seed}{SUFFIX[schema.file_type]}"
    suffix = ".csv" if schema.name == "avazu" else ".txt"
    return Path(cache_dir) / "synthetic" / f"{schema.name}_v{GENERATOR_VERSION}_{rows}rows_{days}d_drift{drift:g}_s{seed}{suffix}"


def _cache_name(schema: DatasetSchema) -> str:
    """``criteo``, or ``my_clicks-1a2b3c4d`` (a schema file's name and digest)."""
    return schema.name if schema.builtin else f"{schema.name}-{schema.digest[:8]}"


def prepared_dir(cache_dir: str | os.PathLike, dataset: str | DatasetSchema,
                 raw: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any], min_count: int,
                 split: str | None, seed: int) -> Path:
    """Where the prepared output of ``raw`` with these parameters is cached.

    ``raw``: one file, several files / globs (in order), or ``{"train", "val", "test"}``
    pre-split files (``data.prepare.input_files``). The key covers every file's resolved path,
    in order (and its split); ``data.prepare`` checks their sizes and mtimes.
    """
    inputs = input_files(raw)
    split = resolve_split(split, inputs)
    name = _cache_name(get_schema(dataset))
    files = inputs.files
    if len(files) == 1 and not inputs.presplit:  # the name of a single file, as it always was
        key = hashlib.sha256(str(files[0].resolve()).encode()).hexdigest()[:10]
        stem = files[0].name
    else:
        lines = [f"{s}:{f.resolve()}" for s, f in zip(inputs.splits or [""] * len(files), files, strict=True)]
        key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]
        stem = f"{files[0].name}-{files[-1].name}_{len(files)}files"
    return Path(cache_dir) / "prepared" / f"{name}_{stem}_{key}_mc{min_count}_{split}_s{seed}"


def resolve(args: argparse.Namespace, progress: bool = True) -> PreparedDataset:
    """Turn the shared data options into a ``PreparedDataset`` (generating / preparing as needed)."""

    schema = get_schema(args.dataset)
    args.dataset = schema.name
    if args.prepared:
        return _open_prepared(args.prepared, schema)
    spec = input_options(getattr(args, "data", None), getattr(args, "train", None), getattr(args, "val", None),
                         getattr(args, "test", None), "--data")
    cache = Path(args.cache_dir)
    if spec is None and args.synthetic is None:
        found = find_real_file(schema.name)
        if found is None:
            raise DataNotFoundError(how_to_get(schema.name))
        spec = [found]
    if spec is None:
        raw = synthetic_file(cache, schema, args.synthetic, args.days, args.drift, args.data_seed)
        if not raw.exists():
            generate(schema, args.synthetic, raw, days=args.days, drift=args.drift, seed=args.data_seed, progress=progress)
        spec = [raw]
    inputs = input_files(spec, "--data")
    for raw in inputs.files:
        if raw.is_dir():
            raise IsADirectoryError(f"{raw}: is a directory, expected a raw {schema.name} file")
        if not raw.is_file():
            raise FileNotFoundError(f"{raw}: no such file")
    split = resolve_split(args.split, inputs)
    min_count = args.min_count if args.min_count is not None else schema.default_min_count
    out = prepared_dir(cache, schema, spec, min_count, split, args.data_seed)
    prepare(
        schema, spec, out, min_count=min_count, split=split, seed=args.data_seed,
        on_bad_rows=args.on_bad_rows, progress=progress,
    )
    return PreparedDataset(out)


def _open_prepared(path: str | os.PathLike, schema: DatasetSchema) -> PreparedDataset:
    """``--prepared DIR``: the directory, whose recorded schema (a schema file's dataset) must be
    the one ``--dataset`` names when that is a schema file, and is registered under its name."""
    data = PreparedDataset(path)
    recorded = data.manifest.get("schema")
    if isinstance(recorded, dict):
        if not schema.builtin and data.manifest.get("schema_sha256") != schema.digest:
            raise ValueError(
                f"{path}: prepared with another schema ({data.dataset}, schema_sha256 "
                f"{str(data.manifest.get('schema_sha256'))[:12]}...) than {schema.source or schema.name} "
                f"({schema.digest[:12]}...); prepare it again"
            )
        register_schema(schema if not schema.builtin else schema_from_dict(recorded))
    elif not schema.builtin:
        raise ValueError(f"{path}: prepared as {data.dataset}, not with the schema {schema.source or schema.name}")
    return data


def resolve_once(args: argparse.Namespace, progress: bool = True, dist=None) -> PreparedDataset:
    """``resolve`` in a multi-process run: rank 0 generates / prepares, the others wait and
    then open the same cached directory (``dist``: a ``genlora_rec.distributed.DistEnv``)."""
    if dist is None:
        return resolve(args, progress=progress)
    import torch.distributed as tdist

    failure = None
    if dist.is_main:
        try:
            data = resolve(args, progress=progress)
        except (DataNotFoundError, ValueError, OSError, ArtifactError) as e:
            failure = e
    box = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    tdist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        raise ValueError(f"rank 0 could not prepare the data ({box[0]})")
    return data if dist.is_main else resolve(args, progress=False)
