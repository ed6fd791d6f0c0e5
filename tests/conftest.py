"""Shared fixtures: the real Criteo / Avazu samples in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny test models gain nothing from intra-op threads, and on a shared 2-core machine the
# threads compete (tiny embedding lookups went from ~0.01 ms to ~15 ms). Tests that need
# several threads set them locally (tests/test_resume.py).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CRITEO_SAMPLE = SHARED_DATA / "criteo_sample" / "train.txt"
AVAZU_SAMPLE = SHARED_DATA / "avazu_sample" / "train.csv"


@pytest.fixture(scope="session")
def criteo_sample() -> Path:
    """The 8,000-row real Criteo sample (raw train.txt format)."""
    if not CRITEO_SAMPLE.is_file():
        pytest.skip(f"real Criteo sample not found at {CRITEO_SAMPLE} (../shared/data is not mounted)")
    return CRITEO_SAMPLE


@pytest.fixture(scope="session")
def avazu_sample() -> Path:
    """The 8,999-row real Avazu sample (raw train CSV with header)."""
    if not AVAZU_SAMPLE.is_file():
        pytest.skip(f"real Avazu sample not found at {AVAZU_SAMPLE} (../shared/data is not mounted)")
    return AVAZU_SAMPLE
