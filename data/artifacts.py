"""Safe artefact files: atomic writes, checksums, JSON headers, path confinement.

Every file the toolkit writes goes through ``atomic_write_*`` (write to a temporary
file in the same directory, fsync, rename), every directory it replaces as a whole goes
through ``replace_dir``, every JSON file that checksums itself through ``json_digest``,
and every file it reads back is checked with ``verify_sha256``. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


class ArtifactError(RuntimeError):
    """A file the toolkit wrote earlier is missing, corrupted, truncated or tampered with."""


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden sibling directory of ``target`` to write into: on a normal exit it
    replaces ``target`` as a whole (``replace_dir``), on an exception it is deleted, so
    ``target`` never holds a partial result."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move directory ``new`` to ``target``, replacing an existing ``target`` directory.

    ``new`` must be on ``target``'s file system (build it as a sibling of ``target``). An
    existing ``target`` is first renamed into a fresh hidden sibling directory, then ``new``
    is renamed to ``target`` and the old one deleted, so ``target`` is always either the
    old or the whole new directory.
    """
    new, target = Path(new), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "d")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write one numpy array in ``.npy`` format (no object arrays)."""
    if array.dtype == object:
        raise TypeError("object arrays cannot be saved without pickle")
    _atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False))


def atomic_torch_save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a dict of tensors and plain values (read back with ``load_torch``).

    Streamed into the temporary file: no in-memory copy of the serialized checkpoint (at
    Criteo size the weights, best weights and Adam moments are over 1 GB)."""
    import torch

    _atomic_write(Path(path), lambda f: torch.save(state, f))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or unparsable file into ``ArtifactError``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); the file is corrupted or truncated") from None


def short_error(e: BaseException, limit: int = 240) -> str:
    """``e``'s message on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


COMPACT_SEPARATORS = (",", ":")  # the canonical form of ``json_digest`` (unless a format says otherwise)


def json_digest(obj: Mapping[str, Any], key: str, separators: tuple[str, str] = COMPACT_SEPARATORS) -> str:
    """sha256 of ``obj``'s canonical JSON without its field ``key`` (a JSON file's checksum of itself).

    Canonical JSON: keys sorted, ``separators`` between items and after keys (compact by
    default). The one implementation of every ``*_sha256`` a JSON file holds of itself.
    """
    body = {k: v for k, v in obj.items() if k != key}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=separators).encode()).hexdigest()


def seal_json(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``obj`` with ``obj[key]`` set to its ``json_digest`` (write it with ``atomic_write_json``)."""
    out = dict(obj)
    out[key] = json_digest(out, key)
    return out


def read_sealed_json(path: str | os.PathLike, key: str) -> dict[str, Any]:
    """Read a JSON object written with ``seal_json``; ``ArtifactError`` unless its digest matches."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    if key not in obj:
        raise ArtifactError(f"{path}: has no {key} checksum (written by an older version, or edited)")
    if obj[key] != json_digest(obj, key):
        raise ArtifactError(f"{path}: checksum mismatch ({key}); the file was edited or is corrupted")
    return obj


def safe_child(root: str | os.PathLike, name: str) -> Path:
    """Resolve ``name`` inside ``root``; names that escape ``root`` raise ``ArtifactError``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ArtifactError(f"{root}: manifest names {name!r}, which is not a file name")
    root_p = Path(root).resolve()
    p = (root_p / name).resolve()
    if p != root_p and root_p not in p.parents:
        raise ArtifactError(f"{root}: manifest names {name!r}, which escapes the artefact directory")
    return p


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise ``ArtifactError`` unless the file exists and its sha256 equals ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{path}: checksum mismatch (expected sha256 {expected[:12]}…, found {actual[:12]}…); "
            "the file is corrupted, truncated or was modified"
        )


def load_npy(path: str | os.PathLike, expected_sha256: str | None = None) -> np.ndarray:
    """Load an ``.npy`` file without pickle, optionally verifying its checksum first."""
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing") from None
    except ValueError as e:
        raise ArtifactError(f"{path}: not a readable .npy array ({e})") from None


def load_torch(path: str | os.PathLike, expected_sha256: str | None = None) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (no arbitrary unpickling), checksum optional."""
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file is missing") from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise ArtifactError(f"{path}: cannot be read as a weights-only checkpoint ({e})") from None
