"""Closed-loop sessions end to end: real gRPC on loopback, real SQLite/PostgreSQL journals, real ONNX
twins and torch generators (tiny ones), real NWB/HDF5 files, and a real server process killed with
SIGKILL and restarted on its journal."""

from __future__ import annotations

import io
import math
import re
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from neurotwin.client.closed_loop import ClosedLoopClient, PendingGeneration
from neurotwin.engines.closed_loop import ClosedLoopEngine, SessionRequest, ToldResponse
from neurotwin.engines.journal import SqliteJournal, open_journal
from neurotwin.errors import FailedPrecondition, InvalidInput, NeurotwinError, NotFound, ResourceExhausted
from neurotwin.server.common import GrpcServer
from neurotwin.store import ModelStore
from PIL import Image

from tests._closed_loop import GENERATOR, NEURONS, TWIN, ServerProcess, natural_png
from tests._closed_loop import start_server as _start_server

ROOT = Path(__file__).resolve().parents[1]
POPULATION = 6


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def natural_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("natural")
    path = folder / "natural.zip"
    rng = np.random.default_rng(5)
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(7):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buffer, format="PNG")
            archive.writestr(f"img{i:02d}.png", buffer.getvalue())
        archive.writestr("readme.txt", "not an image")
    return path


@dataclass
class Served:
    server: GrpcServer
    engine: ClosedLoopEngine
    client: ClosedLoopClient


@pytest.fixture
def served(store_root: Path, tmp_path: Path, natural_zip: Path) -> Iterator[Served]:
    journal = str(tmp_path / "journal.sqlite3")
    server, engine = _start_server(store_root, journal, natural_root=str(natural_zip.parent))
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=30, retries=2, retry_delay=0.05)
    yield Served(server, engine, client)
    client.close()
    server.stop(0)


def _responses(gen: PendingGeneration, seed: int, repeats: int = 0) -> dict[str, np.ndarray]:
    """Deterministic fake responses: the same (seed, generation) gives the same values."""
    rng = np.random.default_rng([seed, gen.generation])
    shape = (len(gen.stimuli), repeats, NEURONS) if repeats else (len(gen.stimuli), NEURONS)
    values = rng.random(shape).astype(np.float32) * 5
    return {s.stimulus_id: values[i] for i, s in enumerate(gen.stimuli)}


def _create(client: ClosedLoopClient, **kwargs: object) -> str:
    options: dict[str, object] = {
        "neuron_count": NEURONS,
        "target_neurons": [1],
        "population_size": POPULATION,
    }
    options.update(kwargs)
    return client.create_session(**options).session_id


def _code(exc: pytest.ExceptionInfo[NeurotwinError]) -> grpc.StatusCode:
    return exc.value.code


# ------------------------------------------------------------------------------------------------
# Semantics


def test_ask_and_tell_are_idempotent(served: Served) -> None:
    client = served.client
    sid = _create(client, seed=11, max_generations=3)
    first = client.ask(sid)
    again = client.ask(sid)
    assert first.generation == 0 and not first.finished and len(first.stimuli) == POPULATION
    assert [(s.stimulus_id, s.sha256, s.image) for s in first.stimuli] == [
        (s.stimulus_id, s.sha256, s.image) for s in again.stimuli
    ]
    for s in first.stimuli:
        s.check()
        assert s.pixels().shape == (16, 16, 3) and s.kind == "synthetic"
    assert client.ask(sid, omit_images=True).stimuli[0].image == b""

    responses = _responses(first, 1)
    summary = client.tell(sid, 0, responses)
    assert summary.generation_complete and summary.generations_told == 1 and summary.presentations_told == 6
    best_id = max(responses, key=lambda k: responses[k][1])
    assert summary.best.stimulus_id == best_id
    assert summary.best.score == pytest.approx(float(responses[best_id][1]))
    # Telling the same thing again is a no-op with the same answer.
    repeat = client.tell(sid, 0, responses)
    assert repeat.generation_complete and repeat.presentations_told == 6
    assert (repeat.best.stimulus_id, repeat.best.score) == (summary.best.stimulus_id, summary.best.score)
    # ... also for one stimulus of it.
    one = next(iter(responses))
    assert client.tell(sid, 0, {one: responses[one]}).presentations_told == 6

    second = client.ask(sid)
    assert second.generation == 1 and second.stimulus_ids != first.stimulus_ids
    # A completed generation told different values is stale.
    with pytest.raises(FailedPrecondition, match="already complete"):
        client.tell(sid, 0, {one: responses[one] + 1})
    # A generation not asked yet.
    with pytest.raises(FailedPrecondition, match="has not been asked"):
        client.tell(sid, 2, _responses(second, 2))
    client.tell(sid, 1, _responses(second, 2))
    third = client.ask(sid)
    client.tell(sid, 2, _responses(third, 3))
    done = client.ask(sid)
    assert done.finished and done.stimuli == []
    info = client.get_session(sid)
    assert (info.status, info.generations_told, info.presentations_told) == ("finished", 3, 18)


