"""One registry for every service, over real loopback gRPC: Predict, Synthesize and closed-loop
sessions on one server get their models from the same registry, so a version refused for one
(all-NaN outputs, flipped weight bytes) is refused for all, and the last good version keeps serving
in each; a durable session keeps the version it was made with after a newer good one arrives."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from neurotwin.client import PredictorClient
from neurotwin.client.closed_loop import ClosedLoopClient
from neurotwin.client.synthesizer import SynthesizerClient
from neurotwin.runtimes.generators import DCGANGenerator, save_generator
from neurotwin.server import closed_loop, predictor, synthesizer
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

from tests._broken_models import copy_version, flip_weight_bytes, nan_predictor
from tests._models import make_predictor, random_images, reference_rates
from tests._serving import metric_value, metrics_text, wait_until

NEURONS = 5


def _make_gan(root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    gan = DCGANGenerator(latent_dim=8, resolution=32, width=8).eval()
    with ModelStore(root).new_version(GENERATORS, "gan") as folder:
        save_generator(gan, folder, "gan", description="test generator (random weights)")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[GrpcServer]:
    store = tmp_path / "store"
    make_predictor(store, seed=0)
    _make_gan(store, seed=0)
    grpc_server = GrpcServer(ServerSettings(port=0, metrics_port=0, grace_seconds=2))
    registry = predictor.attach(grpc_server, predictor.Settings(model_store=str(store), poll_seconds=0.05))
    service = synthesizer.attach(
        grpc_server,
        synthesizer.Settings(model_store=str(store), default_generator="gan", device="cpu", parity_images=2),
    )
    engine = closed_loop.attach(
        grpc_server,
        closed_loop.Settings(
            model_store=str(store), journal=str(tmp_path / "journal.sqlite3"), default_generator="gan"
        ),
    )
    assert service.models is registry and engine.models.registry is registry
    grpc_server.start()
    try:
        yield grpc_server
    finally:
        grpc_server.stop(0)


def _synthesize(address: str) -> tuple[int, int]:
    with SynthesizerClient(address, timeout=60) as client:
        result = client.synthesize("tiny", 0, method="gradient", budget=2, num_images=1, seed=1)
    assert np.isfinite(result.images[0].activation)
    return result.model_version, result.generator_version


def _guided_session(client: ClosedLoopClient) -> str:
    return client.create_session(
        neuron_count=NEURONS, population_size=4, twin="tiny", candidates_per_presentation=2, image_size=32
    ).session_id


def _ask_and_tell(client: ClosedLoopClient, session_id: str) -> None:
    generation = client.ask(session_id)
    for stimulus in generation.stimuli:
        assert len(stimulus.predicted_rates) == 1 and np.isfinite(stimulus.predicted_score)
    responses = {s.stimulus_id: np.full(NEURONS, 1.0 + i) for i, s in enumerate(generation.stimuli)}
    assert client.tell(session_id, generation.generation, responses).generation_complete


def test_refused_versions_are_refused_for_every_service(tmp_path: Path, server: GrpcServer) -> None:
    store = tmp_path / "store"
    address = f"127.0.0.1:{server.port}"
    good = ModelStore(store).resolve(PREDICTORS, "tiny", 1)
    images = random_images(2, seed=3)
    assert _synthesize(address) == (1, 1)
    with PredictorClient(address) as client, ClosedLoopClient(address, timeout=60) as loop:
        early = _guided_session(loop)
        _ask_and_tell(loop, early)
        nan_predictor(store)
        copy_version(store, good, flip_weight_bytes)
        wait_until(
            lambda: (
                {v.version: v.state for v in client.get_model("tiny").status.versions}
                == {1: "READY", 2: "FAILED", 3: "FAILED"}
            ),
            timeout=60,
            what="both bad versions refused",
        )
        result = client.predict(images, "tiny")
        assert result.version == 1
        np.testing.assert_allclose(result.rates, reference_rates(good, images), rtol=1e-5)
        # "Newest" is the newest validated version for every service, not the newest on disk.
        assert _synthesize(address) == (1, 1)
        late = _guided_session(loop)
        assert loop.get_session(late).settings.guidance.twin.version == 1
        for session_id in (early, late):
            _ask_and_tell(loop, session_id)
        # A good version 4 takes over for new work; the sessions keep the version they were made with.
        make_predictor(store, seed=1)
        wait_until(lambda: client.predict(images, "tiny").version == 4, timeout=60, what="version 4 serving")
        assert _synthesize(address) == (4, 1)
        assert loop.get_session(_guided_session(loop)).settings.guidance.twin.version == 4
        _ask_and_tell(loop, early)
        assert loop.get_session(early).settings.guidance.twin.version == 1
    # A generator version whose weights changed after they were recorded: the previous one serves.
    gan = ModelStore(store).resolve(GENERATORS, "gan", 1)
    with ModelStore(store).new_version(GENERATORS, "gan") as folder:
        for path in gan.path.iterdir():
            shutil.copy(path, folder / path.name)
        weights = bytearray((folder / "weights.pt").read_bytes())
        weights[-2048:-1024] = bytes(b ^ 0xFF for b in weights[-2048:-1024])
        (folder / "weights.pt").write_bytes(bytes(weights))
    assert _synthesize(address) == (4, 1)
    with ClosedLoopClient(address, timeout=60) as loop:
        session = loop.create_session(neuron_count=NEURONS, population_size=4, image_size=32)
        assert session.settings.generator.version == 1
    text = metrics_text(server)
    assert metric_value(text, "neurotwin_model_refusals_total", kind="predictors", model="tiny") == 2
    assert metric_value(text, "neurotwin_model_refusals_total", kind="generators", model="gan") == 1
