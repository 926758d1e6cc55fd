"""The firing-rate prediction service: ``neurotwin.v1.FiringRatePredictor`` and, on the same server,
the KServe v2 ``inference.GRPCInferenceService`` (see ``neurotwin.server.kserve``).

The servicers only translate between protocol messages and the engine (model manager + batcher).
Errors are raised as ``neurotwin.errors`` exceptions; ``server.common`` turns them into status codes.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from neurotwin.engines.batcher import BatcherSettings
from neurotwin.engines.inference import InferenceDataPlane, RequestLimits, check_image_count
from neurotwin.engines.model_handles import LoadedVersion
from neurotwin.engines.model_versions import VersionState
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.engines.statistics import InferenceStatistics, VersionStatistics
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import DEFAULT_MAX_PIXELS, decode_image
from neurotwin.runtimes.onnx_session import SessionSettings
from neurotwin.server.common import LATENCY_BUCKETS, GrpcServer, deadline_from
from neurotwin.server.statuses import report, status_for
from neurotwin.store import ModelStore, VersionPolicy, default_store_root
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SECTION = "predictor"
SERVICE_NAME = "neurotwin.v1.FiringRatePredictor"
UNKNOWN_MODEL = "_unknown"
ALL_MODELS = "_all"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_STATES = {
    VersionState.LOADING: pb.LOADING,
    VersionState.READY: pb.READY,
    VersionState.FAILED: pb.FAILED,
    VersionState.UNLOADING: pb.UNLOADING,
}


@dataclass
class Settings:
    """Settings of the predictor service (section ``predictor``, env ``NEUROTWIN_PREDICTOR_*``)."""

    model_store: str = field(default_factory=default_store_root)
    # "latest:N" (the N newest versions of each model) or "pinned:1,3".
    version_policy: str = "latest:1"
    # Dynamic batching, per model version.
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    # ONNX Runtime threads per session; 0 lets ONNX Runtime choose.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Let idle ONNX Runtime threads busy-wait between runs: lower latency on a machine the server has
    # to itself, but on shared or small CPUs the spinning starves request handling.
    spin_threads: bool = False
    # ONNX Runtime device: "auto" (CUDA when available), "cpu" or "cuda".
    device: str = "auto"
    # How often the model store is checked for new or removed versions; 0 turns hot reload off.
    poll_seconds: float = 5.0
    # Request limits: images per call, and decoded pixels per image (refuses decompression bombs
    # before decoding).
    max_images_per_request: int = 256
    max_decoded_pixels: int = DEFAULT_MAX_PIXELS
    # Also serve the KServe v2 / Open Inference Protocol API on the same port (and over HTTP/REST
    # when the server has an HTTP port).
    kserve: bool = True
    # "poll": serve what the store holds (hot reload every poll_seconds; 0 turns that off).
    # "explicit": Triton's explicit model control: clients with a bearer token load and unload
    # models over the repository API; the store is read only then (no polling).
    model_control: str = "poll"

    def registry_settings(self) -> RegistrySettings:
        return RegistrySettings(
            policy=VersionPolicy.parse(self.version_policy),
            batcher=BatcherSettings(
                max_batch_size=self.max_batch_size,
                max_queue_delay_s=self.max_queue_delay_ms / 1000.0,
                max_queue_size=self.max_queue_size,
            ),
            session=SessionSettings(
                intra_op_threads=self.intra_op_threads,
                inter_op_threads=self.inter_op_threads,
                allow_spinning=self.spin_threads,
                device=self.device,
            ),
            poll_seconds=0.0 if self.model_control == "explicit" else self.poll_seconds,
        )


FLAG_HELP = {
    "version_policy": "which versions to serve: latest:N or pinned:V1,V2 (default latest:1)",
    "max_batch_size": "largest merged batch, in images (default 32)",
    "max_queue_delay_ms": "longest wait for a batch to fill, in ms (default 2)",
    "max_queue_size": "requests that may wait per model version before RESOURCE_EXHAUSTED (default 256)",
    "intra_op_threads": "ONNX Runtime intra-op threads (0: automatic)",
    "inter_op_threads": "ONNX Runtime inter-op threads (0: automatic)",
    "spin_threads": "let idle ONNX Runtime threads busy-wait (default false)",
    "device": "ONNX Runtime device: auto, cpu or cuda (default auto)",
    "poll_seconds": "seconds between model store checks for hot reload; 0 turns it off (default 5)",
    "max_images_per_request": "most images in one request (default 256)",
    "max_decoded_pixels": "most pixels one image may decode to (default 16M)",
    "kserve": "also serve the KServe v2 inference API (default true)",
    "model_control": "poll (follow the store) or explicit (clients load/unload models; needs tokens)",
}


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


# -- request decoding ------------------------------------------------------------------------------


def _expected(loaded: LoadedVersion) -> str:
    spec = loaded.card.input
    return f"model {loaded.name} v{loaded.version} expects {spec.height} x {spec.width} x {spec.channels}"


def decode_images(
    images: Sequence[pb.Image], loaded: LoadedVersion, max_images: int, max_pixels: int
) -> np.ndarray:
    """Request images -> uint8 [N, H, W, C] matching the model's input, or InvalidInput naming the image."""
    check_image_count(len(images), max_images)
    spec = loaded.card.input
    expected = (spec.height, spec.width, spec.channels)
    # Nothing larger than the model's input can be valid, so refuse it from the header, undecoded.
    pixel_limit = min(max_pixels, spec.height * spec.width)
    batch = np.empty((len(images), *expected), dtype=np.uint8)
    for i, image in enumerate(images):
        what = f"image {i}"
        kind = image.WhichOneof("data")
        if kind == "encoded":
            try:
                array = decode_image(image.encoded, max_pixels=pixel_limit, what=what)
            except InvalidInput as exc:
                # Most refusals are photos of the wrong size or format: say what the model takes.
                raise InvalidInput(f"{exc}; {_expected(loaded)}") from exc
        elif kind == "raw":
            array = raw_image(image.raw, what, max_pixels)
        else:
            raise InvalidInput(f"{what}: empty (set encoded or raw)")
        if array.shape != expected:
            height, width, channels = array.shape
            raise InvalidInput(f"{what}: {height} x {width} x {channels} (H x W x C); {_expected(loaded)}")
        batch[i] = array
    return batch


