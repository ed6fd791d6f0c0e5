"""Serving benchmark: embedding lookups/s and load-time memory of MPE's bit-packed export
against fp32 torchrec tables and torchrec int8/int4 quantized tables, measured in one run.

    python -m experiments.bench_serving                         # 200k rows, < 1 minute
    python -m experiments.bench_serving --rows 1000000 --rounds 7

The table: ``--rows`` rows split evenly over ``--fields`` fields (Criteo's 26 by default),
dim ``--dim``, N(0, ``--init-std``) values. Lookup ids per field follow a Zipf(``--zipf``)
law over a fixed random permutation of the field's rows (frequent ids are scattered, not
contiguous). The MPE-like bit assignment gives each row 0..6 bits by its expected
frequency, rarest first, in the fractions of ``--bit-fractions`` (default: half the rows
pruned, 2% at 6 bits; mean ~1.3 bits), and LSQ steps of ~3 std / 2^(b-1); the table is
then written with ``mpe.writer.write_packed_export`` exactly as a search run exports it.

Contenders (each maps a KeyedJaggedTensor of ``B`` examples x ``F`` single-valued fields
to float32 rows; the dense tower is not run):

- ``fp32``: ``ctr.model.FP32Embedding`` (torchrec ``EmbeddingBagCollection``);
- ``packed``: ``mpe.serving.PackedEmbeddingModule`` over ``mpe.reader.load_packed_export``
  (decodes only the requested rows from the packed codes; the compiled C decoder);
- ``torch_export``: the same export decoded by torch operations only
  (``mpe.program.TorchPackedEmbedding`` behind per-field offsets), captured by
  ``torch.export`` with a dynamic batch dimension, saved to ``OUT/torch_export/embedding.pt2``
  and loaded back with plain ``torch.export.load``: the program a serving stack without this
  repository runs (its input: the KJT's values viewed as local ids [B, F]);
- ``torch_aoti`` (only when named in ``--contenders``: it compiles for ~30 s): that program
  compiled by AOTInductor (``mpe.program.compile_program``, ``OUT/torch_export/embedding_aoti.pt2``)
  and loaded with ``torch._inductor.aoti_load_package``, what ``python -m mpe.export --aoti`` writes;
- ``mpe_torchrec``: the same MPE buckets as torchrec INT2/INT4/INT8 tables
  (``mpe.torchrec_size.build_torchrec_quant``), global ids located through the id map;
- ``ptq_int8`` / ``ptq_int4``: the fp32 tables quantized rowwise by torchrec
  (``baselines.ptq.TorchrecPTQEmbedding``), uniform bit-width, fbgemm kernels.

Timing: ``--rounds`` rounds; in each round every contender (order rotated) runs calls
cycling over pre-built batches for at least ``--min-time`` seconds; lookups/s of a round =
calls x B x F / seconds; the median over rounds is reported with its ratio to fp32 in the
same run. Bytes: fp32 rows x D x 4; packed: the payload files on disk (codes + steps +
offset + id map); torch_export: the decoder's buffers in memory (codes + locator + pair
tables; the ``.pt2`` file size is in the table summary); torchrec: measured TBE weight
buffers (+ id map for ``mpe_torchrec``).

Memory: each loader runs in its own subprocess (``VmHWM`` / ``ru_maxrss``): the process
imports torch/torchrec, records its RSS, loads the tables from disk, does one lookup and
records the peak again. ``fp32`` loads one ``.npy`` file per field into the torchrec
tables; ``packed`` runs ``load_packed_export``; ``torch_export`` runs ``torch.export.load`` on
the ``.pt2`` file; ``ptq_*`` run
``TorchrecPTQEmbedding.from_export``; ``mpe_torchrec`` loads the packed export then builds
its torchrec tables. Reported: the peak increase over the post-import baseline.

Pipeline (``--pipeline``): raw text to probabilities, as ``python -m mpe.predict`` runs it.
An ``mpe.search`` run on a synthetic Criteo file of ``--pipeline-rows`` rows at
``--target-ratio`` (or an existing ``--pipeline-run``), then the whole labeled file scored
``--rounds`` times by two scorers that share the reader, the export's vocabulary and the tower
(``mpe.predict.Scorer``): ``mpe_predict`` (the packed export's served model) and ``fp32``
(the same rows, decoded once, in a torchrec fp32 ``EmbeddingBagCollection``). Reported: rows/s
of each (median), their ratio (target >= 0.7 at 1M rows), whether the probabilities agree, and
the export's byte breakdown (``mpe.format.byte_breakdown``) for the ``exact`` vocabulary and a
``compact`` re-export: deployable bytes / embedding bytes (target <= 2 at 200x on 1M rows).
``OUT/bench_serving_pipeline.json``. Example:
``python -m experiments.bench_serving --pipeline --pipeline-rows 1000000 --target-ratio 200``.

Results: ``OUT/bench_serving.json``, ``OUT/bench_serving.csv`` (lookups) and
``OUT/bench_serving_memory.csv``. Not a test: timings depend on the machine, and the
development machine is a shared, loaded 2-core box (run with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from baselines.ptq import TorchrecPTQEmbedding
from ctr.model import FP32Embedding, table_name
from data.artifacts import atomic_write_json
from data.batches import to_kjt
from experiments.results_csv import write_rows
from mpe.program import TorchPackedEmbedding, capture_embedding, compile_program
from mpe.quantizer import LSQQuantizer
from mpe.reader import load_packed_export
from mpe.serving import PackedEmbeddingModule
from mpe.torchrec_size import build_torchrec_quant
from mpe.writer import write_packed_export

CONTENDERS = ("fp32", "packed", "torch_export", "torch_aoti", "mpe_torchrec", "ptq_int8", "ptq_int4")
DEFAULT_CONTENDERS = tuple(c for c in CONTENDERS if c != "torch_aoti")  # it compiles for ~30 s
PACKED_CONTENDERS = ("packed", "torch_export", "torch_aoti", "mpe_torchrec")  # serve the packed export
MEMORY_KINDS = ("fp32", "packed", "torch_export", "mpe_torchrec", "ptq_int8", "ptq_int4")
PROGRAM_DIR, PROGRAM_NAME, COMPILED_NAME = "torch_export", "embedding.pt2", "embedding_aoti.pt2"
DEFAULT_BIT_FRACTIONS = "0.50,0.15,0.12,0.10,0.07,0.04,0.02"  # rows at 0,1,..,6 bits, rarest first
SHARED_MACHINE_NOTE = (
    "timings measured on a shared machine under background load; compare ratios within one run only"
)


def _rss_mb() -> tuple[float, float]:
    """(peak, current) resident set size of this process, MiB (``VmHWM``/``VmRSS``;
    ``ru_maxrss`` for the peak where /proc is missing)."""
    peak = cur = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
                elif line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
    except OSError:
        pass
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale
    return float(peak), float(cur if cur is not None else peak)


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def field_cardinalities(rows: int, num_fields: int) -> list[int]:
    """``rows`` split over ``num_fields`` fields as evenly as possible (each >= 1)."""
    if rows < num_fields:
        raise ValueError(f"--rows {rows} is smaller than --fields {num_fields}")
    base, extra = divmod(rows, num_fields)
    return [base + (1 if f < extra else 0) for f in range(num_fields)]


def zipf_permutations(cards: list[int], seed: int) -> list[np.ndarray]:
    """Per field: the row id of frequency rank r (a fixed random permutation)."""
    rng = np.random.default_rng(seed + 1)
    return [rng.permutation(c).astype(np.int64) for c in cards]


def sample_ids(cards: list[int], perms: list[np.ndarray], batch: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """int64 [batch, F] per-field row ids, Zipf(a) over each field's frequency ranks."""
    cols = []
    for card, perm in zip(cards, perms, strict=True):
        rank = (rng.zipf(a, size=batch) - 1) % card
        cols.append(perm[rank])
    return np.stack(cols, axis=1)


