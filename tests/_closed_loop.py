"""Closed-loop test helpers shared by several test files: the tiny store's names, natural images and an
in-process server (the ``store_root`` fixture itself lives in conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from neurotwin.engines.closed_loop import ClosedLoopEngine
from neurotwin.server import closed_loop as service
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore
from PIL import Image

from tests._models import make_predictor

GENERATOR = "tiny-gan"
TWIN = "tiny"
NEURONS = 5


def make_closed_loop_store(root: Path) -> Path:
    """A model store with a tiny DCGAN (8-d latent, 16 px) and a tiny 5-neuron ONNX twin (32 px)."""
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator

    torch.manual_seed(0)
    generator = DCGANGenerator(latent_dim=8, resolution=16, width=8)
    with ModelStore(root).new_version(GENERATORS, GENERATOR) as folder:
        save_generator(generator, folder, GENERATOR, description="tiny test generator")
    make_predictor(root, TWIN, neurons=NEURONS, size=32)
    return root


def natural_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(store_root: Path, journal: str, **settings: object) -> tuple[GrpcServer, ClosedLoopEngine]:
    server = GrpcServer(ServerSettings(port=0, metrics_port=0, grace_seconds=2))
    options = {"default_generator": GENERATOR, "max_sessions": 4, **settings}
    engine = service.attach(server, service.Settings(model_store=str(store_root), journal=journal, **options))
    server.start()
    return server, engine