def raw_image(raw: pb.RawImage, what: str, max_pixels: int) -> np.ndarray:
    shape = tuple(raw.shape)
    if len(shape) != 3:
        raise InvalidInput(f"{what}: raw shape {list(shape)}, expected [height, width, channels]")
    height, width, channels = shape
    if height * width > max_pixels:
        raise InvalidInput(f"{what}: {height} x {width} pixels exceeds the limit of {max_pixels}")
    if len(raw.data) != height * width * channels:
        raise InvalidInput(
            f"{what}: raw data has {len(raw.data)} bytes, shape {list(shape)} "
            f"needs {height * width * channels}"
        )
    return np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)


def neuron_columns(
    selection: pb.NeuronSelection, loaded: LoadedVersion
) -> tuple[list[int] | None, list[str]]:
    """Columns to return (None: all) and their ids; InvalidInput for unknown neurons."""
    ids, indices = list(selection.ids), list(selection.indices)
    all_ids = loaded.card.neuron_ids
    if ids and indices:
        raise InvalidInput("select neurons by ids or by indices, not both")
    if ids:
        unknown = [n for n in ids if n not in loaded.neuron_index]
        if unknown:
            raise InvalidInput(
                f"unknown neuron id(s) {unknown[:10]} for model {loaded.name} v{loaded.version} "
                f"({len(all_ids)} neurons, e.g. {all_ids[:3]})"
            )
        return [loaded.neuron_index[n] for n in ids], ids
    if indices:
        bad = [i for i in indices if i >= len(all_ids)]
        if bad:
            raise InvalidInput(
                f"neuron index {bad[0]} out of range: model {loaded.name} v{loaded.version} "
                f"has {len(all_ids)} neurons (0..{len(all_ids) - 1})"
            )
        return indices, [all_ids[i] for i in indices]
    return None, all_ids


def model_status(name: str, infos: Sequence[Any]) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=name,
        versions=[
            pb.VersionStatus(version=i.version, state=_STATES[i.state], message=i.message, since=i.since)
            for i in infos
        ],
    )


class _CancelSlot:
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


# -- servicer --------------------------------------------------------------------------------------


