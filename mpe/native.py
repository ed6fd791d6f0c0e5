"""The compiled row decoder of the packed export (``packed_decode.c``), built on first use.

``row_decoder()`` compiles ``packed_decode.c`` with the system C compiler (``$CC`` or ``cc``)
into ``$MPE_NATIVE_CACHE`` (default ``~/.cache/mpe-toolkit``), named by the source's sha256
so an edited source is rebuilt, written atomically, and loads it with ctypes. It returns
None, and the caller uses its numpy path, when ``MPE_NATIVE=0`` or when no compiler is
available or the build fails (the reason is kept in ``build_error()``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("packed_decode.c")
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("MPE_NATIVE_CACHE", Path.home() / ".cache" / "mpe-toolkit"))


def _build() -> ctypes.CDLL:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    lib = _cache_dir() / f"packed_decode_{digest}.so"
    if not lib.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc/gcc) found")
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(SOURCE)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
            os.replace(out, lib)
    dll = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    dll.mpe_decode_rows.argtypes = [p, i64, p, p, p, i64, i64, p, p, p, p, i64, p]
    dll.mpe_decode_rows.restype = None
    return dll


def row_decoder():
    """The ``mpe_decode_rows`` C function, or None (numpy fallback)."""
    if "fn" not in _state:
        if os.environ.get("MPE_NATIVE", "1") == "0":
            _state.update(fn=None, error="disabled by MPE_NATIVE=0")
        else:
            try:
                _state.update(fn=_build().mpe_decode_rows, error=None)
            except OSError as e:
                _state.update(fn=None, error=str(e))
    return _state["fn"]


def build_error() -> str | None:
    """Why ``row_decoder()`` returned None (None when it did not)."""
    row_decoder()
    return _state.get("error")  # type: ignore[return-value]
