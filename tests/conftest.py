"""Shared pytest configuration."""

from __future__ import annotations

import os

import pytest

# Tests share 2 cores with each other; many small torch ops are faster single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)
