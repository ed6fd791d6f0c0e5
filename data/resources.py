"""Will it fit? Disk and memory checks made before a long stage starts.

A stage that would run out of disk or memory after an hour of work is refused before it
starts, with one line that says what it needs and what there is. The estimates are
deliberately generous; ``MPE_SKIP_RESOURCE_CHECK=1`` turns the checks off (e.g. where
``/proc/meminfo`` does not see a container's limit).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

GB = 1e9
SKIP_ENV = "MPE_SKIP_RESOURCE_CHECK"


class InsufficientResourcesError(ValueError):
    """A stage would not fit in the free disk space or the available memory."""


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _skipped() -> bool:
    return os.environ.get(SKIP_ENV, "") not in ("", "0")


def check_disk(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """``InsufficientResourcesError`` when the file system of ``path`` has less than ``need_bytes`` free."""
    if _skipped():
        return
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise InsufficientResourcesError(
            f"{what} needs about {need_bytes / GB:.1f} GB of disk at {where}, but only {free / GB:.1f} GB are "
            f"free: free some space or choose another output directory ({SKIP_ENV}=1 skips this check)")


def check_memory(need_bytes: int, what: str) -> None:
    """``InsufficientResourcesError`` when fewer than ``need_bytes`` of memory are available."""
    if _skipped():
        return
    available = available_memory_bytes()
    if available is not None and need_bytes > available:
        raise InsufficientResourcesError(
            f"{what} needs about {need_bytes / GB:.1f} GB of memory, but only {available / GB:.1f} GB are "
            f"available: use a machine with more memory, fewer features (a higher --min-count) or several "
            f"processes (torchrun shards the tables) ({SKIP_ENV}=1 skips this check)")
