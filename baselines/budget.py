"""Size budgets: a setting ``"x<R>"`` asks for at most fp32 bytes / R bytes of export.

``budget_bytes(fp32_bytes, "x10")`` is the largest integer byte count a method set to
``"x10"`` may export: ``floor(fp32_bytes / 10)``, where fp32 bytes = rows x dim x 4 (the
reference the benchmark divides by). The export's bytes are the payload files on disk,
``.npy`` headers included (``CompressedEmbedding.num_bytes``).
"""

from __future__ import annotations

import math
import re

_RATIO = re.compile(r"x(\d+(?:\.\d+)?)")


def is_ratio(setting: str) -> bool:
    """Whether ``setting`` has the form ``x<R>`` (e.g. ``"x10"``, ``"x12.5"``)."""
    return _RATIO.fullmatch(setting) is not None


def parse_ratio(setting: str, method: str = "") -> float:
    """``"x10"`` -> 10.0; ``ValueError`` unless ``setting`` is ``x<R>`` with R > 1."""
    m = _RATIO.fullmatch(setting)
    if m is None or not float(m.group(1)) > 1:
        who = f"{method} setting" if method else "setting"
        raise ValueError(f"{who} {setting!r} is not a target compression ratio 'x<R>' with R > 1 (e.g. 'x10')")
    return float(m.group(1))


def budget_bytes(fp32_bytes: int, ratio: float) -> int:
    """Largest byte count within ``ratio``: ``floor(fp32_bytes / ratio)``."""
    if not ratio > 1:
        raise ValueError(f"target ratio must be > 1, got {ratio}")
    return math.floor(int(fp32_bytes) / ratio)
