"""The Open Inference Protocol data plane: what the gRPC KServe servicer and the HTTP/REST routes
share, so that the two protocols cannot drift apart. The front ends only translate their wire
formats to and from the objects and JSON-shaped dictionaries here.

A predictor appears as a model with one input (the card's input name, ``UINT8 [-1, H, W, C]``) and
one output (the card's output name, ``FP32 [-1, neurons]``). As an extension the input may also be
``BYTES [N]`` (or ``[N, 1]``): N encoded PNG/JPEG images.

Metadata, configuration, repository index and statistics are returned in the JSON form Triton's
HTTP API uses; the gRPC servicer parses the same dictionaries into its messages, whose field names
are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurotwin import __version__
from neurotwin.engines.model_handles import LoadedVersion
from neurotwin.engines.oip_tensors import InputTensor, OutputTensor, bytes_elements, uint8_array
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.engines.statistics import InferenceStatistics
from neurotwin.errors import FailedPrecondition, InvalidInput, NeurotwinError
from neurotwin.imagecodec import DEFAULT_MAX_PIXELS, decode_image
from neurotwin.store import PREDICTORS, ModelStore

SERVER_NAME = "neurotwin"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters")
# Manager version states -> the states Triton's repository index reports.
_INDEX_STATES = {"READY": "READY", "LOADING": "LOADING", "UNLOADING": "UNLOADING", "FAILED": "UNAVAILABLE"}
_INSTANCE_KINDS = {"cpu": "KIND_CPU", "cuda": "KIND_GPU", "auto": "KIND_AUTO"}
# Parameters of a load/unload request that neurotwin accepts (Triton's "config" and file overrides
# would load a model that is not in the store, which the store's checks exist to prevent).
_UNLOAD_PARAMETERS = {"unload_dependents"}


def parse_version(text: str) -> int | None:
    """A request's version text: None for "" (the server chooses), else a version >= 1."""
    if not text:
        return None
    try:
        version = int(text)
    except ValueError:
        raise InvalidInput(f"model version {text!r}: expected an integer") from None
    if version < 1:
        raise InvalidInput(f"model version {text!r}: versions start at 1")
    return version


def check_image_count(count: int, limit: int) -> None:
    if count == 0:
        raise InvalidInput("no images in the request")
    if count > limit:
        raise InvalidInput(f"{count} images in one request exceeds the limit of {limit}")


@dataclass(frozen=True)
class RequestLimits:
    max_images: int = 256
    # Pixels one encoded image may decode to (refuses decompression bombs before decoding).
    max_decoded_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class InferRequest:
    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: list[InputTensor] = field(default_factory=list)
    # Names of the outputs to return; empty means all.
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def deadline(self) -> float | None:
        """The "timeout" request parameter (microseconds, Triton's) as a time.monotonic() deadline."""
        timeout = self.parameters.get("timeout")
        if timeout is None:
            return None
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidInput(f"parameter 'timeout': expected microseconds >= 0, got {timeout!r}")
        # 0 means no timeout, as in Triton.
        return time.monotonic() + timeout / 1e6 if timeout else None


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def _earliest(*deadlines: float | None) -> float | None:
    given = [d for d in deadlines if d is not None]
    return min(given) if given else None


