"""The generators and twins closed-loop sessions use, loaded once per (name, version) and shared."""

from __future__ import annotations

import threading
from typing import Any

from neurotwin.engines.closed_loop.guidance import Twin
from neurotwin.store import GENERATORS, ModelStore


class SessionModels:
    """Thread-safe caches of loaded generators (torch, on ``device``) and twins (ONNX Runtime, CPU)."""

    def __init__(self, store: ModelStore, device: str = "cpu", twin_threads: int = 0) -> None:
        self.store = store
        self.device = device
        self.twin_threads = twin_threads
        self._lock = threading.Lock()
        self._generators: dict[tuple[str, int], Any] = {}
        self._twins: dict[tuple[str, int], Twin] = {}

    def generator(self, name: str, version: int) -> Any:
        key = (name, version)
        with self._lock:
            cached = self._generators.get(key)
        if cached is not None:
            return cached
        from neurotwin.runtimes.generators import load_generator

        module = load_generator(self.store.resolve(GENERATORS, name, version), self.device)
        with self._lock:
            return self._generators.setdefault(key, module)

    def twin(self, name: str, version: int) -> Twin:
        key = (name, version)
        with self._lock:
            cached = self._twins.get(key)
        if cached is not None:
            return cached
        twin = Twin(self.store, name, version, self.twin_threads)
        with self._lock:
            return self._twins.setdefault(key, twin)

    def close(self) -> None:
        with self._lock:
            twins = list(self._twins.values())
            self._twins.clear()
            self._generators.clear()
        for twin in twins:
            twin.session.close()
