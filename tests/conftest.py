"""Shared pytest configuration."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._postgres import POSTGRES_URL, postgres_skip_reason

# Tests share 2 cores with each other; many small torch ops are faster single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(1)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards."""
    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    import psycopg

    schema = f"nt_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The closed-loop tests' store: a tiny DCGAN and a tiny 5-neuron ONNX twin (see tests/_closed_loop.py).
    Test files with a store of their own define their own ``store_root``."""
    # Imported here: conftest is read before OMP_NUM_THREADS is set, and this pulls in the server.
    from tests._closed_loop import make_closed_loop_store

    return make_closed_loop_store(tmp_path_factory.mktemp("store"))