def test_every_bad_tell_is_refused_and_stores_nothing(served: Served) -> None:
    client = served.client
    sid = _create(client, seed=3)
    gen = client.ask(sid)
    good = _responses(gen, 0)
    ids = gen.stimulus_ids
    bad_cases: list[tuple[dict[str, object], str]] = [
        ({**good, ids[0]: np.array([1, 2, np.nan, 4, 5], np.float32)}, "finite"),
        ({**good, ids[1]: np.array([1, 2, np.inf, 4, 5], np.float32)}, "finite"),
        ({**good, ids[2]: np.array([-np.inf, 2, 3, 4, 5], np.float32)}, "finite"),
        ({**good, ids[0]: np.ones(4, np.float32)}, "has 4 values, expected 5"),
        ({**good, ids[0]: np.ones(6, np.float32)}, "has 6 values, expected 5"),
        ({**good, ids[0]: np.ones((2, 4), np.float32)}, "repeat 0 has 4 values"),
        ({**good, ids[0]: np.zeros(0, np.float32)}, "give rates or repeats"),
        ({**good, "g0000-s999": np.ones(5, np.float32)}, "not part of generation 0"),
    ]
    for payload, message in bad_cases:
        with pytest.raises(InvalidInput, match=message):
            client.tell(sid, 0, payload)
    # Both rates and repeats on one stimulus, and a stimulus twice, need hand-built requests.
    from neurotwin.client.closed_loop import stimulus_response
    from neurotwin.v1 import closed_loop_pb2 as pb
    from neurotwin.v1 import closed_loop_pb2_grpc as pb_grpc

    stub = pb_grpc.ClosedLoopStub(client._channel)
    both = stimulus_response(ids[0], good[ids[0]])
    both.repeats.add(rates=list(good[ids[0]]))
    twice = [stimulus_response(i, good[i]) for i in ids] + [stimulus_response(ids[0], good[ids[0]])]
    for responses, message in (
        ([both] + [stimulus_response(i, good[i]) for i in ids[1:]], "exactly one"),
        (twice, "appears twice"),
        ([], "without responses"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Tell(pb.TellRequest(session_id=sid, generation=0, responses=responses))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    # Incomplete: names the missing stimuli.
    partial = {k: good[k] for k in ids[:2]}
    with pytest.raises(FailedPrecondition) as err:
        client.tell(sid, 0, partial)
    assert "incomplete" in str(err.value) and ids[2] in str(err.value) and ids[5] in str(err.value)
    assert ids[0] not in str(err.value)
    info = client.get_session(sid)
    assert info.presentations_told == 0 and info.generations_told == 0 and info.pending

    # Unknown and malformed sessions.
    with pytest.raises(NotFound):
        client.tell("no-such-session", 0, good)
    with pytest.raises(NotFound):
        client.ask("no-such-session")
    with pytest.raises(InvalidInput, match="session_id is required"):
        client.ask("")

    # Partial tells accumulate; a conflicting re-tell of a told stimulus is refused.
    summary = client.tell(sid, 0, partial, partial=True)
    assert not summary.generation_complete and summary.missing_stimulus_ids == ids[2:]
    assert summary.presentations_told == 2
    with pytest.raises(FailedPrecondition, match="already told different responses"):
        client.tell(sid, 0, {ids[0]: good[ids[0]] * 2}, partial=True)
    summary = client.tell(sid, 0, good)  # the full set again: the two told ones match, the rest complete it
    assert summary.generation_complete and summary.presentations_told == POPULATION

    # Closed sessions take no more responses.
    client.close_session(sid)
    assert client.get_session(sid).status == "closed"
    assert client.ask(sid).finished
    with pytest.raises(FailedPrecondition, match="closed"):
        client.tell(sid, 1, good)


def test_bad_sessions_are_refused(served: Served, natural_zip: Path) -> None:
    client = served.client
    cases: list[tuple[dict[str, object], type[NeurotwinError], str]] = [
        ({"optimizer": "adam"}, InvalidInput, "optimizer"),
        ({"objective": "max"}, InvalidInput, "objective"),
        ({"target_neurons": [5]}, InvalidInput, "target_neurons"),
        ({"target_neurons": [1, 1]}, InvalidInput, "target_neurons"),
        ({"population_size": 1}, InvalidInput, "population_size"),
        ({"neuron_count": 1, "target_neurons": [0], "objective": "contrast"}, InvalidInput, "contrast"),
        ({"neuron_ids": ["a", "b"]}, InvalidInput, "neuron_ids"),
        ({"generator": "missing-gan"}, NotFound, "missing-gan"),
        ({"twin": "missing-twin"}, NotFound, "missing-twin"),
        ({"optimizer_options": {"learning_rate": 1.0}}, InvalidInput, "unknown optimizer option"),
        ({"optimizer_options": {"sigma0": -1.0}}, InvalidInput, "sigma0"),
        ({"optimizer": "ga", "twin": TWIN, "candidates_per_presentation": 3}, InvalidInput, "cma-es"),
        ({"twin": TWIN, "twin_neurons": [9]}, InvalidInput, "out of range"),
        ({"candidates_per_presentation": 3}, InvalidInput, "need a twin"),
        ({"natural_per_generation": 2}, InvalidInput, "needs natural images"),
        ({"natural_source": "../outside.zip"}, InvalidInput, "outside"),
        ({"natural_source": natural_zip.name, "natural_images": [b"x"]}, InvalidInput, "not both"),
        ({"natural_images": [b"not an image"]}, InvalidInput, "not a decodable image"),
        ({"image_format": "gif"}, InvalidInput, "image_format"),
        ({"session_id": "bad id!"}, InvalidInput, "session_id"),
        ({"session_id": ".."}, InvalidInput, "needs a letter"),
        ({"session_id": "."}, InvalidInput, "needs a letter"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            _create(client, **kwargs)
            pytest.fail(f"accepted {kwargs}")
    assert client.list_sessions() == []

    # The same id with the same settings is the same session; with other settings it is refused.
    a = _create(client, session_id="rig-1", seed=1)
    assert _create(client, session_id="rig-1", seed=1) == a
    with pytest.raises(FailedPrecondition, match="different settings"):
        _create(client, session_id="rig-1", seed=2)
    for i in range(3):
        _create(client, seed=i)
    with pytest.raises(ResourceExhausted, match="limit 4"):
        _create(client)
    assert len(client.list_sessions(open_only=True)) == 4


def test_naturals_repeats_and_guidance(served: Served, natural_zip: Path) -> None:
    client = served.client
    sid = _create(
        client,
        seed=21,
        natural_source=natural_zip.name,
        natural_per_generation=3,
        twin=TWIN,
        candidates_per_presentation=4,
        refit_readout=True,
        image_size=20,
        image_format="jpeg",
        max_generations=5,
    )
    info = client.get_session(sid)
    assert info.natural_image_count == 7 and info.settings.guidance.twin.version == 1
    kinds_seen: list[list[str]] = []
    for _ in range(5):
        gen = client.ask(sid)
        assert len(gen.stimuli) == POPULATION + 3 and gen.image_format == "jpeg"
        kinds = [s.kind for s in gen.stimuli]
        kinds_seen.append(kinds)
        assert kinds.count("natural") == 3
        for s in gen.stimuli:
            assert s.pixels().shape == (20, 20, 3)
            assert len(s.predicted_rates) == 1 and math.isfinite(s.predicted_score)
            if s.kind == "natural":
                assert re.fullmatch(r"img0\d\.png", s.natural_name)
        summary = client.tell(sid, gen.generation, _responses(gen, 4, repeats=3))
        assert summary.generation_complete
    assert len({tuple(k) for k in kinds_seen}) > 1, "natural images should not sit at fixed positions"
    assert summary.finished and summary.best.best_natural_stimulus_id.startswith("g")
    assert math.isfinite(summary.best.best_natural_score)

    # The twin ranked each generation's candidates and presented its favourites; once enough
    # responses were in, the refit readout was fitted and judged against the twin.
    journal = served.engine.journal
    generations = journal.generations(sid)
    assert all(g.meta["candidates"] == POPULATION * 4 for g in generations)
    assert all(g.meta["guide_presented_mean"] >= g.meta["guide_candidates_mean"] for g in generations)
    assert "readout_loo_r" in generations[-1].meta
    told = journal.responses(sid)
    assert len(told) == 5 * 9 and all(r.repeats.shape == (3, NEURONS) for r in told)


def test_export_nwb_and_hdf5(served: Served, tmp_path: Path) -> None:
    import h5py
    from pynwb import NWBHDF5IO

    client = served.client
    images = [natural_png(i) for i in range(4)]
    sid = _create(client, seed=8, natural_images=images, natural_per_generation=2, neuron_ids=list("abcde"))
    for _ in range(2):
        gen = client.ask(sid)
        client.tell(sid, gen.generation, _responses(gen, 9, repeats=2), onsets={gen.stimulus_ids[0]: 12.5})
    pending = client.ask(sid)
    client.tell(sid, pending.generation, {pending.stimulus_ids[0]: np.ones(NEURONS)}, partial=True)

    nwb_path = client.export_session(sid, tmp_path / "s.nwb")
    with NWBHDF5IO(str(nwb_path), "r") as nwb_io:
        nwb = nwb_io.read()
        trials = nwb.trials.to_dataframe()
        assert len(trials) == 2 * 8 + 1
        assert list(trials["kind"]).count("natural") == 4 + (pending.stimuli[0].kind == "natural")
        assert trials["repeats"].iloc[0].shape == (2, NEURONS)
        # The rig's onset where it gave one, the receive time elsewhere; rows in order of start time.
        assert list(trials["start_time"]).count(12.5) == 2 and trials["start_time"].is_monotonic_increasing
        # Every synthetic image of the three generations (the pending one too), each natural image once.
        assert len(nwb.stimulus_template["stimuli"].images) == 3 * POPULATION + 4
        assert nwb.stimulus["presentations"].data.shape == (17,)
        assert nwb.acquisition["responses"].data.shape == (17, NEURONS)
        models = nwb.processing["closed_loop"]["models"].to_dataframe()
        assert list(models["model_name"]) == [GENERATOR]
        gens = nwb.processing["closed_loop"]["generations"].to_dataframe()
        assert list(gens["generation"]) == [0, 1, 2] and np.isfinite(gens["optimizer_sigma"].iloc[0])
        assert list(nwb.processing["closed_loop"]["neurons"].to_dataframe()["neuron_id"]) == list("abcde")

    h5_path = client.export_session(sid, tmp_path / "s.h5", format="hdf5")
    with h5py.File(h5_path, "r") as f:
        assert f.attrs["session_id"] == sid
        pres = f["presentations"]
        assert pres["responses"].shape == (17, NEURONS) and pres["repeats"].shape == (33, NEURONS)
        assert f["stimuli/images"].shape[1:] == (16, 16, 3)
        assert np.isnan(pres["latent"][list(pres["kind"].asstr()[:]).index("natural")]).all()
        assert f["models"].attrs["generator_name"] == GENERATOR
    small = client.export_session(sid, tmp_path / "small.h5", format="hdf5", omit_images=True)
    with h5py.File(small, "r") as f:
        assert "images" not in f["stimuli"]
    with pytest.raises(InvalidInput, match="export format"):
        client.export_session(sid, tmp_path / "x.csv", format="csv")


def test_metrics(served: Served) -> None:
    server, client = served.server, served.client
    sid = _create(client, seed=1)
    gen = client.ask(sid)
    client.ask(sid)
    client.tell(sid, 0, _responses(gen, 1))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'neurotwin_closed_loop_ask_seconds_count{new_generation="true"} 1.0' in body
    assert 'neurotwin_closed_loop_ask_seconds_count{new_generation="false"} 1.0' in body
    assert 'neurotwin_closed_loop_tell_seconds_count{generation_complete="true"} 1.0' in body
    assert "neurotwin_closed_loop_sessions_open 1.0" in body
    assert f"neurotwin_closed_loop_presentations_total {float(POPULATION)}" in body


# ------------------------------------------------------------------------------------------------
# Durability and resume


def _told(sid: str, gen: object, seed: int) -> list[ToldResponse]:
    """Deterministic responses for one generation of the engine API."""
    values = np.random.default_rng([seed, gen.generation]).random((len(gen.stimuli), NEURONS)) * 5
    return [ToldResponse(s.stimulus_id, rates=list(values[i])) for i, s in enumerate(gen.stimuli)]


def _run(engine: ClosedLoopEngine, sid: str, generations: int, seed: int) -> list[list[str]]:
    """Ask/tell ``generations`` times with deterministic responses; returns each generation's hashes."""
    hashes = []
    for _ in range(generations):
        gen = engine.ask(sid)
        hashes.append([s.sha256 for s in gen.stimuli])
        engine.tell(sid, gen.generation, _told(sid, gen, seed))
    return hashes


@pytest.mark.parametrize("optimizer", ["cma-es", "ga"])
def test_restart_resumes_exactly(store_root: Path, tmp_path: Path, optimizer: str) -> None:
    """A fresh engine on the same journal continues exactly as the original would have."""
    store = ModelStore(store_root)
    guided = optimizer == "cma-es"
    request = SessionRequest(
        session_id="s",
        neuron_count=NEURONS,
        target_neurons=[2],
        population_size=POPULATION,
        seed=5,
        optimizer=optimizer,
        twin=TWIN,
        candidates_per_presentation=3 if guided else 0,
        refit_readout=guided,
        natural_images=[natural_png(i) for i in range(3)],
        natural_per_generation=1,
    )
    reference = ClosedLoopEngine(store, SqliteJournal(tmp_path / "ref.sqlite3"), default_generator=GENERATOR)
    reference.create_session(request)
    expected = _run(reference, "s", 8, seed=1)

    path = tmp_path / "resumed.sqlite3"
    first = ClosedLoopEngine(store, SqliteJournal(path), default_generator=GENERATOR)
    first.create_session(request)
    got = _run(first, "s", 5, seed=1)
    pending = first.ask("s")
    first.tell("s", 5, _told("s", pending, 1)[:2], partial=True)
    first.journal.close()  # the process is gone; only the journal remains

    second = ClosedLoopEngine(store, SqliteJournal(path), default_generator=GENERATOR)
    assert second.get_session("s").presentations_told == 5 * (POPULATION + 1) + 2
    again = second.ask("s")
    assert [s.sha256 for s in again.stimuli] == [s.sha256 for s in pending.stimuli] == expected[5]
    second.tell("s", 5, _told("s", again, 1))
    got += [[s.sha256 for s in again.stimuli], *_run(second, "s", 2, seed=1)]
    assert got == expected
    assert second.get_session("s").best == reference.get_session("s").best


def test_postgres_replicas_share_sessions(store_root: Path, postgres_url: str) -> None:
    """Two engines on one PostgreSQL journal act as replicas: any call may land on either."""
    store = ModelStore(store_root)
    a = ClosedLoopEngine(store, open_journal(postgres_url), default_generator=GENERATOR)
    b = ClosedLoopEngine(store, open_journal(postgres_url), default_generator=GENERATOR)
    try:
        sid = a.create_session(
            SessionRequest(neuron_count=NEURONS, population_size=POPULATION, seed=2)
        ).session_id
        for g in range(3):
            asker, teller = (a, b) if g % 2 == 0 else (b, a)
            gen = asker.ask(sid)
            assert [s.sha256 for s in teller.ask(sid).stimuli] == [s.sha256 for s in gen.stimuli]
            result = teller.tell(
                sid, g, [ToldResponse(s.stimulus_id, rates=[float(g)] * NEURONS) for s in gen.stimuli]
            )
            assert result.generations_told == g + 1
        assert (
            a.get_session(sid).presentations_told == b.get_session(sid).presentations_told == 3 * POPULATION
        )
    finally:
        a.journal.close()
        b.journal.close()


@pytest.mark.slow  # a server in a child process, killed and restarted
def test_sigkill_mid_session_and_restart(store_root: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    log = tmp_path / "server.log"
    request = {
        "session_id": "rig-a",
        "seed": 17,
        "max_generations": 6,
        "twin": TWIN,
        "candidates_per_presentation": 2,
    }
    server = ServerProcess(store_root, journal, log)
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            sid = _create(client, **request)
            for _ in range(3):
                gen = client.ask(sid)
                client.tell(sid, gen.generation, _responses(gen, 7))
            pending = client.ask(sid)
            told = _responses(pending, 7)
            half = dict(list(told.items())[:3])
            assert client.tell(sid, 3, half, partial=True).presentations_told == 3 * POPULATION + 3
    finally:
        server.kill()  # no drain, no stop hooks: whatever was acknowledged must be in the journal

    server = ServerProcess(store_root, journal, log)
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            info = client.get_session(sid)
            assert (info.generation, info.pending, info.presentations_told) == (3, True, 3 * POPULATION + 3)
            resumed = client.ask(sid)
            assert [(s.stimulus_id, s.sha256, s.image) for s in resumed.stimuli] == [
                (s.stimulus_id, s.sha256, s.image) for s in pending.stimuli
            ]
            summary = client.tell(sid, 3, told)  # the full set: three repeat what was told before the kill
            assert summary.generation_complete and summary.presentations_told == 4 * POPULATION
            after_restart = []
            while not (gen := client.ask(sid)).finished:
                after_restart.append([s.sha256 for s in gen.stimuli])
                client.tell(sid, gen.generation, _responses(gen, 7))
            final = client.get_session(sid)
    finally:
        server.kill()
    assert final.status == "finished" and final.presentations_told == 6 * POPULATION

    # An uninterrupted run with the same seed and responses proposes exactly the same stimuli.
    reference_server, _ = _start_server(store_root, str(tmp_path / "reference.sqlite3"))
    try:
        with ClosedLoopClient(f"127.0.0.1:{reference_server.port}", timeout=30) as client:
            _create(client, **request)
            hashes = []
            while not (gen := client.ask(sid)).finished:
                hashes.append([s.sha256 for s in gen.stimuli])
                client.tell(sid, gen.generation, _responses(gen, 7))
            reference = client.get_session(sid)
    finally:
        reference_server.stop(0)
    assert hashes[3] == [s.sha256 for s in pending.stimuli]
    assert hashes[4:] == after_restart
    assert (reference.best.stimulus_id, reference.best.score) == (final.best.stimulus_id, final.best.score)

    # Nothing told was lost: every response is in the journal, bit for bit.
    journal_copy = SqliteJournal(journal)
    try:
        stored = journal_copy.responses(sid)
        assert len(stored) == 6 * POPULATION
        gen3 = {r.index: r.repeats[0] for r in stored if r.generation == 3}
        for s in pending.stimuli:
            assert np.array_equal(gen3[s.index], told[s.stimulus_id])
    finally:
        journal_copy.close()


# ------------------------------------------------------------------------------------------------
# rig-sim


@pytest.mark.slow  # a whole rig simulation over gRPC
def test_rig_sim_runs_a_session(store_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from neurotwin.cli import main

    journal = tmp_path / "rig.sqlite3"
    export = tmp_path / "rig.nwb"
    argv = [
        "rig-sim",
        "--twin",
        TWIN,
        "--neuron",
        "3",
        "--model-store",
        str(store_root),
        "--journal",
        str(journal),
        "--generator",
        GENERATOR,
        "--population",
        "8",
        "--generations",
        "4",
        "--repeats",
        "2",
        "--session-id",
        "sim",
        "--export",
        str(export),
        "--stop-after",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "in-process server" in out and "gen    3" in out and "3 generations, 24 presentations" in out
    assert export.is_file()
    # Running again resumes the same session and finishes it.
    assert main([*argv[:-2], "--stop-after", "0"]) == 0
    out = capsys.readouterr().out
    assert "resuming sim at generation 3" in out and "4 generations, 32 presentations" in out
    with pytest.raises(SystemExit):
        main(["rig-sim", "--twin", "bad:name:x"])
