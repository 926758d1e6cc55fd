"""The Open Inference Protocol over HTTP/REST (``/v2/...``), as Triton serves it and
``tritonclient.http`` calls it: health, metadata, model configuration, repository, statistics and
inference with JSON tensors or the binary-tensor extension.

Binary-tensor extension: the body is a JSON header of ``Inference-Header-Content-Length`` bytes
followed by the raw data of every input whose parameters give ``binary_data_size``, in input order.
Outputs go back in binary when the request asks (``binary_data`` on an output, or the request
parameter ``binary_data_output``); the response then carries the same header and layout.

Only translation lives here; ``neurotwin.engines.inference`` does the work for gRPC and HTTP alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from neurotwin.engines.inference import InferenceDataPlane, InferRequest, InferResponse
from neurotwin.engines.oip_tensors import InputTensor, check_shape
from neurotwin.errors import InvalidInput
from neurotwin.server.calls import ALL_MODELS, CallMetrics, PredictorMetrics
from neurotwin.server.common import GrpcServer
from neurotwin.server.http import HttpServer, error_response, read_body

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "/v2/models/{model}"
VERSION = "/v2/models/{model}/versions/{version}"


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {value!r}")
    return value


def parse_json(data: bytes, what: str = "request body") -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def parse_infer_request(
    body: bytes, header_length: str | None, model: str, version: str
) -> tuple[InferRequest, dict[str, bool]]:
    """The body of POST .../infer -> the request, and which outputs go back as binary data."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes")
        header, binary = body[: int(header_length)], body[int(header_length) :]
    document = _object(parse_json(header, "inference request header"), "inference request")
    parameters = _object(document.get("parameters", {}), "parameters")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput("inference request needs 'inputs': a list of tensors")
    inputs = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        item = _object(item, f"inputs[{i}]")
        name = _string(item.get("name"), f"inputs[{i}].name")
        what = f"input {name!r}"
        tensor_parameters = _object(item.get("parameters", {}), f"{what} parameters")
        if "shared_memory_region" in tensor_parameters:
            raise InvalidInput(f"{what}: shared memory is not supported; send the data in the request")
        tensor = InputTensor(
            name=name,
            datatype=_string(item.get("datatype"), f"{what} datatype"),
            shape=check_shape(item.get("shape"), what),
            parameters=tensor_parameters,
        )
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise InvalidInput(f"{what} has both binary_data_size and JSON data")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"{what}: binary_data_size must be a byte count, got {size!r}")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{what}: binary_data_size {size} overruns the {len(binary)} bytes of binary data"
                )
            tensor.raw = binary[offset : offset + size]
            offset += size
        elif "data" in item:
            if not isinstance(item["data"], list):
                raise InvalidInput(f"{what}: 'data' must be a list of values, got {item['data']!r:.40}")
            tensor.values = item["data"]
        else:
            raise InvalidInput(f"{what} has neither 'data' nor a binary_data_size parameter")
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data after the last binary input")
    binary_default = bool(parameters.get("binary_data_output", False))
    requested: dict[str, bool] = {}
    for i, item in enumerate(document.get("outputs") or []):
        item = _object(item, f"outputs[{i}]")
        name = _string(item.get("name"), f"outputs[{i}].name")
        output_parameters = _object(item.get("parameters", {}), f"output {name!r} parameters")
        if output_parameters.get("classification"):
            raise InvalidInput(f"output {name!r}: the classification extension is not supported")
        if "shared_memory_region" in output_parameters:
            raise InvalidInput(f"output {name!r}: shared memory is not supported")
        requested[name] = bool(output_parameters.get("binary_data", binary_default))
    request = InferRequest(
        model_name=model,
        model_version=version,
        id=_string(document.get("id", ""), "id"),
        inputs=inputs,
        outputs=list(requested),
        parameters=parameters,
    )
    return request, {"": binary_default, **requested}


def infer_response(result: InferResponse, binary: dict[str, bool]) -> Response:
    outputs = []
    chunks = []
    for tensor in result.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary.get(tensor.name, binary[""]):
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensor.values()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if result.id:
        document["id"] = result.id
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


