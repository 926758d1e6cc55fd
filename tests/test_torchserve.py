"""``neurotwin export torchserve`` against a real TorchServe: the .mar loads, token auth and Prometheus
metrics are on, and TorchServe's gRPC Predictions returns the rates of neurotwin's own predictor.

TorchServe's gRPC stubs are generated here from the .proto files inside its frontend jar, so the
client speaks exactly the protocol of the installed TorchServe.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
from neurotwin.commands.export import export_torchserve
from neurotwin.imagecodec import decode_image, encode_jpeg, encode_png
from neurotwin.store import PREDICTORS, ModelStore

from tests._models import make_predictor, random_images, reference_rates
from tests._serving import predictor_server

NEURONS, SIZE = 5, 32
STARTUP_TIMEOUT_S = 180.0


def _missing() -> str | None:
    if shutil.which("java") is None:
        return "Java is not installed (TorchServe's frontend needs Java 17)"
    for module, package in (("ts", "torchserve"), ("model_archiver", "torch-model-archiver")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
    if not (Path(sys.executable).parent / "torchserve").exists():
        return "the torchserve launcher is not on this interpreter's bin folder"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Stubs:
    pb: ModuleType
    grpc: ModuleType


@pytest.fixture(scope="module")
def ts_stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stubs]:
    """Python stubs for TorchServe's inference API, built from the protos its jar ships."""
    from grpc_tools import protoc

    spec = importlib.util.find_spec("ts")
    assert spec is not None and spec.submodule_search_locations
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    src = tmp_path_factory.mktemp("ts_proto_src")
    out = tmp_path_factory.mktemp("ts_proto_py")
    with zipfile.ZipFile(jar) as archive:
        # Renamed on the way out: the file name is the key in protobuf's descriptor pool, and
        # "inference.proto" is also the KServe proto's name.
        (src / "torchserve_inference.proto").write_bytes(archive.read("proto/inference.proto"))
        (src / "google" / "rpc").mkdir(parents=True)
        (src / "google" / "rpc" / "status.proto").write_bytes(archive.read("google/rpc/status.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "torchserve_inference.proto",
            "google/rpc/status.proto",
        ]
    )
    assert rc == 0, "protoc failed on TorchServe's protos"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(out))
        yield Stubs(
            pb=importlib.import_module("torchserve_inference_pb2"),
            grpc=importlib.import_module("torchserve_inference_pb2_grpc"),
        )


@dataclass
class TorchServe:
    workdir: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    process: subprocess.Popen[bytes]

    def keys(self) -> dict[str, Any]:
        return json.loads((self.workdir / "key_file.json").read_text())

    @property
    def inference_key(self) -> str:
        return str(self.keys()["inference"]["key"])

    def log_tail(self) -> str:
        log = self.workdir / "torchserve.log"
        return log.read_text(errors="replace")[-4000:] if log.exists() else ""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_predictor(root, "tiny", neurons=NEURONS, size=SIZE)
    return root


