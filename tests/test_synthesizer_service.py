"""The stimulus-synthesis service over real loopback gRPC, with a tiny twin and generators built here.

Every method (gradient, CMA-ES, genetic), objective (single, weighted, one-hot, diversity) and prior
(GAN-type generator, Fourier pixels) must improve its objective; progress streams with previews; a
cancelled call or a passed deadline stops the engine within one step; the admission limit answers
RESOURCE_EXHAUSTED; seeds reproduce; ``neurotwin synthesize`` writes PNGs and a contact sheet.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neurotwin.cli import main as cli_main
from neurotwin.client.synthesizer import Progress, Synthesis, SynthesizerClient, build_request
from neurotwin.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    ResourceExhausted,
)
from neurotwin.runtimes.generators import DCGANGenerator, save_generator
from neurotwin.server import synthesizer
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore
from PIL import Image
from torch import nn

from tests._models import export_onnx, make_card, neuron_stats_for, write_predictor
from tests._serving import metric_value, metrics_text

NEURONS = 5
SIZE = 32
LATENT = 16


class _Twin(nn.Module):
    """A small convolutional twin with a spatial readout, so each neuron has a preferred pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.readout = nn.Linear(16 * (SIZE // 4) ** 2, NEURONS)
        with torch.no_grad():
            # Default initialization gives nearly flat tuning; a larger readout gives a useful range.
            self.readout.weight.mul_(4.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return nn.functional.softplus(self.readout(x.flatten(1)))


def _make_twin(root: Path) -> None:
    torch.manual_seed(1)
    model_bytes = export_onnx(_Twin().eval(), SIZE)
    # Random-noise images stand in for the natural images whose maxima the card records.
    stats = neuron_stats_for(model_bytes, SIZE, images=64)
    write_predictor(root, "twin", model_bytes, make_card("twin", NEURONS, SIZE, stats, seed=1))


def _make_gan(root: Path, name: str, resolution: int, width: int) -> None:
    torch.manual_seed(2)
    gan = DCGANGenerator(latent_dim=LATENT, resolution=resolution, width=width)
    with torch.no_grad():
        # Freshly initialized DCGANs map every latent to nearly the same grey image; larger weights
        # make the image depend on the latent, as in a trained generator.
        for module in gan.modules():
            if isinstance(module, (nn.ConvTranspose2d, nn.Linear)):
                module.weight.mul_(3.0)
    gan.eval()
    with ModelStore(root).new_version(GENERATORS, name) as folder:
        save_generator(gan, folder, name, description="test generator (random weights)")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth-store")
    _make_twin(root)
    _make_gan(root, "gan", SIZE, 8)
    # 128 px and wider: one step takes tens of milliseconds, long enough to see when work stops.
    _make_gan(root, "slow-gan", 128, 16)
    return root


def _settings(store: Path, **overrides: object) -> synthesizer.Settings:
    values: dict[str, object] = {
        "model_store": str(store),
        "default_generator": "gan",
        "device": "cpu",
        "max_jobs": 2,
        "max_images": 8,
        "max_gradient_steps": 100_000,
        "parity_images": 2,
    }
    values.update(overrides)
    return synthesizer.Settings(**values)  # type: ignore[arg-type]


def _start(
    store: Path, server: dict[str, object] | None = None, **overrides: object
) -> tuple[GrpcServer, synthesizer.SynthesizerService]:
    grpc_server = GrpcServer(
        ServerSettings(**{"port": 0, "metrics_port": 0, "grace_seconds": 2, **(server or {})})
    )
    service = synthesizer.attach(grpc_server, _settings(store, **overrides))
    grpc_server.start()
    return grpc_server, service


@pytest.fixture(scope="module")
def served(store: Path) -> Iterator[tuple[GrpcServer, synthesizer.SynthesizerService]]:
    grpc_server, service = _start(store)
    yield grpc_server, service
    grpc_server.stop(0)


@pytest.fixture(scope="module")
def client(served: tuple[GrpcServer, synthesizer.SynthesizerService]) -> Iterator[SynthesizerClient]:
    with SynthesizerClient(f"127.0.0.1:{served[0].port}", timeout=60) as c:
        yield c


def _run(client: SynthesizerClient, neurons: object, **options: object) -> tuple[list[Progress], Synthesis]:
    events = list(client.stream("twin", neurons, **options))  # type: ignore[arg-type]
    *progress, result = events
    assert isinstance(result, Synthesis)
    assert progress and all(isinstance(p, Progress) for p in progress)
    return progress, result  # type: ignore[return-value]


def _start_objective(
    client: SynthesizerClient, neurons: object, method: str, **options: object
) -> np.ndarray:
    """The objective after the smallest budget (one step or one generation) from the same seed, scored
    exactly as the final images are (quantized, without the robustness transforms of progress events)."""
    smallest = {"gradient": 1, "cmaes": 40, "genetic": 20}[method]
    _, result = _run(client, neurons, method=method, **{**options, "budget": smallest})
    return np.array([img.objective for img in result.images])


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


# -- methods, priors, objectives ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "generator", "budget"),
    [
        ("gradient", "gan", 40),
        ("gradient", "pixels", 40),
        ("cmaes", "gan", 400),
        ("genetic", "gan", 400),
        ("cmaes", "pixels", 200),
        ("genetic", "pixels", 200),
    ],
)
def test_every_method_and_prior_improves(
    client: SynthesizerClient, store: Path, method: str, generator: str, budget: int
) -> None:
    options = {"method": method, "generator": generator, "num_images": 2, "seed": 3}
    _, result = _run(client, 2, budget=budget, **options)
    start = _start_objective(client, 2, **options)
    final = np.array([img.objective for img in result.images])
    assert np.all(final > start + 0.01), (start, final)
    # The result is complete and self-consistent.
    assert result.neuron_ids == [f"n{i:03d}" for i in range(NEURONS)]
    assert result.target_neuron == 2 and result.model == "twin" and result.model_version == 1
    assert result.generator == generator and result.generator_version == (0 if generator == "pixels" else 1)
    latent_dim = LATENT if generator == "gan" else 3 * SIZE * (SIZE // 2 + 1) * 2
    card = json.loads((store / "predictors/twin/1/card.json").read_text())
    top = card["neuron_stats"]["predicted_max"][2]
    for img in result.images:
        assert img.pixels().shape == (SIZE, SIZE, 3)
        assert img.latent.shape == (latent_dim,) and img.rates.shape == (NEURONS,)
        assert img.activation == pytest.approx(float(img.rates[2]))
        assert img.reference_max == pytest.approx(top)
        assert img.activation_ratio == pytest.approx(img.activation / top, rel=1e-5)
    if method == "gradient":
        assert result.steps == budget and result.evaluations == budget * 2
    else:
        population = {"cmaes": 40, "genetic": 20}[method]
        assert result.steps == budget // population and result.evaluations == budget * 2


@pytest.mark.parametrize(
    ("objective", "neurons", "extra"),
    [
        ("single", [4], {}),
        ("weighted", [0, 1, 3], {"weights": [1.0, -1.0, 0.5]}),
        ("one_hot", [3], {"temperature": 0.1}),
        ("single", [1], {"diversity": 2.0}),
    ],
)
def test_every_objective_improves(
    client: SynthesizerClient, objective: str, neurons: list[int], extra: dict[str, object]
) -> None:
    options = {"objective": objective, "num_images": 3, "seed": 5, **extra}
    _, result = _run(client, neurons, budget=40, **options)
    start = _start_objective(client, neurons, "gradient", **options)
    final = np.array([img.objective for img in result.images])
    assert final.mean() > start.mean() + 0.01, (start, final)
    expected_target = neurons[0] if objective != "weighted" else 0
    assert result.target_neuron == expected_target
    if objective == "one_hot":
        # The score is the target's share of the population's softmax.
        rates = np.stack([img.rates for img in result.images]) / 0.1
        share = np.exp(rates[:, 3] - rates.max(1)) / np.exp(rates - rates.max(1, keepdims=True)).sum(1)
        assert final == pytest.approx(share, rel=1e-3, abs=1e-5)
    if extra.get("diversity"):
        pixels = result.pixels().reshape(3, -1).astype(np.float64)
        assert not np.array_equal(pixels[0], pixels[1])


def test_diversity_spreads_images(client: SynthesizerClient) -> None:
    def mean_correlation(result: Synthesis) -> float:
        x = result.pixels().reshape(len(result.images), -1).astype(np.float64)
        c = np.corrcoef(x)
        return float(c[~np.eye(len(x), dtype=bool)].mean())

    _, plain = _run(client, [1], budget=40, num_images=3, seed=9)
    _, diverse = _run(client, [1], budget=40, num_images=3, seed=9, diversity=5.0)
    assert mean_correlation(diverse) < mean_correlation(plain)


# -- streaming, seeds --------------------------------------------------------------------------------


def test_progress_streams_with_previews(client: SynthesizerClient) -> None:
    progress, result = _run(
        client, 0, budget=20, num_images=2, preview_every=5, image_format="jpeg", image_size=48
    )
    assert [p.step for p in progress] == list(range(1, 21))
    assert all(p.total_steps == 20 for p in progress)
    assert [p.evaluations for p in progress] == [2 * s for s in range(1, 21)]
    elapsed = [p.elapsed_seconds for p in progress]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= result.elapsed_seconds + 1e-6
    with_previews = [p.step for p in progress if p.previews]
    assert with_previews == [5, 10, 15, 20]
    for p in progress:
        assert len(p.objective) == 2 and len(p.activation) == 2
        for data in p.previews:
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and image.size == (48, 48)
    assert len(progress[4].previews) == 2
    for img in result.images:
        assert Image.open(io.BytesIO(img.image)).format == "JPEG"
        assert img.pixels().shape == (48, 48, 3)


def test_seed_reproduces(client: SynthesizerClient) -> None:
    for method, budget in (("gradient", 15), ("cmaes", 120), ("genetic", 120)):
        _, first = _run(client, 1, method=method, budget=budget, num_images=2, seed=42)
        _, again = _run(client, 1, method=method, budget=budget, num_images=2, seed=42)
        _, other = _run(client, 1, method=method, budget=budget, num_images=2, seed=43)
        assert [i.image for i in first.images] == [i.image for i in again.images]
        pairs = zip(first.images, again.images, strict=True)
        assert all(np.array_equal(a.latent, b.latent) for a, b in pairs)
        assert [i.image for i in first.images] != [i.image for i in other.images]


# -- cancellation, deadlines, admission ---------------------------------------------------------------


def _latest_job(service: synthesizer.SynthesizerService, after: int) -> object:
    _wait(lambda: len(service.recent) > after)
    return service.recent[-1].job


def test_client_cancel_stops_work_within_one_step(
    served: tuple[GrpcServer, synthesizer.SynthesizerService], client: SynthesizerClient
) -> None:
    server, service = served
    before = service.scheduler.stats().cancelled
    known = len(service.recent)
    stream = client.stream("twin", 0, generator="slow-gan", budget=50_000, num_images=2)
    for event in stream:
        assert isinstance(event, Progress)
        if event.step >= 3:
            break
    stream.close()  # cancels the call
    job = _latest_job(service, known)
    _wait(lambda: job.cancelled, timeout=5)  # the call's callback reached the engine
    step_at_cancel = job.step
    _wait(lambda: job.done, timeout=5)
    # The step running when the cancel arrived may finish; no further step starts.
    assert job.step <= step_at_cancel + 1
    assert job.state == "cancelled" and job.step < 50
    assert service.scheduler.stats().cancelled == before + 1
    time.sleep(0.2)
    assert job.step <= step_at_cancel + 1
    _wait(
        lambda: (
            metric_value(
                metrics_text(server),
                "neurotwin_synthesizer_jobs_total",
                method="gradient",
                outcome="cancelled",
            )
            >= 1
        )
    )


def test_deadline_stops_work(
    served: tuple[GrpcServer, synthesizer.SynthesizerService], client: SynthesizerClient
) -> None:
    _, service = served
    known = len(service.recent)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.synthesize("twin", 0, generator="slow-gan", budget=50_000, num_images=2, timeout=1.0)
    job = _latest_job(service, known)
    _wait(lambda: job.done, timeout=5)
    assert job.state == "deadline"
    assert isinstance(job.error, DeadlineExceeded)
    steps = job.step
    assert time.monotonic() - started < 4
    time.sleep(0.2)
    assert job.step == steps


def test_admission_limit(
    served: tuple[GrpcServer, synthesizer.SynthesizerService], client: SynthesizerClient
) -> None:
    server, service = served
    streams = [client.stream("twin", 0, generator="slow-gan", budget=50_000, num_images=1) for _ in range(2)]
    for stream in streams:
        assert isinstance(next(stream), Progress)  # both admitted and stepping
    assert service.scheduler.load == 2
    rejected_before = metric_value(
        metrics_text(server), "neurotwin_synthesizer_jobs_rejected_total", reason="full"
    )
    with pytest.raises(ResourceExhausted, match="limit of 2"):
        client.synthesize("twin", 1, budget=5)
    for stream in streams:
        stream.close()
    _wait(lambda: service.scheduler.load == 0)
    text = metrics_text(server)
    rejected = metric_value(text, "neurotwin_synthesizer_jobs_rejected_total", reason="full")
    assert rejected == rejected_before + 1
    assert (
        metric_value(text, "neurotwin_grpc_requests_total", code="RESOURCE_EXHAUSTED", method="Synthesize")
        >= 1
    )
    # Capacity is back.
    _, result = _run(client, 1, budget=5)
    assert len(result.images) == 1


def test_concurrent_requests_share_batched_steps(
    served: tuple[GrpcServer, synthesizer.SynthesizerService], client: SynthesizerClient
) -> None:
    server, service = served
    results: list[Synthesis] = []
    service.scheduler.pause()
    try:
        threads = [
            threading.Thread(target=lambda s=s: results.append(client.synthesize("twin", s, budget=10)))
            for s in range(2)
        ]
        for thread in threads:
            thread.start()
        _wait(lambda: service.scheduler.load == 2)
    finally:
        service.scheduler.resume()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2
    stats = service.scheduler.stats()
    assert stats.max_jobs_per_batch >= 2 and stats.occupancy[2] >= 10
    text = metrics_text(server)
    assert metric_value(text, "neurotwin_synthesizer_batch_jobs_bucket", le="2.0") >= 10
    assert metric_value(text, "neurotwin_synthesizer_job_steps_total") > 0
    assert metric_value(text, "neurotwin_synthesizer_job_seconds_count", method="gradient") > 0
    assert "neurotwin_synthesizer_steps_per_second" in text
    assert "neurotwin_synthesizer_jobs_active" in text


# -- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("neurons", "options", "error", "text"),
    [
        (0, {"model": "nope"}, NotFound, "nope"),
        (0, {"generator": "nope"}, NotFound, "nope"),
        (0, {"generator_version": 7}, NotFound, "version 7"),
        (0, {"model_version": 9}, NotFound, "version 9"),
        (99, {}, InvalidInput, "out of range"),
        ("n999", {}, InvalidInput, "n999"),
        ([0, 1], {}, InvalidInput, "SINGLE_NEURON"),
        ([0, 1], {"objective": "weighted", "weights": [1.0]}, InvalidInput, "weights"),
        (0, {"num_images": 0}, InvalidInput, "num_images"),
        (0, {"num_images": 9}, InvalidInput, "num_images"),
        (0, {"image_format": "gif"}, InvalidInput, "image_format"),
        (0, {"image_size": 4}, InvalidInput, "image_size"),
        (0, {"image_size": 5000}, InvalidInput, "image_size"),
        (0, {"budget": 200_000}, InvalidInput, "budget"),
        (0, {"method": "cmaes", "budget": 200_000}, InvalidInput, "budget"),
        (0, {"learning_rate": float("nan")}, InvalidInput, "learning_rate"),
        (0, {"objective": "one_hot", "temperature": -1.0}, InvalidInput, "temperature"),
    ],
)
def test_invalid_requests(
    client: SynthesizerClient, neurons: object, options: dict[str, object], error: type, text: str
) -> None:
    model = str(options.pop("model", "twin"))
    with pytest.raises(error, match=text):
        client.synthesize(model, neurons, budget=int(options.pop("budget", 5)), **options)  # type: ignore[arg-type]


def test_indices_and_ids_together_are_refused(client: SynthesizerClient) -> None:
    request = build_request("twin", 0, budget=5)
    request.objective.neuron_ids.append("n001")
    with pytest.raises(InvalidInput, match="not both"):
        list(client.stream_request(request))
    by_id = build_request("twin", "n003", budget=5)
    _, result = _run_request(client, by_id)
    assert result.target_neuron == 3


def _run_request(client: SynthesizerClient, request: object) -> tuple[list[Progress], Synthesis]:
    *progress, result = list(client.stream_request(request))  # type: ignore[arg-type]
    assert isinstance(result, Synthesis)
    return progress, result  # type: ignore[return-value]


def test_list_generators(client: SynthesizerClient) -> None:
    infos = {g.name: g for g in client.list_generators()}
    assert {"gan", "slow-gan", "pixels"} <= set(infos)
    gan = infos["gan"]
    assert gan.versions == [1] and gan.architecture == "DCGANGenerator"
    assert (gan.latent_dim, gan.resolution) == (LATENT, SIZE)
    assert gan.card is not None and gan.card.hyperparameters["width"] == 8
    assert infos["pixels"].architecture == "FourierPixels"


# -- serve command, auth ---------------------------------------------------------------------------------


def test_serve_command_flags_health_and_token(store: Path) -> None:
    from neurotwin.commands import serve

    parser = argparse.ArgumentParser()
    serve.configure(parser)
    args = parser.parse_args(
        [
            "synthesizer",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--auth-tokens",
            "s3cret",
            "--model-store",
            str(store),
            "--synthesizer-max-jobs",
            "3",
            "--synthesizer-device",
            "cpu",
            "--synthesizer-default-generator",
            "gan",
            "--synthesizer-parity-images",
            "0",
        ]
    )
    server = serve.build_server(args)
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=synthesizer.SERVICE_NAME))
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        with SynthesizerClient(address, timeout=30) as anonymous:
            with pytest.raises(Exception, match="UNAUTHENTICATED"):
                anonymous.list_generators()
        with SynthesizerClient(address, token="s3cret", timeout=30) as authorized:
            result = authorized.synthesize("twin", 1, budget=3)
            assert result.images and result.generator == "gan"
    finally:
        server.stop(0)


