"""NWB exports that validate: sessions created and told over real gRPC on loopback, exported over gRPC
and by ``neurotwin export-session`` from the journal, checked with nwbinspector's Python API and read
back with pynwb. Times: an onset of 0.0 is kept, stop = start + presentation time, starts ascend.
Subject, device and session metadata come from CreateSession and can be completed at export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurotwin.cli import main
from neurotwin.client.closed_loop import ClosedLoopClient, PendingGeneration
from neurotwin.engines.session_metadata import RecordingMetadata
from neurotwin.errors import InvalidInput
from neurotwin.server.closed_loop import metadata_dict
from neurotwin.server.common import GrpcServer

from tests._closed_loop import NEURONS, natural_png
from tests._closed_loop import start_server as _start_server

nwbinspector = pytest.importorskip("nwbinspector")

METADATA = {
    "subject_id": "M1",
    "species": "Macaca mulatta",
    "sex": "F",
    "age": "P5Y",
    "subject_description": "test subject",
    "experimenter": ["Doe, Jane", "Roe, Rick"],
    "lab": "Vision Lab",
    "institution": "Example University",
    "experiment_description": "closed-loop stimulus evolution",
    "protocol": "IACUC-0001",
    "device_name": "Utah array 96ch",
    "device_description": "96-channel microelectrode array",
    "device_manufacturer": "Blackrock",
    "brain_area": "V4",
    "response_units": "spikes per 100 ms window",
    "presentation_duration": 0.1,
}
PRESENTATION_S = 0.1
SERIOUS = {"CRITICAL", "BEST_PRACTICE_VIOLATION", "PYNWB_VALIDATION", "ERROR"}


@pytest.fixture
def served(store_root: Path, tmp_path: Path) -> Iterator[tuple[GrpcServer, ClosedLoopClient, Path]]:
    journal = tmp_path / "journal.sqlite3"
    server, _ = _start_server(store_root, str(journal))
    client = ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=30, retries=2, retry_delay=0.05)
    yield server, client, journal
    client.close()
    server.stop(0)


def _respond(gen: PendingGeneration, seed: int, repeats: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, gen.generation])
    values = rng.poisson(4.0, (len(gen.stimuli), repeats, NEURONS)).astype(np.float32)
    return {s.stimulus_id: values[i] for i, s in enumerate(gen.stimuli)}


def _run(
    client: ClosedLoopClient, sid: str, generations: int, *, onsets: bool, durations: bool, repeats: int = 2
) -> None:
    """A rig presenting back to back from t = 0.0 on its clock, each repeat 100 ms."""
    clock = 0.0
    for _ in range(generations):
        gen = client.ask(sid)
        step = repeats * PRESENTATION_S
        times = {s.stimulus_id: clock + i * step for i, s in enumerate(gen.stimuli)}
        clock += len(gen.stimuli) * step
        client.tell(
            sid,
            gen.generation,
            _respond(gen, 3, repeats),
            onsets=times if onsets else None,
            durations=dict.fromkeys(times, PRESENTATION_S) if durations else None,
        )


def _serious(path: Path) -> list[str]:
    messages = [m for m in nwbinspector.inspect_nwbfile(nwbfile_path=path) if m is not None]
    return [
        f"{m.importance.name}: {m.check_function_name}: {m.message}"
        for m in messages
        if m.importance.name in SERIOUS
    ]


def test_exported_session_passes_nwbinspector_and_keeps_its_times(
    served: tuple[GrpcServer, ClosedLoopClient, Path], tmp_path: Path
) -> None:
    from pynwb import NWBHDF5IO

    _, client, _ = served
    naturals = [natural_png(i) for i in range(3)]
    info = client.create_session(
        neuron_count=NEURONS,
        target_neurons=[1],
        population_size=6,
        natural_images=naturals,
        natural_per_generation=2,
        seed=4,
        metadata=METADATA,
    )
    # The session reports its metadata back as given.
    echoed = metadata_dict(info.settings.metadata)
    assert echoed == {**METADATA, "presentation_duration": pytest.approx(0.1)}
    # Generation 0 tells its durations; generation 1 relies on the session's presentation_duration.
    _run(client, info.session_id, 1, onsets=True, durations=True)
    gen = client.ask(info.session_id)
    start = 8 * 2 * PRESENTATION_S
    times = {s.stimulus_id: start + i * 2 * PRESENTATION_S for i, s in enumerate(gen.stimuli)}
    client.tell(info.session_id, gen.generation, _respond(gen, 4, 2), onsets=times)

    path = client.export_session(info.session_id, tmp_path / "session.nwb")
    assert _serious(path) == []
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        trials = nwb.trials.to_dataframe()
        assert len(trials) == 16
        assert trials["start_time"].iloc[0] == 0.0, "the rig's first onset (0.0) is kept, not NaN"
        assert trials["start_time"].is_monotonic_increasing
        np.testing.assert_allclose(trials["stop_time"] - trials["start_time"], PRESENTATION_S)
        np.testing.assert_allclose(trials["start_time"], np.arange(16) * 2 * PRESENTATION_S, atol=1e-9)
        subject = nwb.subject
        assert (subject.subject_id, subject.species, subject.sex, subject.age) == (
            "M1",
            "Macaca mulatta",
            "F",
            "P5Y",
        )
        assert list(nwb.experimenter) == ["Doe, Jane", "Roe, Rick"]
        assert (nwb.lab, nwb.institution, nwb.protocol) == ("Vision Lab", "Example University", "IACUC-0001")
        device = nwb.devices["Utah array 96ch"]
        manufacturer = device.model.manufacturer if getattr(device, "model", None) else device.manufacturer
        assert manufacturer == "Blackrock"
        assert nwb.electrode_groups["recording_site"].location == "V4"
        responses = nwb.acquisition["responses"]
        assert responses.unit == "spikes per 100 ms window"
        # Back-to-back presentations are evenly spaced: a rate, not a list of timestamps.
        assert responses.rate == pytest.approx(1 / (2 * PRESENTATION_S)) and responses.starting_time == 0.0
        assert nwb.stimulus["presentations"].data.shape == (16,)


def test_session_without_metadata_has_no_critical_issue(
    served: tuple[GrpcServer, ClosedLoopClient, Path], tmp_path: Path
) -> None:
    from pynwb import NWBHDF5IO

    _, client, _ = served
    sid = client.create_session(neuron_count=NEURONS, population_size=6, seed=1).session_id
    _run(client, sid, 2, onsets=False, durations=False)
    path = client.export_session(sid, tmp_path / "bare.nwb")
    serious = _serious(path)
    # Only what a rig alone can say is missing: the species.
    assert [line.split(":")[1].strip() for line in serious] == ["check_subject_species_exists"]
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        assert (nwb.subject.subject_id, nwb.subject.sex, nwb.subject.age) == ("unknown", "U", "P0D/")
        trials = nwb.trials.to_dataframe()
        # No onsets: the server's receive times; no duration anywhere: stop unknown (NaN), not invented.
        assert trials["start_time"].is_monotonic_increasing and trials["start_time"].iloc[0] > 0
        assert trials["stop_time"].isna().all()
        assert nwb.acquisition["responses"].unit == "responses as told by the rig"

    # Metadata given at export completes this file only.
    completed = client.export_session(
        sid, tmp_path / "completed.nwb", metadata={"species": "Macaca mulatta", "presentation_duration": 0.1}
    )
    assert _serious(completed) == []
    assert client.get_session(sid).settings.metadata.species == "", "an export stores nothing"
    with NWBHDF5IO(str(completed), "r") as io:
        trials = io.read().trials.to_dataframe()
        np.testing.assert_allclose(trials["stop_time"] - trials["start_time"], 0.1)


def test_bad_metadata_is_refused(served: tuple[GrpcServer, ClosedLoopClient, Path], tmp_path: Path) -> None:
    _, client, _ = served
    for field, value, message in (
        ("species", "macaque", "Latin binomial"),
        ("sex", "X", "one of M, F, U, O"),
        ("age", "7 years", "ISO 8601 duration"),
        ("subject_id", "a/b", "no '/'"),
        ("presentation_duration", -1.0, ">= 0"),
    ):
        with pytest.raises(InvalidInput, match=message):
            client.create_session(neuron_count=NEURONS, population_size=6, metadata={field: value})
    sid = client.create_session(neuron_count=NEURONS, population_size=6).session_id
    _run(client, sid, 1, onsets=True, durations=True)
    with pytest.raises(InvalidInput, match="ISO 8601"):
        client.export_session(sid, tmp_path / "x.nwb", metadata={"age": "old"})
    assert RecordingMetadata.from_dict({"age": "P7Y/"}).age == "P7Y/"
    assert RecordingMetadata.from_dict({"age": "P1Y2M3DT4H"}).age == "P1Y2M3DT4H"
    for bad in ("P", "PT", "P1YT", "1Y", "/"):
        with pytest.raises(InvalidInput):
            RecordingMetadata.from_dict({"age": bad})


def test_export_session_command_reads_the_journal(
    served: tuple[GrpcServer, ClosedLoopClient, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import h5py
    from pynwb import NWBHDF5IO

    _, client, journal = served
    sid = client.create_session(
        neuron_count=NEURONS, population_size=6, session_id="rig-a", metadata={"subject_id": "M7"}
    ).session_id
    _run(client, sid, 2, onsets=True, durations=True)
    out = tmp_path / "exports" / "rig-a.nwb"
    argv = ["export-session", "--journal", f"sqlite:///{journal}", "--out", str(out)]
    # The only session: no id needed. Metadata flags complete the file.
    code = main([*argv, "--species", "Macaca mulatta", "--experimenter", "Doe, Jane", "--age", "P4Y"])
    assert code == 0, capsys.readouterr().err
    assert f"exported session rig-a to {out}" in capsys.readouterr().out
    assert _serious(out) == []
    with NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        assert (nwb.subject.subject_id, nwb.subject.species) == ("M7", "Macaca mulatta")
    assert sorted(p.name for p in out.parent.iterdir()) == ["rig-a.nwb"], "no partial file is left"

    h5 = tmp_path / "rig-a.h5"
    assert main(["export-session", "rig-a", "--journal", str(journal), "--out", str(h5)]) == 0
    with h5py.File(h5, "r") as f:
        assert f.attrs["session_id"] == "rig-a" and '"subject_id": "M7"' in f.attrs["metadata"]
        assert f["presentations/start_time"][0] == 0.0

    client.create_session(neuron_count=NEURONS, population_size=6, session_id="rig-b")
    capsys.readouterr()
    assert main(["export-session", "--journal", str(journal), "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["rig-a", "rig-b"]
    assert main(["export-session", "--journal", str(journal), "--out", str(tmp_path / "y.nwb")]) == 1
    assert "holds 2 sessions (rig-a, rig-b); name one" in capsys.readouterr().err
    assert main(["export-session", "nope", "--journal", str(journal)]) == 1
    assert "nope" in capsys.readouterr().err
    missing = tmp_path / "absent.sqlite3"
    assert main(["export-session", "--journal", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"journal {missing} does not exist" in err
    assert not missing.exists(), "a missing journal is not created by looking at it"
