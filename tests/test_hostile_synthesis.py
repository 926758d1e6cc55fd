"""Synthesis under hostile budgets and deadlines, over the real server: a deadline stops every method
within one optimizer step and is counted as a deadline; a budget is a ceiling on evaluations."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from neurotwin.client.synthesizer import SynthesizerClient
from neurotwin.errors import DeadlineExceeded, InvalidInput
from neurotwin.server import synthesizer
from neurotwin.server.common import GrpcServer

from tests._serving import metric_value, metrics_text
from tests.test_synthesizer_service import _start, store  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def served(store: Path) -> Iterator[tuple[GrpcServer, synthesizer.SynthesizerService]]:  # noqa: F811
    grpc_server, service = _start(store)
    yield grpc_server, service
    grpc_server.stop(0)


@pytest.fixture(scope="module")
def client(served: tuple[GrpcServer, synthesizer.SynthesizerService]) -> Iterator[SynthesizerClient]:
    with SynthesizerClient(f"127.0.0.1:{served[0].port}", timeout=60) as c:
        yield c


@pytest.mark.parametrize("method", ["gradient", "cmaes", "genetic"])
def test_deadline_stops_every_method_within_one_step(
    served: tuple[GrpcServer, synthesizer.SynthesizerService], client: SynthesizerClient, method: str
) -> None:
    server, service = served
    outcome = {"method": method, "outcome": "deadline"}
    before = metric_value(metrics_text(server), "neurotwin_synthesizer_jobs_total", **outcome)
    known = len(service.recent)
    budget = 50_000 if method == "gradient" else 100_000
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.synthesize(
                "twin", 0, method=method, generator="slow-gan", budget=budget, num_images=2, timeout=1.0
            )
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    caller = threading.Thread(target=call)
    caller.start()
    while len(service.recent) <= known:
        time.sleep(0.01)
    job = service.recent[-1].job
    # The step the job is on when its deadline passes (measured by the job, not by wall time, so
    # that a busy machine does not change the answer).
    time.sleep(max(0.0, started + 1.0 - time.monotonic()))
    step_at_deadline = job.step
    caller.join(30)
    assert len(errors) == 1 and isinstance(errors[0], DeadlineExceeded)
    assert job.wait(60), "the job kept running after its deadline"
    assert job.state == "deadline" and isinstance(job.error, DeadlineExceeded)
    # The step running when the deadline passed may finish; no further step starts.
    assert job.step <= step_at_deadline + 1, (step_at_deadline, job.step)
    steps = job.step
    time.sleep(0.3)
    assert job.step == steps
    deadline_metric = 0.0
    for _ in range(50):
        deadline_metric = metric_value(metrics_text(server), "neurotwin_synthesizer_jobs_total", **outcome)
        if deadline_metric > before:
            break
        time.sleep(0.05)
    assert deadline_metric == before + 1


@pytest.mark.parametrize(("method", "population"), [("cmaes", 40), ("genetic", 20)])
def test_budget_is_a_ceiling_on_evaluations(client: SynthesizerClient, method: str, population: int) -> None:
    with pytest.raises(InvalidInput, match=f"less than one {method} generation of {population}"):
        client.synthesize("twin", 0, method=method, budget=2)
    # Not a whole number of generations: as many whole generations as fit, never more.
    result = client.synthesize("twin", 0, method=method, budget=population * 2 + population // 2)
    assert result.evaluations == population * 2
