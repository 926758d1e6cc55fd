"""The KServe v2 / Open Inference Protocol API, checked with the unmodified tritonclient[grpc] client.

tritonclient registers its own copy of the ``inference`` proto package; two copies in one process
collide, so tritonclient runs in a subprocess and reports back as JSON. The in-process tests use
our generated stubs for what tritonclient cannot send (typed contents, malformed tensors).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from neurotwin.imagecodec import encode_png
from neurotwin.kserve import grpc_service_pb2 as pb
from neurotwin.kserve import grpc_service_pb2_grpc as pb_grpc
from neurotwin.server.common import GrpcServer
from neurotwin.store import ModelVersion

from tests._models import make_predictor, random_images, reference_rates
from tests._serving import metric_value, metrics_text, predictor_server

TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

url, folder = sys.argv[1], sys.argv[2]
images = np.load(f"{folder}/images.npy")
png = open(f"{folder}/image.png", "rb").read()
out = {}
client = triton.InferenceServerClient(url=url)
out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
out["model_ready"] = client.is_model_ready("tiny")
out["model_ready_v1"] = client.is_model_ready("tiny", "1")
out["missing_ready"] = client.is_model_ready("nope")
meta = client.get_server_metadata(as_json=True)
out["server"] = [meta["name"], meta["version"]]
meta = client.get_model_metadata("tiny", as_json=True)
out["model"] = {
    "versions": meta["versions"],
    "platform": meta["platform"],
    "inputs": [[t["name"], t["datatype"], t["shape"]] for t in meta["inputs"]],
    "outputs": [[t["name"], t["datatype"], t["shape"]] for t in meta["outputs"]],
}

inputs = [triton.InferInput("images", list(images.shape), "UINT8")]
inputs[0].set_data_from_numpy(images)
result = client.infer("tiny", inputs, outputs=[triton.InferRequestedOutput("rates")], request_id="abc")
np.save(f"{folder}/rates.npy", result.as_numpy("rates"))
response = result.get_response(as_json=True)
out["infer"] = [response["model_name"], response["model_version"], response["id"]]

# Without requested outputs, and with an explicit version.
result = client.infer("tiny", inputs, model_version="1")
np.save(f"{folder}/rates_v1.npy", result.as_numpy("rates"))

# Encoded images as a BYTES tensor.
encoded = triton.InferInput("images", [1], "BYTES")
encoded.set_data_from_numpy(np.array([png], dtype=np.object_))
np.save(f"{folder}/rates_png.npy", client.infer("tiny", [encoded]).as_numpy("rates"))

errors = {}
def expect_error(key, call):
    try:
        call()
        errors[key] = None
    except InferenceServerException as exc:
        errors[key] = [exc.status(), exc.message()]

expect_error("unknown_model", lambda: client.infer("nope", inputs))
expect_error("unknown_version", lambda: client.infer("tiny", inputs, model_version="9"))
bad = [triton.InferInput("images", [1, 16, 16, 3], "UINT8")]
bad[0].set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
expect_error("wrong_size", lambda: client.infer("tiny", bad))
fp = [triton.InferInput("images", [1, 32, 32, 3], "FP32")]
fp[0].set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
expect_error("wrong_type", lambda: client.infer("tiny", fp))
expect_error("wrong_output", lambda: client.infer("tiny", inputs, outputs=[triton.InferRequestedOutput("x")]))
expect_error("metadata_missing", lambda: client.get_model_metadata("nope"))
expect_error("config_missing", lambda: client.get_model_config("nope"))
expect_error("stats_missing", lambda: client.get_inference_statistics("nope"))
expect_error("load_disabled", lambda: client.load_model("tiny"))
expect_error("unload_disabled", lambda: client.unload_model("tiny"))
out["errors"] = errors

config = client.get_model_config("tiny", as_json=True)["config"]
out["config"] = config
out["index"] = client.get_model_repository_index(as_json=True)["models"]

# Statistics: deltas over a known sequence of calls (2 good requests of 3 images, 1 refused).
def stats():
    (entry,) = client.get_inference_statistics("tiny", "1", as_json=True)["model_stats"]
    return entry
before = stats()
client.infer("tiny", inputs)
client.infer("tiny", inputs)
expect_error("counted_failure", lambda: client.infer("tiny", bad))
out["stats_before"], out["stats_after"] = before, stats()
out["stats_all"] = client.get_inference_statistics(as_json=True)["model_stats"]

# Streaming: one response per request, in order; a failed request answers in-stream.
import queue
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)))
client.async_stream_infer("tiny", inputs, request_id="s1")
client.async_stream_infer("nope", inputs, request_id="s2")
client.async_stream_infer("tiny", inputs, request_id="s3", model_version="1")
stream = []
for _ in range(3):
    result, error = answers.get(timeout=30)
    if error is not None:
        stream.append(["error", error.message()])
    else:
        stream.append([result.get_response().id, result.as_numpy("rates").tolist()])
client.stop_stream()
out["stream"] = stream
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    root = tmp_path_factory.mktemp("store")
    return root, make_predictor(root)


@pytest.fixture(scope="module")
def served(store: tuple[Path, ModelVersion]) -> Iterator[GrpcServer]:
    with predictor_server(store[0]) as (server, _):
        yield server


def test_tritonclient_against_our_server(
    served: GrpcServer, store: tuple[Path, ModelVersion], tmp_path: Path
) -> None:
    images = random_images(3, seed=3)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "image.png").write_bytes(encode_png(images[0]))
    run = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, f"127.0.0.1:{served.port}", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"] and out["model_ready_v1"]
    assert not out["missing_ready"]
    assert out["server"][0] == "neurotwin"
    assert out["model"] == {
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [["images", "UINT8", ["-1", "32", "32", "3"]]],
        "outputs": [["rates", "FP32", ["-1", "5"]]],
    }
    assert out["infer"] == ["tiny", "1", "abc"]
    expected = reference_rates(store[1], images)
    for name in ("rates.npy", "rates_v1.npy"):
        rates = np.load(tmp_path / name)
        assert rates.dtype == np.float32
        np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "rates_png.npy"), expected[:1], rtol=1e-5, atol=1e-6)
    errors = out["errors"]
    for key in ("unknown_model", "unknown_version", "metadata_missing", "config_missing", "stats_missing"):
        assert errors[key][0] == "StatusCode.NOT_FOUND", (key, errors[key])
    for key in ("load_disabled", "unload_disabled"):
        assert errors[key][0] == "StatusCode.FAILED_PRECONDITION", errors[key]
        assert "model control is off" in errors[key][1]
    for key, text in (("wrong_size", "16 x 16"), ("wrong_type", "FP32"), ("wrong_output", "'x'")):
        assert errors[key][0] == "StatusCode.INVALID_ARGUMENT", errors[key]
        assert text in errors[key][1]
    text = metrics_text(served)
    assert (
        metric_value(text, "neurotwin_predictor_requests_total", model="tiny", method="ModelInfer", code="OK")
        >= 3
    )
    check_config(out["config"])
    assert out["index"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    check_statistics(out["stats_before"], out["stats_after"], images_per_request=3)
    assert [(s["name"], s["version"]) for s in out["stats_all"]] == [("tiny", "1")]
    expected_list = expected.tolist()
    assert out["stream"][0][0] == "s1" and out["stream"][2][0] == "s3"
    for answer in (out["stream"][0], out["stream"][2]):
        np.testing.assert_allclose(answer[1], expected_list, rtol=1e-5, atol=1e-6)
    assert out["stream"][1][0] == "error" and "no model named 'nope'" in out["stream"][1][1]


def check_config(config: dict[str, Any]) -> None:
    """Triton's model configuration of the test twin (gRPC JSON has int64s as strings)."""
    assert config["name"] == "tiny" and config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 32
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    (model_input,) = config["input"]
    assert model_input["name"] == "images" and model_input["data_type"] == "TYPE_UINT8"
    assert model_input["format"] == "FORMAT_NHWC"
    assert [int(d) for d in model_input["dims"]] == [32, 32, 3]
    (model_output,) = config["output"]
    assert model_output["name"] == "rates" and model_output["data_type"] == "TYPE_FP32"
    assert [int(d) for d in model_output["dims"]] == [5]
    batching = config["dynamic_batching"]
    assert int(batching["max_queue_delay_microseconds"]) == 2000
    assert int(batching["default_queue_policy"]["max_queue_size"]) == 256
    assert config["default_model_filename"] == "model.onnx"
    assert config["parameters"]["neuron_ids"]["string_value"].count(",") == 4
    assert config["instance_group"][0]["count"] == 1


