"""``python -m mpe.export --run DIR --out DIR [--torch-export] [--aoti]``: (re)write the bit-packed export
of a finished ``mpe.search`` run and report its bytes beside the fp32 and torchrec-quantized
sizes; ``--torch-export`` adds the served model as a ``torch.export`` program
(``mpe.program``), ``--aoti`` that program compiled by AOTInductor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.artifacts import ArtifactError, atomic_write_json, read_json
from data.batches import PreparedDataset
from encoding.sizes import fp32_table_bytes
from mpe.exporter import export_model
from mpe.format import COMPILED_FILE, HEADER_FILE, PROGRAM_FILE
from mpe.program import write_compiled_program, write_exported_program
from mpe.run_dir import load_model
from mpe.vocabulary import VOCAB_MODES

EXPORT_REPORT = "export_report.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpe.export",
        description="Write the bit-packed export of an `mpe.search` run (codes per bit bucket, steps, "
        "offset, id map, tower; sha256 of every file in header.json) and report its bytes next to "
        "the fp32 and torchrec rowwise-quantized sizes.",
    )
    p.add_argument("--run", required=True, help="run directory written by `python -m mpe.search`")
    p.add_argument("--out", required=True, help="export directory (replaced as a whole)")
    p.add_argument("--no-torchrec", action="store_true", help="skip the torchrec quantized-size report")
    p.add_argument("--prepared", metavar="DIR", default=None,
                   help="the prepared data directory the run was trained on (default: the one its report.json "
                   "names); its preprocessing and the kept features' vocabulary go into the export, which "
                   "`python -m mpe.predict` then scores raw rows with")
    p.add_argument("--vocabulary", choices=(*VOCAB_MODES, "none"), default="exact",
                   help="exact: the kept features' tokens, plus the pruned ones of fields whose OOV row has bits "
                   "(predictions equal the served model's on every value seen in preparation); compact: the kept "
                   "tokens only (a pruned token of such a field gets the OOV row); none: no vocabulary "
                   "(default exact)")
    p.add_argument("--torch-export", action="store_true",
                   help=f"also write {PROGRAM_FILE}: the served model (torch-only decoder + tower, local ids "
                   "[B, F] -> click probabilities [B]) captured by torch.export, verified against the "
                   "served model and recorded in header.json (load it with mpe.serving.load_exported_program "
                   "or plain torch.export.load)")
    p.add_argument("--aoti", action="store_true",
                   help=f"also write {COMPILED_FILE} (implies --torch-export): that program compiled by "
                   "AOTInductor, its decoder ops fused into native loops; verified like it and recorded in "
                   "header.json; it runs only on the torch version and CPU kind it was compiled with (load it "
                   "with mpe.serving.load_compiled_program, torch._inductor.aoti_load_package or C++ "
                   "torch::inductor::AOTIModelPackageLoader); needs a C++ compiler at export time")
    return p


def _prepared(args: argparse.Namespace) -> PreparedDataset | None:
    """The run's prepared data: ``--prepared``, else the directory its report names (None, with a
    note, when neither is there: the export then holds no vocabulary)."""
    if args.prepared:
        return PreparedDataset(args.prepared)
    report = Path(args.run) / "report.json"
    data = read_json(report).get("data") if report.is_file() else None
    if data and Path(data).is_dir():
        return PreparedDataset(data)
    print(f"note: no prepared data found for {args.run} (give --prepared DIR): the export holds no vocabulary "
          "and cannot score raw rows", file=sys.stderr)
    return None


def format_bytes(b: dict, deployable: bool = True) -> str:
    """The byte breakdown (``mpe.format.byte_breakdown``), one part a line."""
    rows = [("codes", b["codes"]), ("id map", b["id_map"]), ("steps / offset", b["steps_offset"]),
            ("embedding total (the ratio's)", b["embedding_total"]), ("vocabulary + preprocessing", b["vocabulary"]),
            ("tower", b["tower"])]
    if deployable:
        rows.append(("deployable total", b["deployable_total"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v:>12,} bytes" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, meta = load_model(args.run)
        prepared = _prepared(args) if args.vocabulary != "none" else None
        result = export_model(model, meta, args.out, torchrec=not args.no_torchrec,
                              extra_meta={"run": str(Path(args.run).resolve())}, prepared=prepared,
                              vocabulary=None if args.vocabulary == "none" else args.vocabulary)
        if args.torch_export or args.aoti:
            result["program"] = write_exported_program(args.out)
        if args.aoti:
            result["compiled_program"] = write_compiled_program(args.out)
    except (ArtifactError, OSError, ValueError, RuntimeError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = json.loads((Path(args.out) / HEADER_FILE).read_text())
    fp32 = fp32_table_bytes(header["num_rows"], header["dim"])
    result["fp32_bytes"] = fp32
    atomic_write_json(Path(args.out) / EXPORT_REPORT, result)
    print(f"packed export: {result['total_bytes']:,} bytes ({fp32 / result['total_bytes']:.1f}x smaller than fp32 {fp32:,})")
    print(format_bytes(result["bytes"], deployable=result.get("deployable_bytes") is not None))
    if "torchrec_quant_bytes" in result:
        print(f"torchrec rowwise-quantized tables: {result['torchrec_quant_bytes']:,} bytes ({fp32 / result['torchrec_quant_bytes']:.1f}x)")
    if "program" in result:
        prog = result["program"]
        print(f"torch.export program: {prog['file']} ({prog['bytes']:,} bytes; decoder buffers "
              f"{prog['decoder_bytes']['total']:,}, locator {prog['decoder_bytes']['locator']:,})")
    if "compiled_program" in result:
        comp = result["compiled_program"]
        print(f"AOTInductor package: {comp['file']} ({comp['bytes']:,} bytes, compiled in {comp['compile_seconds']} s "
              f"for torch {comp['torch_version']} on {comp['machine']})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
