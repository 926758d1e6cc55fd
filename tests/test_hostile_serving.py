"""Hostile clients against the real server over loopback: idle streams, floods of connections and
wedged calls cannot starve health checks, Predict or Tell, and the health port tells the truth."""

from __future__ import annotations

import queue
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neurotwin.client.closed_loop import ClosedLoopClient
from neurotwin.engines.registry import ModelRegistry
from neurotwin.server import closed_loop as closed_loop_service
from neurotwin.server import predictor
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore
from neurotwin.v1 import predictor_pb2 as pb
from neurotwin.v1 import predictor_pb2_grpc as pb_grpc

from tests._models import make_predictor, random_images
from tests._serving import gate_model

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TWIN = "tiny"
GENERATOR = "tiny-gan"
NEURONS = 5


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    with ModelStore(root).new_version(GENERATORS, GENERATOR) as folder:
        save_generator(DCGANGenerator(latent_dim=8, resolution=16, width=8), folder, GENERATOR)
    make_predictor(root, TWIN, neurons=NEURONS, size=32)
    return root


def _serve_all(store_root: Path, tmp_path: Path, **server: object) -> tuple[GrpcServer, ModelRegistry]:
    """Predictor (+ KServe) and closed loop on one server, as ``neurotwin serve all`` runs them."""
    settings = ServerSettings(**{"port": 0, "metrics_port": -1, "grace_seconds": 1, **server})
    grpc_server = GrpcServer(settings)
    manager = predictor.attach(grpc_server, predictor.Settings(model_store=str(store_root), poll_seconds=0))
    closed_loop_service.attach(
        grpc_server,
        closed_loop_service.Settings(
            model_store=str(store_root),
            journal=str(tmp_path / "journal.sqlite3"),
            default_generator=GENERATOR,
        ),
    )
    grpc_server.start()
    return grpc_server, manager


def _predict_request() -> pb.PredictRequest:
    image = random_images(1, 32)[0]
    raw = pb.RawImage(shape=list(image.shape), data=image.tobytes())
    return pb.PredictRequest(model=TWIN, images=[pb.Image(raw=raw)])


def _check(channel: grpc.Channel, timeout: float = 10) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


