"""Clients for ``neurotwin.v1.FiringRatePredictor``: ``PredictorClient`` (blocking) and
``AsyncPredictorClient`` (asyncio).

    with PredictorClient("127.0.0.1:8001") as client:
        result = client.predict([image_array, open("cat.png", "rb").read()], model="v4")
        result.rates        # float32 [images, neurons]
        result.neuron_ids   # column ids
        result.version      # the version that answered

Failed calls raise ``neurotwin.errors`` exceptions whose ``code`` is the gRPC status.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import numpy as np

from neurotwin.card import PredictorCard
from neurotwin.client._channel import DEFAULT_ADDRESS, ChannelConfig, translate_error
from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

# One image: uint8 [H, W, 3] pixels, encoded PNG/JPEG bytes, or a path to an image file.
ImageLike = np.ndarray | bytes | bytearray | memoryview | str | os.PathLike
# Several images: a sequence of the above, or one uint8 [N, H, W, 3] array.
Images = Sequence[ImageLike] | np.ndarray
# Neurons: ids (strings) or 0-based indices, not mixed.
Neurons = Sequence[str] | Sequence[int] | None

_UNSET: Any = object()
_STATE_NAMES = {v: k for k, v in pb.VersionState.items()}


@dataclass(frozen=True)
class Prediction:
    rates: np.ndarray
    """float32 [images, neurons]."""
    model: str
    version: int
    neuron_ids: list[str]


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: str
    """LOADING, READY, FAILED or UNLOADING."""
    message: str
    since: float


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[VersionInfo]

    @property
    def ready_versions(self) -> list[int]:
        return [v.version for v in self.versions if v.state == "READY"]


@dataclass(frozen=True)
class ModelDetails:
    model: str
    version: int
    input_height: int
    input_width: int
    input_channels: int
    neuron_ids: list[str]
    card: PredictorCard
    status: ModelInfo


def _add_image(request: pb.PredictRequest, item: ImageLike, index: int) -> None:
    # Filling the message in place copies the pixels once; nested constructors would copy them twice.
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3:
            raise InvalidInput(
                f"image {index}: expected a uint8 [H, W, 3] array, got {item.dtype} {list(item.shape)}"
            )
        raw = request.images.add().raw
        raw.shape.extend(item.shape)
        raw.data = item.tobytes()
    elif isinstance(item, (bytes, bytearray, memoryview)):
        request.images.add().encoded = bytes(item)
    elif isinstance(item, (str, os.PathLike)):
        try:
            request.images.add().encoded = Path(item).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"image {index}: {exc}") from exc
    else:
        raise InvalidInput(f"image {index}: unsupported type {type(item).__name__}")


def _neurons(neurons: Neurons) -> pb.NeuronSelection | None:
    if neurons is None or len(neurons) == 0:
        return None
    items = list(neurons)
    if all(isinstance(n, str) for n in items):
        return pb.NeuronSelection(ids=items)
    if all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in items):
        if min(items) < 0:
            raise InvalidInput("neuron indices must be >= 0")
        return pb.NeuronSelection(indices=[int(n) for n in items])
    raise InvalidInput("neurons: give all ids (strings) or all indices (integers)")


def build_request(
    images: Images, model: str, version: int | None = None, neurons: Neurons = None
) -> pb.PredictRequest:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items: Sequence[ImageLike] = list(images)
    elif isinstance(images, (np.ndarray, bytes, bytearray, memoryview, str, os.PathLike)):
        items = [images]  # a single image is accepted too
    else:
        items = images
    request = pb.PredictRequest(model=model, version=version or 0)
    for index, item in enumerate(items):
        _add_image(request, item, index)
    selection = _neurons(neurons)
    if selection is not None:
        request.neurons.CopyFrom(selection)
    return request


def parse_prediction(response: pb.PredictResponse) -> Prediction:
    ids = list(response.neuron_ids)
    rates = np.fromiter(response.rates, dtype=np.float32, count=len(response.rates))
    return Prediction(
        rates=rates.reshape(response.image_count, len(ids)),
        model=response.model,
        version=response.version,
        neuron_ids=ids,
    )


def _version_info(status: pb.VersionStatus) -> VersionInfo:
    return VersionInfo(
        version=status.version,
        state=_STATE_NAMES.get(status.state, "VERSION_STATE_UNSPECIFIED"),
        message=status.message,
        since=status.since,
    )


def _model_info(status: pb.ModelStatus) -> ModelInfo:
    return ModelInfo(name=status.name, versions=[_version_info(v) for v in status.versions])


def _details(response: pb.GetModelResponse) -> ModelDetails:
    import json

    return ModelDetails(
        model=response.model,
        version=response.version,
        input_height=response.input_height,
        input_width=response.input_width,
        input_channels=response.input_channels,
        neuron_ids=list(response.neuron_ids),
        card=PredictorCard.from_dict(json.loads(response.card_json), source=f"{response.model} card"),
        status=_model_info(response.status),
    )


def _stream_outcome(
    response: pb.PredictStreamResponse, errors: Literal["raise", "return"]
) -> Prediction | NeurotwinError:
    if response.WhichOneof("outcome") == "result":
        return parse_prediction(response.result)
    code = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), grpc.StatusCode.UNKNOWN)
    error = translate_error(_StreamRpcError(code, response.error.message))
    if errors == "raise":
        raise error
    return error


class _StreamRpcError(grpc.RpcError):
    """One failed request inside a stream, shaped like a failed call for translate_error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Base:
    def __init__(self, address: str, config: ChannelConfig | None, timeout: float | None, **channel: Any):
        self.config = config or ChannelConfig(address=address, **channel)
        self.timeout = timeout
        self._metadata = self.config.metadata()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout


