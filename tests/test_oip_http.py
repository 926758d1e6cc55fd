"""The Open Inference Protocol over HTTP/REST: unmodified tritonclient.http, and plain HTTP requests
for what a client library would never send (bad bodies, missing tokens, oversized requests).

Every test runs a real server on loopback: gRPC and HTTP in one process over one model manager.
tritonclient runs in a subprocess (it brings gevent, and its gRPC half its own ``inference`` proto).
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import re
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import encode_png
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import ModelVersion

from tests._models import make_predictor, random_images, reference_rates
from tests._serving import gate_model, metric_value, metrics_text, predictor_server, wait_until
from tests._tls import make_tls_files
from tests.test_kserve import check_config, check_statistics

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 1 << 20

TRITON_HTTP_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

url, folder, token = sys.argv[1], sys.argv[2], sys.argv[3]
headers = {"Authorization": f"Bearer {token}"}
images = np.load(f"{folder}/images.npy")
png = open(f"{folder}/image.png", "rb").read()
out = {}
client = triton.InferenceServerClient(url=url)
out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready()
out["model_ready"] = client.is_model_ready("tiny", headers=headers)
out["model_ready_v1"] = client.is_model_ready("tiny", "1", headers=headers)
out["missing_ready"] = client.is_model_ready("nope", headers=headers)
out["server"] = client.get_server_metadata(headers=headers)
out["model"] = client.get_model_metadata("tiny", headers=headers)
out["config"] = client.get_model_config("tiny", headers=headers)
out["index"] = client.get_model_repository_index(headers=headers)

def infer(binary, **kwargs):
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [triton.InferRequestedOutput("rates", binary_data=binary)]
    # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one given.
    return client.infer("tiny", [tensor], outputs=outputs, headers=dict(headers), **kwargs)

result = infer(True, request_id="bin")
np.save(f"{folder}/rates_binary.npy", result.as_numpy("rates"))
out["binary_response"] = result.get_response()
result = infer(False, request_id="json")
np.save(f"{folder}/rates_json.npy", result.as_numpy("rates"))
out["json_response"] = result.get_response()
result = infer(True, model_version="1", request_compression_algorithm="gzip")
np.save(f"{folder}/rates_gzip.npy", result.as_numpy("rates"))
# No requested outputs: tritonclient asks for all of them in binary (binary_data_output).
tensor = triton.InferInput("images", list(images.shape), "UINT8")
tensor.set_data_from_numpy(images)
np.save(f"{folder}/rates_all.npy", client.infer("tiny", [tensor], headers=dict(headers)).as_numpy("rates"))
encoded = triton.InferInput("images", [1], "BYTES")
encoded.set_data_from_numpy(np.array([png], dtype=np.object_))
np.save(f"{folder}/rates_png.npy", client.infer("tiny", [encoded], headers=dict(headers)).as_numpy("rates"))

errors = {}
def expect_error(key, call):
    try:
        call()
        errors[key] = None
    except InferenceServerException as exc:
        errors[key] = [exc.status(), exc.message()]

expect_error("no_token", lambda: client.get_server_metadata())
expect_error("unknown_model", lambda: client.infer("nope", [tensor], headers=dict(headers)))
expect_error(
    "unknown_version", lambda: client.infer("tiny", [tensor], model_version="9", headers=dict(headers))
)
bad = triton.InferInput("images", [1, 16, 16, 3], "UINT8")
bad.set_data_from_numpy(np.zeros((1, 16, 16, 3), np.uint8))
expect_error("wrong_size", lambda: client.infer("tiny", [bad], headers=dict(headers)))
fp = triton.InferInput("images", [1, 32, 32, 3], "FP32")
fp.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
expect_error("wrong_type", lambda: client.infer("tiny", [fp], headers=dict(headers)))
expect_error("config_missing", lambda: client.get_model_config("nope", headers=headers))
expect_error("load_disabled", lambda: client.load_model("tiny", headers=headers))
expect_error("unload_disabled", lambda: client.unload_model("tiny", headers=headers))
out["errors"] = errors

def stats():
    (entry,) = client.get_inference_statistics("tiny", "1", headers=headers)["model_stats"]
    return entry
before = stats()
infer(True)
infer(False)
expect_error("counted_failure", lambda: client.infer("tiny", [bad], headers=dict(headers)))
out["stats_before"], out["stats_after"] = before, stats()
out["stats_all"] = client.get_inference_statistics(headers=headers)["model_stats"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    root = tmp_path_factory.mktemp("store")
    return root, make_predictor(root)


@pytest.fixture(scope="module")
def served(store: tuple[Path, ModelVersion]) -> Iterator[GrpcServer]:
    server = {"http_port": 0, "auth_tokens": [TOKEN], "max_message_bytes": BODY_LIMIT}
    with predictor_server(store[0], server=server) as (grpc_server, _):
        yield grpc_server


def call(
    server: GrpcServer,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request to the server's HTTP port."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}",
        data=body,
        headers={**AUTH, **(headers or {})},
        method=method or ("POST" if body is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def declared_oversize_reply(server: GrpcServer, path: str, length: int) -> tuple[int, dict[str, Any]]:
    """Status and JSON body when a request declares ``length`` body bytes but sends none of them.

    The server refuses on the header alone. Sending the whole oversized body instead races the
    server's early reply: it answers and closes while the client still writes (EPIPE/RST).
    """
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as conn:
        conn.sendall(request)
        reply = http.client.HTTPResponse(conn)
        reply.begin()
        return reply.status, json.loads(reply.read())


def infer_json(images: np.ndarray, nested: bool = False, **fields: Any) -> bytes:
    data = images.tolist() if nested else images.ravel().tolist()
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape), "data": data}
    return json.dumps({"inputs": [tensor], **fields}).encode()


def test_tritonclient_http_against_our_server(
    served: GrpcServer, store: tuple[Path, ModelVersion], tmp_path: Path
) -> None:
    images = random_images(3, seed=5)
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "image.png").write_bytes(encode_png(images[0]))
    run = subprocess.run(
        [sys.executable, "-c", TRITON_HTTP_SCRIPT, f"127.0.0.1:{served.http_port}", str(tmp_path), TOKEN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["live"] and out["ready"] and out["model_ready"] and out["model_ready_v1"]
    assert not out["missing_ready"]
    assert out["server"]["name"] == "neurotwin"
    assert {"binary_tensor_data", "statistics", "model_configuration"} <= set(out["server"]["extensions"])
    assert out["model"] == {
        "name": "tiny",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": "rates", "datatype": "FP32", "shape": [-1, 5]}],
    }
    check_config(out["config"])
    assert out["index"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    expected = reference_rates(store[1], images)
    for name in ("rates_binary", "rates_json", "rates_gzip", "rates_all"):
        rates = np.load(tmp_path / f"{name}.npy")
        assert rates.dtype == np.float32 and rates.shape == (3, 5), name
        np.testing.assert_allclose(rates, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.load(tmp_path / "rates_png.npy"), expected[:1], rtol=1e-5, atol=1e-6)
    (binary_output,) = out["binary_response"]["outputs"]
    assert binary_output["parameters"] == {"binary_data_size": 3 * 5 * 4}
    assert out["binary_response"]["id"] == "bin" and out["binary_response"]["model_version"] == "1"
    (json_output,) = out["json_response"]["outputs"]
    assert "parameters" not in json_output and len(json_output["data"]) == 15
    errors = out["errors"]
    assert errors["no_token"][0] == "401"
    for key in ("unknown_model", "unknown_version", "config_missing"):
        assert errors[key][0] == "404", (key, errors[key])
    for key, text in (("wrong_size", "16 x 16"), ("wrong_type", "FP32"), ("load_disabled", "model control")):
        assert errors[key][0] == "400", (key, errors[key])
        assert text in errors[key][1], (key, errors[key])
    assert errors["unload_disabled"][0] == "400"
    check_statistics(out["stats_before"], out["stats_after"], images_per_request=3)
    assert [(s["name"], s["version"]) for s in out["stats_all"]] == [("tiny", "1")]


def test_plain_json_infer(served: GrpcServer, store: tuple[Path, ModelVersion]) -> None:
    images = random_images(2, seed=11)
    expected = reference_rates(store[1], images)
    for nested in (False, True):
        status, headers, body = call(
            served, "/v2/models/tiny/versions/1/infer", infer_json(images, nested, id="req-7")
        )
        assert status == 200, body
        assert headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["id"] == "req-7" and answer["model_name"] == "tiny"
        (output,) = answer["outputs"]
        assert output["name"] == "rates" and output["datatype"] == "FP32" and output["shape"] == [2, 5]
        np.testing.assert_allclose(np.reshape(output["data"], (2, 5)), expected, rtol=1e-5, atol=1e-6)


def test_binary_request_with_json_output(served: GrpcServer, store: tuple[Path, ModelVersion]) -> None:
    """The binary-tensor extension as a hand-made body: JSON header, then the raw input bytes."""
    images = random_images(2, seed=12)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(images.shape),
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "rates", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = call(
        served,
        "/v2/models/tiny/infer",
        header + images.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    length = int(headers["inference-header-content-length"])
    answer = json.loads(body[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == 2 * 5 * 4
    rates = np.frombuffer(body[length:], dtype="<f4").reshape(2, 5)
    np.testing.assert_allclose(rates, reference_rates(store[1], images), rtol=1e-5, atol=1e-6)


def test_auth_and_open_health(served: GrpcServer) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        status, _, _ = call(served, path, headers={"Authorization": ""})
        assert status == 200, path
    for auth in ("", "Bearer wrong", f"Basic {TOKEN}"):
        for path in ("/v2", "/v2/models/tiny", "/v2/models/tiny/ready", "/v2/no/such/route"):
            status, headers, body = call(served, path, headers={"Authorization": auth})
            assert status == 401, (auth, path)
            assert headers["www-authenticate"].startswith("Bearer")
            assert json.loads(body) == {"error": "missing or invalid bearer token"}


def _binary_body(images: np.ndarray, size: int, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape)}
    tensor["parameters"] = {"binary_data_size": size}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + images.tobytes()[:size] + extra, {"Inference-Header-Content-Length": str(len(header))}


def test_error_statuses(served: GrpcServer) -> None:
    images = random_images(1, seed=13)
    pixels = images.ravel().tolist()

    def tensor(**fields: Any) -> bytes:
        base = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": pixels}
        return json.dumps({"inputs": [{**base, **fields}]}).encode()

    short, short_headers = _binary_body(images, images.nbytes - 1)
    trailing, trailing_headers = _binary_body(images, images.nbytes, b"xx")
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("/v2/models/nope/infer", tensor(), {}, 404, "no model named 'nope'"),
        ("/v2/models/tiny/versions/9/infer", tensor(), {}, 404, "no ready version 9"),
        ("/v2/models/tiny/versions/x/infer", tensor(), {}, 400, "expected an integer"),
        ("/v2/models/tiny/infer", tensor(shape=[1, 16, 16, 3]), {}, 400, "16 x 16 x 3"),
        ("/v2/models/tiny/infer", tensor(shape=[32, 32, 3]), {}, 400, "expected [N, height, width"),
        ("/v2/models/tiny/infer", tensor(datatype="FP32"), {}, 400, "datatype 'FP32' not supported"),
        ("/v2/models/tiny/infer", tensor(data=pixels[:-1]), {}, 400, "3071 values of data"),
        ("/v2/models/tiny/infer", tensor(data=[0.5] * len(pixels)), {}, 400, "must be integers"),
        ("/v2/models/tiny/infer", tensor(data=[256] * len(pixels)), {}, 400, "outside 0..255"),
        ("/v2/models/tiny/infer", tensor(data=[[1, 2], [3]]), {}, 400, "data is not a regular array"),
        ("/v2/models/tiny/infer", tensor(data=None), {}, 400, "'data' must be a list"),
        ("/v2/models/tiny/infer", tensor(name="pixels"), {}, 400, "unknown input 'pixels'"),
        ("/v2/models/tiny/infer", tensor(shape="big"), {}, 400, "shape must be a list"),
        ("/v2/models/tiny/infer", b"{not json", {}, 400, "not valid JSON"),
        ("/v2/models/tiny/infer", b"\xff\xfe", {}, 400, "not valid JSON"),
        ("/v2/models/tiny/infer", b"[1, 2]", {}, 400, "must be a JSON object"),
        ("/v2/models/tiny/infer", b"{}", {}, 400, "needs 'inputs'"),
        ("/v2/models/tiny/infer", short, short_headers, 400, "3071 bytes of data"),
        ("/v2/models/tiny/infer", trailing, trailing_headers, 400, "2 bytes of binary data after"),
        (
            "/v2/models/tiny/infer",
            tensor(),
            {"Inference-Header-Content-Length": "99999"},
            400,
            "does not fit",
        ),
        ("/v2/models/tiny/infer", tensor(), {"Content-Encoding": "br"}, 415, "not supported"),
        ("/v2/models/tiny/infer", b"\x1f\x8bjunk", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (
            "/v2/models/tiny/infer",
            gzip.compress(b" " * (BODY_LIMIT + 10)),
            {"Content-Encoding": "gzip"},
            413,
            "",
        ),
        ("/v2/repository/index", b'{"ready": "yes"}', {}, 400, "'ready' must be true or false"),
        ("/v2/repository/models/tiny/load", b"", {}, 400, "model control is off"),
    ]
    for path, body, headers, expected_status, text in cases:
        status, _, answer = call(served, path, body, headers)
        assert status == expected_status, (path, text, status, answer[:300])
        message = json.loads(answer)["error"]
        assert text in message, (text, message)
    status, answer_json = declared_oversize_reply(served, "/v2/models/tiny/infer", BODY_LIMIT + 1)
    assert status == 413 and "exceeds the limit" in answer_json["error"], answer_json
    # Unknown routes and methods get the protocol's error body too.
    status, _, answer = call(served, "/v2/nothing/here")
    assert status == 404 and "error" in json.loads(answer)
    status, _, answer = call(served, "/v2/models/tiny/infer", method="GET")
    assert status == 405 and "error" in json.loads(answer)
    # A gzip body within the limit is read like a plain one.
    status, _, answer = call(
        served, "/v2/models/tiny/infer", gzip.compress(infer_json(images)), {"Content-Encoding": "gzip"}
    )
    assert status == 200, answer


def test_repository_index_ready_filter_and_metadata_by_version(served: GrpcServer) -> None:
    status, _, body = call(served, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and json.loads(body) == [{"name": "tiny", "version": "1", "state": "READY"}]
    status, _, body = call(served, "/v2/models/tiny/versions/1")
    assert status == 200 and json.loads(body)["versions"] == ["1"]
    status, _, body = call(served, "/v2/models/tiny/versions/1/ready")
    assert status == 200
    status, _, body = call(served, "/v2/models/tiny/versions/2/ready")
    assert status == 404 and "no ready version 2" in json.loads(body)["error"]
    status, _, body = call(served, "/v2/models/tiny/versions/1/stats")
    assert status == 200 and json.loads(body)["model_stats"][0]["version"] == "1"


def test_http_metrics(served: GrpcServer) -> None:
    call(served, "/v2/models/tiny/infer", infer_json(random_images(1, seed=14)))
    text = metrics_text(served)
    assert (
        metric_value(
            text,
            "neurotwin_http_requests_total",
            route="/v2/models/{model}/infer",
            method="POST",
            status="200",
        )
        >= 1
    )
    assert (
        metric_value(
            text, "neurotwin_predictor_requests_total", model="tiny", method="http.ModelInfer", code="OK"
        )
        >= 1
    )


def test_internal_error_hides_detail(
    store: tuple[Path, ModelVersion], caplog: pytest.LogCaptureFixture
) -> None:
    with predictor_server(store[0], server={"http_port": 0}) as (server, manager):

        def broken(images: np.ndarray) -> np.ndarray:
            raise RuntimeError("secret internal detail")

        manager.get("tiny").batcher.run_fn = broken
        with caplog.at_level(logging.ERROR, logger="neurotwin.server.statuses"):
            status, _, body = call(server, "/v2/models/tiny/infer", infer_json(random_images(1, seed=1)))
    # As over gRPC: only "internal error" and an id, which the server logs once with the traceback.
    assert status == 500, body
    reply = re.fullmatch(r"internal error \(id ([0-9a-f]{12})\)", json.loads(body)["error"])
    assert reply is not None, body
    logged = [r for r in caplog.records if reply.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret internal detail" in caplog.text


def test_timeout_parameter_queue_full_and_drain(store: tuple[Path, ModelVersion]) -> None:
    """The HTTP path queues in the same batcher: its "timeout" parameter, a full queue (503 with
    Retry-After) and the drain (503 for new requests, in-flight ones finish) behave as over gRPC."""
    settings = {"max_queue_size": 1, "max_queue_delay_ms": 0}
    with predictor_server(store[0], server={"http_port": 0}, **settings) as (server, manager):
        gate = gate_model(manager, "tiny")
        gate.hold()
        images = random_images(1, seed=2)
        results: dict[str, tuple[int, dict[str, str], bytes]] = {}

        def send(key: str, body: bytes) -> threading.Thread:
            thread = threading.Thread(
                target=lambda: results.__setitem__(key, call(server, "/v2/models/tiny/infer", body))
            )
            thread.start()
            return thread

        running = send("running", infer_json(images))
        assert gate.entered.wait(10)
        queued = send("queued", infer_json(images, parameters={"timeout": 100_000}))
        wait_until(lambda: manager.get("tiny").batcher.queue_length == 1, what="a queued request")
        status, headers, body = call(server, "/v2/models/tiny/infer", infer_json(images))
        assert status == 503 and headers["retry-after"] == "1" and "queue full" in json.loads(body)["error"]
        queued.join(10)
        status, _, body = results["queued"]
        assert status == 504 and "deadline" in json.loads(body)["error"]

        stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
        stopper.start()
        wait_until(lambda: server.draining, what="the drain")
        status, _, body = call(server, "/v2/models/tiny/infer", infer_json(images))
        assert status == 503 and "shutting down" in json.loads(body)["error"]
        assert call(server, "/v2/health/ready")[0] == 503
        assert call(server, "/v2/health/live")[0] == 200
        gate.open.set()
        running.join(10)
        assert results["running"][0] == 200
        stopper.join(20)
        port = server.http_port
        assert port is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_tls_and_mutual_tls(store: tuple[Path, ModelVersion], tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    files = {"tls_cert": str(tls.server_cert), "tls_key": str(tls.server_key)}
    for client_ca in ("", str(tls.ca_cert)):
        server_settings = {"http_port": 0, "auth_tokens": [TOKEN], **files, "tls_client_ca": client_ca}
        with predictor_server(store[0], server=server_settings) as (server, _):
            url = f"https://localhost:{server.http_port}/v2"
            context = ssl.create_default_context(cafile=str(tls.ca_cert))
            if client_ca:
                with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                    urllib.request.urlopen(
                        urllib.request.Request(url, headers=AUTH), context=context, timeout=10
                    )
                context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=AUTH), context=context, timeout=10
            ) as r:
                assert r.status == 200 and json.loads(r.read())["name"] == "neurotwin"
            # Plain HTTP is not answered on the TLS port.
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/health/live", timeout=10)


def test_http_port_in_use_is_a_clear_error(store: tuple[Path, ModelVersion]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServerSettings(port=0, metrics_port=-1, http_port=port)
        server = GrpcServer(settings)
        with pytest.raises(InvalidInput, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            server.start()
        server.stop(0)


def test_serve_command_http_port(store: tuple[Path, ModelVersion], tmp_path: Path) -> None:
    """``neurotwin serve --http-port`` serves the REST API and drains it on SIGTERM."""
    import os
    import re
    import signal

    command = [
        str(Path(sys.executable).parent / "neurotwin"),
        "serve",
        "predictor",
        "--model-store",
        str(store[0]),
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "-1",
    ]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"HTTP on :(\d+)", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as response:
            assert response.status == 200
        body = infer_json(random_images(1, seed=3))
        with urllib.request.urlopen(
            urllib.request.Request(f"{url}/v2/models/tiny/infer", body), timeout=10
        ) as r:
            assert json.loads(r.read())["outputs"][0]["shape"] == [1, 5]
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
        log.close()
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