@pytest.fixture(scope="module")
def mar(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_torchserve(store, "tiny", out=tmp_path_factory.mktemp("torchserve_store"))


def _predict(ts: TorchServe, stubs: Stubs, data: dict[str, bytes], token: str | None) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{ts.grpc_port}") as channel:
        stub = stubs.grpc.InferenceAPIsServiceStub(channel)
        metadata = [("authorization", f"Bearer {token}")] if token is not None else None
        response = stub.Predictions(
            stubs.pb.PredictionsRequest(model_name="tiny", input=data), metadata=metadata, timeout=30
        )
    return json.loads(response.prediction)


@pytest.fixture(scope="module")
def torchserve(mar: Path, ts_stubs: Stubs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("torchserve")
    http, management, metrics, grpc_port, grpc_management, worker = _free_ports(6)
    config = workdir / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{http}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={grpc_port}",
                f"grpc_management_port={grpc_management}",
                # Workers talk to the frontend over /tmp/.ts.sock.<port>; a port of our own keeps
                # two TorchServes on one machine (parallel test runs) from sharing sockets.
                f"initial_worker_port={worker}",
                "enable_token_auth=true",
                "metrics_mode=prometheus",
                "disable_system_metrics=true",
                "default_workers_per_model=1",
                "number_of_netty_threads=2",
                "netty_client_threads=2",
                # The JVM would otherwise reserve a quarter of the machine's memory.
                "vmargs=-Xmx256m -XX:+UseSerialGC -XX:-UsePerfData",
                "",
            ]
        )
    )
    env = {
        **os.environ,
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        "OMP_NUM_THREADS": "1",
        "NEUROTWIN_TS_ORT_THREADS": "1",
    }
    command = [
        str(Path(sys.executable).parent / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--model-store",
        str(mar.parent),
        "--models",
        f"tiny={mar.name}",
        "--ts-config",
        str(config),
    ]
    with open(workdir / "torchserve.log", "wb") as log:
        # A session of its own: the Java frontend and its Python workers go down together.
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    ts = TorchServe(workdir, grpc_port, http, metrics, process)
    try:
        _wait_until_serving(ts, ts_stubs)
        yield ts
    finally:
        _stop(process)


def _wait_until_serving(ts: TorchServe, stubs: Stubs) -> None:
    image = encode_png(random_images(1, SIZE, seed=99)[0])
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: object = None
    while time.monotonic() < deadline:
        if ts.process.poll() is not None:
            pytest.fail(f"TorchServe exited with {ts.process.returncode}:\n{ts.log_tail()}")
        if (ts.workdir / "key_file.json").exists():
            try:
                _predict(ts, stubs, {"data": image}, ts.inference_key)
                return
            except (grpc.RpcError, ValueError, KeyError) as exc:
                last = exc
        time.sleep(0.5)
    pytest.fail(f"TorchServe did not serve within {STARTUP_TIMEOUT_S} s ({last}):\n{ts.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass
    # Workers whose frontend died are orphans in the same session; take them down too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _our_service_rates(store: Path, images: list[bytes]) -> np.ndarray:
    """Rates from neurotwin's own predictor service, over real gRPC."""
    from neurotwin.v1 import predictor_pb2 as pb
    from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

    with (
        predictor_server(store) as (server, _),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        response = pb_grpc.FiringRatePredictorStub(channel).Predict(
            pb.PredictRequest(model="tiny", images=[pb.Image(encoded=data) for data in images]), timeout=30
        )
    return np.asarray(response.rates, dtype=np.float32).reshape(response.image_count, -1)


def test_export_writes_an_archive_with_handler_model_and_card(mar: Path) -> None:
    with zipfile.ZipFile(mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = archive.read("model-config.yaml").decode()
        requirements = archive.read("requirements.txt").decode().split()
    assert {"model.onnx", "card.json", "torchserve_handler.py", "model-config.yaml"} <= names
    # The handler's own packages, for TorchServe's install_py_dep_per_model.
    assert [r.split(">=")[0].lower() for r in requirements] == ["numpy", "pillow", "onnxruntime"]
    assert manifest["model"]["requirementsFile"] == "requirements.txt"
    assert manifest["model"]["modelName"] == "tiny"
    assert manifest["model"]["modelVersion"] == "1"
    assert manifest["model"]["handler"] == "torchserve_handler.py"
    assert manifest["model"]["serializedFile"] == "model.onnx"
    assert "batchSize: 8" in config


def test_export_command_line(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ts"
    result = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "neurotwin"), "export", "torchserve", "--model", "tiny"),
            *("--model-store", str(store), "--out", str(out), "--batch-size", "4"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "tiny.mar")
    with zipfile.ZipFile(out / "tiny.mar") as archive:
        assert "batchSize: 4" in archive.read("model-config.yaml").decode()
    # Nothing but the archive is left behind (staging folders are removed).
    assert sorted(p.name for p in out.iterdir()) == ["tiny.mar"]


def test_torchserve_rates_match_our_service(torchserve: TorchServe, ts_stubs: Stubs, store: Path) -> None:
    pixels = random_images(4, SIZE, seed=3)
    encoded = [encode_png(pixels[0]), encode_png(pixels[1]), encode_jpeg(pixels[2], quality=90)]
    ours = _our_service_rates(store, [*encoded, encode_png(pixels[3])])
    key = torchserve.inference_key
    theirs = [_predict(torchserve, ts_stubs, {"data": data}, key) for data in encoded]
    # Raw pixels, sized by the card, as a rig that skips encoding would send them.
    theirs.append(_predict(torchserve, ts_stubs, {"data": pixels[3].tobytes()}, key))
    rates = np.asarray([t["rates"] for t in theirs], dtype=np.float32)
    assert theirs[0]["neuron_ids"] == [f"n{i:03d}" for i in range(NEURONS)]
    assert theirs[0]["version"] == "1"
    np.testing.assert_allclose(rates, ours, rtol=0, atol=1e-4)
    # And both equal ONNX Runtime run directly on the decoded pixels.
    decoded = np.stack([*(decode_image(data) for data in encoded), pixels[3]])
    version = ModelStore(store).resolve(PREDICTORS, "tiny")
    np.testing.assert_allclose(rates, reference_rates(version, decoded), rtol=0, atol=1e-4)


def test_torchserve_requires_its_token(torchserve: TorchServe, ts_stubs: Stubs) -> None:
    image = encode_png(random_images(1, SIZE, seed=5)[0])
    for token in (None, "not-the-key"):
        with pytest.raises(grpc.RpcError) as err:
            _predict(torchserve, ts_stubs, {"data": image}, token)
        assert err.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_bad_images_are_refused_per_request(torchserve: TorchServe, ts_stubs: Stubs) -> None:
    key = torchserve.inference_key
    # gRPC: TorchServe reports handler errors in the body, with an OK status.
    wrong_size = encode_png(random_images(1, SIZE * 2, seed=6)[0])
    assert "64 x 64" in _predict(torchserve, ts_stubs, {"data": wrong_size}, key)["error"]
    assert "not a decodable image" in _predict(torchserve, ts_stubs, {"data": b"junk"}, key)["error"]
    # REST: the same error with HTTP 400.
    request = urllib.request.Request(
        f"http://127.0.0.1:{torchserve.http_port}/predictions/tiny",
        data=b"junk",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    assert "not a decodable image" in json.loads(err.value.read())["error"]


def test_torchserve_prometheus_metrics(torchserve: TorchServe, ts_stubs: Stubs) -> None:
    _predict(
        torchserve,
        ts_stubs,
        {"data": encode_png(random_images(1, SIZE, seed=7)[0])},
        torchserve.inference_key,
    )
    body = urllib.request.urlopen(f"http://127.0.0.1:{torchserve.metrics_port}/metrics", timeout=30).read()
    text = body.decode()
    assert "# TYPE" in text
    assert 'model_name="tiny"' in text
