"""Closed-loop test helpers shared by several test files: the tiny store's names, natural images and an
in-process server (the ``store_root`` fixture itself lives in conftest.py)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from neurotwin.engines.closed_loop import ClosedLoopEngine
from neurotwin.server import closed_loop as service
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore
from PIL import Image

from tests._models import make_predictor

ROOT = Path(__file__).resolve().parents[1]
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


class ServerProcess:
    """``neurotwin serve closed-loop`` in a child process, on a port it picks and prints."""

    def __init__(self, store_root: Path, journal: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neurotwin.cli",
                "serve",
                "closed-loop",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--model-store",
                str(store_root),
                "--closed-loop-journal",
                str(journal),
                "--closed-loop-default-generator",
                GENERATOR,
                "--closed-loop-compute-threads",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=log.open("ab"),
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        self.port = 0
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line and self.proc.poll() is not None:
                break
            match = re.search(r"serving closed-loop on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return
        raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