def check_statistics(before: dict[str, Any], after: dict[str, Any], images_per_request: int) -> None:
    """Two successful requests and one refused after the model was resolved, as Triton counts them."""

    def delta(*keys: str) -> int:
        def get(entry: dict[str, Any]) -> int:
            for key in keys:
                entry = entry.get(key, {})
            return int(entry or 0)  # type: ignore[arg-type]

        return get(after) - get(before)

    assert (after["name"], after["version"]) == ("tiny", "1")
    assert delta("inference_stats", "success", "count") == 2
    assert delta("inference_stats", "fail", "count") == 1
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", stage, "count") == 2, stage
    for stage in ("success", "fail", "compute_input", "compute_infer"):
        assert delta("inference_stats", stage, "ns") > 0, stage
    assert delta("inference_count") == 2 * images_per_request
    assert delta("execution_count") == 2
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    sizes_before = {
        int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in before.get("batch_stats", [])
    }
    assert sizes[images_per_request] - sizes_before.get(images_per_request, 0) == 2


@pytest.fixture
def stub(served: GrpcServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(images: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=list(images.shape))
    return pb.ModelInferRequest(model_name="tiny", inputs=[tensor], **fields)  # type: ignore[arg-type]


def test_typed_contents_and_malformed_tensors(
    stub: pb_grpc.GRPCInferenceServiceStub, store: tuple[Path, ModelVersion]
) -> None:
    images = random_images(2, seed=8)
    typed = _request(images)
    typed.inputs[0].contents.uint_contents.extend(images.ravel().tolist())
    response = stub.ModelInfer(typed, timeout=10)
    assert list(response.outputs[0].shape) == [2, 5] and response.outputs[0].datatype == "FP32"
    rates = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 5)
    np.testing.assert_allclose(rates, reference_rates(store[1], images), rtol=1e-5, atol=1e-6)

    # Typed BYTES: one encoded image per element.
    encoded = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[2])
    encoded.contents.bytes_contents.extend([encode_png(i) for i in images])
    response = stub.ModelInfer(pb.ModelInferRequest(model_name="tiny", inputs=[encoded]), timeout=10)
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 5), rates, rtol=1e-6
    )

    raw = images.tobytes()
    short = _request(images, raw_input_contents=[raw[:-1]])
    both = _request(images, raw_input_contents=[raw])
    both.inputs[0].contents.uint_contents.append(1)
    renamed = _request(images, raw_input_contents=[raw])
    renamed.inputs[0].name = "pixels"
    two_inputs = _request(images, raw_input_contents=[raw, raw])
    two_inputs.inputs.append(two_inputs.inputs[0])
    truncated = pb.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])
    cases = [
        (short, "bytes of data"),
        (both, "both raw_input_contents and typed contents"),
        (renamed, "unknown input 'pixels'"),
        (two_inputs, "expected 1 input"),
        (_request(images[:0], raw_input_contents=[b""]), "no images"),
        (_request(images, model_version="x", raw_input_contents=[raw]), "expected an integer"),
        (
            pb.ModelInferRequest(model_name="tiny", inputs=[truncated], raw_input_contents=[b"\x09\0"]),
            "truncated",
        ),
    ]
    for request, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err.value.details())
        assert text in err.value.details(), (text, err.value.details())