# -- CLI -----------------------------------------------------------------------------------------------


def _natural_folder(root: Path) -> Path:
    folder = root / "naturals"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"image{i + 1:04d}.png")
    return folder


def test_cli_writes_pngs_and_contact_sheet(
    store: Path, tmp_path: Path, served: tuple[GrpcServer, synthesizer.SynthesizerService]
) -> None:
    naturals = _natural_folder(tmp_path)
    out = tmp_path / "local"
    code = cli_main(
        [
            "synthesize",
            "--model",
            "twin",
            "--neuron",
            "2",
            "--out",
            str(out),
            "--model-store",
            str(store),
            "--generator",
            "gan",
            "--budget",
            "10",
            "--num-images",
            "3",
            "--data",
            str(naturals),
            "--top",
            "4",
            "--device",
            "cpu",
            "--no-progress",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    pngs = sorted(out.glob("twin_2_gradient_*.png"))
    assert len(pngs) == 3
    assert all(Image.open(p).size == (SIZE, SIZE) for p in pngs)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] >= 4 * 128 and sheet.size[1] >= 2 * 128
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_neuron"] == "n002" and len(summary["images"]) == 3
    assert len(summary["natural_top"]) == 4
    natural = [entry["activation"] for entry in summary["natural_top"]]
    assert natural == sorted(natural, reverse=True)
    assert np.load(out / "latents.npy").shape == (3, LATENT)

    # The same through the running server (the twin is scored locally from the same store).
    remote = tmp_path / "remote"
    code = cli_main(
        [
            "synthesize",
            "--model",
            "twin",
            "--neuron",
            "n002",
            "--out",
            str(remote),
            "--model-store",
            str(store),
            "--address",
            f"127.0.0.1:{served[0].port}",
            "--method",
            "cmaes",
            "--budget",
            "80",
            "--num-images",
            "2",
            "--data",
            str(naturals),
            "--no-progress",
        ]
    )
    assert code == 0
    assert len(list(remote.glob("twin_n002_cmaes_*.png"))) == 2
    assert (remote / "contact_sheet.png").is_file()