class InferenceDataPlane:
    """Health, metadata, configuration, repository, statistics and inference for OIP front ends."""

    def __init__(
        self,
        manager: ModelRegistry,
        store: ModelStore,
        serving: RegistrySettings,
        statistics: InferenceStatistics,
        limits: RequestLimits | None = None,
        model_control: bool = False,
    ) -> None:
        self.manager = manager
        self.store = store
        self.serving = serving
        self.stats = statistics
        self.limits = limits or RequestLimits()
        # Explicit model control (Triton's --model-control-mode=explicit): clients load and unload.
        self.model_control = model_control

    # -- health and metadata ----------------------------------------------------------------------

    def ready(self) -> bool:
        return bool(self.manager.ready)

    def require_ready(self, name: str, version: str) -> None:
        """Nothing when the model (version) can serve now, else NotFound or Unavailable saying why."""
        self.manager.get(name, parse_version(version))

    def model_ready(self, name: str, version: str) -> bool:
        number = parse_version(version)  # a malformed version is the caller's error, not "not ready"
        try:
            self.manager.get(name, number)
        except NeurotwinError:
            return False
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def _ready_versions(self, name: str) -> list[int]:
        return [i.version for i in self.manager.status().get(name, []) if i.state.value == "READY"]

    def model_metadata(self, name: str, version: str) -> dict[str, Any]:
        loaded = self.manager.get(name, parse_version(version))
        card = loaded.card
        spec = card.input
        return {
            "name": loaded.name,
            "versions": [str(v) for v in self._ready_versions(loaded.name) or [loaded.version]],
            "platform": PLATFORM,
            "inputs": [
                {
                    "name": spec.name,
                    "datatype": "UINT8",
                    "shape": [-1, spec.height, spec.width, spec.channels],
                }
            ],
            "outputs": [{"name": card.output.name, "datatype": "FP32", "shape": [-1, card.neuron_count]}],
        }

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        """Triton's ModelConfig (JSON form) of a served version."""
        loaded = self.manager.get(name, parse_version(version))
        card, spec = loaded.card, loaded.card.input
        policy = self.serving.policy
        batcher = self.serving.batcher
        device = self.serving.session.device.lower()
        instance: dict[str, Any] = {
            "name": f"{loaded.name}_0",
            "kind": _INSTANCE_KINDS.get(device),
            "count": 1,
        }
        if device == "cuda":
            instance["gpus"] = [self.serving.session.device_id]
        return {
            "name": loaded.name,
            "platform": PLATFORM,
            "backend": BACKEND,
            "version_policy": (
                {"specific": {"versions": list(policy.pinned)}}
                if policy.pinned
                else {"latest": {"num_versions": policy.latest}}
            ),
            "max_batch_size": batcher.max_batch_size,
            "input": [
                {
                    "name": spec.name,
                    "data_type": "TYPE_UINT8",
                    "format": "FORMAT_NHWC",
                    "dims": [spec.height, spec.width, spec.channels],
                }
            ],
            "output": [{"name": card.output.name, "data_type": "TYPE_FP32", "dims": [card.neuron_count]}],
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(batcher.max_queue_delay_s * 1e6),
                # Requests over their deadline (or "timeout" parameter) are refused, not delayed.
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "allow_timeout_override": True,
                    "max_queue_size": batcher.max_queue_size,
                },
            },
            "instance_group": [instance],
            "default_model_filename": MODEL_FILE,
            "parameters": {
                "neuron_ids": {"string_value": ",".join(card.neuron_ids)},
                "rate_units": {"string_value": card.output.units},
            },
        }

    # -- repository and statistics ----------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every model in the store and every version the server knows, with its state."""
        statuses = self.manager.status()
        rows: list[dict[str, Any]] = []
        for name in sorted(set(self.store.names(PREDICTORS)) | set(statuses)):
            infos = statuses.get(name, [])
            if not infos and not ready_only:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": "not loaded"})
            for info in infos:
                state = _INDEX_STATES.get(info.state.value, "UNAVAILABLE")
                if ready_only and state != "READY":
                    continue
                row = {"name": name, "version": str(info.version), "state": state}
                if info.message:
                    row["reason"] = info.message
                rows.append(row)
        return rows

    def model_statistics(self, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's ModelStatisticsResponse: every ready version, one model's, or one version's."""
        if not name:
            pairs = [(n, v) for n in self.manager.names() for v in self._ready_versions(n)]
        elif version:
            loaded = self.manager.get(name, parse_version(version))
            pairs = [(loaded.name, loaded.version)]
        else:
            loaded = self.manager.get(name)  # NotFound when the model has no ready version
            pairs = [(loaded.name, v) for v in self._ready_versions(loaded.name)]
        return self.stats.to_json(pairs)

    # -- model control ----------------------------------------------------------------------------

    def _check_control(self, action: str, parameters: dict[str, Any], accepted: set[str]) -> None:
        if not self.model_control:
            raise FailedPrecondition(
                f"cannot {action} models: model control is off (the server follows its model store); "
                "start it with --predictor-model-control explicit to allow it"
            )
        unknown = sorted(set(parameters) - accepted)
        if unknown:
            raise InvalidInput(f"{action} parameters {unknown} are not supported")

    def load(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Load (or reload) a model from the store: the versions the version policy selects."""
        self._check_control("load", parameters or {}, set())
        self.manager.load_model(name)

    def unload(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        """Stop serving a model; in-flight requests finish first."""
        self._check_control("unload", parameters or {}, _UNLOAD_PARAMETERS)
        self.manager.unload_model(name)

    # -- inference --------------------------------------------------------------------------------

    def infer(
        self,
        request: InferRequest,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> InferResponse:
        """Run one request through the version's batcher; InvalidInput names what is wrong."""
        request_deadline = request.deadline()
        loaded = self.manager.acquire(request.model_name, parse_version(request.model_version))
        timing = self.stats.version(loaded.name, loaded.version).start()
        ok = False
        try:
            outputs = self._requested_outputs(request, loaded)
            images = self._images(request, loaded)
            timing.inputs_ready()
            rates = loaded.predict(images, _earliest(deadline, request_deadline), on_cancel)
            timing.outputs_started()
            array = np.ascontiguousarray(rates, dtype="<f4")
            tensors = [OutputTensor(name, "FP32", array) for name in outputs]
            ok = True
        finally:
            loaded.exit()
            timing.finish(ok)
        return InferResponse(loaded.name, str(loaded.version), request.id, tensors)

    def _requested_outputs(self, request: InferRequest, loaded: LoadedVersion) -> list[str]:
        output = loaded.card.output.name
        for name in request.outputs:
            if name != output:
                raise InvalidInput(f"unknown output {name!r}; model {loaded.name} has one output {output!r}")
        if len(request.outputs) > 1:
            raise InvalidInput(f"output {output!r} requested {len(request.outputs)} times")
        return [output]

    def _images(self, request: InferRequest, loaded: LoadedVersion) -> np.ndarray:
        spec = loaded.card.input
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"expected 1 input ({spec.name!r}), got {len(request.inputs)}: "
                f"{[i.name for i in request.inputs]}"
            )
        tensor = request.inputs[0]
        if tensor.name != spec.name:
            raise InvalidInput(f"unknown input {tensor.name!r}; model {loaded.name} takes {spec.name!r}")
        if tensor.datatype == "UINT8":
            return self._pixels(tensor, loaded)
        if tensor.datatype == "BYTES":
            return self._encoded(tensor, loaded)
        raise InvalidInput(
            f"{tensor.what}: datatype {tensor.datatype!r} not supported; send UINT8 [N, H, W, 3] pixels "
            "or BYTES [N] encoded PNG/JPEG images"
        )

    def _expected(self, loaded: LoadedVersion) -> str:
        spec = loaded.card.input
        return f"model {loaded.name} v{loaded.version} expects {spec.height} x {spec.width} x {spec.channels}"

    def _pixels(self, tensor: InputTensor, loaded: LoadedVersion) -> np.ndarray:
        if len(tensor.shape) != 4:
            raise InvalidInput(f"{tensor.what}: shape {tensor.shape}, expected [N, height, width, channels]")
        check_image_count(tensor.shape[0], self.limits.max_images)
        spec = loaded.card.input
        _, height, width, channels = tensor.shape
        if (height, width, channels) != (spec.height, spec.width, spec.channels):
            raise InvalidInput(
                f"{tensor.what}: {height} x {width} x {channels} pixels (H x W x C); {self._expected(loaded)}"
            )
        return uint8_array(tensor)

    def _encoded(self, tensor: InputTensor, loaded: LoadedVersion) -> np.ndarray:
        shape = tensor.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"{tensor.what}: BYTES shape {shape}; expected [N] or [N, 1]")
        elements = bytes_elements(tensor)
        check_image_count(len(elements), self.limits.max_images)
        spec = loaded.card.input
        limit = min(self.limits.max_decoded_pixels, spec.height * spec.width)
        images = []
        for i, data in enumerate(elements):
            what = f"{tensor.what} element {i}"
            try:
                image = decode_image(data, max_pixels=limit, what=what)
            except InvalidInput as exc:
                raise InvalidInput(f"{exc}; {self._expected(loaded)}") from exc
            if image.shape != (spec.height, spec.width, spec.channels):
                raise InvalidInput(
                    f"{what}: {image.shape[0]} x {image.shape[1]} pixels; {self._expected(loaded)}"
                )
            images.append(image)
        return np.stack(images)
