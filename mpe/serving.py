"""Serve a CTR model from a bit-packed export: packed embedding lookups + the trained tower.

``load_served_model(export_dir)`` reads only weights-only / ``.npy`` / JSON files, verifies
every checksum, and returns a ``CTRModel`` whose embedding decodes rows from the packed
codes. Its predictions equal the retrained in-memory model's bit for bit.

``load_exported_program(export_dir)`` returns the export's ``served_program.pt2`` (written by
``python -m mpe.export --torch-export``, see ``mpe.program``) as a ``torch.export``
``ExportedProgram``, after checking the header and the file's size and sha256 against it;
``.module()(local_ids int64 [B, F])`` gives click probabilities float32 [B]. It needs only
``header.json`` and the ``.pt2`` file. ``load_compiled_program(export_dir)`` does the same for
the program compiled by AOTInductor (``--aoti``): the same call, the decoder's ops fused into
native loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctr.model import CTRModel
from data.artifacts import (
    ArtifactError,
    load_torch,
    read_json,
    safe_child,
    sha256_file,
    short_error,
    verify_sha256,
)
from data.layout import global_ids
from genlora_rec.towers import build_tower
from mpe.format import (
    COMPILED_FORMAT,
    COMPILED_KEY,
    HEADER_FILE,
    PROGRAM_FORMAT,
    PROGRAM_KEY,
    PROGRAM_SCHEMA_VERSION,
    TOWER_FILE,
    TOWER_KEY,
    TOWER_META,
)
from mpe.reader import PackedEmbedding, load_packed_export, read_header


class PackedEmbeddingModule(nn.Module):
    """KJT -> Tensor[B, F, D] served from a ``PackedEmbedding`` (single-valued fields)."""

    def __init__(self, packed: PackedEmbedding, fields: Sequence[str], field_offsets: Sequence[int]):
        super().__init__()
        self.packed = packed
        self.fields = list(fields)
        self.register_buffer("field_offsets", torch.as_tensor(list(field_offsets), dtype=torch.int64))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        ids = self.packed.resolve(global_ids(kjt, self.field_offsets, "the packed embedding"))
        return self.packed.lookup(ids.reshape(-1)).view(kjt.stride(), len(self.fields), -1)

    def num_bytes(self) -> int:
        return int(self.packed.num_bytes())


def load_served_model(export_dir: str | Path) -> CTRModel:
    """The export's packed embedding plugged into its tower (``tower.pt`` + ``tower.json``)."""
    export_dir = Path(export_dir)
    packed = load_packed_export(export_dir)
    meta_path = export_dir / TOWER_META
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise ArtifactError(f"{meta_path}: not a tower description (no sha256)")
    # the header is checksummed; the tower description must agree with it
    for key in ("fields", "field_offsets", "dim"):
        if meta.get(key) != packed.header.get(key):
            raise ArtifactError(f"{meta_path}: {key} disagrees with {export_dir / 'header.json'}; edited or mixed up")
    state = load_torch(safe_child(export_dir, meta.get("file", TOWER_FILE)), expected_sha256=meta["sha256"])
    try:
        hidden = tuple(meta["hidden"]) if meta.get("hidden") else None
        tower = build_tower(meta["tower"], len(meta["fields"]), meta["dim"], hidden)
        tower.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{export_dir / TOWER_FILE}: tower weights do not match {meta_path} ({short_error(e)})") from None
    _check_tower_entry(export_dir, packed.header, meta_path, meta)
    model = CTRModel(PackedEmbeddingModule(packed, meta["fields"], meta["field_offsets"]), tower)
    return model.eval()


