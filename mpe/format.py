"""The bit-packed export of a mixed-precision embedding table (real bytes on disk).

Directory layout (``schema_version`` 1, no pickle anywhere):

- ``bucket_b{b}.bin`` for every used b > 0: the signed codes of the rows stored at b bits,
  in ascending global id order, packed by ``encoding.packing.pack_codes``
  (``ceil(n_b * b * D / 8)`` bytes);
- ``steps.npy``: float32 [|B|], the effective steps ``|alpha_b| + 1e-10`` of all candidates;
- ``offset.npy``: float32 [D], the LSQ+ offset beta;
- ``id_map.npy``: uint8, the Elias-Fano coded id -> (bucket, row) map (``encoding.packing``);
- ``header.json``: format, schema_version, dim, num_rows, candidates, fields and their
  offsets, row count per bucket, sha256 and size of every file above, their total
  (``total_bytes`` = ``mpe.bitwidths.packed_table_bytes``) and ``header_sha256`` over the
  rest of the header (catches edits and corruption of the header itself).

A row at b bits decodes to ``code * steps[b] + offset``; a pruned row (0 bits) is the zero
vector. The tower of a served model sits beside it as ``tower.pt`` (weights only) and
``tower.json``. ``mpe.reader.load_packed_export`` reads it back and reproduces
``LSQQuantizer.quantize_per_row`` bit for bit.

Optionally (``python -m mpe.export --torch-export``) the directory also holds
``served_program.pt2``: the whole served model (torch-only decoder of the packed codes + the
tower) captured by ``torch.export`` (``mpe.program``). The header then records it under
``program`` (file, sha256, bytes, inputs, outputs, torch version); exports without it stay
valid, and the packed payload's ``files`` / ``total_bytes`` never include it.
"""

from __future__ import annotations

from typing import Any

from data.artifacts import json_digest

FORMAT = "mpe-packed"
SCHEMA_VERSION = 1
HEADER_FILE = "header.json"
HEADER_DIGEST = "header_sha256"
STEPS_FILE = "steps.npy"
OFFSET_FILE = "offset.npy"
ID_MAP_FILE = "id_map.npy"
TOWER_FILE, TOWER_META = "tower.pt", "tower.json"
PROGRAM_FILE = "served_program.pt2"  # torch.export program of the served model (optional)
PROGRAM_KEY = "program"  # the header's entry describing PROGRAM_FILE
PROGRAM_FORMAT = "mpe-served-program"
PROGRAM_SCHEMA_VERSION = 1


def bucket_file(bits: int) -> str:
    """File name of the packed codes of the rows stored at ``bits`` bits."""
    return f"bucket_b{int(bits)}.bin"


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical (compact) JSON without its ``header_sha256`` field."""
    return json_digest(header, HEADER_DIGEST)
