"""One registry for every service, over real loopback gRPC: Predict and Synthesize on one server get
their models from the same registry, so a version refused for one (all-NaN outputs, flipped weight
bytes) is refused for all, and the last good version keeps serving in both."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from neurotwin.client import PredictorClient
from neurotwin.client.synthesizer import SynthesizerClient
from neurotwin.runtimes.generators import DCGANGenerator, save_generator
from neurotwin.server import predictor, synthesizer
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore

from tests._broken_models import copy_version, flip_weight_bytes, nan_predictor
from tests._models import make_predictor, random_images, reference_rates
from tests._serving import metric_value, metrics_text, wait_until


def _make_gan(root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    gan = DCGANGenerator(latent_dim=8, resolution=32, width=8).eval()
    with ModelStore(root).new_version(GENERATORS, "gan") as folder:
        save_generator(gan, folder, "gan", description="test generator (random weights)")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[GrpcServer]:
    make_predictor(tmp_path, seed=0)
    _make_gan(tmp_path, seed=0)
    grpc_server = GrpcServer(ServerSettings(port=0, metrics_port=0, grace_seconds=2))
    registry = predictor.attach(grpc_server, predictor.Settings(model_store=str(tmp_path), poll_seconds=0.05))
    service = synthesizer.attach(
        grpc_server,
        synthesizer.Settings(
            model_store=str(tmp_path), default_generator="gan", device="cpu", parity_images=2
        ),
    )
    assert service.models is registry
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


def test_refused_versions_are_refused_for_predict_and_synthesize(tmp_path: Path, server: GrpcServer) -> None:
    address = f"127.0.0.1:{server.port}"
    good = ModelStore(tmp_path).resolve("predictors", "tiny", 1)
    images = random_images(2, seed=3)
    assert _synthesize(address) == (1, 1)
    with PredictorClient(address) as client:
        nan_predictor(tmp_path)
        flipped = copy_version(tmp_path, good)
        flip_weight_bytes(flipped)
        wait_until(
            lambda: (
                {v.version: v.state for v in client.get_model("tiny").status.versions}
                == {1: "READY", 2: "FAILED", 3: "FAILED"}
            ),
            what="both bad versions refused",
        )
        result = client.predict(images, "tiny")
        assert result.version == 1
        np.testing.assert_allclose(result.rates, reference_rates(good, images), rtol=1e-5)
    # The synthesizer resolves "newest" to the newest validated version, not the newest on disk.
    assert _synthesize(address) == (1, 1)
    # A generator version whose weights changed after they were recorded: the previous one serves.
    gan = ModelStore(tmp_path).resolve(GENERATORS, "gan", 1)
    with ModelStore(tmp_path).new_version(GENERATORS, "gan") as folder:
        for path in gan.path.iterdir():
            shutil.copy(path, folder / path.name)
        weights = bytearray((folder / "weights.pt").read_bytes())
        weights[-2048:-1024] = bytes(b ^ 0xFF for b in weights[-2048:-1024])
        (folder / "weights.pt").write_bytes(bytes(weights))
    assert _synthesize(address) == (1, 1)
    text = metrics_text(server)
    assert metric_value(text, "neurotwin_model_refusals_total", kind="predictors", model="tiny") == 2
    assert metric_value(text, "neurotwin_model_refusals_total", kind="generators", model="gan") == 1