class _IdleStream:
    """A PredictStream whose client sends ``first`` (if any), then nothing until ``finish``."""

    def __init__(self, stub: pb_grpc.FiringRatePredictorStub, first: int = 0) -> None:
        self._outbox: queue.Queue[pb.PredictStreamRequest | None] = queue.Queue()
        for i in range(first):
            self._outbox.put(pb.PredictStreamRequest(request_id=str(i), request=_predict_request()))
        self.call = stub.PredictStream(self._requests(), timeout=60)

    def _requests(self) -> Iterator[pb.PredictStreamRequest]:
        while (item := self._outbox.get()) is not None:
            yield item

    def send(self) -> None:
        self._outbox.put(pb.PredictStreamRequest(request_id="later", request=_predict_request()))

    def finish(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


def _stream_outcome(stream: _IdleStream, wait: float) -> grpc.StatusCode | None:
    """The stream's final status if it ends within ``wait`` seconds, else None (still open)."""
    done = threading.Event()
    stream.call.add_done_callback(lambda _call: done.set())
    if not done.wait(wait):
        return None
    return stream.call.code()


def test_idle_streams_cannot_starve_health_predict_or_tell(store_root: Path, tmp_path: Path) -> None:
    # 80 streams that never send: more than the old fixed pool of 64 threads.
    server, _ = _serve_all(store_root, tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.FiringRatePredictorStub(channel)
            streams = [_IdleStream(stub) for _ in range(80)]
            outcomes = [_stream_outcome(s, 0.05) for s in streams]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                outcomes = [
                    o if o is not None else _stream_outcome(s, 0.01)
                    for s, o in zip(streams, outcomes, strict=True)
                ]
                if sum(o == grpc.StatusCode.RESOURCE_EXHAUSTED for o in outcomes) >= 80 - 16:
                    break
            # Beyond the per-method cap (16) the server refuses at once, naming the limit.
            exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
            refused = [s for s, o in zip(streams, outcomes, strict=True) if o == exhausted]
            assert len(refused) == 80 - 16
            assert "PredictStream=16" in refused[0].call.details()
            assert outcomes.count(None) == 16

            # Everything else is still answered promptly.
            assert _check(channel, timeout=5) == SERVING
            reply = stub.Predict(_predict_request(), timeout=5)
            assert len(reply.rates) == NEURONS and np.isfinite(reply.rates).all()
            client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=60, retries=0)
            try:
                created = client.create_session(neuron_count=NEURONS, target_neurons=[0], population_size=4)
                sid = created.session_id
                generation = client.ask(sid)
                told = {s.stimulus_id: np.arange(NEURONS, dtype=np.float32) for s in generation.stimuli}
                assert client.tell(sid, 0, told).generation_complete
            finally:
                client.close()
            # An open stream still works when its client finally speaks.
            live = next(s for s, o in zip(streams, outcomes, strict=True) if o is None)
            live.send()
            answer = next(iter(live.call))
            assert answer.request_id == "later" and len(answer.result.rates) == NEURONS
            for stream in streams:
                stream.finish()
    finally:
        server.stop(0)


def test_idle_stream_is_closed_but_a_slow_answer_is_not(store_root: Path, tmp_path: Path) -> None:
    server, manager = _serve_all(store_root, tmp_path, stream_idle_seconds=0.5)
    try:
        gate = gate_model(manager, TWIN)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.FiringRatePredictorStub(channel)
            # The model takes 1.5 s (three idle limits) to answer: computing is not idling.
            gate.hold()
            slow = _IdleStream(stub, first=1)
            assert gate.entered.wait(5)
            time.sleep(1.5)
            gate.open.set()
            assert next(iter(slow.call)).request_id == "0"
            # Then the client says nothing more: closed with DEADLINE_EXCEEDED naming the limit.
            started = time.monotonic()
            assert _stream_outcome(slow, 5) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.4 < time.monotonic() - started < 3
            assert "stream_idle_seconds" in slow.call.details()
            slow.finish()
            # Its slot is free again: the full per-method cap of streams can open.
            streams = [_IdleStream(stub, first=1) for _ in range(16)]
            for stream in streams:
                assert next(iter(stream.call)).request_id == "0"
            for stream in streams:
                stream.finish()
    finally:
        server.stop(0)


def test_health_port_says_not_serving_while_unary_calls_are_wedged(store_root: Path, tmp_path: Path) -> None:
    server, manager = _serve_all(store_root, tmp_path, max_workers=2, health_port=0, health_probe_seconds=0.1)
    gate = gate_model(manager, TWIN)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as probe,
        ):
            stub = pb_grpc.FiringRatePredictorStub(channel)
            assert _check(probe) == SERVING
            gate.hold()
            wedged = [stub.Predict.future(_predict_request(), timeout=30) for _ in range(2)]
            assert gate.entered.wait(5)
            # A third unary call is refused at once, naming the limit; health on the main port answers.
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(_predict_request(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "unary=2" in refused.value.details()
            assert _check(channel, timeout=5) == SERVING
            # The health port notices that unary calls cannot run.
            deadline = time.monotonic() + 5
            while _check(probe) == SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _check(probe) == NOT_SERVING
            gate.open.set()
            for call in wedged:
                assert len(call.result().rates) == NEURONS
            deadline = time.monotonic() + 5
            while _check(probe) != SERVING and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _check(probe) == SERVING
        # The private probe socket (plaintext, no TLS) serves health checks and nothing else.
        assert server._probe_socket is not None
        with grpc.insecure_channel(server._probe_socket.address) as private:
            assert _check(private) == SERVING
            with pytest.raises(grpc.RpcError) as denied:
                pb_grpc.FiringRatePredictorStub(private).Predict(_predict_request(), timeout=5)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        gate.open.set()
        server.stop(0)


def test_http_connection_flood_is_refused_not_queued(store_root: Path, tmp_path: Path) -> None:
    server, _ = _serve_all(store_root, tmp_path, http_port=0, max_http_requests=4)
    idle: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{server.http_port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=5) as page:
            assert page.status == 200
        for _ in range(8):
            idle.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=5))
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(url, timeout=5)
        assert busy.value.code == 503 and time.monotonic() - started < 2
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert _check(channel, timeout=5) == SERVING
        for sock in idle:
            sock.close()
        idle.clear()
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as page:
                    assert page.status == 200
                break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()
        server.stop(0)