class PredictorClient(_Base):
    """Blocking client; thread-safe (one channel, many concurrent calls)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        config: ChannelConfig | None = None,
        timeout: float | None = 30.0,
        **channel: Any,
    ) -> None:
        """``channel``: ChannelConfig fields (tls_ca, tls_cert, tls_key, token, max_message_bytes...)."""
        super().__init__(address, config, timeout, **channel)
        self.channel = self.config.open()
        self._stub = pb_grpc.FiringRatePredictorStub(self.channel)

    def predict(
        self,
        images: Images,
        model: str,
        version: int | None = None,
        neurons: Neurons = None,
        timeout: float | None = _UNSET,
    ) -> Prediction:
        request = build_request(images, model, version, neurons)
        try:
            response = self._stub.Predict(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        return parse_prediction(response)

    def stream(
        self,
        batches: Iterable[Images],
        model: str,
        version: int | None = None,
        neurons: Neurons = None,
        timeout: float | None = None,
        errors: Literal["raise", "return"] = "raise",
    ) -> Iterator[Prediction | NeurotwinError]:
        """One Prediction per batch, in order, over one PredictStream call.

        ``batches`` may be a generator that yields the next images only after the previous result
        arrived (a rig's trial loop). A failed request raises, or with ``errors="return"`` yields
        its exception and the stream goes on.
        """
        requests = (
            pb.PredictStreamRequest(request_id=str(i), request=build_request(b, model, version, neurons))
            for i, b in enumerate(batches)
        )
        call = self._stub.PredictStream(requests, timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield _stream_outcome(response, errors)
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        finally:
            call.cancel()

    def list_models(self, timeout: float | None = _UNSET) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        return [_model_info(m) for m in response.models]

    def get_model(
        self, model: str, version: int | None = None, timeout: float | None = _UNSET
    ) -> ModelDetails:
        request = pb.GetModelRequest(model=model, version=version or 0)
        try:
            response = self._stub.GetModel(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        return _details(response)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PredictorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPredictorClient(_Base):
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        config: ChannelConfig | None = None,
        timeout: float | None = 30.0,
        **channel: Any,
    ) -> None:
        super().__init__(address, config, timeout, **channel)
        self.channel = self.config.open_aio()
        self._stub = pb_grpc.FiringRatePredictorStub(self.channel)

    async def predict(
        self,
        images: Images,
        model: str,
        version: int | None = None,
        neurons: Neurons = None,
        timeout: float | None = _UNSET,
    ) -> Prediction:
        request = build_request(images, model, version, neurons)
        try:
            response = await self._stub.Predict(
                request, timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc) from exc
        return parse_prediction(response)

    async def stream(
        self,
        batches: Iterable[Images] | AsyncIterable[Images],
        model: str,
        version: int | None = None,
        neurons: Neurons = None,
        timeout: float | None = None,
        errors: Literal["raise", "return"] = "raise",
    ) -> AsyncIterator[Prediction | NeurotwinError]:
        """As PredictorClient.stream; ``batches`` may be an async iterable."""

        async def requests() -> AsyncIterator[pb.PredictStreamRequest]:
            index = 0
            if isinstance(batches, AsyncIterable):
                async for batch in batches:
                    yield pb.PredictStreamRequest(
                        request_id=str(index), request=build_request(batch, model, version, neurons)
                    )
                    index += 1
            else:
                for batch in batches:
                    yield pb.PredictStreamRequest(
                        request_id=str(index), request=build_request(batch, model, version, neurons)
                    )
                    index += 1

        call = self._stub.PredictStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield _stream_outcome(response, errors)
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc) from exc
        finally:
            call.cancel()

    async def list_models(self, timeout: float | None = _UNSET) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc) from exc
        return [_model_info(m) for m in response.models]

    async def get_model(
        self, model: str, version: int | None = None, timeout: float | None = _UNSET
    ) -> ModelDetails:
        request = pb.GetModelRequest(model=model, version=version or 0)
        try:
            response = await self._stub.GetModel(
                request, timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise translate_error(exc) from exc
        return _details(response)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncPredictorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
