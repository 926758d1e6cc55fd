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
out["errors"] = errors
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
    assert errors["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert errors["unknown_version"][0] == "StatusCode.NOT_FOUND"
    assert errors["metadata_missing"][0] == "StatusCode.NOT_FOUND"
    for key, text in (("wrong_size", "16 x 16"), ("wrong_type", "FP32"), ("wrong_output", "'x'")):
        assert errors[key][0] == "StatusCode.INVALID_ARGUMENT", errors[key]
        assert text in errors[key][1]
    text = metrics_text(served)
    assert (
        metric_value(text, "neurotwin_predictor_requests_total", model="tiny", method="ModelInfer", code="OK")
        >= 3
    )


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
