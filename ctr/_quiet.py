"""Drops one harmless torch log line; ``ctr/__init__.py`` imports this first, so every CLI does."""

from __future__ import annotations

import logging
import re

# torch logs "W... torch/fx/_symbolic_trace.py:56] is_fx_tracing will return true ..." at the first torchrec KJT.
_FX_TRACING = re.compile(r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export\. ")


class _DropFxTracingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and _FX_TRACING.match(record.getMessage()))


_LOGGER = logging.getLogger("torch.fx._symbolic_trace")
if not any(isinstance(f, _DropFxTracingWarning) for f in _LOGGER.filters):
    _LOGGER.addFilter(_DropFxTracingWarning())
