"""The deployable part of an export: the preprocessing of ``data.prepare`` and a vocabulary of
the kept features only, so that a raw row can be scored from the export alone.

Files (``mpe.format``), both recorded with sha256 and bytes under the header's ``vocabulary``:

- ``preprocess.json``: the dataset's schema (``DatasetSchema.to_dict``, the built-in name for
  Criteo / Avazu), the ``quantile:N`` cut points, ``data.prepare``'s parameters (min_count, ...),
  the fields and cardinalities, the sha256 of the export's id map and of the prepared
  directory's manifest (binding the vocabulary to this export), and per field its layout in
  ``vocab.npy``: ``width`` (bytes per fingerprint: 2, 3, 4 or 8), ``salt``, ``kept``,
  ``pruned``, ``start`` (its first byte);
- ``vocab.npy``: uint8, per field the fingerprints (little-endian, ``width`` bytes each) of the
  tokens of its rows stored at > 0 bits, in ascending local id order (the rows themselves are
  implicit: the id map tells which of the field's rows 1.. have bits > 0), then, in ``exact``
  mode, only for an export whose ``pruned_as`` is ``"zero"`` and only where the field's OOV
  row (id 0) is stored at > 0 bits, the sorted fingerprints of its pruned (0-bit) tokens. Under
  ``pruned_as = "oov"`` (the default of ``mpe.search``) a pruned row reads as the OOV row, as an
  unseen value does, so no pruned token is ever stored and ``exact`` and ``compact`` are the
  same vocabulary.

A token is what ``data.prepare`` looks up: the raw value of a categorical field (or of a
``bucket = "none"`` numeric one), the category of a bucketed numeric or datetime field (the
same transforms, ``data.prepare.field_plans`` with the recorded cut points). Its fingerprint
of ``width`` bytes: the low ``8 * width`` bits of ``splitmix64(string_keys(token) ^ salt)``;
at width 4 an 8-character lowercase hex token (Criteo's categorical values) is its own value
instead. A field's width is the narrowest of 2, 3, 4 bytes whose false-hit rate (stored tokens
/ 2^(8 width), the chance that a value never counted reads as a stored row) is at most
``FALSE_HIT_RATE`` = 1e-4 and where one of 16 salts makes the stored fingerprints distinct
and different from every other token counted in preparation; otherwise 8 bytes. So a field of
up to 1,677 stored tokens takes 3 bytes per token, one of up to 429,496 takes 4.

Lookup of a token: its fingerprint found among the field's kept tokens -> that row; among its
pruned tokens -> a 0-bit row of the field (the zero vector, as the served model gives it);
otherwise the OOV row 0, as ``data.prepare`` maps a value seen fewer than ``min_count`` times
or never. Where the OOV row itself has 0 bits, pruned and unseen tokens both decode to the
zero vector, so the pruned tokens are not stored. Every value counted in preparation
therefore maps exactly as in the prepared data (the predictions equal ``load_served_model``'s
on the prepared rows); only a value never counted, or counted fewer than ``min_count`` times,
can hit a stored fingerprint: with probability stored / 2^(8 width) <= 1e-4 per lookup (never
an 8-hex token against an 8-hex token at width 4).

``compact`` mode stores the kept tokens only: under ``pruned_as = "zero"``, a pruned token of a
field whose OOV row has bits then gets the OOV row (not the zero vector the served model gives
it), close to but not bit-equal with the served model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.artifacts import (
    ArtifactError,
    atomic_write_json,
    atomic_write_npy,
    load_npy,
    read_json,
    safe_child,
    sha256_file,
    verify_sha256,
)
from data.manifest import MANIFEST_DIGEST
from data.manifest import VOCAB_FILE as PREPARED_VOCAB_FILE
from data.prepare import FieldPlan, field_plans
from data.schema import DatasetSchema, get_schema, schema_from_dict
from data.transforms import splitmix64, string_keys
from mpe.format import (
    HEADER_FILE,
    ID_MAP_FILE,
    PREPROCESS_FILE,
    VOCAB_FILE,
    VOCAB_FORMAT,
    VOCAB_KEY,
    VOCAB_SCHEMA_VERSION,
)

PREPROCESS_FORMAT = "mpe-preprocess"
VOCAB_MODES = ("exact", "compact")
MAX_SALTS = 16
WIDTHS = (2, 3, 4, 8)  # fingerprint bytes
FALSE_HIT_RATE = 1e-4  # the largest share of never-counted values that may read as a kept row
_HEX_LUT = np.full(256, -1, dtype=np.int16)
_HEX_LUT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_LUT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_SHIFTS = np.arange(28, -1, -4, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------
def _hex8(tokens: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(uint64 value, mask)`` of the tokens that are exactly 8 lowercase hex characters."""
    arr = tokens.cast(pa.binary())
    n = len(arr)
    value = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return value, np.zeros(0, dtype=bool)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4).astype(np.int64)
    is8 = np.diff(offsets) == 8
    if not is8.any():
        return value, is8
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    rows = np.flatnonzero(is8)
    nib = _HEX_LUT[data[offsets[rows][:, None] + np.arange(8)]]
    ok = (nib >= 0).all(axis=1)
    rows = rows[ok]
    value[rows] = (nib[ok].astype(np.uint64) << _HEX_SHIFTS).sum(axis=1, dtype=np.uint64)
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return value, mask


