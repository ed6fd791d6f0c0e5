"""``python -m mpe.export --run DIR --out DIR [--torch-export]``: (re)write the bit-packed export
of a finished ``mpe.search`` run and report its bytes beside the fp32 and torchrec-quantized
sizes; ``--torch-export`` adds the served model as a ``torch.export`` program
(``mpe.program``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.artifacts import ArtifactError, atomic_write_json
from encoding.sizes import fp32_table_bytes
from mpe.exporter import export_model
from mpe.format import HEADER_FILE, PROGRAM_FILE
from mpe.program import write_exported_program
from mpe.run_dir import load_model

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
    p.add_argument("--torch-export", action="store_true",
                   help=f"also write {PROGRAM_FILE}: the served model (torch-only decoder + tower, local ids "
                   "[B, F] -> click probabilities [B]) captured by torch.export, verified against the "
                   "served model and recorded in header.json (load it with mpe.serving.load_exported_program "
                   "or plain torch.export.load)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, meta = load_model(args.run)
        result = export_model(model, meta, args.out, torchrec=not args.no_torchrec,
                              extra_meta={"run": str(Path(args.run).resolve())})
        if args.torch_export:
            result["program"] = write_exported_program(args.out)
    except (ArtifactError, OSError, ValueError, RuntimeError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = json.loads((Path(args.out) / HEADER_FILE).read_text())
    fp32 = fp32_table_bytes(header["num_rows"], header["dim"])
    result["fp32_bytes"] = fp32
    atomic_write_json(Path(args.out) / EXPORT_REPORT, result)
    print(f"packed export: {result['total_bytes']:,} bytes ({fp32 / result['total_bytes']:.1f}x smaller than fp32 {fp32:,})")
    if "torchrec_quant_bytes" in result:
        print(f"torchrec rowwise-quantized tables: {result['torchrec_quant_bytes']:,} bytes ({fp32 / result['torchrec_quant_bytes']:.1f}x)")
    if "program" in result:
        prog = result["program"]
        print(f"torch.export program: {prog['file']} ({prog['bytes']:,} bytes; decoder buffers "
              f"{prog['decoder_bytes']['total']:,}, locator {prog['decoder_bytes']['locator']:,})")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
