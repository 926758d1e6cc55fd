"""One model registry per server process, shared by every service on it.

``shared_registry`` builds the registry the first time a service of a :class:`GrpcServer` asks for it
and hands the same one to every later service, so Predict, Synthesize and closed-loop sessions see
the same validated versions: a version refused for one is refused for all, and the last good one
serves everywhere. Refusals are counted in ``neurotwin_model_refusals`` (by kind and model).
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.errors import InvalidInput
from neurotwin.server.common import GrpcServer

log = logging.getLogger(__name__)

_lock = threading.Lock()
_registries: weakref.WeakKeyDictionary[GrpcServer, _Shared] = weakref.WeakKeyDictionary()


class RegistryMetrics:
    """Registry hooks -> Prometheus."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "neurotwin_model_refusals",
            "Model versions refused before serving (checksums, load, non-finite or changed outputs), "
            "by kind (predictors, generators, twins)",
            ["kind", "model"],
            registry=registry,
        )

    def refused(self, kind: str, model: str, version: int, message: str) -> None:
        self.refusals.labels(kind, model).inc()


class _Shared:
    def __init__(self, registry: ModelRegistry, root: Path, configured: bool) -> None:
        self.registry = registry
        self.root = root
        self.configured = configured


def shared_registry(
    server: GrpcServer,
    model_store: str,
    settings: RegistrySettings | None = None,
    observers: list[Any] = (),  # type: ignore[assignment]
) -> ModelRegistry:
    """The registry of ``server``'s process, started. ``settings`` come from the service that owns
    them (the predictor's flags); services without their own take the defaults or what is there.
    ``observers`` (metrics hooks) are added before anything loads."""
    root = Path(model_store).expanduser().resolve()
    with _lock:
        shared = _registries.get(server)
        if shared is None:
            metrics = RegistryMetrics(server.metrics.registry)
            registry = ModelRegistry(model_store, settings, observer=metrics)
            shared = _registries[server] = _Shared(registry, root, configured=settings is not None)
            # Released with the server (stop hooks run in reverse, so after the services using it).
            server.add_service(lambda grpc_server: None, [], on_stop=registry.stop)
            registry.observers.extend(observers)
        elif shared.root != root:
            raise InvalidInput(
                f"one model store per server: {model_store} differs from {shared.registry.store.root}"
            )
        elif settings is not None and not shared.configured:
            # A service without settings started it with the defaults: reload with the owner's
            # settings and observers (its batchers need the metrics hooks from their first batch).
            shared.configured = True
            shared.registry.observers.extend(observers)
            shared.registry.reconfigure(settings, force=True)
        elif settings is not None and settings != shared.registry.settings:
            raise InvalidInput("two services configure the model registry differently")
        else:
            shared.registry.observers.extend(observers)
    shared.registry.start()
    return shared.registry
