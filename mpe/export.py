"""The bit-packed export of a mixed-precision embedding table (real bytes on disk).

Directory layout (``schema_version`` 1, no pickle anywhere):

- ``bucket_b{b}.bin`` for every used b > 0: the signed codes of the rows stored at b bits,
  in ascending global id order, packed by ``mpe.packing.pack_codes``
  (``ceil(n_b * b * D / 8)`` bytes);
- ``steps.npy``: float32 [|B|], the effective steps ``|alpha_b| + 1e-10`` of all candidates;
- ``offset.npy``: float32 [D], the LSQ+ offset beta;
- ``id_map.npy``: uint8, the Elias-Fano coded id -> (bucket, row) map (``mpe.packing``);
- ``header.json``: format, schema_version, dim, num_rows, candidates, fields and their
  offsets, row count per bucket, sha256 and size of every file above, their total
  (``total_bytes`` = ``mpe.bitwidths.packed_table_bytes``) and ``header_sha256`` over the
  rest of the header (catches edits and corruption of the header itself).

A row at b bits decodes to ``code * steps[b] + offset``; a pruned row (0 bits) is the zero
vector. ``mpe.packed.load_packed_export`` reads it back and reproduces
``LSQQuantizer.quantize_per_row`` bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_npy, sha256_file
from mpe.bitwidths import (
    ID_MAP_FILE,
    OFFSET_FILE,
    STEPS_FILE,
    bits_to_indices,
    bucket_file,
    fp32_table_bytes,
    packed_size_breakdown,
)
from mpe.packing import encode_id_map, pack_codes
from mpe.quantizer import LSQQuantizer

FORMAT = "mpe-packed"
SCHEMA_VERSION = 1
HEADER_FILE = "header.json"
_ROW_CHUNK = 1 << 18  # rows quantized at a time; a multiple of 8 so chunks end on a byte


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical JSON without its ``header_sha256`` field."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_fields(field_names: Sequence[str], field_offsets: Sequence[int], num_rows: int) -> None:
    if len(field_names) != len(field_offsets):
        raise ValueError(f"{len(field_names)} field names for {len(field_offsets)} offsets")
    offs = [int(o) for o in field_offsets]
    if offs and (offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:], strict=False)) or offs[-1] >= num_rows):
        raise ValueError(f"field offsets {offs} must start at 0, increase and stay below {num_rows}")


def bucket_codes(weight: torch.Tensor, rows: np.ndarray, bit_index: int, quantizer: LSQQuantizer) -> np.ndarray:
    """uint8: the packed codes of ``weight[rows]`` [n, D] at candidate ``bit_index``."""
    bits = quantizer.candidates[bit_index]
    parts = []
    for start in range(0, rows.size, _ROW_CHUNK):
        sel = torch.from_numpy(rows[start : start + _ROW_CHUNK])
        idx = torch.full((sel.numel(),), bit_index, dtype=torch.int64)
        codes = quantizer.codes(weight[sel], idx).numpy()
        parts.append(pack_codes(codes, bits))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def write_packed_export(
    out_dir: str | os.PathLike,
    weight: torch.Tensor,
    bits_per_row: np.ndarray,
    quantizer: LSQQuantizer,
    field_names: Sequence[str],
    field_offsets: Sequence[int],
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the bit-packed export of ``weight`` [N, D] (fp32 master rows) at ``bits_per_row``
    (int [N], bit values) and return its header.

    The files are written into a temporary sibling directory which then replaces
    ``out_dir`` as a whole (an existing ``out_dir`` and everything in it is replaced).
    ``extra_meta`` (JSON-serialisable) is stored under ``header["meta"]``.
    """
    out = Path(out_dir)
    weight = weight.detach().to(torch.float32).cpu()
    if weight.dim() != 2 or weight.shape[1] != quantizer.dim:
        raise ValueError(f"weight must be [N, {quantizer.dim}], got {tuple(weight.shape)}")
    num_rows, dim = int(weight.shape[0]), quantizer.dim
    bits = np.asarray(bits_per_row)
    if bits.shape != (num_rows,):
        raise ValueError(f"bits_per_row has shape {bits.shape}, expected ({num_rows},)")
    cands = quantizer.candidates
    idx = bits_to_indices(bits, cands)
    _check_fields(field_names, field_offsets, num_rows)
    counts = np.bincount(idx, minlength=len(cands))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        names = []
        for i, b in enumerate(cands):
            if b > 0 and counts[i] > 0:
                name = bucket_file(b)
                atomic_write_bytes(tmp / name, bucket_codes(weight, np.flatnonzero(idx == i), i, quantizer).tobytes())
                names.append(name)
        with torch.no_grad():
            steps = quantizer.steps().detach().to(torch.float32).cpu().numpy()
            offset = quantizer.beta.detach().to(torch.float32).cpu().numpy()
        atomic_write_npy(tmp / STEPS_FILE, np.ascontiguousarray(steps))
        atomic_write_npy(tmp / OFFSET_FILE, np.ascontiguousarray(offset))
        atomic_write_npy(tmp / ID_MAP_FILE, encode_id_map(idx, len(cands)))
        names += [STEPS_FILE, OFFSET_FILE, ID_MAP_FILE]

        files = {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size} for n in names}
        total = sum(f["bytes"] for f in files.values())
        expected = packed_size_breakdown(bits, dim, cands)
        if {n: f["bytes"] for n, f in files.items()} != expected:
            raise RuntimeError(f"export sizes {files} differ from the size model {expected}")
        fp32 = fp32_table_bytes(num_rows, dim)
        header: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "dim": dim,
            "num_rows": num_rows,
            "candidates": list(cands),
            "fields": list(field_names),
            "field_offsets": [int(o) for o in field_offsets],
            "bucket_rows": {str(b): int(n) for b, n in zip(cands, counts.tolist(), strict=True)},
            "files": files,
            "total_bytes": int(total),
            "fp32_bytes": int(fp32),
            "compression_ratio": fp32 / total,
            "mean_bits_per_row": float(np.mean(bits)),
            "meta": dict(extra_meta or {}),
        }
        header["header_sha256"] = header_digest(header)
        atomic_write_json(tmp / HEADER_FILE, header)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return header


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing ``target`` directory."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "d")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# ---------------------------------------------------------------------------------------
# CLI (``python -m mpe.export``): added by the lead below this line.
# ---------------------------------------------------------------------------------------


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    verify_data: Any = None,
    torchrec: bool = True,
) -> dict[str, Any]:
    """Export the retrained model of an ``mpe.search`` run directory.

    Writes the bit-packed tables (``write_packed_export``) plus the tower (``tower.pt``,
    ``tower.json``) so ``mpe.serving.load_served_model(out_dir)`` serves the whole model.
    With ``verify_data`` (a ``PreparedDataset``) the loaded export is evaluated on the test
    split and must give exactly the in-memory model's AUC. Returns sizes and that AUC.
    """
    from data.artifacts import atomic_torch_save, atomic_write_json, sha256_file
    from genlora_rec.trainer import predict
    from mpe.search import load_model
    from mpe.serving import TOWER_FILE, TOWER_META, load_served_model

    model, meta = load_model(run_dir)
    emb = model.embedding
    out = Path(out_dir)
    header = write_packed_export(
        out, emb.global_weight(), emb.bits_per_row(), emb.quantizer, meta["fields"], meta["field_offsets"],
        extra_meta={"run": str(Path(run_dir).resolve()), "bits_per_group": emb.bits_per_group().tolist()},
    )
    atomic_torch_save(out / TOWER_FILE, model.tower.state_dict())
    atomic_write_json(out / TOWER_META, {
        "file": TOWER_FILE, "sha256": sha256_file(out / TOWER_FILE), "tower": meta["tower"],
        "hidden": meta["hidden"], "dim": meta["dim"], "fields": meta["fields"], "field_offsets": meta["field_offsets"],
    })
    served = load_served_model(out)
    result: dict[str, Any] = {"total_bytes": served.embedding.num_bytes(), "header_total_bytes": header["total_bytes"]}
    if torchrec:
        from mpe.torchrec_export import torchrec_quantized_bytes

        result["torchrec_quant"] = torchrec_quantized_bytes(served.embedding.packed)
        result["torchrec_quant_bytes"] = result["torchrec_quant"]["total_bytes"]
    if verify_data is not None:
        from genlora_rec.trainer import metrics

        test = verify_data.split("test")
        model.eval()
        p_mem = predict(model, test, verify_data.fields)
        p_served = predict(served, test, verify_data.fields)
        if not np.array_equal(p_mem, p_served):
            raise RuntimeError(
                f"{out}: predictions from the loaded export differ from the in-memory model "
                f"(max |diff| {np.abs(p_mem - p_served).max():.3g})"
            )
        result["test_auc"] = metrics(test.labels, p_served)["auc"]
    return result


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mpe.export",
        description="Write the bit-packed export of an `mpe.search` run (codes per bit bucket, steps, "
        "offset, id map, tower; sha256 of every file in header.json) and report its bytes next to "
        "the fp32 and torchrec rowwise-quantized sizes.",
    )
    p.add_argument("--run", required=True, help="run directory written by `python -m mpe.search`")
    p.add_argument("--out", required=True, help="export directory (replaced as a whole)")
    p.add_argument("--no-torchrec", action="store_true", help="skip the torchrec quantized-size report")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    from data.artifacts import ArtifactError, atomic_write_json
    from mpe.bitwidths import fp32_table_bytes

    args = build_parser().parse_args(argv)
    try:
        result = export_run(args.run, args.out, torchrec=not args.no_torchrec)
    except (ArtifactError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = json.loads((Path(args.out) / HEADER_FILE).read_text())
    fp32 = fp32_table_bytes(header["num_rows"], header["dim"])
    result["fp32_bytes"] = fp32
    atomic_write_json(Path(args.out) / "export_report.json", result)
    print(f"packed export: {result['total_bytes']:,} bytes ({fp32 / result['total_bytes']:.1f}x smaller than fp32 {fp32:,})")
    if "torchrec_quant_bytes" in result:
        print(f"torchrec rowwise-quantized tables: {result['torchrec_quant_bytes']:,} bytes ({fp32 / result['torchrec_quant_bytes']:.1f}x)")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
