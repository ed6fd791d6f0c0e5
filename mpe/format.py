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
vector, and a model reading the table by field (``mpe.serving``, ``mpe.program``) reads it as
the header's ``pruned_as`` says (``mpe.bitwidths``): ``"oov"``, as its field's row 0 where that
row has bits; ``"zero"`` (also when the key is absent), as the zero vector. The tower of a served model sits beside it as ``tower.pt`` (weights only) and
``tower.json``. ``mpe.reader.load_packed_export`` reads it back and reproduces
``LSQQuantizer.quantize_per_row`` bit for bit.

Optionally (``python -m mpe.export --torch-export``) the directory also holds
``served_program.pt2``: the whole served model (torch-only decoder of the packed codes + the
tower) captured by ``torch.export`` (``mpe.program``). The header then records it under
``program`` (file, sha256, bytes, inputs, outputs, torch version); exports without it stay
valid, and the packed payload's ``files`` / ``total_bytes`` never include it.

A deployable export (``mpe.vocabulary``; written by ``mpe.exporter.export_model`` when it has
the prepared data) also holds ``preprocess.json`` (the schema, the bucketing cut points, the
per-field vocabulary layout) and ``vocab.npy`` (uint8: the 2-8-byte fingerprints of the kept
features' tokens): ``python -m mpe.predict`` scores raw rows from the export alone. The header
records them under ``vocabulary``, the tower under ``tower`` (sha256 and bytes of
``tower.json`` and ``tower.pt``), and the byte breakdown under ``bytes`` (codes, id map,
steps/offset, vocabulary, tower, embedding and deployable totals). These keys are additive:
exports without them still load, and ``files`` / ``total_bytes`` stay the packed payload.
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
COMPILED_FILE = "served_program_aoti.pt2"  # PROGRAM_FILE compiled by AOTInductor (optional)
COMPILED_KEY = "compiled_program"  # the header's entry describing COMPILED_FILE
COMPILED_FORMAT = "mpe-served-program-aoti"
TOWER_KEY = "tower"  # the header's entry: sha256 / bytes of tower.json and tower.pt
VOCAB_FILE = "vocab.npy"  # uint8 token fingerprints of the kept features (mpe.vocabulary)
PREPROCESS_FILE = "preprocess.json"  # schema, cut points, per-field vocabulary layout
VOCAB_KEY = "vocabulary"  # the header's entry describing VOCAB_FILE and PREPROCESS_FILE
VOCAB_FORMAT = "mpe-vocabulary"
VOCAB_SCHEMA_VERSION = 2  # 2: fingerprints of 2, 3, 4 or 8 bytes (uint8 vocab.npy)
BYTES_KEY = "bytes"  # the header's byte breakdown (codes, id_map, steps_offset, vocabulary, tower, totals)


def bucket_file(bits: int) -> str:
    """File name of the packed codes of the rows stored at ``bits`` bits."""
    return f"bucket_b{int(bits)}.bin"


def byte_breakdown(header: dict[str, Any]) -> dict[str, int]:
    """Bytes on disk by part: ``codes`` (the bucket files), ``id_map``, ``steps_offset``,
    ``vocabulary`` (vocab.npy + preprocess.json), ``tower`` (tower.pt + tower.json), their
    ``embedding_total`` (codes + id map + steps/offset = ``total_bytes``, what the compression
    ratio is on) and ``deployable_total`` (everything ``mpe.predict`` needs to score a raw row).
    Parts an export lacks count 0."""
    files = header["files"]
    codes = sum(int(f["bytes"]) for n, f in files.items() if n.startswith("bucket_b"))
    id_map = int(files[ID_MAP_FILE]["bytes"]) if ID_MAP_FILE in files else 0
    steps_offset = sum(int(files[n]["bytes"]) for n in (STEPS_FILE, OFFSET_FILE) if n in files)
    vocab = header.get(VOCAB_KEY)
    vocabulary = int(vocab["bytes"]) + int(vocab["preprocess"]["bytes"]) if vocab else 0
    tower_entry = header.get(TOWER_KEY)
    tower = int(tower_entry["bytes"]) + int(tower_entry["weights"]["bytes"]) if tower_entry else 0
    embedding = codes + id_map + steps_offset
    return {"codes": codes, "id_map": id_map, "steps_offset": steps_offset, "vocabulary": vocabulary,
            "tower": tower, "embedding_total": embedding, "deployable_total": embedding + vocabulary + tower}


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical (compact) JSON without its ``header_sha256`` field."""
    return json_digest(header, HEADER_DIGEST)