def test_health_and_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny", version="2")).ready
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"))
    assert metadata.name == "tiny" and list(metadata.versions) == ["1"]
    assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "neurotwin"


TRITON_DESCRIPTORS = r"""
import json
from tritonclient.grpc import model_config_pb2, service_pb2

def walk(message, prefix, out):
    fields = {}
    for f in message.fields:
        kind = f.message_type or f.enum_type
        fields[f.name] = [f.number, f.type, f.is_repeated, kind.full_name if kind else ""]
    out[prefix + message.name] = fields
    for nested in message.nested_types:
        walk(nested, prefix + message.name + ".", out)

out = {}
for file in (service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
    for message in file.message_types_by_name.values():
        walk(message, "", out)
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["rpc"] = {
    m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
    for m in service.methods
}
print(json.dumps(out))
"""


def test_proto_matches_triton() -> None:
    """Every message, field and RPC of our ``inference`` package is Triton's, number and type alike."""
    from neurotwin.kserve import model_config_pb2

    run = subprocess.run(
        [sys.executable, "-c", TRITON_DESCRIPTORS], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-3000:]
    triton = json.loads(run.stdout)
    checked = 0

    def walk(message: Any, prefix: str) -> None:
        nonlocal checked
        name = prefix + message.name
        assert name in triton, f"{name} is not a Triton message"
        for f in message.fields:
            kind = f.message_type or f.enum_type
            ours = [f.number, f.type, f.is_repeated, kind.full_name if kind else ""]
            assert triton[name].get(f.name) == ours, (name, f.name, ours, triton[name].get(f.name))
            checked += 1
        for nested in message.nested_types:
            walk(nested, name + ".")

    for file in (pb.DESCRIPTOR, model_config_pb2.DESCRIPTOR):
        for message in file.message_types_by_name.values():
            walk(message, "")
    assert checked > 100
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        ours = [method.input_type.full_name, method.output_type.full_name]
        ours += [method.client_streaming, method.server_streaming]
        assert triton["rpc"][method.name] == ours, method.name
    assert len(service.methods) == 12


def test_reflection_v1_lists_and_describes(served: GrpcServer) -> None:
    """A grpc.reflection.v1 client (as current grpcurl) lists the services and gets their files."""
    from google.protobuf import descriptor_pb2
    from neurotwin.server import reflection_v1

    request_class = reflection_v1.message_class("ServerReflectionRequest")
    response_class = reflection_v1.message_class("ServerReflectionResponse")
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        asks = [
            request_class(list_services=""),
            request_class(file_containing_symbol="inference.GRPCInferenceService"),
            request_class(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            request_class(file_containing_symbol="no.such.Service"),
        ]
        listing, inference, reflection, missing = list(call(iter(asks), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "neurotwin.v1.FiringRatePredictor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = {}
    for blob in inference.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(blob)
        files[file.name] = file
    service = files["neurotwin/kserve/grpc_service.proto"].service[0]
    assert {"ModelConfig", "ModelStatistics", "RepositoryIndex", "ModelStreamInfer"} <= {
        m.name for m in service.method
    }
    # Its import comes along, so that a client can resolve ModelConfig.
    assert "neurotwin/kserve/model_config.proto" in files
    (own,) = reflection.file_descriptor_response.file_descriptor_proto
    own_file = descriptor_pb2.FileDescriptorProto.FromString(own)
    assert own_file.package == "grpc.reflection.v1"
    assert own_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