def _check_tower_entry(export_dir: Path, header: dict, meta_path: Path, meta: dict) -> None:
    """The header (checksummed) records which tower belongs to the export (``tower``: sha256 and
    bytes of tower.json and of the weights): a consistent tower.json + tower.pt pair of another
    export is refused. Exports written before the entry existed have none."""
    entry = header.get(TOWER_KEY)
    if entry is None:
        return
    try:
        size, digest, weights = int(entry["bytes"]), str(entry["sha256"]), str(entry["weights"]["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{export_dir / HEADER_FILE}: malformed {TOWER_KEY!r} entry ({short_error(e)})") from None
    if meta_path.stat().st_size != size or sha256_file(meta_path) != digest or meta.get("sha256") != weights:
        raise ArtifactError(f"{meta_path}: not the tower {export_dir / HEADER_FILE} records (sha256 or size "
                            "differ); modified or from another export")


def _recorded_file(root: Path, key: str, fmt: str, what: str, hint: str) -> tuple[dict, Path]:
    """(header, path) of the file the header's ``key`` entry describes, after checking the
    entry (format ``fmt``, schema version) and the file's size and sha256 against it."""
    header = read_header(root)
    entry = header.get(key)
    if entry is None:
        raise ArtifactError(f"{root / HEADER_FILE}: no {what} recorded ({hint})")
    try:
        if entry["format"] != fmt or entry["schema_version"] != PROGRAM_SCHEMA_VERSION:
            raise ValueError(f"format {entry['format']!r} v{entry['schema_version']!r}")
        name, size, digest = str(entry["file"]), int(entry["bytes"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{root / HEADER_FILE}: malformed {key!r} entry ({short_error(e)})") from None
    path = safe_child(root, name)
    if not path.is_file():
        raise ArtifactError(f"{path}: file is missing")
    if path.stat().st_size != size:
        raise ArtifactError(f"{path}: has {path.stat().st_size} bytes, the header records {size}; truncated or modified")
    verify_sha256(path, digest)
    return header, path


def load_exported_program(export_dir: str | Path) -> torch.export.ExportedProgram:
    """The export's served program (``mpe.format.PROGRAM_FILE``), verified before it is loaded:
    the header (format, its own checksum) must describe it, and the file's size and sha256
    must match that description; only then ``torch.export.load`` runs. Any problem (no
    program recorded, missing, truncated, modified or foreign file, not a ``torch.export``
    program) raises ``ArtifactError`` naming the file."""
    header, path = _recorded_file(Path(export_dir), PROGRAM_KEY, PROGRAM_FORMAT, "exported program",
                                  "write one with `python -m mpe.export --torch-export`")
    try:
        program = torch.export.load(path)
    except Exception as e:  # a foreign file that still matches a rewritten header
        raise ArtifactError(f"{path}: not a torch.export program ({short_error(e)})") from None
    if _program_signature(program) != ([(torch.int64, 2, len(header["fields"]))], [(torch.float32, 1, None)]):
        raise ArtifactError(f"{path}: not this export's served program (it maps {_program_signature(program)}; "
                            f"expected int64 ids [B, {len(header['fields'])}] -> float32 [B])")
    return program


def load_compiled_program(export_dir: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The export's AOTInductor-compiled served program (``mpe.format.COMPILED_FILE``, written by
    ``python -m mpe.export --aoti``): local ids int64 [B, F] -> click probabilities float32 [B].
    Verified as ``load_exported_program`` verifies its program, then loaded with
    ``torch._inductor.aoti_load_package`` (C++: ``torch::inductor::AOTIModelPackageLoader``). It
    runs only on a torch of the version and a CPU of the kind it was compiled with (the header
    records both); any other problem raises ``ArtifactError`` naming the file. The package reads
    its input as a contiguous tensor: the function returned makes it one (a C++ caller must)."""
    header, path = _recorded_file(Path(export_dir), COMPILED_KEY, COMPILED_FORMAT, "compiled program",
                                  "write one with `python -m mpe.export --aoti`")
    built = header[COMPILED_KEY].get("torch_version")
    if built != torch.__version__:
        raise ArtifactError(f"{path}: compiled with torch {built}, this is torch {torch.__version__}; "
                            "recompile it with `python -m mpe.export --aoti` (or serve served_program.pt2)")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # a foreign file that still matches a rewritten header
        raise ArtifactError(f"{path}: not an AOTInductor package ({short_error(e)})") from None

    def compiled(local_ids: torch.Tensor) -> torch.Tensor:
        # the compiled code reads its input with the strides it was compiled for (contiguous)
        return runner(local_ids.contiguous())

    return compiled


def _program_signature(program: torch.export.ExportedProgram) -> tuple[list, list]:
    """([(dtype, ndim, size of dim 1)] of the user inputs, the same of the outputs)."""
    sig = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}

    def spec(val: object) -> tuple:
        if not isinstance(val, torch.Tensor):
            return (type(val).__name__, None, None)
        shape = val.shape
        second = shape[1] if len(shape) > 1 else None
        return (val.dtype, len(shape), second if second is None or isinstance(second, int) else str(second))

    inputs = [spec(nodes[name].meta.get("val")) for name in sig.user_inputs]
    out_node = next(n for n in program.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outputs = [spec(o.meta.get("val") if hasattr(o, "meta") else o) for o in outs]
    return inputs, outputs
