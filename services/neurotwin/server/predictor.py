"""The firing-rate prediction service: ``neurotwin.v1.FiringRatePredictor`` and, on the same server,
the KServe v2 ``inference.GRPCInferenceService`` (see ``neurotwin.server.kserve``).

The servicers only translate between protocol messages and the engine (model manager + batcher).
Errors are raised as ``neurotwin.errors`` exceptions; ``server.common`` turns them into status codes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from neurotwin.engines.batcher import BatcherSettings
from neurotwin.engines.inference import InferenceDataPlane, RequestLimits, check_image_count
from neurotwin.engines.model_handles import LoadedVersion
from neurotwin.engines.model_versions import VersionState
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import DEFAULT_MAX_PIXELS, decode_image
from neurotwin.runtimes.onnx_session import SessionSettings
from neurotwin.server.calls import ALL_MODELS, CallMetrics, CancelSlot, PredictorMetrics
from neurotwin.server.common import GrpcServer, deadline_from
from neurotwin.server.statuses import report
from neurotwin.store import ModelStore, VersionPolicy, default_store_root
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SECTION = "predictor"
SERVICE_NAME = "neurotwin.v1.FiringRatePredictor"

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
    if len(images) == 1:
        # The common single image goes to the runtime as a view on its request bytes (read-only),
        # without the copy into a batch array.
        return _decode_one(images[0], "image 0", loaded, expected, pixel_limit, max_pixels)[None]
    batch = np.empty((len(images), *expected), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = _decode_one(image, f"image {i}", loaded, expected, pixel_limit, max_pixels)
    return batch


def _decode_one(
    image: pb.Image,
    what: str,
    loaded: LoadedVersion,
    expected: tuple[int, int, int],
    pixel_limit: int,
    max_pixels: int,
) -> np.ndarray:
    """One request image -> uint8 [H, W, C] of the model's input size, or InvalidInput naming it."""
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
    return array


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
        slot = CancelSlot(context)
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
