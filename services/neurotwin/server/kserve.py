"""KServe v2 / Open Inference Protocol servicer (``inference.GRPCInferenceService``) over the same
model manager as FiringRatePredictor, so standard clients (tritonclient, kserve) work unchanged.

A predictor appears as a model with one input (card input name, ``UINT8 [-1, H, W, 3]``) and one
output (card output name, ``FP32 [-1, neurons]``). As an extension the input may also be ``BYTES
[N]``: N encoded PNG/JPEG images. Inputs are read from ``raw_input_contents`` or typed contents;
outputs always go in ``raw_output_contents``, which is where tritonclient reads them.
"""

from __future__ import annotations

import struct
from typing import Any

import grpc
import numpy as np

from neurotwin import __version__
from neurotwin.engines.model_manager import LoadedVersion, ModelManager
from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.imagecodec import decode_image
from neurotwin.kserve import grpc_service_pb2 as pb
from neurotwin.kserve import grpc_service_pb2_grpc as pb_grpc
from neurotwin.server.common import GrpcServer, deadline_from
from neurotwin.server.predictor import CallMetrics, PredictorMetrics, Settings, check_image_count

SERVICE_NAME = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"


def parse_version(text: str) -> int | None:
    if not text:
        return None
    try:
        version = int(text)
    except ValueError:
        raise InvalidInput(f"model version {text!r}: expected an integer") from None
    if version < 1:
        raise InvalidInput(f"model version {text!r}: versions start at 1")
    return version


def split_bytes_tensor(raw: bytes, what: str) -> list[bytes]:
    """A raw BYTES tensor: each element is a 4-byte little-endian length followed by its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{what}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"{what}: BYTES element of {length} bytes overruns the tensor")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, manager: ModelManager, settings: Settings, metrics: PredictorMetrics, server: GrpcServer
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.metrics = metrics
        self.server = server

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.manager.ready and not self.server.draining)

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        version = parse_version(request.version)
        try:
            self.manager.get(request.name, version)
        except NeurotwinError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="neurotwin", version=__version__, extensions=[])

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        with CallMetrics(self.metrics, request.name, "ModelMetadata"):
            loaded = self.manager.get(request.name, parse_version(request.version))
            card = loaded.card
            ready = [
                str(i.version) for i in self.manager.status().get(loaded.name, []) if i.state.value == "READY"
            ]
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=loaded.name,
                versions=ready or [str(loaded.version)],
                platform=PLATFORM,
                inputs=[
                    tensor(
                        name=card.input.name,
                        datatype="UINT8",
                        shape=[-1, card.input.height, card.input.width, card.input.channels],
                    )
                ],
                outputs=[tensor(name=card.output.name, datatype="FP32", shape=[-1, card.neuron_count])],
            )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        with CallMetrics(self.metrics, request.model_name, "ModelInfer"):
            loaded = self.manager.acquire(request.model_name, parse_version(request.model_version))
            try:
                self._check_outputs(request, loaded)
                images = self._images(request, loaded)
                rates = loaded.predict(images, deadline_from(context), context.add_callback)
            finally:
                loaded.exit()
            output = pb.ModelInferResponse.InferOutputTensor(
                name=loaded.card.output.name, datatype="FP32", shape=list(rates.shape)
            )
            return pb.ModelInferResponse(
                model_name=loaded.name,
                model_version=str(loaded.version),
                id=request.id,
                outputs=[output],
                raw_output_contents=[np.ascontiguousarray(rates, dtype="<f4").tobytes()],
            )

    def _check_outputs(self, request: pb.ModelInferRequest, loaded: LoadedVersion) -> None:
        for output in request.outputs:
            if output.name != loaded.card.output.name:
                raise InvalidInput(
                    f"unknown output {output.name!r}; model {loaded.name} has one output "
                    f"{loaded.card.output.name!r}"
                )

    def _images(self, request: pb.ModelInferRequest, loaded: LoadedVersion) -> np.ndarray:
        card = loaded.card
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"expected 1 input ({card.input.name!r}), got {len(request.inputs)}: "
                f"{[i.name for i in request.inputs]}"
            )
        tensor = request.inputs[0]
        if tensor.name != card.input.name:
            raise InvalidInput(
                f"unknown input {tensor.name!r}; model {loaded.name} takes {card.input.name!r}"
            )
        raw: bytes | None = None
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
            if tensor.HasField("contents"):
                raise InvalidInput("input has both raw_input_contents and typed contents")
            raw = request.raw_input_contents[0]
        shape = list(tensor.shape)
        what = f"input {tensor.name!r}"
        if tensor.datatype == "UINT8":
            return self._pixels(tensor, raw, shape, what, loaded)
        if tensor.datatype == "BYTES":
            return self._encoded(tensor, raw, shape, what, loaded)
        raise InvalidInput(
            f"{what}: datatype {tensor.datatype!r} not supported; send UINT8 [N, H, W, 3] pixels "
            "or BYTES [N] encoded PNG/JPEG images"
        )

    def _pixels(
        self, tensor: Any, raw: bytes | None, shape: list[int], what: str, loaded: LoadedVersion
    ) -> np.ndarray:
        if len(shape) != 4 or min(shape, default=0) < 0:
            raise InvalidInput(f"{what}: shape {shape}, expected [N, height, width, channels]")
        check_image_count(shape[0], self.settings.max_images_per_request)
        size = int(np.prod(shape))
        if raw is not None:
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            values = tensor.contents.uint_contents
            if values and max(values) > 255:
                raise InvalidInput(f"{what}: UINT8 values above 255 in uint_contents")
            data = np.asarray(values, dtype=np.uint8)
        if data.size != size:
            raise InvalidInput(f"{what}: {data.size} bytes of data for shape {shape} ({size} needed)")
        return loaded.session.check(data.reshape(shape), what)

    def _encoded(
        self, tensor: Any, raw: bytes | None, shape: list[int], what: str, loaded: LoadedVersion
    ) -> np.ndarray:
        elements = split_bytes_tensor(raw, what) if raw is not None else list(tensor.contents.bytes_contents)
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] != len(elements):
            raise InvalidInput(
                f"{what}: BYTES shape {shape} for {len(elements)} elements; expected [N] or [N, 1]"
            )
        check_image_count(len(elements), self.settings.max_images_per_request)
        spec = loaded.card.input
        limit = min(self.settings.max_decoded_pixels, spec.height * spec.width)
        images = [
            decode_image(data, max_pixels=limit, what=f"{what} element {i}")
            for i, data in enumerate(elements)
        ]
        for i, image in enumerate(images):
            if image.shape != (spec.height, spec.width, spec.channels):
                raise InvalidInput(
                    f"{what} element {i}: {image.shape[0]} x {image.shape[1]} pixels; model {loaded.name} "
                    f"v{loaded.version} expects {spec.height} x {spec.width}"
                )
        return np.stack(images)


def attach(server: GrpcServer, manager: ModelManager, settings: Settings, metrics: PredictorMetrics) -> None:
    servicer = KServeServicer(manager, settings, metrics, server)
    server.add_service(
        lambda grpc_server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server),
        [SERVICE_NAME],
    )
