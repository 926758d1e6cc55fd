"""Synthesis under hostile budgets and deadlines, over the real server: a deadline stops every method
within one optimizer step and is counted as a deadline; a budget is a ceiling on evaluations."""

from __future__ import annotations

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
    # How long one step takes here: one gradient step, or one generation of the default population.
    one_step = {"gradient": 1, "cmaes": 40, "genetic": 20}[method]
    timed = time.monotonic()
    client.synthesize("twin", 0, method=method, generator="slow-gan", budget=one_step, num_images=2)
    step_seconds = time.monotonic() - timed
    before = metric_value(metrics_text(server), "neurotwin_synthesizer_jobs_total", **outcome)
    known = len(service.recent)
    budget = 50_000 if method == "gradient" else 100_000
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.synthesize(
            "twin", 0, method=method, generator="slow-gan", budget=budget, num_images=2, timeout=1.0
        )
    deadline = started + 1.0
    assert len(service.recent) > known
    job = service.recent[-1].job
    assert job.wait(10), "the job kept running after its deadline"
    ended = time.monotonic()
    assert job.state == "deadline" and isinstance(job.error, DeadlineExceeded)
    # Within one step of the deadline (plus scheduling slack on a busy machine).
    assert ended - deadline < step_seconds + 1.0, (ended - deadline, step_seconds, job.step)
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