class PredictorServicer(pb_grpc.FiringRatePredictorServicer):
    def __init__(self, manager: ModelRegistry, settings: Settings, metrics: PredictorMetrics) -> None:
        self.manager = manager
        self.settings = settings
        self.metrics = metrics

    def _predict(
        self,
        request: pb.PredictRequest,
        context: grpc.ServicerContext,
        on_cancel: Callable[[Callable[[], None]], Any] | None,
    ) -> pb.PredictResponse:
        if not request.model:
            raise InvalidInput("model name is required")
        loaded = self.manager.acquire(request.model, request.version or None)
        timing = self.metrics.statistics.version(loaded.name, loaded.version).start()
        ok = False
        try:
            columns, ids = neuron_columns(request.neurons, loaded)
            images = decode_images(
                request.images, loaded, self.settings.max_images_per_request, self.settings.max_decoded_pixels
            )
            timing.inputs_ready()
            rates = loaded.predict(images, deadline_from(context), on_cancel)
            timing.outputs_started()
            if columns is not None:
                rates = rates[:, columns]
            ok = True
        finally:
            loaded.exit()
            timing.finish(ok)
        return pb.PredictResponse(
            model=loaded.name,
            version=loaded.version,
            neuron_ids=ids,
            image_count=rates.shape[0],
            rates=rates.ravel().tolist(),
        )

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        with CallMetrics(self.metrics, request.model, "Predict"):
            return self._predict(request, context, context.add_callback)

    def PredictStream(
        self, request_iterator: Iterator[pb.PredictStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictStreamResponse]:
        slot = _CancelSlot(context)
        # Requests are answered one by one in arrival order, which is the stream's ordering promise.
        for item in request_iterator:
            try:
                with CallMetrics(self.metrics, item.request.model, "PredictStream"):
                    result = self._predict(item.request, context, slot.register)
                yield pb.PredictStreamResponse(request_id=item.request_id, result=result)
            except Exception as exc:
                code, message = report(exc, f"PredictStream request {item.request_id!r}")
                error = pb.StreamError(code=code.value[0], message=message)
                yield pb.PredictStreamResponse(request_id=item.request_id, error=error)

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        with CallMetrics(self.metrics, ALL_MODELS, "ListModels"):
            statuses = self.manager.status()
            return pb.ListModelsResponse(models=[model_status(n, infos) for n, infos in statuses.items()])

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.GetModelResponse:
        with CallMetrics(self.metrics, request.model, "GetModel"):
            loaded = self.manager.get(request.model, request.version or None)
            card = loaded.card
            return pb.GetModelResponse(
                model=loaded.name,
                version=loaded.version,
                input_height=card.input.height,
                input_width=card.input.width,
                input_channels=card.input.channels,
                neuron_ids=card.neuron_ids,
                card_json=card.to_json(),
                status=model_status(loaded.name, self.manager.status().get(loaded.name, [])),
            )


def attach(server: GrpcServer, settings: Settings) -> ModelRegistry:
    """Load the models, then register FiringRatePredictor (and KServe v2) on ``server``.

    The models come from the server's shared registry (``server/models.py``), configured by these
    settings. Returns the registry, for embedding code and tests.
    """
    if settings.model_control not in ("poll", "explicit"):
        raise InvalidInput(f"model_control {settings.model_control!r}: expected 'poll' or 'explicit'")
    if settings.model_control == "explicit" and not server.settings.tokens():
        raise InvalidInput(
            "model_control 'explicit' lets clients load and unload models: set auth tokens "
            "(--auth-tokens or --auth-token-file) so that only holders of a token can"
        )
    from neurotwin.server.models import shared_registry

    metrics = PredictorMetrics(server.metrics.registry)
    # The observer goes in before the first load, so the first versions' batchers get their metrics.
    manager = shared_registry(server, settings.model_store, settings.registry_settings(), observers=[metrics])
    metrics.knows = manager.knows
    ready = {
        name: [i.version for i in infos if i.state == VersionState.READY]
        for name, infos in manager.status().items()
    }
    log.info("predictor: model store %s, serving %s", settings.model_store, ready or "no models yet")
    servicer = PredictorServicer(manager, settings, metrics)
    server.add_service(
        lambda grpc_server: pb_grpc.add_FiringRatePredictorServicer_to_server(servicer, grpc_server),
        [SERVICE_NAME],
    )
    if settings.kserve:
        from neurotwin.server import kserve

        plane = InferenceDataPlane(
            manager,
            ModelStore(settings.model_store),
            settings.registry_settings(),
            metrics.statistics,
            RequestLimits(settings.max_images_per_request, settings.max_decoded_pixels),
            model_control=settings.model_control == "explicit",
        )
        kserve.attach(server, plane, metrics)
        if server.http is not None:
            from neurotwin.server import oip_http

            oip_http.attach(server, plane, metrics)
    return manager
