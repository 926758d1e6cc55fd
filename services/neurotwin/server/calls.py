"""Per-call plumbing the predictor's gRPC services share (FiringRatePredictor and KServe v2): the
service metrics, one call's metrics, and cancellation of whichever request a stream is waiting on.

Both servicers import it; neither imports the other.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from neurotwin.engines.statistics import InferenceStatistics, VersionStatistics
from neurotwin.server.common import LATENCY_BUCKETS
from neurotwin.server.statuses import status_for

UNKNOWN_MODEL = "_unknown"
ALL_MODELS = "_all"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class PredictorMetrics:
    """Service-level Prometheus metrics; also the registry's and batchers' observer."""

    def __init__(
        self, registry: CollectorRegistry, manager_knows: Callable[[str], bool] | None = None
    ) -> None:
        self.knows = manager_knows or (lambda name: True)
        # Triton-style per-version statistics (the OIP statistics extension), fed by the same hooks.
        self.statistics = InferenceStatistics()
        self.children: dict[tuple[str, str], _CallChildren] = {}
        self.requests = Counter(
            "neurotwin_predictor_requests",
            "Prediction-service calls by model, method and status code",
            ["model", "method", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "neurotwin_predictor_request_seconds",
            "Total time of a prediction call in the servicer (decode, queue, compute, encode)",
            ["model", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "neurotwin_predictor_queue_seconds",
            "Time a request waited for its batch to start",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "neurotwin_predictor_compute_seconds",
            "Time of one ONNX Runtime call (one batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "neurotwin_predictor_batch_size",
            "Images per ONNX Runtime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "neurotwin_predictor_batch_requests",
            "Requests merged into one ONNX Runtime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "neurotwin_predictor_in_flight", "Prediction calls being handled", ["model"], registry=registry
        )
        self.dropped = Counter(
            "neurotwin_predictor_dropped",
            "Requests dropped before compute (deadline passed or call cancelled)",
            ["model", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "neurotwin_predictor_queue_rejections",
            "Requests refused because the model's queue was full",
            ["model"],
            registry=registry,
        )
        self.load_failures = Counter(
            "neurotwin_predictor_model_load_failures",
            "Model versions refused at load (invalid files, failed warm-up)",
            ["model"],
            registry=registry,
        )
        self.versions_ready = Gauge(
            "neurotwin_predictor_model_versions_ready",
            "Versions of a model ready to serve",
            ["model"],
            registry=registry,
        )

    def label(self, model: str) -> str:
        # Labels only for models the server knows: arbitrary requested names must not grow the registry.
        return model if model == ALL_MODELS or (model and self.knows(model)) else UNKNOWN_MODEL

    # RegistryObserver
    def batch_observer(self, model: str, version: int) -> _BatchMetrics:
        return _BatchMetrics(self, model, self.statistics.loaded(model, version))

    def load_failed(self, model: str, version: int, message: str) -> None:
        self.load_failures.labels(model).inc()

    def versions_changed(self, model: str, ready: list[int]) -> None:
        self.versions_ready.labels(model).set(len(ready))


class _BatchMetrics:
    """Batcher hooks bound to one model's metric children (label lookups done once)."""

    def __init__(self, metrics: PredictorMetrics, model: str, stats: VersionStatistics) -> None:
        self._stats = stats
        self._queue = metrics.queue_seconds.labels(model)
        self._compute = metrics.compute_seconds.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._requests = metrics.batch_requests.labels(model)
        self._dropped = {r: metrics.dropped.labels(model, r) for r in ("deadline", "cancelled")}
        self._rejected = metrics.rejected.labels(model)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)
        self._stats.queued(seconds)

    def computed(self, seconds: float, images: int, requests: int) -> None:
        self._stats.computed(seconds, images, requests)
        self._compute.observe(seconds)
        self._batch.observe(images)
        self._requests.observe(requests)

    def dropped(self, reason: str) -> None:
        self._dropped[reason].inc()

    def rejected(self) -> None:
        self._rejected.inc()


class _CallChildren:
    """The metric children of one (model, method), looked up once instead of on every call."""

    __slots__ = ("codes", "in_flight", "requests", "seconds")

    def __init__(self, metrics: PredictorMetrics, model: str, method: str) -> None:
        self.in_flight = metrics.in_flight.labels(model)
        self.seconds = metrics.request_seconds.labels(model, method)
        self.requests = functools.partial(metrics.requests.labels, model, method)
        self.codes: dict[grpc.StatusCode, Any] = {}

    def count(self, code: grpc.StatusCode) -> None:
        child = self.codes.get(code)
        if child is None:
            child = self.codes[code] = self.requests(code.name)
        child.inc()


class CallMetrics:
    """``with CallMetrics(...)``: in-flight, total latency and the status code of one call."""

    __slots__ = ("_children", "_started")

    def __init__(self, metrics: PredictorMetrics, model: str, method: str) -> None:
        label = metrics.label(model)
        key = (label, method)
        children = metrics.children.get(key)
        if children is None:
            children = metrics.children[key] = _CallChildren(metrics, label, method)
        self._children = children

    def __enter__(self) -> CallMetrics:
        self._started = time.perf_counter()
        self._children.in_flight.inc()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        code = grpc.StatusCode.OK if exc is None else status_for(exc)
        children = self._children
        children.count(code)
        children.seconds.observe(time.perf_counter() - self._started)
        children.in_flight.dec()


class CancelSlot:
    """One gRPC cancel callback per stream that cancels whichever request is waiting now.

    ``context.add_callback`` keeps every callback until the call ends, so registering one per
    request would grow without bound on a long-lived stream.
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._current: Callable[[], None] | None = None
        self._fired = False
        self._lock = threading.Lock()
        if not context.add_callback(self._fire):
            self._fired = True

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            current = self._current
        if current is not None:
            current()

    def register(self, callback: Callable[[], None]) -> bool:
        with self._lock:
            if self._fired:
                return False
            self._current = callback
            return True
