"""Helpers for tests that run the predictor service over real loopback gRPC."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from neurotwin.engines.registry import ModelRegistry
from neurotwin.server import predictor
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings


class Gate:
    """Wraps a runtime call: records the calling thread and batch size, and can hold a batch."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self._run = run
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.calls: list[tuple[str, int]] = []

    def hold(self) -> None:
        self.open.clear()
        self.entered.clear()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append((threading.current_thread().name, int(images.shape[0])))
        self.entered.set()
        assert self.open.wait(10), "gate never opened"
        return self._run(images)


def gate_model(manager: ModelRegistry, name: str, version: int | None = None) -> Gate:
    """Put a gate in front of a served version's runtime (the batcher and session stay real)."""
    batcher = manager.get(name, version).batcher
    gate = Gate(batcher.run_fn)
    batcher.run_fn = gate
    return gate


@contextlib.contextmanager
def predictor_server(
    store_root: str | Path, server: dict[str, Any] | None = None, **settings: Any
) -> Iterator[tuple[GrpcServer, ModelRegistry]]:
    """A started server with the predictor service (plus KServe) on free ports."""
    server_settings = ServerSettings(**{"port": 0, "metrics_port": 0, "grace_seconds": 5, **(server or {})})
    grpc_server = GrpcServer(server_settings)
    settings.setdefault("poll_seconds", 0)
    manager = predictor.attach(grpc_server, predictor.Settings(model_store=str(store_root), **settings))
    grpc_server.start()
    try:
        yield grpc_server, manager
    finally:
        grpc_server.stop(0)


def metrics_text(server: GrpcServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as page:
        return page.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{val}"' in head for key, val in labels.items()):
            return float(value)
    return 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)
