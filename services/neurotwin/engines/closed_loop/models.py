"""The generators and twins closed-loop sessions use, from the model registry.

Every version a session gets has passed the registry's validation (checksums, finite and matching
reference outputs), and "newest" means the newest version that passed, the same one Predict serves.
A session journals the versions it was created with and keeps them for its whole life: a version the
policy no longer serves is loaded on demand for it (validated the same way).
"""

from __future__ import annotations

import threading
from typing import Any

from neurotwin.engines.closed_loop.guidance import Twin
from neurotwin.engines.registry import ModelRegistry


class SessionModels:
    """Generators (torch, on ``device``) and twins (the registry's ONNX Runtime sessions)."""

    def __init__(self, registry: ModelRegistry, device: str = "cpu", own_registry: bool = False) -> None:
        self.registry = registry
        self.store = registry.store
        self.device = device
        self._own_registry = own_registry
        self._lock = threading.Lock()
        self._twins: dict[tuple[str, int, tuple[int, ...] | None], Twin] = {}

    def checkout_generator(self, name: str, version: int | None) -> tuple[int, Any]:
        """The version (newest validated when None or 0) and its module. Generators hold no resource
        but memory, which the sessions using the module keep alive; the handle is not held."""
        with self.registry.derived.generator(name, version or None, self.device) as loaded:
            return loaded.version, loaded.module

    def generator(self, name: str, version: int) -> Any:
        return self.checkout_generator(name, version)[1]

    def twin(self, name: str, version: int | None, outputs: tuple[int, ...] | None = None) -> Twin:
        """The twin of ``version`` (the newest validated one when None or 0), pruned to ``outputs``
        when given; one per (name, version, outputs)."""
        if version:
            with self._lock:
                cached = self._twins.get((name, version, outputs))
            if cached is not None:
                return cached
        twin = Twin(self.registry, name, version, outputs)
        key = (name, twin.version.version, outputs)
        with self._lock:
            return self._twins.setdefault(key, twin)

    def close(self) -> None:
        with self._lock:
            self._twins.clear()
        if self._own_registry:
            self.registry.stop()
