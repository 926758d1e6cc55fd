"""Closed-loop sessions that could never run, or that would read the server's files, are refused at
CreateSession with INVALID_ARGUMENT naming the limit (real server over loopback, real generator)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurotwin.client.closed_loop import ClosedLoopClient
from neurotwin.errors import InvalidInput
from neurotwin.server import closed_loop as service
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings
from neurotwin.store import GENERATORS, ModelStore
from PIL import Image

GENERATOR = "tiny-gan"
NEURONS = 3


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from neurotwin.runtimes.generators import DCGANGenerator, save_generator

    root = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    with ModelStore(root).new_version(GENERATORS, GENERATOR) as folder:
        save_generator(DCGANGenerator(latent_dim=8, resolution=16, width=8), folder, GENERATOR)
    return root


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve(store_root: Path, journal: Path, **settings: object) -> GrpcServer:
    server = GrpcServer(ServerSettings(port=0, metrics_port=-1, grace_seconds=1))
    service.attach(
        server,
        service.Settings(
            model_store=str(store_root), journal=str(journal), default_generator=GENERATOR, **settings
        ),
    )
    server.start()
    return server


@pytest.fixture
def client(store_root: Path, tmp_path: Path) -> Iterator[ClosedLoopClient]:
    server = _serve(store_root, tmp_path / "journal.sqlite3")
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=60, retries=0)
    yield client
    client.close()
    server.stop(0)


def _create(client: ClosedLoopClient, **options: object) -> str:
    return client.create_session(neuron_count=NEURONS, **options).session_id  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # Every Ask would journal ~0.8 GB (the population 1000 x 512 px).
        ({"population_size": 1000, "image_size": 512}, "max_generation_bytes"),
        # Bounded, but the whole session would not fit the journal budget.
        ({"population_size": 100, "image_size": 256, "max_generations": 100000}, "max_session_bytes"),
        ({"optimizer_options": {"sigma0": 1e308}}, "sigma0"),
        ({"optimizer_options": {"sigma0": 0.0}}, "sigma0"),
        ({"optimizer": "ga", "optimizer_options": {"latent_std": 1e300}}, "latent_std"),
        ({"optimizer": "ga", "optimizer_options": {"mutation_size": -1}}, "mutation_size"),
        ({"description": "x" * 5000}, "max_description_chars"),
        ({"metadata": {"session_description": "y" * 100_000}}, "max_metadata_bytes"),
    ],
    ids=[
        "generation-bytes",
        "session-bytes",
        "sigma0-huge",
        "sigma0-zero",
        "ga-std",
        "ga-mutation",
        "description",
        "metadata",
    ],
)
def test_sessions_that_cannot_run_are_refused(
    client: ClosedLoopClient, options: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        _create(client, **options)
    # Nothing was journaled, and listing sessions still works for everyone.
    assert client.list_sessions() == []


def test_sessions_within_limits_still_run(client: ClosedLoopClient) -> None:
    sid = _create(
        client,
        population_size=40,
        image_size=128,
        optimizer_options={"sigma0": 2.0},
        description="d" * 4096,
        max_generations=10,
    )
    generation = client.ask(sid)
    told = {s.stimulus_id: np.linspace(0, 1, NEURONS).astype(np.float32) for s in generation.stimuli}
    assert client.tell(sid, 0, told).generation_complete


def test_natural_source_is_refused_without_a_root(client: ClosedLoopClient, tmp_path: Path) -> None:
    folder = tmp_path / "server-files"
    folder.mkdir()
    (folder / "secret.png").write_bytes(_png(np.full((16, 16, 3), 7, np.uint8)))
    for source in (str(folder), "/etc", "server-files"):
        with pytest.raises(InvalidInput, match="no natural-image root"):
            _create(client, natural_source=source, natural_per_generation=1)


def test_natural_source_stays_inside_the_root(store_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "naturals"
    (root / "set").mkdir(parents=True)
    inside = np.full((16, 16, 3), 40, np.uint8)
    (root / "set" / "a.png").write_bytes(_png(inside))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(np.full((16, 16, 3), 200, np.uint8)))
    # A link inside the root to a file outside it, and one to a folder outside it.
    (root / "set" / "leak.png").symlink_to(outside / "secret.png")
    (root / "set" / "more").symlink_to(outside, target_is_directory=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    server = _serve(store_root, tmp_path / "journal.sqlite3", natural_root=str(root))
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=60, retries=0)
    try:
        for source in ("../outside", str(outside), "escape", "set/../../outside"):
            with pytest.raises(InvalidInput, match="outside the server's natural-image root"):
                _create(client, natural_source=source, natural_per_generation=1)
        sid = _create(client, natural_source="set", natural_per_generation=1, population_size=4)
        assert client.get_session(sid).natural_image_count == 1
        shown = [s for s in client.ask(sid).stimuli if s.kind == "natural"]
        assert len(shown) == 1
        assert int(shown[0].pixels().mean()) == 40
    finally:
        client.close()
        server.stop(0)


def test_natural_images_decode_with_a_pixel_limit(client: ClosedLoopClient) -> None:
    big = _png(np.zeros((3000, 3000, 3), np.uint8))
    with pytest.raises(InvalidInput, match="exceeds the limit of 4194304 decoded pixels"):
        _create(client, natural_images=[big], natural_per_generation=1)
    small = _png(np.zeros((64, 64, 3), np.uint8))
    sid = _create(client, natural_images=[small], natural_per_generation=1, population_size=4)
    assert client.get_session(sid).natural_image_count == 1