def mpe_like_bits(cards: list[int], perms: list[np.ndarray], a: float, fractions: list[float]) -> np.ndarray:
    """int64 [N] bits per global row: rows sorted by expected Zipf frequency, rarest first,
    cut into ``fractions`` (bit b gets ``fractions[b]`` of the rows)."""
    probs = []
    for card, perm in zip(cards, perms, strict=True):
        p = np.zeros(card)
        ranks = np.arange(1, card + 1, dtype=np.float64)
        p[perm] = ranks ** (-a) / np.sum(ranks ** (-a))
        probs.append(p)
    prob = np.concatenate(probs)
    order = np.argsort(prob, kind="stable")  # rarest first
    frac = np.asarray(fractions, dtype=np.float64)
    cuts = np.round(np.cumsum(frac / frac.sum()) * prob.size).astype(np.int64)
    bits_sorted = np.searchsorted(cuts, np.arange(prob.size), side="right")
    bits = np.empty(prob.size, dtype=np.int64)
    bits[order] = np.minimum(bits_sorted, len(fractions) - 1)
    return bits


def build_tables(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Write the fp32 tables (one .npy per field), the packed export and the ptq exports."""
    from torchrec.modules.embedding_configs import DataType


    fields = [f"f{i}" for i in range(args.fields)]
    cards = field_cardinalities(args.rows, args.fields)
    offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(np.int64).tolist()
    perms = zipf_permutations(cards, args.seed)
    fractions = [float(x) for x in args.bit_fractions.split(",")]
    bits = mpe_like_bits(cards, perms, args.zipf, fractions)

    torch.manual_seed(args.seed)
    fp32 = FP32Embedding(fields, cards, args.dim, init_std=args.init_std)
    (out / "fp32").mkdir(parents=True, exist_ok=True)
    for f in fields:
        np.save(out / "fp32" / f"{table_name(f)}.npy", fp32.ebc.embedding_bags[table_name(f)].weight.detach().numpy())

    cands = tuple(range(len(fractions)))
    quant = LSQQuantizer(cands, args.dim, args.rows)
    with torch.no_grad():
        quant.alpha.copy_(torch.tensor([3 * args.init_std / 2 ** max(b - 1, 0) for b in cands]))
    header = write_packed_export(out / "packed", fp32.global_weight(), bits, quant, fields, offsets,
                                 extra_meta={"source": "experiments.bench_serving synthetic table"})
    program_file = out / PROGRAM_DIR / PROGRAM_NAME
    program_file.parent.mkdir(parents=True, exist_ok=True)
    program = capture_embedding(load_packed_export(out / "packed"), offsets)
    torch.export.save(program, program_file)
    if "torch_aoti" in args.contenders.split(","):
        compile_program(program, program_file.with_name(COMPILED_NAME))
    ptq_bytes = {}
    for name, dt in (("ptq_int8", DataType.INT8), ("ptq_int4", DataType.INT4)):
        emb = TorchrecPTQEmbedding.from_float(fp32, dt)
        emb.export(out / name)
        ptq_bytes[name] = emb.weight_bytes()
    table = {
        "rows": args.rows, "fields": args.fields, "dim": args.dim, "cardinalities": cards,
        "field_offsets": offsets, "zipf_a": args.zipf, "bit_fractions": fractions,
        "rows_per_bits": {str(b): int(n) for b, n in enumerate(np.bincount(bits, minlength=len(fractions)))},
        "mean_bits": float(bits.mean()), "packed_total_bytes": int(header["total_bytes"]),
        "ptq_weight_bytes": ptq_bytes, "torch_export_file_bytes": program_file.stat().st_size,
    }
    return {"fp32": fp32, "fields": fields, "cards": cards, "offsets": offsets, "perms": perms, "table": table}


# ---------------------------------------------------------------------------------------------
# serving throughput
# ---------------------------------------------------------------------------------------------
def _local_ids(kjt, num_fields: int) -> torch.Tensor:
    """int64 [B, F] per-field ids of a KJT of B examples x F single-valued fields (a view)."""
    return kjt.values().view(num_fields, kjt.stride()).t()


def make_contenders(built: dict[str, Any], out: Path, names: list[str]) -> dict[str, tuple[Callable, int]]:
    """name -> (kjt -> Tensor, bytes) for each contender, loaded from the files just written."""

    fp32, fields, offsets = built["fp32"], built["fields"], built["offsets"]
    off_t = torch.as_tensor(offsets, dtype=torch.int64)
    res: dict[str, tuple[Callable, int]] = {}
    packed = load_packed_export(out / "packed") if set(PACKED_CONTENDERS) & set(names) else None
    for name in names:
        if name == "fp32":
            res[name] = (fp32, fp32.num_bytes())
        elif name == "packed":
            mod = PackedEmbeddingModule(packed, fields, offsets)
            res[name] = (mod, mod.num_bytes())
        elif name == "torch_export":
            program = torch.export.load(out / PROGRAM_DIR / PROGRAM_NAME).module()

            def run_program(kjt, program=program):
                return program(_local_ids(kjt, len(fields)))

            res[name] = (run_program, TorchPackedEmbedding(packed).num_bytes())
        elif name == "torch_aoti":
            compiled = torch._inductor.aoti_load_package(str(out / PROGRAM_DIR / COMPILED_NAME))

            def run_compiled(kjt, compiled=compiled):
                return compiled(_local_ids(kjt, len(fields)).contiguous())

            res[name] = (run_compiled, TorchPackedEmbedding(packed).num_bytes())
        elif name == "mpe_torchrec":
            tq = build_torchrec_quant(packed)

            def fn(kjt, tq=tq):
                b = kjt.stride()
                ids = _local_ids(kjt, len(fields)) + off_t
                return tq.lookup(ids.reshape(-1)).view(b, len(fields), -1)

            res[name] = (fn, tq.num_bytes())
        elif name.startswith("ptq_"):
            emb = TorchrecPTQEmbedding.from_export(out / name).eval()
            res[name] = (emb, emb.weight_bytes())
        else:
            raise ValueError(f"unknown contender {name!r} (one of {', '.join(CONTENDERS)})")
    return res


@torch.inference_mode()
def time_contenders(contenders: dict[str, tuple[Callable, int]], kjts: list, batch: int, num_fields: int,
                    rounds: int, min_time: float, min_calls: int) -> dict[str, list[float]]:
    """name -> lookups/s of every round (order rotated between rounds)."""
    names = list(contenders)
    for n in names:  # warm-up
        contenders[n][0](kjts[0])
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            fn = contenders[n][0]
            calls, t0 = 0, time.perf_counter()
            while True:
                fn(kjts[calls % len(kjts)])
                calls += 1
                el = time.perf_counter() - t0
                if el >= min_time and calls >= min_calls:
                    break
            rates[n].append(calls * batch * num_fields / el)
    return rates


@torch.inference_mode()
def check_outputs(contenders: dict[str, tuple[Callable, int]], kjt) -> dict[str, float]:
    """Max |difference| of every contender against its reference on one batch (packed,
    torch_export and mpe_torchrec against the packed export; fp32 and ptq against fp32): a
    sanity check."""
    ref = {}
    if "fp32" in contenders:
        ref["fp32"] = contenders["fp32"][0](kjt)
    if "packed" in contenders:
        ref["packed"] = contenders["packed"][0](kjt)
    diffs = {}
    for n, (fn, _) in contenders.items():
        base = ref.get("packed" if n in PACKED_CONTENDERS else "fp32")
        if base is not None:
            diffs[n] = float((fn(kjt).to(torch.float32) - base).abs().max())
    return diffs


# ---------------------------------------------------------------------------------------------
# load-time memory (one subprocess per loader)
# ---------------------------------------------------------------------------------------------
def _child_load(kind: str, out: Path) -> dict[str, Any]:
    """Runs in a fresh process: import, baseline RSS, load ``kind`` from ``out``, one lookup."""
    torch.set_num_threads(1)
    import torchrec  # noqa: F401  (imported before the baseline, as every loader needs it)


    table = json.loads((out / "table.json").read_text())
    fields = [f"f{i}" for i in range(table["fields"])]
    ids = np.zeros((4, len(fields)), dtype=np.int64)
    kjt = to_kjt(ids, fields)
    base_peak, base_cur = _rss_mb()
    t0 = time.perf_counter()
    if kind == "fp32":
        emb = FP32Embedding(fields, table["cardinalities"], table["dim"], init_std=0.0)
        with torch.no_grad():
            for f in fields:
                emb.ebc.embedding_bags[table_name(f)].weight.copy_(torch.from_numpy(np.load(out / "fp32" / f"{table_name(f)}.npy")))
        fn, nbytes = emb, emb.num_bytes()
    elif kind == "packed":
        packed = load_packed_export(out / "packed")
        fn = PackedEmbeddingModule(packed, fields, table["field_offsets"])
        nbytes = fn.num_bytes()
    elif kind == "torch_export":
        program = torch.export.load(out / PROGRAM_DIR / PROGRAM_NAME).module()
        fn = lambda k: program(_local_ids(k, len(fields)))  # noqa: E731
        nbytes = (out / PROGRAM_DIR / PROGRAM_NAME).stat().st_size
    elif kind == "mpe_torchrec":
        tq = build_torchrec_quant(load_packed_export(out / "packed"))
        fn, nbytes = (lambda k: tq.lookup(k.values())), tq.num_bytes()
    elif kind.startswith("ptq_"):
        emb = TorchrecPTQEmbedding.from_export(out / kind)
        fn, nbytes = emb, emb.weight_bytes()
    else:
        raise ValueError(f"unknown memory kind {kind!r}")
    with torch.inference_mode():
        fn(kjt)
    seconds = time.perf_counter() - t0
    peak, cur = _rss_mb()
    return {
        "kind": kind, "table_bytes": int(nbytes), "load_seconds": seconds,
        "baseline_rss_mb": base_cur, "baseline_peak_mb": base_peak, "peak_rss_mb": peak, "rss_after_mb": cur,
        "load_peak_delta_mb": peak - base_peak, "resident_delta_mb": cur - base_cur,
    }


def measure_memory(kind: str, out: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_serving", "--child-load", kind, "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="total table rows (default 200000; e.g. 1000000)")
    p.add_argument("--fields", type=int, default=26, help="fields (tables), rows split evenly (default 26)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the lookup ids (default 1.2)")
    p.add_argument("--bit-fractions", default=DEFAULT_BIT_FRACTIONS,
                   help=f"fractions of rows at 0,1,..,6 bits, rarest first (default {DEFAULT_BIT_FRACTIONS})")
    p.add_argument("--init-std", type=float, default=0.01, help="std of the synthetic fp32 rows")
    p.add_argument("--batch-sizes", default="1,4096", help="comma-separated batch sizes (examples; default 1,4096)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"subset of {','.join(CONTENDERS)} (default all but torch_aoti)")
    p.add_argument("--memory", default=",".join(MEMORY_KINDS),
                   help=f"loaders measured in subprocesses, subset of {','.join(MEMORY_KINDS)}; '' to skip")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported; default 5)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per contender per round (default 0.2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_serving")
    p.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pipeline", action="store_true",
                   help="instead: mpe.predict from raw text vs the fp32 model through the same pipeline, and "
                   "deployable bytes vs embedding bytes (module docstring)")
    p.add_argument("--pipeline-rows", type=int, default=1_000_000, help="synthetic Criteo rows (default 1000000)")
    p.add_argument("--target-ratio", type=float, default=200.0, help="the run's compression target (default 200)")
    p.add_argument("--pipeline-run", default=None, metavar="DIR", help="an existing mpe.search run to use instead")
    p.add_argument("--search-args", default="", help="extra mpe.search options, one string (e.g. '--epochs 1')")
    return p


def run_pipeline(args: argparse.Namespace, out: Path) -> dict:
    """The ``--pipeline`` measurement (module docstring); returns what it writes."""
    import shlex

    from ctr.model import CTRModel
    from data.batches import PreparedDataset
    from mpe import search
    from mpe.exporter import export_model
    from mpe.format import HEADER_FILE
    from mpe.predict import Scorer, load_scorer
    from mpe.run_dir import load_model

    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.pipeline_run) if args.pipeline_run else out / "pipeline_run"
    if not args.pipeline_run:
        rc = search.main(["--dataset", "criteo", "--synthetic", str(args.pipeline_rows), "--out", str(run),
                          "--cache-dir", str(out / "cache"), "--target-ratio", str(args.target_ratio),
                          "--no-progress", *shlex.split(args.search_args)])
        if rc != 0:
            raise RuntimeError(f"mpe.search exited with {rc}")
    report = json.loads((run / "report.json").read_text())
    prepared = PreparedDataset(report["data"])
    raw = [Path(i["path"]) for i in prepared.manifest["inputs"]]
    export = run / "export"
    packed_scorer = load_scorer(export)
    served = packed_scorer.model
    packed = served.embedding.packed
    fp32 = FP32Embedding(packed.fields, prepared.cardinalities, packed.dim)
    dense = packed.to_dense()
    with torch.no_grad():
        for f, name in enumerate(packed.fields):
            lo = packed.field_offsets[f]
            fp32.ebc.embedding_bags[table_name(name)].weight.copy_(dense[lo : lo + prepared.cardinalities[f]])
    fp32_scorer = Scorer(packed_scorer.vocabulary, CTRModel(fp32, served.tower), packed_scorer.fields)
    scorers = {"mpe_predict": packed_scorer, "fp32": fp32_scorer}
    rates: dict[str, list[float]] = {n: [] for n in scorers}
    results = {}
    for r in range(max(1, args.rounds)):
        for name in (list(scorers) if r % 2 == 0 else list(scorers)[::-1]):
            res = scorers[name].score(raw)
            rates[name].append(res.rows_per_second)
            results[name] = res
    med = {n: float(np.median(v)) for n, v in rates.items()}
    agree = float(np.abs(results["mpe_predict"].probabilities.astype(np.float64)
                         - results["fp32"].probabilities.astype(np.float64)).max())

    model, meta = load_model(run)
    compact_dir = out / "pipeline_compact_export"
    export_model(model, meta, compact_dir, torchrec=False, prepared=prepared, vocabulary="compact")
    sizes = {}
    for mode, d in (("exact", export), ("compact", compact_dir)):
        b = json.loads((d / HEADER_FILE).read_text())["bytes"]
        sizes[mode] = {**b, "deployable_over_embedding": b["deployable_total"] / b["embedding_total"],
                       "deployable_without_tower_over_embedding": (b["deployable_total"] - b["tower"]) / b["embedding_total"]}
    result = {
        "rows": results["mpe_predict"].rows, "rows_per_s": med, "ratio_to_fp32": med["mpe_predict"] / med["fp32"],
        "rounds_rows_per_s": rates, "max_abs_diff_fp32_vs_packed": agree,
        "auc": results["mpe_predict"].metrics, "compression_ratio": report["compression_ratio"],
        "bytes": sizes, "run": str(run), "note": SHARED_MACHINE_NOTE,
    }
    print(f"raw text -> probabilities, {result['rows']:,} rows, median of {len(rates['fp32'])} rounds "
          f"({SHARED_MACHINE_NOTE})")
    for n in scorers:
        print(f"  {n:<12} {med[n]:>12,.0f} rows/s")
    print(f"  mpe_predict / fp32: {result['ratio_to_fp32']:.2f}x (target >= 0.7); max |diff| {agree:.3g}")
    print(f"bytes at {report['compression_ratio']:.1f}x (embedding bytes = the ratio's):")
    for mode, b in sizes.items():
        print(f"  {mode:<8} codes {b['codes']:,}  id map {b['id_map']:,}  steps/offset {b['steps_offset']:,}  "
              f"vocabulary {b['vocabulary']:,}  tower {b['tower']:,}  embedding {b['embedding_total']:,}  "
              f"deployable {b['deployable_total']:,} ({b['deployable_over_embedding']:.2f}x embedding; "
              f"{b['deployable_without_tower_over_embedding']:.2f}x without the tower)")
    atomic_write_json(out / "bench_serving_pipeline.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.child_load:
        print(json.dumps(_child_load(args.child_load, out)))
        return 0
    torch.set_num_threads(args.threads)
    if args.pipeline:
        run_pipeline(args, out)
        return 0

    names = [n for n in args.contenders.split(",") if n]
    kinds = [k for k in args.memory.split(",") if k]
    for n in names:
        if n not in CONTENDERS:
            raise SystemExit(f"unknown contender {n!r} (one of {', '.join(CONTENDERS)})")
    for n in kinds:
        if n not in MEMORY_KINDS:
            raise SystemExit(f"unknown memory kind {n!r} (one of {', '.join(MEMORY_KINDS)})")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build_tables(args, out)
    atomic_write_json(out / "table.json", built["table"])
    print(f"table: {args.rows:,} rows x {args.dim} dims in {args.fields} fields, Zipf {args.zipf}, "
          f"mean {built['table']['mean_bits']:.2f} bits ({time.perf_counter() - t0:.1f}s to build)")
    contenders = make_contenders(built, out, names)
    rng = np.random.default_rng(args.seed)
    fields, cards, perms = built["fields"], built["cards"], built["perms"]
    diffs = check_outputs(contenders, to_kjt(sample_ids(cards, perms, 256, args.zipf, rng), fields))

    serving = []
    fp32_bytes = contenders["fp32"][1] if "fp32" in contenders else args.rows * args.dim * 4
    for b in batch_sizes:
        n_batches = max(2, min(256, 65536 // b))
        kjts = [to_kjt(sample_ids(cards, perms, b, args.zipf, rng), fields) for _ in range(n_batches)]
        rates = time_contenders(contenders, kjts, b, len(fields), args.rounds, args.min_time,
                                min_calls=3 if b > 1 else 20)
        med = {n: float(np.median(r)) for n, r in rates.items()}
        for n in names:
            serving.append({
                "method": n, "batch_size": b, "lookups_per_batch": b * len(fields),
                "lookups_per_s": med[n],
                "ratio_to_fp32": med[n] / med["fp32"] if "fp32" in med else None,
                "us_per_batch": 1e6 * b * len(fields) / med[n],
                "bytes": int(contenders[n][1]), "compression_vs_fp32": fp32_bytes / contenders[n][1],
                "max_abs_diff_vs_reference": diffs.get(n),
                "rounds_lookups_per_s": ";".join(f"{x:.0f}" for x in rates[n]),
            })

    memory = [measure_memory(k, out) for k in kinds]
    fp32_mem = next((m for m in memory if m["kind"] == "fp32"), None)
    for m in memory:
        m["peak_delta_ratio_to_fp32"] = (m["load_peak_delta_mb"] / fp32_mem["load_peak_delta_mb"]
                                         if fp32_mem and fp32_mem["load_peak_delta_mb"] > 0 else None)

    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
               "gpu": torch.cuda.is_available(), "note": SHARED_MACHINE_NOTE}
    print(f"embedding lookups (B examples x {len(fields)} fields), median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s); {SHARED_MACHINE_NOTE}")
    print(f"  {'method':<13} {'batch':>5} {'lookups/s':>12} {'vs fp32':>8} {'us/batch':>10} {'bytes':>13} {'fp32/bytes':>10}")
    for r in serving:
        ratio = f"{r['ratio_to_fp32']:.2f}x" if r["ratio_to_fp32"] is not None else "-"
        print(f"  {r['method']:<13} {r['batch_size']:>5} {r['lookups_per_s']:>12,.0f} {ratio:>8} "
              f"{r['us_per_batch']:>10.1f} {r['bytes']:>13,} {r['compression_vs_fp32']:>9.1f}x")
    if memory:
        print("load from disk + one lookup, own subprocess each (MiB; delta over the post-import baseline)")
        print(f"  {'loader':<13} {'bytes':>13} {'peak delta':>11} {'resident delta':>15} {'vs fp32':>8} {'peak RSS':>9}")
        for m in memory:
            ratio = f"{m['peak_delta_ratio_to_fp32']:.2f}x" if m["peak_delta_ratio_to_fp32"] is not None else "-"
            print(f"  {m['kind']:<13} {m['table_bytes']:>13,} {m['load_peak_delta_mb']:>11.1f} "
                  f"{m['resident_delta_mb']:>15.1f} {ratio:>8} {m['peak_rss_mb']:>9.1f}")
    atomic_write_json(out / "bench_serving.json", {
        "serving": serving, "memory": memory, "table": built["table"], "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k != "child_load"},
        "seconds_total": time.perf_counter() - t0,
    })
    for name, rows in (("bench_serving.csv", serving), ("bench_serving_memory.csv", memory)):
        if rows:
            write_rows(out / name, rows, list(rows[0]))
    print(f"-> {out / 'bench_serving.json'} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
