"""KServe v2 / Open Inference Protocol servicer (``inference.GRPCInferenceService``) with the Triton
extensions tritonclient calls, over the same model manager and batchers as FiringRatePredictor.

Only translation lives here: protobuf messages to and from ``neurotwin.engines.inference``, which
the HTTP/REST routes share. Inputs are read from ``raw_input_contents`` or typed contents; outputs
always go in ``raw_output_contents``, which is where tritonclient reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format

from neurotwin.engines.inference import InferenceDataPlane, InferRequest
from neurotwin.engines.oip_tensors import InputTensor, check_shape
from neurotwin.errors import InvalidInput
from neurotwin.kserve import grpc_service_pb2 as pb
from neurotwin.kserve import grpc_service_pb2_grpc as pb_grpc
from neurotwin.kserve import model_config_pb2 as config_pb
from neurotwin.server.calls import ALL_MODELS, CallMetrics, CancelSlot, PredictorMetrics
from neurotwin.server.common import GrpcServer, deadline_from
from neurotwin.server.statuses import report

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# Which typed-contents field carries each datatype (the specification's table).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameters(parameters: Any) -> dict[str, Any]:
    """A protobuf parameter map (InferParameter or ModelRepositoryParameter) as plain values."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice else None
    return values


def _single_repository(name: str) -> None:
    if name:
        raise InvalidInput(f"repository {name!r}: this server has one model repository; leave the name empty")


def to_infer_request(request: pb.ModelInferRequest) -> InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} input(s)")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        what = f"input {tensor.name!r}"
        typed = tensor.HasField("contents")
        if raw and typed:
            raise InvalidInput(f"{what} has both raw_input_contents and typed contents")
        field = _CONTENTS_FIELD.get(tensor.datatype)
        values = getattr(tensor.contents, field) if field and not raw else None
        inputs.append(
            InputTensor(
                name=tensor.name,
                datatype=tensor.datatype,
                shape=check_shape(list(tensor.shape), what),
                raw=raw[i] if raw else None,
                values=values,
                parameters=_parameters(tensor.parameters),
            )
        )
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=[o.name for o in request.outputs],
        parameters=_parameters(request.parameters),
    )


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: InferenceDataPlane, metrics: PredictorMetrics, server: GrpcServer) -> None:
        self.plane = plane
        self.metrics = metrics
        self.server = server

    def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready() and not self.server.draining)

    def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(self.plane.server_metadata(), pb.ServerMetadataResponse())

    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        with CallMetrics(self.metrics, request.name, "ModelMetadata"):
            metadata = self.plane.model_metadata(request.name, request.version)
            return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.ServicerContext
    ) -> pb.ModelConfigResponse:
        with CallMetrics(self.metrics, request.name, "ModelConfig"):
            config = self.plane.model_config(request.name, request.version)
            return pb.ModelConfigResponse(config=json_format.ParseDict(config, config_pb.ModelConfig()))

    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        with CallMetrics(self.metrics, request.name or ALL_MODELS, "ModelStatistics"):
            stats = self.plane.model_statistics(request.name, request.version)
            return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        with CallMetrics(self.metrics, ALL_MODELS, "RepositoryIndex"):
            _single_repository(request.repository_name)
            rows = self.plane.repository_index(request.ready)
            return json_format.ParseDict({"models": rows}, pb.RepositoryIndexResponse())

    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        with CallMetrics(self.metrics, request.model_name, "RepositoryModelLoad"):
            _single_repository(request.repository_name)
            self.plane.load(request.model_name, _parameters(request.parameters))
            return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        with CallMetrics(self.metrics, request.model_name, "RepositoryModelUnload"):
            _single_repository(request.repository_name)
            self.plane.unload(request.model_name, _parameters(request.parameters))
            return pb.RepositoryModelUnloadResponse()

    def _infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        on_cancel: Callable[[Callable[[], None]], Any] | None,
    ) -> pb.ModelInferResponse:
        result = self.plane.infer(to_infer_request(request), deadline, on_cancel)
        tensor = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            id=result.id,
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in result.outputs],
            raw_output_contents=[o.raw() for o in result.outputs],
        )

    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        with CallMetrics(self.metrics, request.model_name, "ModelInfer"):
            return self._infer(request, deadline_from(context), context.add_callback)

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        slot = CancelSlot(context)
        deadline = deadline_from(context)
        # One response per request, in arrival order; a failed request answers with its error and
        # the stream goes on, as in Triton.
        for request in request_iterator:
            try:
                with CallMetrics(self.metrics, request.model_name, "ModelStreamInfer"):
                    response = self._infer(request, deadline, slot.register)
                yield pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:
                _, message = report(exc, f"ModelStreamInfer request {request.id!r}")
                echo = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                yield pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


def attach(server: GrpcServer, plane: InferenceDataPlane, metrics: PredictorMetrics) -> None:
    servicer = KServeServicer(plane, metrics, server)
    server.add_service(
        lambda grpc_server: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server),
        [SERVICE_NAME],
    )