class OipRoutes:
    """Route handlers over one data plane; each names its model-level metric method."""

    def __init__(
        self, plane: InferenceDataPlane, metrics: PredictorMetrics, server: GrpcServer, http: HttpServer
    ) -> None:
        self.plane = plane
        self.metrics = metrics
        self.server = server
        self.http = http

    async def _call(self, model: str, method: str, work: Callable[[], Any]) -> Any:
        def run() -> Any:
            with CallMetrics(self.metrics, model, f"http.{method}"):
                return work()

        # Model calls may block (loading, batching); the event loop stays free for other requests.
        return await run_in_threadpool(run)

    # -- health and metadata ----------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        if self.server.draining:
            return error_response(503, "server is shutting down")
        if not self.plane.ready():
            return error_response(503, "models are still loading")
        return Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(self.plane.server_metadata())

    def _model(self, request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def model_ready(self, request: Request) -> Response:
        name, version = self._model(request)
        # Not ready answers with why: 404 for an unknown model or version, 503 while it loads.
        await self._call(name, "ModelReady", lambda: self.plane.require_ready(name, version))
        return Response(status_code=200)

    async def model_metadata(self, request: Request) -> Response:
        name, version = self._model(request)
        return JSONResponse(
            await self._call(name, "ModelMetadata", lambda: self.plane.model_metadata(name, version))
        )

    async def model_config(self, request: Request) -> Response:
        name, version = self._model(request)
        return JSONResponse(
            await self._call(name, "ModelConfig", lambda: self.plane.model_config(name, version))
        )

    async def model_statistics(self, request: Request) -> Response:
        name, version = request.path_params.get("model", ""), request.path_params.get("version", "")
        stats = await self._call(
            name or ALL_MODELS, "ModelStatistics", lambda: self.plane.model_statistics(name, version)
        )
        return JSONResponse(stats)

    # -- repository -------------------------------------------------------------------------------

    async def _body_object(self, request: Request) -> dict[str, Any]:
        body = await read_body(request, self.http.max_body_bytes)
        return _object(parse_json(body), "request body") if body.strip() else {}

    async def repository_index(self, request: Request) -> Response:
        document = await self._body_object(request)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f"'ready' must be true or false, got {ready!r}")
        return JSONResponse(
            await self._call(ALL_MODELS, "RepositoryIndex", lambda: self.plane.repository_index(ready))
        )

    async def load(self, request: Request) -> Response:
        name = request.path_params["model"]
        parameters = _object((await self._body_object(request)).get("parameters", {}), "parameters")
        await self._call(name, "RepositoryModelLoad", lambda: self.plane.load(name, parameters))
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        name = request.path_params["model"]
        parameters = _object((await self._body_object(request)).get("parameters", {}), "parameters")
        await self._call(name, "RepositoryModelUnload", lambda: self.plane.unload(name, parameters))
        return Response(status_code=200)

    # -- inference --------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        name, version = self._model(request)
        body = await read_body(request, self.http.max_body_bytes)
        header_length = request.headers.get(HEADER_LENGTH)

        def work() -> Response:
            parsed, binary = parse_infer_request(body, header_length, name, version)
            return infer_response(self.plane.infer(parsed), binary)

        return await self._call(name, "ModelInfer", work)

    def routes(self) -> list[Route]:
        get, post = ["GET"], ["POST"]
        return [
            Route("/v2", self.server_metadata, methods=get),
            Route("/v2/health/live", self.live, methods=get),
            Route("/v2/health/ready", self.ready, methods=get),
            Route("/v2/models/stats", self.model_statistics, methods=get),
            Route("/v2/repository/index", self.repository_index, methods=post),
            Route("/v2/repository/models/{model}/load", self.load, methods=post),
            Route("/v2/repository/models/{model}/unload", self.unload, methods=post),
            *[
                route
                for prefix in (MODEL, VERSION)
                for route in (
                    Route(prefix, self.model_metadata, methods=get),
                    Route(f"{prefix}/ready", self.model_ready, methods=get),
                    Route(f"{prefix}/config", self.model_config, methods=get),
                    Route(f"{prefix}/stats", self.model_statistics, methods=get),
                    Route(f"{prefix}/infer", self.infer, methods=post),
                )
            ],
        ]


def attach(server: GrpcServer, plane: InferenceDataPlane, metrics: PredictorMetrics) -> None:
    http = server.http
    assert http is not None, "the server has no HTTP listener (http_port)"
    http.add_routes(OipRoutes(plane, metrics, server, http).routes())
