"""The synthesis engine and its scheduler on a tiny real twin (ONNX in a store, converted to torch) and a
tiny DCGAN prior: every method improves its objective, seeds reproduce, concurrent jobs share batched
steps, a failing job fails alone, the admission limit holds, and cancellation stops within one step."""

from __future__ import annotations

import io
import itertools
import threading
import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from neurotwin.card import NeuronStats
from neurotwin.engines.objectives import Objective, build_objective, neuron, one_hot_population, population
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.synthesis import (
    ModelPair,
    Progress,
    SynthesisFailed,
    SynthesisRequest,
    SynthesisResult,
    SynthesisScheduler,
    TickInfo,
    naive_synthesis,
    render_latents,
    score_latents,
    synthesize,
)
from neurotwin.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from neurotwin.runtimes.generators import DCGANGenerator
from neurotwin.runtimes.onnx_torch import load_differentiable_twin
from neurotwin.store import ModelVersion
from torch import nn

from tests._models import make_card, write_predictor

SIZE = 24
NEURONS = 4


class TinyTwin(nn.Module):
    """Two convolutions and a spatial readout, so neurons care about where things are in the image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.readout = nn.Linear(8 * 6 * 6, NEURONS)
        with torch.no_grad():
            self.readout.weight.mul_(4.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.softplus(self.readout(x.flatten(1)))


def _tiny_prior() -> DCGANGenerator:
    torch.manual_seed(1)
    prior = DCGANGenerator(latent_dim=8, resolution=16, width=8).eval().requires_grad_(False)
    with torch.no_grad():
        # Random weights make nearly grey images; more contrast gives the optimizers something to find.
        prior.body[-1].weight.mul_(30.0)
    return prior


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelVersion, bytes]:
    """The tiny twin exported to ONNX and written into a store, with a card like a trainer writes."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TinyTwin().eval(),
            (torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8),),
            buffer,
            input_names=["images"],
            output_names=["rates"],
            dynamic_axes={"images": {0: "batch"}, "rates": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    prior = _tiny_prior()
    # "Natural images" for the card's statistics: samples of the prior itself.
    with torch.no_grad():
        natural = prior(prior.sample_latents(64, torch.Generator().manual_seed(9)))
        natural = F.interpolate(natural, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        pixels = (natural * 255).round().byte().permute(0, 2, 3, 1).numpy()
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    rates = session.run(None, {"images": pixels})[0]
    stats = NeuronStats(
        image_count=64,
        predicted_max=[float(v) for v in rates.max(0)],
        predicted_p99=[float(v) for v in np.percentile(rates, 99, 0)],
    )
    root = tmp_path_factory.mktemp("store")
    version = write_predictor(root, "tiny", buffer.getvalue(), make_card("tiny", NEURONS, SIZE, stats, 0))
    return version, buffer.getvalue()


@pytest.fixture(scope="module")
def pair(stored: tuple[ModelVersion, bytes]) -> ModelPair:
    twin, card = load_differentiable_twin(stored[0], "cpu")
    return ModelPair(twin, _tiny_prior(), card, key="tiny|dcgan")


def _request(method: str, **kw: object) -> SynthesisRequest:
    defaults: dict[str, object] = {
        "objective": neuron(1),
        "method": method,
        "n_images": 2,
        "seed": 7,
        "transforms": False,
    }
    if method == "gradient":
        defaults.update(budget=25, gradient=GradientConfig(lr=0.3))
    else:
        defaults.update(budget=120, population=10)
    defaults.update(kw)
    return SynthesisRequest(**defaults)  # type: ignore[arg-type]


def _run(pair: ModelPair, request: SynthesisRequest) -> tuple[list[Progress], SynthesisResult]:
    scheduler = SynthesisScheduler("cpu")
    job = scheduler.submit(pair, request)
    scheduler.run_until_idle()
    events = list(job.events(timeout=0))
    assert isinstance(events[-1], SynthesisResult)
    return events[:-1], events[-1]  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# One job
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradient", "cmaes", "genetic"])
def test_every_method_improves_the_objective(pair: ModelPair, method: str) -> None:
    progress, result = _run(pair, _request(method))
    first, last = progress[0], progress[-1]
    assert last.step == result.steps == progress[-1].total_steps
    assert result.activation is not None and first.activation is not None
    assert result.activation.mean() > first.activation.mean() + 0.02
    # Beyond the typical natural image (the card's maximum is over 64 prior samples).
    assert np.median(result.relative_activation) > 0.9


def test_gradient_with_robustness_transforms_improves(pair: ModelPair) -> None:
    progress, result = _run(pair, _request("gradient", transforms=True, budget=30))
    assert result.activation.mean() > progress[0].activation.mean()


def test_result_is_measured_on_the_exact_returned_pixels(pair: ModelPair, stored: tuple) -> None:
    _, result = _run(pair, _request("cmaes", budget=40))
    assert result.images.dtype == np.uint8 and result.images.shape == (2, SIZE, SIZE, 3)
    assert result.latents.shape == (2, 8) and result.rates.shape == (2, NEURONS)
    # What the predict service (ONNX Runtime on the stored model) says about the returned pixels.
    session = ort.InferenceSession(stored[1], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        result.rates, session.run(None, {"images": result.images})[0], rtol=1e-4, atol=1e-5
    )
    top = pair.card.neuron_stats.predicted_max[1]
    np.testing.assert_allclose(result.relative_activation, result.rates[:, 1] / top, rtol=1e-6)
    assert result.target == 1 and result.evaluations == 2 * 40


@pytest.mark.parametrize(
    "objective",
    [
        population([0, 2], [1.0, -1.0]),
        one_hot_population(3),
        build_objective({"kind": "neuron", "neurons": [2], "diversity": 0.5}, NEURONS),
        build_objective(
            {"kind": "one_hot", "neurons": [0], "diversity": 0.2, "diversity_on": "rates"}, NEURONS
        ),
    ],
    ids=["population", "one_hot", "neuron+diversity", "one_hot+rate_diversity"],
)
def test_every_objective_improves_through_the_engine(pair: ModelPair, objective: Objective) -> None:
    progress, result = _run(pair, _request("gradient", objective=objective, n_images=3))
    assert result.score.mean() > progress[0].score.mean()


@pytest.mark.parametrize("method", ["gradient", "cmaes", "genetic"])
def test_seeds_reproduce_exactly(pair: ModelPair, method: str) -> None:
    _, a = _run(pair, _request(method, budget=10 if method == "gradient" else 40))
    _, b = _run(pair, _request(method, budget=10 if method == "gradient" else 40))
    _, c = _run(pair, _request(method, budget=10 if method == "gradient" else 40, seed=8))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.latents, b.latents)
    assert not np.array_equal(a.latents, c.latents)


def test_progress_events_and_previews(pair: ModelPair) -> None:
    progress, result = _run(pair, _request("gradient", budget=10, preview_every=5))
    assert [p.step for p in progress] == list(range(1, 11))
    assert [p.step for p in progress if p.preview is not None] == [5, 10]
    assert progress[4].preview.shape == (2, SIZE, SIZE, 3) and progress[4].preview.dtype == np.uint8
    assert all(b.elapsed >= a.elapsed for a, b in itertools.pairwise(progress))
    assert progress[-1].evaluations == result.evaluations == 20
    evolution, _ = _run(pair, _request("genetic", budget=40, preview_every=2))
    assert [p.step for p in evolution if p.preview is not None] == [2, 4]
    assert np.all(np.isfinite(evolution[-1].activation))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"method": "annealing"}, "method"),
        ({"objective": neuron(NEURONS)}, "neurons"),
        ({"n_images": 0}, "n_images"),
        ({"budget": 0}, "budget"),
        ({"preview_every": -1}, "preview_every"),
    ],
)
def test_invalid_requests_are_refused_at_submit(pair: ModelPair, change: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        change = dict(change)
        SynthesisScheduler("cpu").submit(pair, _request(change.pop("method", "gradient"), **change))


def test_helpers_render_and_score(pair: ModelPair) -> None:
    z = pair.prior.sample_latents(5, torch.Generator().manual_seed(0))
    images = render_latents(pair, z)
    assert images.shape == (5, SIZE, SIZE, 3) and images.dtype == np.uint8
    scores, rates = score_latents(pair, z.numpy(), neuron(3))
    assert scores.shape == (5,) and rates.shape == (5, NEURONS)
    np.testing.assert_allclose(scores, rates[:, 3])


def test_naive_eager_loop_and_synthesize(pair: ModelPair) -> None:
    naive = naive_synthesis(pair, _request("gradient", budget=15), "cpu")
    direct = synthesize(pair, _request("gradient", budget=15), "cpu")
    assert naive.images.shape == direct.images.shape == (2, SIZE, SIZE, 3)
    assert naive.evaluations == direct.evaluations == 30
    evo = naive_synthesis(pair, _request("cmaes", budget=30), "cpu")
    assert evo.evaluations == 2 * 30


# ------------------------------------------------------------------------------------------------
# The scheduler: batching, isolation, admission, cancellation
# ------------------------------------------------------------------------------------------------


def test_concurrent_jobs_share_batched_steps(pair: ModelPair) -> None:
    ticks: list[TickInfo] = []
    other = ModelPair(pair.twin, _tiny_prior(), pair.card, key="tiny|other-prior")
    scheduler = SynthesisScheduler("cpu", on_tick=ticks.append)
    scheduler.pause()
    with scheduler:
        jobs = [scheduler.submit(pair, _request("gradient", budget=8, seed=s)) for s in range(3)]
        jobs.append(scheduler.submit(pair, _request("cmaes", budget=40)))
        jobs.append(scheduler.submit(other, _request("gradient", budget=8)))
        scheduler.resume()
        results = [job.result(timeout=60) for job in jobs]
    stats = scheduler.stats()
    assert stats.completed == 5 and stats.failed == 0
    # Three gradient jobs on one pair stepped as one batch; the evolution job and the other pair apart.
    assert stats.max_jobs_per_batch == 3 and stats.occupancy[3] == 8
    grouped = {(t.key, t.method, t.jobs, t.images) for t in ticks}
    assert grouped == {
        ("tiny|dcgan", "gradient", 3, 6),
        ("tiny|dcgan", "evolution", 1, 20),
        ("tiny|other-prior", "gradient", 1, 2),
    }
    assert all(r.images.shape == (2, SIZE, SIZE, 3) for r in results)


def test_batching_does_not_change_a_jobs_result(pair: ModelPair) -> None:
    _, alone = _run(pair, _request("gradient", budget=8))
    scheduler = SynthesisScheduler("cpu")
    scheduler.pause()
    job = scheduler.submit(pair, _request("gradient", budget=8))
    for seed in (1, 2):
        scheduler.submit(pair, _request("gradient", budget=8, seed=seed, objective=neuron(seed)))
    scheduler.run_until_idle()
    batched = job.result(timeout=0)
    np.testing.assert_allclose(batched.latents, alone.latents, rtol=1e-4, atol=1e-4)


class _NanAfter(Objective):
    """Neuron 0, until the objective has been evaluated ``after`` times; then NaN."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def score(
        self, rates: torch.Tensor, images: torch.Tensor | None, groups: torch.Tensor | None
    ) -> torch.Tensor:
        self.calls += 1
        out = rates[:, 0]
        return out * float("nan") if self.calls > self.after else out

    @property
    def target(self) -> int:
        return 0

    @property
    def neurons(self) -> list[int]:
        return [0]


class _Raises(_NanAfter):
    def score(
        self, rates: torch.Tensor, images: torch.Tensor | None, groups: torch.Tensor | None
    ) -> torch.Tensor:
        raise RuntimeError("objective blew up")


def _bad_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    raise ValueError("transform exploded")


@pytest.mark.parametrize(
    "bad",
    [
        _request("gradient", budget=8, objective=_NanAfter(3)),
        _request("gradient", budget=8, objective=_Raises(0)),
        _request("gradient", budget=8, transforms=_bad_transform),  # fails the batched step itself
        _request("cmaes", budget=40, objective=_NanAfter(2)),
    ],
    ids=["nan", "raises", "batch-level", "evolution-nan"],
)
def test_a_failing_job_fails_alone(pair: ModelPair, bad: SynthesisRequest) -> None:
    scheduler = SynthesisScheduler("cpu")
    scheduler.pause()
    good = [scheduler.submit(pair, _request(bad.method, budget=bad.budget, seed=s)) for s in (1, 2)]
    failing = scheduler.submit(pair, bad)
    scheduler.run_until_idle()
    # A NaN objective on finite rates is the objective's fault (OUT_OF_RANGE), not the models'.
    with pytest.raises((SynthesisFailed, OutOfRange), match=r"overflowed|blew up|exploded"):
        failing.result(timeout=0)
    assert failing.state == "failed"
    for job, seed in zip(good, (1, 2), strict=True):
        _, alone = _run(pair, _request(bad.method, budget=bad.budget, seed=seed))
        np.testing.assert_allclose(job.result(timeout=0).latents, alone.latents, rtol=1e-4, atol=1e-4)
    assert scheduler.stats().failed == 1 and scheduler.stats().completed == 2


def test_admission_limit(pair: ModelPair) -> None:
    scheduler = SynthesisScheduler("cpu", max_jobs=2)
    scheduler.pause()
    first = scheduler.submit(pair, _request("gradient", budget=2))
    scheduler.submit(pair, _request("gradient", budget=2))
    with pytest.raises(ResourceExhausted, match="limit of 2"):
        scheduler.submit(pair, _request("gradient", budget=2))
    scheduler.run_until_idle()
    assert first.result(timeout=0).steps == 2
    scheduler.submit(pair, _request("gradient", budget=2))  # room again once jobs leave


def test_cancel_stops_within_one_step(pair: ModelPair) -> None:
    with SynthesisScheduler("cpu") as scheduler:
        job = scheduler.submit(pair, _request("gradient", budget=100_000))
        bystander = scheduler.submit(pair, _request("gradient", budget=30))
        seen = 0
        with pytest.raises(Cancelled):
            for event in job.events(timeout=30):
                seen += 1
                if event.step >= 3 and not job.cancelled:
                    at_cancel = job.step
                    job.cancel()
        assert job.wait(5) and job.state == "cancelled"
        assert job.step <= at_cancel + 1
        assert bystander.result(timeout=60).steps == 30


def test_cancel_before_start_and_deadline(pair: ModelPair) -> None:
    scheduler = SynthesisScheduler("cpu")
    scheduler.pause()
    queued = scheduler.submit(pair, _request("gradient", budget=5))
    queued.cancel()
    late = scheduler.submit(pair, _request("cmaes", budget=10**7, deadline=time.monotonic() + 0.3))
    started = time.monotonic()
    scheduler.run_until_idle()
    with pytest.raises(Cancelled):
        queued.result(timeout=0)
    assert queued.step == 0
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=0)
    assert time.monotonic() - started < 10


def test_stop_fails_queued_jobs(pair: ModelPair) -> None:
    scheduler = SynthesisScheduler("cpu").start()
    scheduler.pause()
    job = scheduler.submit(pair, _request("gradient", budget=5))
    scheduler.stop()
    with pytest.raises(Unavailable):
        job.result(timeout=1)
    with pytest.raises(Unavailable):
        scheduler.submit(pair, _request("gradient", budget=5))


def test_jobs_submitted_from_many_threads(pair: ModelPair) -> None:
    with SynthesisScheduler("cpu", max_jobs=8) as scheduler:
        results: list[SynthesisResult] = []

        def client(seed: int) -> None:
            results.append(
                scheduler.submit(pair, _request("gradient", budget=6, seed=seed)).result(timeout=60)
            )

        threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 6 and scheduler.stats().completed == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_gpu(stored: tuple, pair: ModelPair) -> None:
    twin, card = load_differentiable_twin(stored[0], "cuda")
    gpu_pair = ModelPair(twin, _tiny_prior(), card, key="gpu")
    for method in ("gradient", "cmaes"):
        with SynthesisScheduler("cuda") as scheduler:
            jobs = [scheduler.submit(gpu_pair, _request(method, seed=s)) for s in range(3)]
            results = [job.result(timeout=120) for job in jobs]
        for result in results:
            assert result.images.shape == (2, SIZE, SIZE, 3)
            # The reported rates are the CPU twin's on the same pixels (TF32 convolutions aside).
            with torch.no_grad():
                on_cpu = pair.twin(torch.from_numpy(result.images).float()).numpy()
            np.testing.assert_allclose(result.rates, on_cpu, rtol=1e-2, atol=1e-3)
            assert np.median(result.relative_activation) > 0.9
