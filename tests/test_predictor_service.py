"""FiringRatePredictor over real loopback gRPC: predictions, streams, model info, every error case,
batching, queue limits, deadlines, cancellation, TLS and tokens, drain, health, reflection, metrics,
the Python clients and the ``neurotwin predict`` command."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurotwin import cli
from neurotwin.client import AsyncPredictorClient, ChannelConfig, PredictorClient
from neurotwin.errors import InvalidInput, NotFound, ResourceExhausted
from neurotwin.imagecodec import decode_image, encode_jpeg, encode_png, resize_uint8
from neurotwin.server.common import GrpcServer
from neurotwin.store import ModelVersion
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

from tests._models import make_predictor, random_images, reference_rates
from tests._serving import gate_model, metric_value, metrics_text, predictor_server, wait_until
from tests._tls import make_tls_files

SERVICE = "neurotwin.v1.FiringRatePredictor"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion]:
    root = tmp_path_factory.mktemp("store")
    return root, make_predictor(root)


@pytest.fixture(scope="module")
def served(store: tuple[Path, ModelVersion]) -> Iterator[GrpcServer]:
    with predictor_server(store[0], max_images_per_request=8) as (server, _):
        yield server


@pytest.fixture
def client(served: GrpcServer) -> Iterator[PredictorClient]:
    with PredictorClient(f"127.0.0.1:{served.port}", timeout=10) as client:
        yield client


@pytest.fixture
def stub(served: GrpcServer) -> Iterator[pb_grpc.FiringRatePredictorStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.FiringRatePredictorStub(channel)


def _raw(image: np.ndarray) -> pb.Image:
    return pb.Image(raw=pb.RawImage(shape=list(image.shape), data=image.tobytes()))


def _code(stub: pb_grpc.FiringRatePredictorStub, request: pb.PredictRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=10)
    return err.value.code(), err.value.details()


# -- predictions -----------------------------------------------------------------------------------


def test_predict_png_jpeg_and_raw(client: PredictorClient, store: tuple[Path, ModelVersion]) -> None:
    model = store[1]
    images = random_images(3, seed=1)
    jpeg = encode_jpeg(images[1])
    result = client.predict([encode_png(images[0]), jpeg, images[2]], "tiny")
    assert result.model == "tiny" and result.version == 1
    assert result.neuron_ids == ["n000", "n001", "n002", "n003", "n004"]
    assert result.rates.dtype == np.float32 and result.rates.shape == (3, 5)
    # JPEG is lossy: the reference runs on exactly what the server decoded.
    expected = reference_rates(model, np.stack([images[0], decode_image(jpeg), images[2]]))
    np.testing.assert_allclose(result.rates, expected, rtol=1e-5, atol=1e-6)
    # A 4-D array is N raw images.
    batch = client.predict(images, "tiny", version=1)
    np.testing.assert_allclose(batch.rates, reference_rates(model, images), rtol=1e-5, atol=1e-6)


def test_neuron_subsets(client: PredictorClient, store: tuple[Path, ModelVersion]) -> None:
    images = random_images(2, seed=2)
    full = reference_rates(store[1], images)
    by_id = client.predict(images, "tiny", neurons=["n003", "n000"])
    assert by_id.neuron_ids == ["n003", "n000"]
    np.testing.assert_allclose(by_id.rates, full[:, [3, 0]], rtol=1e-5, atol=1e-6)
    by_index = client.predict(images, "tiny", neurons=[4, 1, 1])
    assert by_index.neuron_ids == ["n004", "n001", "n001"]
    np.testing.assert_allclose(by_index.rates, full[:, [4, 1, 1]], rtol=1e-5, atol=1e-6)


def test_stream_answers_each_request_in_order(
    client: PredictorClient, store: tuple[Path, ModelVersion]
) -> None:
    batches = [random_images(1 + i % 3, seed=100 + i) for i in range(12)]
    batches.insert(5, [b"not an image"])
    results = list(client.stream(batches, "tiny", errors="return"))
    assert len(results) == len(batches)
    assert isinstance(results[5], InvalidInput) and "image 0" in str(results[5])
    for batch, result in zip(batches, results, strict=True):
        if isinstance(batch, np.ndarray):
            np.testing.assert_allclose(result.rates, reference_rates(store[1], batch), rtol=1e-5, atol=1e-6)
    # Responses carry the request ids, in order, over the raw stub too.
    with grpc.insecure_channel(client.config.address) as channel:
        stub = pb_grpc.FiringRatePredictorStub(channel)
        requests = [
            pb.PredictStreamRequest(
                request_id=f"r{i}", request=pb.PredictRequest(model="tiny", images=[_raw(b[0])])
            )
            for i, b in enumerate(batches[:4])
        ]
        assert [r.request_id for r in stub.PredictStream(iter(requests), timeout=10)] == [
            "r0",
            "r1",
            "r2",
            "r3",
        ]
    with pytest.raises(NotFound):
        list(client.stream([random_images(1)], "nope"))


def test_list_and_get_model(client: PredictorClient, store: tuple[Path, ModelVersion]) -> None:
    (info,) = client.list_models()
    assert info.name == "tiny" and info.ready_versions == [1]
    details = client.get_model("tiny")
    assert (details.model, details.version) == ("tiny", 1)
    assert (details.input_height, details.input_width, details.input_channels) == (32, 32, 3)
    assert details.neuron_ids == details.card.neuron_ids == ["n000", "n001", "n002", "n003", "n004"]
    assert details.card.neuron_stats is not None and len(details.card.neuron_stats.predicted_max) == 5
    assert details.status.ready_versions == [1]
    with pytest.raises(NotFound):
        client.get_model("tiny", version=9)


# -- errors ----------------------------------------------------------------------------------------


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb stand-in, cheap to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_invalid_requests(stub: pb_grpc.FiringRatePredictorStub) -> None:
    good = _raw(random_images(1)[0])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (
            pb.PredictRequest(model="tiny", images=[pb.Image(encoded=b"GIF89a garbage")]),
            "not a decodable image",
        ),
        (
            pb.PredictRequest(model="tiny", images=[pb.Image(encoded=encode_png(random_images(1, 16)[0]))]),
            "16 x 16",
        ),
        (pb.PredictRequest(model="tiny", images=[_raw(np.zeros((32, 32, 4), np.uint8))]), "32 x 32 x 4"),
        (
            pb.PredictRequest(
                model="tiny", images=[pb.Image(raw=pb.RawImage(shape=[32, 32, 3], data=b"\0" * 10))]
            ),
            "10 bytes",
        ),
        (pb.PredictRequest(model="tiny", images=[pb.Image()]), "empty"),
        (pb.PredictRequest(model="tiny"), "no images"),
        (pb.PredictRequest(model="tiny", images=[good] * 9), "limit of 8"),
        (pb.PredictRequest(model="tiny", images=[good], neurons=pb.NeuronSelection(ids=["n999"])), "n999"),
        (
            pb.PredictRequest(model="tiny", images=[good], neurons=pb.NeuronSelection(indices=[5])),
            "out of range",
        ),
        (
            pb.PredictRequest(
                model="tiny", images=[good], neurons=pb.NeuronSelection(ids=["n000"], indices=[0])
            ),
            "not both",
        ),
        (
            pb.PredictRequest(model="tiny", images=[pb.Image(encoded=_png_claiming(60000, 60000))]),
            "decompression bomb",
        ),
        # Larger than the model's input: refused from the header, before any pixel is decoded.
        (
            pb.PredictRequest(model="tiny", images=[pb.Image(encoded=_png_claiming(4000, 3000))]),
            "image 0: 4000 x 3000 pixels exceeds the limit of 1024 decoded pixels; "
            "model tiny v1 expects 32 x 32 x 3",
        ),
        (pb.PredictRequest(images=[good]), "model name is required"),
    ]
    for request, text in cases:
        code, details = _code(stub, request)
        assert code == invalid, (text, code, details)
        assert text in details, (text, details)
    assert _code(stub, pb.PredictRequest(model="nope", images=[good]))[0] == grpc.StatusCode.NOT_FOUND
    assert (
        _code(stub, pb.PredictRequest(model="tiny", version=7, images=[good]))[0] == grpc.StatusCode.NOT_FOUND
    )


def test_message_size_limit(store: tuple[Path, ModelVersion]) -> None:
    with predictor_server(store[0], server={"max_message_bytes": 64 * 1024}) as (server, _):
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            assert client.predict(random_images(1), "tiny").rates.shape == (1, 5)
            with pytest.raises(ResourceExhausted):
                client.predict(random_images(30), "tiny")


# -- batching, queue, deadlines, cancellation ------------------------------------------------------


def test_batching_queue_deadline_and_cancel(store: tuple[Path, ModelVersion]) -> None:
    with predictor_server(store[0], max_queue_size=6, max_queue_delay_ms=50) as (server, manager):
        gate = gate_model(manager, "tiny")
        batcher = manager.get("tiny").batcher
        address = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.FiringRatePredictorStub(channel)

            def request(seed: int) -> pb.PredictRequest:
                return pb.PredictRequest(model="tiny", images=[_raw(random_images(1, seed=seed)[0])])

            gate.hold()
            first = stub.Predict.future(request(0), timeout=20)
            assert gate.entered.wait(5)
            merged = [stub.Predict.future(request(i), timeout=20) for i in range(1, 5)]
            wait_until(lambda: batcher.queue_length == 4, what="4 queued")
            late = stub.Predict.future(request(5), timeout=2)
            cancelled = stub.Predict.future(request(6), timeout=20)
            wait_until(lambda: batcher.queue_length == 6, what="queue full")
            code, details = _code(stub, request(7))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in details
            cancelled.cancel()
            wait_until(lambda: batcher.queue_length == 5, what="cancelled call to leave the queue")
            with pytest.raises(grpc.RpcError) as err:
                late.result(5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: batcher.queue_length == 4, what="expired call to leave the queue")
            gate.open.set()
            for future in [first, *merged]:
                assert len(future.result(10).rates) == 5
        # One inline call, then the four waiting requests as one batch; nothing else was computed.
        assert [size for _, size in gate.calls] == [1, 4]
        text = metrics_text(server)
        assert metric_value(text, "neurotwin_predictor_batch_size_count", model="tiny") == 2
        assert metric_value(text, "neurotwin_predictor_batch_size_bucket", model="tiny", le="2.0") == 1
        assert metric_value(text, "neurotwin_predictor_batch_size_bucket", model="tiny", le="4.0") == 2
        assert metric_value(text, "neurotwin_predictor_dropped_total", model="tiny", reason="deadline") == 1
        assert metric_value(text, "neurotwin_predictor_dropped_total", model="tiny", reason="cancelled") == 1
        assert metric_value(text, "neurotwin_predictor_queue_rejections_total", model="tiny") == 1
        assert (
            metric_value(
                text,
                "neurotwin_predictor_requests_total",
                model="tiny",
                method="Predict",
                code="RESOURCE_EXHAUSTED",
            )
            == 1
        )


# -- security, drain, health, reflection, metrics --------------------------------------------------


def test_tls_and_token_auth(store: tuple[Path, ModelVersion], tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    settings = {
        "tls_cert": str(tls.server_cert),
        "tls_key": str(tls.server_key),
        "tls_client_ca": str(tls.ca_cert),
        "auth_tokens": ["s3cret"],
    }
    with predictor_server(store[0], server=settings) as (server, _):
        address = f"localhost:{server.port}"
        mtls = {"tls_ca": str(tls.ca_cert), "tls_cert": str(tls.client_cert), "tls_key": str(tls.client_key)}
        with PredictorClient(address, token="s3cret", **mtls) as client:
            assert client.predict(random_images(1), "tiny").rates.shape == (1, 5)
            assert client.list_models()[0].name == "tiny"
        with PredictorClient(address, token="wrong", **mtls) as client:
            with pytest.raises(Exception) as err:
                client.predict(random_images(1), "tiny")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with PredictorClient(address, token="s3cret", tls_ca=str(tls.ca_cert)) as client:
            with pytest.raises(Exception) as err:
                client.predict(random_images(1), "tiny", timeout=10)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE  # no client certificate
        with PredictorClient(address, token="s3cret", timeout=5) as client:
            with pytest.raises(Exception) as err:
                client.predict(random_images(1), "tiny")  # plaintext against TLS
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        # Probes need no token.
        credentials = grpc.ssl_channel_credentials(
            tls.ca_cert.read_bytes(), tls.client_key.read_bytes(), tls.client_cert.read_bytes()
        )
        with grpc.secure_channel(address, credentials) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status == 1


def test_drain_finishes_in_flight_and_refuses_new(store: tuple[Path, ModelVersion]) -> None:
    with predictor_server(store[0]) as (server, manager):
        gate = gate_model(manager, "tiny")
        gate.hold()
        with PredictorClient(f"127.0.0.1:{server.port}", timeout=20) as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.predict, random_images(1), "tiny")
            assert gate.entered.wait(5)
            stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
            stopper.start()
            wait_until(lambda: server.draining, what="drain")
            with pytest.raises(Exception) as err:
                client.predict(random_images(1), "tiny")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            gate.open.set()
            assert in_flight.result(10).version == 1
            stopper.join(10)
            assert not stopper.is_alive()


def test_health_reflection_and_metrics(served: GrpcServer, client: PredictorClient) -> None:
    client.predict(random_images(2), "tiny")
    with pytest.raises(NotFound):
        client.predict(random_images(1), "no-such-model")
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for service in ("", SERVICE, "inference.GRPCInferenceService"):
            assert (
                check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE, "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        # Tools such as grpcurl also need the schemas, not just the names.
        for symbol in (SERVICE, "inference.GRPCInferenceService"):
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            (answer,) = reflection.ServerReflectionInfo(iter([request]))
            assert answer.file_descriptor_response.file_descriptor_proto, symbol
    text = metrics_text(served)
    assert (
        metric_value(text, "neurotwin_predictor_requests_total", model="tiny", method="Predict", code="OK")
        >= 1
    )
    # Unknown model names share one label value, so requests cannot grow the registry.
    assert metric_value(text, "neurotwin_predictor_requests_total", model="_unknown", code="NOT_FOUND") >= 1
    for name in (
        "neurotwin_predictor_request_seconds_bucket",
        "neurotwin_predictor_queue_seconds_bucket",
        "neurotwin_predictor_compute_seconds_bucket",
        "neurotwin_predictor_batch_size_bucket",
        "neurotwin_predictor_in_flight",
        "neurotwin_predictor_model_versions_ready",
        "neurotwin_build_info",
        "neurotwin_predictor_model_load_failures_total",
    ):
        assert name in text, name


# -- clients and command line ----------------------------------------------------------------------


def test_async_client(served: GrpcServer, store: tuple[Path, ModelVersion]) -> None:
    images = random_images(3, seed=4)

    async def main() -> None:
        async with AsyncPredictorClient(config=ChannelConfig(address=f"127.0.0.1:{served.port}")) as client:
            results = await asyncio.gather(*(client.predict(images[i : i + 1], "tiny") for i in range(3)))
            rates = np.concatenate([r.rates for r in results])
            np.testing.assert_allclose(rates, reference_rates(store[1], images), rtol=1e-5, atol=1e-6)
            streamed = [r async for r in client.stream([images[:1], images[1:]], "tiny")]
            assert [r.rates.shape for r in streamed] == [(1, 5), (2, 5)]
            assert (await client.list_models())[0].name == "tiny"
            assert (await client.get_model("tiny")).version == 1
            with pytest.raises(NotFound):
                await client.predict(images, "nope")

    asyncio.run(main())


def test_predict_command(served: GrpcServer, store: tuple[Path, ModelVersion], tmp_path: Path) -> None:
    images = random_images(2, seed=6)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"stim{i}.png")
        files[-1].write_bytes(encode_png(image))
    address = f"127.0.0.1:{served.port}"
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["predict", *map(str, files), "--model", "tiny", "--address", address, "--json"]) == 0
    payload = json.loads(out.getvalue())
    assert payload["version"] == 1 and payload["neuron_ids"][0] == "n000"
    np.testing.assert_allclose(payload["rates"], reference_rates(store[1], images), rtol=1e-5, atol=1e-6)
    out = io.StringIO()
    with redirect_stdout(out):
        argv = [
            "predict",
            *map(str, files),
            "--model",
            "tiny",
            "--address",
            address,
            "--neurons",
            "n002",
            "n004",
        ]
        assert cli.main(argv) == 0
    table = out.getvalue().splitlines()
    assert table[0].startswith("model tiny v1") and "stim0.png" in table[1] and "stim1.png" in table[1]
    assert [line.split()[0] for line in table[2:]] == ["n002", "n004"]
    assert cli.main(["predict", str(files[0]), "--model", "nope", "--address", address]) == 1
    # A photo of another size: refused as it is, predicted once resized to the model's input here.
    photo = random_images(1, size=45, seed=8)[0]
    (tmp_path / "photo.png").write_bytes(encode_png(photo))
    assert cli.main(["predict", str(tmp_path / "photo.png"), "--model", "tiny", "--address", address]) == 1
    out = io.StringIO()
    with redirect_stdout(out):
        argv = [
            "predict",
            str(tmp_path / "photo.png"),
            "--model",
            "tiny",
            "--address",
            address,
            "--resize",
            "--json",
        ]
        assert cli.main(argv) == 0
    resized = decode_image(encode_png(resize_uint8(photo, 32, 32)))[None]
    np.testing.assert_allclose(
        json.loads(out.getvalue())["rates"], reference_rates(store[1], resized), rtol=1e-5, atol=1e-6
    )


def test_serve_command_builds_the_service(store: tuple[Path, ModelVersion]) -> None:
    import argparse

    from neurotwin.commands import serve

    parser = argparse.ArgumentParser()
    serve.configure(parser)
    args = parser.parse_args(
        [
            "predictor",
            "--model-store",
            str(store[0]),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--predictor-max-batch-size",
            "4",
            "--predictor-poll-seconds",
            "0",
        ]
    )
    server = serve.build_server(args)
    server.start()
    try:
        with PredictorClient(f"127.0.0.1:{server.port}") as client:
            assert client.predict(random_images(1), "tiny").version == 1
    finally:
        server.stop(0)