def fingerprints(tokens: pa.Array, width: int, salt: int) -> np.ndarray:
    """uint64 fingerprints of ``tokens`` (utf8, no nulls), ``width`` bytes each (``WIDTHS``)
    under ``salt``: the low ``8 * width`` bits of ``splitmix64(string_keys(token) ^ salt)``,
    except at width 4 an 8-hex token, which is its own value (see the module docstring)."""
    if width not in WIDTHS:
        raise ValueError(f"fingerprint width must be one of {WIDTHS} bytes, got {width}")
    mix = splitmix64(np.array([salt], dtype=np.uint64))[0]
    h = splitmix64(string_keys(tokens.cast(pa.string())) ^ mix)
    if width == 8:
        return h
    fp = h & np.uint64((1 << (8 * width)) - 1)
    if width == 4:
        value, is_hex = _hex8(tokens)
        fp[is_hex] = value[is_hex]
    return fp


def choose_fingerprint(tokens: pa.Array, stored: np.ndarray) -> tuple[int, int]:
    """``(width, salt)`` of a field whose prepared tokens are ``tokens`` (every value counted in
    preparation) and whose vocabulary stores those of ``stored`` (bool mask): the narrowest
    width whose false-hit rate ``stored.sum() / 2^(8 width)`` is at most ``FALSE_HIT_RATE``
    (64-bit ones always qualify) and, at it, the first salt under which the stored tokens'
    fingerprints are distinct and no other token's equals one of them. ``RuntimeError`` when
    even 64-bit fingerprints fail (two strings with one 64-bit key)."""
    stored = np.asarray(stored, dtype=bool)
    n_stored = int(stored.sum())
    for width in WIDTHS:
        if width < 8 and n_stored > FALSE_HIT_RATE * 2.0 ** (8 * width):
            continue
        for salt in range(MAX_SALTS if width < 8 else 1):
            fp = fingerprints(tokens, width, salt)
            keys = fp[stored]
            if np.unique(keys).size == keys.size and not np.isin(fp[~stored], keys).any():
                return width, salt
    raise RuntimeError(f"{len(tokens)} tokens whose 64-bit keys collide")


def _to_bytes(fp: np.ndarray, width: int) -> np.ndarray:
    """uint8 [n * width]: the fingerprints little-endian, ``width`` bytes each."""
    fp = np.ascontiguousarray(fp, dtype="<u8")
    return np.ascontiguousarray(fp.view(np.uint8).reshape(-1, 8)[:, :width]).reshape(-1)


