"""Dynamic batching on a real ONNX Runtime session: merging, order, limits, deadlines, cancellation.

A gate (tests/_serving.py) in front of the session holds a batch "in compute" so that the tests
decide exactly which requests overlap; everything else (session, arrays, threads) is real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
from neurotwin.card import PredictorCard
from neurotwin.engines.batcher import Batcher, BatcherSettings
from neurotwin.errors import Cancelled, DeadlineExceeded, InvalidInput, ResourceExhausted, Unavailable
from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
from neurotwin.store import ModelVersion

from tests._models import make_predictor, random_images, reference_rates
from tests._serving import Gate, wait_until


@dataclass
class Recorder:
    """Batch observer that keeps what it saw."""

    queued_seconds: list[float] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    rejections: int = 0

    def queued(self, seconds: float) -> None:
        self.queued_seconds.append(seconds)

    def computed(self, seconds: float, images: int, requests: int) -> None:
        self.batches.append((images, requests))

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)

    def rejected(self) -> None:
        self.rejections += 1


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    return make_predictor(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def session(model: ModelVersion) -> Iterator[PredictorSession]:
    session = PredictorSession(model.model_path, PredictorCard.load(model.card_path), SessionSettings())
    yield session
    session.close()


def _batcher(session: PredictorSession, **settings: object) -> tuple[Batcher, Gate, Recorder]:
    gate, recorder = Gate(session.run), Recorder()
    batcher = Batcher(gate, BatcherSettings(**settings), recorder, name="tiny v1")  # type: ignore[arg-type]
    return batcher, gate, recorder


def test_single_request_runs_inline_without_delay(session: PredictorSession, model: ModelVersion) -> None:
    batcher, gate, recorder = _batcher(session, max_queue_delay_s=1.0)
    images = random_images(2)
    started = time.perf_counter()
    out = batcher.infer(images)
    # A lone request must not wait for max_queue_delay (1 s here) nor hop to the worker thread.
    assert time.perf_counter() - started < 0.5
    assert gate.calls == [(threading.current_thread().name, 2)]
    assert recorder.queued_seconds == [0.0]
    np.testing.assert_allclose(out, reference_rates(model, images), rtol=1e-5)
    assert batcher.close(5)


def test_concurrent_requests_merge_and_split_in_order(session: PredictorSession, model: ModelVersion) -> None:
    batcher, gate, recorder = _batcher(session, max_batch_size=32, max_queue_delay_s=0.05)
    sizes = [1, 2, 3, 1, 4]
    batches = [random_images(n, seed=10 + i) for i, n in enumerate(sizes)]
    gate.hold()
    with ThreadPoolExecutor(len(sizes) + 1) as pool:
        first = pool.submit(batcher.infer, random_images(1, seed=99))
        assert gate.entered.wait(5)
        futures = [pool.submit(batcher.infer, b) for b in batches]
        wait_until(lambda: batcher.queue_length == len(sizes))
        gate.open.set()
        results = [f.result(10) for f in futures]
        first.result(10)
    assert recorder.batches == [(1, 1), (sum(sizes), len(sizes))]
    assert gate.calls[1][0].startswith("batcher-")
    reference = reference_rates(model, np.concatenate(batches))
    offset = 0
    for result, n in zip(results, sizes, strict=True):
        np.testing.assert_allclose(result, reference[offset : offset + n], rtol=1e-5, atol=1e-6)
        offset += n
    assert batcher.close(5)


def test_batches_respect_max_batch_size(session: PredictorSession) -> None:
    batcher, gate, recorder = _batcher(session, max_batch_size=4, max_queue_delay_s=0.0)
    gate.hold()
    with ThreadPoolExecutor(12) as pool:
        first = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        futures = [pool.submit(batcher.infer, random_images(1, seed=i)) for i in range(10)]
        wait_until(lambda: batcher.queue_length == 10)
        gate.open.set()
        for f in [first, *futures]:
            assert f.result(10).shape == (1, 5)
    assert sum(images for images, _ in recorder.batches) == 11
    assert max(images for images, _ in recorder.batches) == 4
    assert batcher.close(5)


def test_full_queue_is_rejected_and_a_cancelled_call_frees_its_slot(session: PredictorSession) -> None:
    batcher, gate, recorder = _batcher(session, max_queue_size=2)
    gate.hold()
    cancels: list[Callable[[], None]] = []
    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        waiting = [pool.submit(batcher.infer, random_images(1), None, cancels.append) for _ in range(2)]
        wait_until(lambda: batcher.queue_length == 2 and len(cancels) == 2)
        with pytest.raises(ResourceExhausted, match="queue full"):
            batcher.infer(random_images(1))
        assert recorder.rejections == 1
        cancels[0]()  # what gRPC does when the client cancels
        with pytest.raises(Cancelled):
            waiting[0].result(5)
        assert batcher.queue_length == 1
        replacement = pool.submit(batcher.infer, random_images(1))
        wait_until(lambda: batcher.queue_length == 2)
        gate.open.set()
        for f in (running, waiting[1], replacement):
            assert f.result(10).shape == (1, 5)
    assert recorder.drops == ["cancelled"]
    # The cancelled request never reached the runtime.
    assert sum(images for images, _ in recorder.batches) == 3
    assert batcher.close(5)


def test_expired_requests_are_dropped_not_computed(session: PredictorSession) -> None:
    batcher, gate, recorder = _batcher(session)
    gate.hold()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        started = time.monotonic()
        late = pool.submit(batcher.infer, random_images(3), time.monotonic() + 0.15)
        with pytest.raises(DeadlineExceeded):
            late.result(5)
        assert time.monotonic() - started < 2
        gate.open.set()
        running.result(5)
    with pytest.raises(DeadlineExceeded):
        batcher.infer(random_images(1), deadline=time.monotonic() - 1)
    assert recorder.drops == ["deadline", "deadline"]
    assert [images for images, _ in recorder.batches] == [1]
    assert batcher.close(5)


def test_an_expired_request_does_not_hold_up_the_queue(session: PredictorSession) -> None:
    batcher, gate, recorder = _batcher(session, max_queue_delay_s=0.0)
    gate.hold()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        short = pool.submit(batcher.infer, random_images(2), time.monotonic() + 0.05)
        keep = pool.submit(batcher.infer, random_images(1))
        wait_until(lambda: batcher.queue_length >= 1)
        time.sleep(0.1)
        gate.open.set()
        with pytest.raises(DeadlineExceeded):
            short.result(5)
        assert keep.result(5).shape == (1, 5)
        running.result(5)
    assert sum(images for images, _ in recorder.batches) == 2
    assert recorder.drops == ["deadline"]
    assert batcher.close(5)


def test_runtime_errors_reach_every_request_of_the_batch(session: PredictorSession) -> None:
    batcher, gate, _ = _batcher(session)
    gate.hold()
    wrong = np.zeros((1, 16, 16, 3), dtype=np.uint8)  # bypasses the servicer's checks on purpose
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        bad = [pool.submit(batcher.infer, wrong) for _ in range(2)]
        wait_until(lambda: batcher.queue_length == 2)
        gate.open.set()
        running.result(5)
        for f in bad:
            with pytest.raises(InvalidInput, match="16 x 16"):
                f.result(5)
    # The worker survives and keeps serving.
    assert batcher.infer(random_images(1)).shape == (1, 5)
    assert batcher.close(5)


def test_close_finishes_queued_work_then_refuses(session: PredictorSession) -> None:
    batcher, gate, _ = _batcher(session)
    gate.hold()
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(batcher.infer, random_images(1))
        assert gate.entered.wait(5)
        queued = pool.submit(batcher.infer, random_images(2))
        wait_until(lambda: batcher.queue_length == 1)
        closer = pool.submit(batcher.close, 10)
        time.sleep(0.05)
        assert not closer.done()
        gate.open.set()
        assert running.result(5).shape == (1, 5)
        assert queued.result(5).shape == (2, 5)
        assert closer.result(5)
    with pytest.raises(Unavailable):
        batcher.infer(random_images(1))


def test_session_checks_name_the_problem(session: PredictorSession) -> None:
    with pytest.raises(InvalidInput, match="64 x 32 pixels"):
        session.run(np.zeros((1, 64, 32, 3), np.uint8))
    with pytest.raises(InvalidInput, match="4 channels"):
        session.run(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(InvalidInput, match="dtype float32"):
        session.run(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(InvalidInput, match="no images"):
        session.run(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(InvalidInput, match="4 dimensions"):
        session.run(np.zeros((32, 32, 3), np.uint8))
    assert session.providers[-1] == "CPUExecutionProvider"


def test_io_binding_path(model: ModelVersion) -> None:
    """The IO-binding code used on CUDA, exercised here with the output bound to CPU memory."""
    session = PredictorSession(
        model.model_path, PredictorCard.load(model.card_path), SessionSettings(device="cpu")
    )
    assert not session.on_cuda and session.bind_output_to is None
    session.bind_output_to = "cpu"
    images = random_images(3, seed=12)
    np.testing.assert_allclose(session.run(images), reference_rates(model, images), rtol=1e-5, atol=1e-6)
    session.close()


def test_settings_are_validated() -> None:
    with pytest.raises(InvalidInput):
        BatcherSettings(max_batch_size=0)
    with pytest.raises(InvalidInput):
        BatcherSettings(max_queue_size=0)
    with pytest.raises(InvalidInput):
        BatcherSettings(max_queue_delay_s=-1)