def _from_bytes(b: np.ndarray, width: int) -> np.ndarray:
    """uint64 [n] fingerprints of ``_to_bytes``'s layout."""
    rows = np.zeros((b.size // width, 8), dtype=np.uint8)
    rows[:, :width] = np.asarray(b, dtype=np.uint8).reshape(-1, width)
    return rows.view("<u8").reshape(-1).astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# writing (at export time, from the prepared directory)
# ---------------------------------------------------------------------------------------------
def _boundaries(cuts: dict[str, Sequence[float]] | None) -> dict[str, np.ndarray]:
    return {c: np.asarray(v, dtype=np.float64) for c, v in (cuts or {}).items()}


def write_vocabulary(
    out_dir: str | os.PathLike, prepared_root: str | os.PathLike, manifest: dict[str, Any], bits_per_row: np.ndarray,
    mode: str = "exact",
    pruned_as: str = "zero",
) -> dict[str, Any]:
    """Write ``preprocess.json`` and ``vocab.npy`` into the export ``out_dir`` (its header and id
    map already written) from the prepared directory it was trained on; return the header
    entry (``VOCAB_KEY``). ``bits_per_row``: int [N] of the export."""
    if mode not in VOCAB_MODES:
        raise ValueError(f"vocabulary mode must be one of {VOCAB_MODES}, got {mode!r}")
    out, root = Path(out_dir), Path(prepared_root)
    schema = get_schema(manifest["dataset"]) if "schema" not in manifest else schema_from_dict(manifest["schema"])
    plans = field_plans(schema, _boundaries(manifest.get("quantile_cuts")))
    fields, cards, offsets = manifest["fields"], manifest["cardinalities"], manifest["field_offsets"]
    if [p.name for p in plans] != list(fields):
        raise ValueError(f"{root}: the schema's fields differ from the prepared data's")
    bits = np.asarray(bits_per_row)
    if bits.shape != (int(manifest["num_features"]),):
        raise ValueError(f"bits for {bits.shape} rows, the prepared data has {manifest['num_features']}")
    vocab = pq.read_table(root / PREPARED_VOCAB_FILE, columns=["field", "value", "id"])
    field_col = vocab["field"].combine_chunks()
    parts: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    start = 0
    for plan, card, off in zip(plans, cards, offsets, strict=True):
        rows = vocab.filter(pc.equal(field_col, plan.name)).sort_by("id")
        ids = rows["id"].to_numpy()
        if not np.array_equal(ids, np.arange(card)):
            raise ArtifactError(f"{root / PREPARED_VOCAB_FILE}: field {plan.name} holds ids {ids[:3]}..., expected 0..{card - 1}")
        tokens = rows["value"].combine_chunks().slice(1).cast(pa.string())  # ids 1..K (0 is <OOV>)
        local_bits = bits[off : off + card]
        stored = np.flatnonzero(local_bits[1:] > 0)  # positions in ``tokens``; local id = +1
        pruned = np.flatnonzero(local_bits[1:] == 0)
        # a pruned token reads as the OOV row under pruned_as "oov": like an unseen one, not stored
        store_pruned = mode == "exact" and pruned_as == "zero" and local_bits[0] > 0 and pruned.size > 0
        stored_mask = (local_bits[1:] > 0) | store_pruned  # every token when the pruned ones are stored
        width, salt = choose_fingerprint(tokens, stored_mask) if len(tokens) else (WIDTHS[0], 0)
        fp = fingerprints(tokens, width, salt) if len(tokens) else np.zeros(0, np.uint64)
        kept_fp = fp[stored]
        pruned_fp = np.sort(fp[pruned]) if store_pruned else np.zeros(0, np.uint64)
        block = np.concatenate([_to_bytes(kept_fp, width), _to_bytes(pruned_fp, width)])
        parts.append(block)
        entries.append({
            "field": plan.name, "source": plan.source, "width": width, "salt": salt, "start": start,
            "kept": int(stored.size), "pruned": int(pruned_fp.size), "tokens": int(len(tokens)),
            "oov_bits": int(local_bits[0]), "pruned_not_stored": int(pruned.size - pruned_fp.size),
        })
        start += block.size
    bytes_all = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    atomic_write_npy(out / VOCAB_FILE, np.ascontiguousarray(bytes_all, dtype=np.uint8))
    header = read_json(out / HEADER_FILE)
    preprocess = {
        "format": PREPROCESS_FORMAT, "schema_version": VOCAB_SCHEMA_VERSION, "mode": mode,
        "dataset": schema.name, "builtin": bool(schema.builtin), "schema": schema.to_dict(),
        "schema_sha256": schema.digest, "params": manifest.get("params", {}),
        "quantile_cuts": manifest.get("quantile_cuts", {}),
        "fields": list(fields), "cardinalities": [int(c) for c in cards],
        "id_map_sha256": header["files"][ID_MAP_FILE]["sha256"],
        "prepared_manifest_sha256": manifest.get(MANIFEST_DIGEST),
        "vocabulary": entries, "bytes": int(bytes_all.size),
    }
    atomic_write_json(out / PREPROCESS_FILE, preprocess)
    return {
        "format": VOCAB_FORMAT, "schema_version": VOCAB_SCHEMA_VERSION, "mode": mode,
        "file": VOCAB_FILE, "sha256": sha256_file(out / VOCAB_FILE), "bytes": (out / VOCAB_FILE).stat().st_size,
        "preprocess": {"file": PREPROCESS_FILE, "sha256": sha256_file(out / PREPROCESS_FILE),
                       "bytes": (out / PREPROCESS_FILE).stat().st_size},
        "kept_tokens": int(sum(e["kept"] for e in entries)), "pruned_tokens": int(sum(e["pruned"] for e in entries)),
    }


# ---------------------------------------------------------------------------------------------
# reading (at serving time, from the export alone)
# ---------------------------------------------------------------------------------------------
@dataclass
class FieldVocabulary:
    """One field's lookup: sorted fingerprints and their local ids (0 when not found)."""

    plan: FieldPlan
    width: int
    salt: int
    keys: np.ndarray  # uint64, sorted
    rows: np.ndarray  # int64 local ids, aligned with keys

    def ids(self, values: pa.Array) -> np.ndarray:
        """int64 local ids of raw values (a block's distinct values of the source column)."""
        tokens = values if self.plan.categories is None else self.plan.categories(values)
        if len(self.keys) == 0 or len(tokens) == 0:
            return np.zeros(len(tokens), dtype=np.int64)
        fp = fingerprints(tokens, self.width, self.salt)
        pos = np.minimum(np.searchsorted(self.keys, fp), len(self.keys) - 1)
        return np.where(self.keys[pos] == fp, self.rows[pos], 0)


class ExportVocabulary:
    """The export's preprocessing and vocabulary: ``schema``, ``fields``, ``columns`` (the raw
    columns read), ``encode(batch) -> int64 [n, F]`` local ids of a reader block."""

    def __init__(self, schema: DatasetSchema, fields: list[FieldVocabulary], preprocess: dict[str, Any], num_bytes: int):
        self.schema = schema
        self.fields = fields
        self.preprocess = preprocess
        self.mode = preprocess["mode"]
        self.columns = list(dict.fromkeys(f.plan.source for f in fields))
        self.num_bytes = int(num_bytes)  # vocab.npy + preprocess.json on disk

    def encode(self, batch: pa.RecordBatch) -> np.ndarray:
        """int64 [n, F] local ids of a dictionary-encoded reader block (``data.reader.RawBlock``)."""
        out = np.empty((batch.num_rows, len(self.fields)), dtype=np.int64)
        for j, fv in enumerate(self.fields):
            col = batch.column(fv.plan.source)
            idx = col.indices.to_numpy(zero_copy_only=False)
            used = np.zeros(len(col.dictionary), dtype=bool)
            used[idx] = True
            if used.all():
                out[:, j] = fv.ids(col.dictionary)[idx]
            else:  # the dictionary also holds values of skipped rows, which need not parse
                ids = np.zeros(len(used), dtype=np.int64)
                ids[used] = fv.ids(col.dictionary.filter(pa.array(used)))
                out[:, j] = ids[idx]
        return out


def _fail(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: {why}")


def load_vocabulary(export_dir: str | os.PathLike, header: dict[str, Any], bits_per_row: np.ndarray) -> ExportVocabulary:
    """Verify and load the export's vocabulary (``header``: its verified header; ``bits_per_row``:
    int [N] from its id map). ``ArtifactError`` when the export has none, a file is missing,
    truncated or modified, or the vocabulary belongs to another export."""
    root = Path(export_dir)
    entry = header.get(VOCAB_KEY)
    if entry is None:
        raise _fail(root / HEADER_FILE, "this export holds no vocabulary (written without the prepared data); "
                    "re-export it with `python -m mpe.export --run RUN --out DIR --prepared PREPARED_DIR`")
    try:
        if entry["format"] != VOCAB_FORMAT or entry["schema_version"] != VOCAB_SCHEMA_VERSION:
            raise ValueError(f"format {entry['format']!r} v{entry['schema_version']!r}, this version reads "
                             f"v{VOCAB_SCHEMA_VERSION}: re-export with `python -m mpe.export`")
        files = [(str(entry["file"]), int(entry["bytes"]), str(entry["sha256"])),
                 (str(entry["preprocess"]["file"]), int(entry["preprocess"]["bytes"]), str(entry["preprocess"]["sha256"]))]
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(root / HEADER_FILE, f"malformed {VOCAB_KEY!r} entry ({e})") from None
    paths = []
    for name, size, digest in files:
        path = safe_child(root, name)
        if not path.is_file():
            raise _fail(path, "file is missing")
        if path.stat().st_size != size:
            raise _fail(path, f"has {path.stat().st_size} bytes, the header records {size}; truncated or modified")
        verify_sha256(path, digest)
        paths.append(path)
    vocab_path, pre_path = paths
    pre = read_json(pre_path)
    if not isinstance(pre, dict) or pre.get("format") != PREPROCESS_FORMAT:
        raise _fail(pre_path, "not an export's preprocessing description")
    if pre.get("id_map_sha256") != header["files"][ID_MAP_FILE]["sha256"] or pre.get("fields") != header["fields"]:
        raise _fail(pre_path, "belongs to another export (its id map or fields differ); mixed up")
    bytes_all = load_npy(vocab_path)
    if bytes_all.dtype != np.uint8 or bytes_all.ndim != 1 or bytes_all.size != pre.get("bytes"):
        raise _fail(vocab_path, f"expected uint8 [{pre.get('bytes')}], got {bytes_all.dtype} {bytes_all.shape}")
    try:
        schema = get_schema(pre["dataset"]) if pre["builtin"] else schema_from_dict(pre["schema"])
        if schema.digest != pre["schema_sha256"]:
            raise ValueError("the schema differs from the one recorded")
        plans = field_plans(schema, _boundaries(pre.get("quantile_cuts")))
        cards, offsets = [int(c) for c in pre["cardinalities"]], header["field_offsets"]
        if [p.name for p in plans] != header["fields"] or [sum(cards[:i]) for i in range(len(cards))] != offsets:
            raise ValueError("fields or cardinalities disagree with the header")
        if sum(cards) != header["num_rows"]:
            raise ValueError("cardinalities do not add up to the table's rows")
        out: list[FieldVocabulary] = []
        for plan, card, off, e in zip(plans, cards, offsets, pre["vocabulary"], strict=True):
            local = np.asarray(bits_per_row[off : off + card])
            kept_rows = np.flatnonzero(local[1:] > 0) + 1
            zero_rows = np.flatnonzero(local[1:] == 0) + 1
            width, salt, start = int(e["width"]), int(e["salt"]), int(e["start"])
            kept, pruned = int(e["kept"]), int(e["pruned"])
            if e["field"] != plan.name or width not in WIDTHS or kept != kept_rows.size or pruned > zero_rows.size:
                raise ValueError(f"field {plan.name}: {kept} kept tokens for {kept_rows.size} stored rows")
            block = bytes_all[start : start + width * (kept + pruned)]
            if block.size != width * (kept + pruned):
                raise ValueError(f"field {plan.name}: vocab.npy is too short")
            fp = _from_bytes(block, width)
            rows = np.concatenate([kept_rows, np.full(pruned, zero_rows[0] if pruned else 0, dtype=np.int64)])
            order = np.argsort(fp, kind="stable")
            keys = fp[order]
            if keys.size > 1 and bool((keys[1:] == keys[:-1]).any()):
                raise ValueError(f"field {plan.name}: duplicate fingerprints")
            out.append(FieldVocabulary(plan, width, salt, keys, rows[order].astype(np.int64)))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise _fail(pre_path, f"does not match this export ({e})") from None
    return ExportVocabulary(schema, out, pre, int(entry["bytes"]) + int(entry["preprocess"]["bytes"]))
