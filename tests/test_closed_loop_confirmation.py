"""Confirmation re-presentations: the logic on its own, a session over real gRPC on loopback, exports, and
a server killed with SIGKILL in the middle of the confirmation generation and restarted on its journal."""

from __future__ import annotations

from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest
from neurotwin.client.closed_loop import ClosedLoopClient, PendingGeneration
from neurotwin.engines.closed_loop.confirmation import (
    confirmed_summary,
    default_top,
    repetition_order,
    resolve_confirmation,
    top_candidates,
)
from neurotwin.engines.journal import NATURAL, SYNTHETIC, ResponseRecord, SqliteJournal, StimulusRecord
from neurotwin.engines.session_import import read_hdf5
from neurotwin.errors import InvalidInput

from tests._closed_loop import NEURONS, ServerProcess, natural_png
from tests._closed_loop import start_server as _start_server

POPULATION = 10


# ------------------------------------------------------------------------------------------------
# The logic


def test_defaults_and_checks() -> None:
    # Defaults: one generation's worth (population / 5 images x 5 repeats), only for sessions of >= 10.
    assert resolve_confirmation(False, False, 0, 0, 40, 30) == (8, 5)
    assert default_top(40) == 8 and default_top(6) == 2
    assert resolve_confirmation(False, False, 0, 0, 40, 9) == (0, 0)
    assert resolve_confirmation(False, False, 0, 0, 40, 0) == (0, 0)
    assert resolve_confirmation(False, True, 0, 0, 40, 30) == (0, 0)
    # Asked for explicitly, it applies to short sessions too, with the given or default numbers.
    assert resolve_confirmation(True, False, 3, 0, 40, 2) == (3, 5)
    assert resolve_confirmation(True, False, 0, 2, 40, 4) == (8, 2)
    with pytest.raises(InvalidInput, match="needs max_generations"):
        resolve_confirmation(True, False, 3, 2, 40, 0)
    with pytest.raises(InvalidInput, match="max_generations >= 2"):
        resolve_confirmation(True, False, 3, 2, 40, 1)
    with pytest.raises(InvalidInput, match=">= 0"):
        resolve_confirmation(True, False, -1, 2, 40, 5)
    with pytest.raises(InvalidInput, match="disabled with"):
        resolve_confirmation(True, True, 3, 0, 40, 5)
    with pytest.raises(InvalidInput, match="more than 1000"):
        resolve_confirmation(True, False, 100, 11, 40, 5)


def _stimulus(generation: int, index: int, sha: str, kind: str = SYNTHETIC) -> StimulusRecord:
    return StimulusRecord(generation, index, f"g{generation}-s{index}", kind, sha)


def _response(generation: int, index: int, *rows: list[float]) -> ResponseRecord:
    return ResponseRecord(generation, index, np.asarray(rows, dtype=np.float32), received=0.0)


def test_top_candidates_are_distinct_images_by_measured_objective() -> None:
    stimuli = [
        _stimulus(0, 0, "a"),
        _stimulus(0, 1, "b"),
        _stimulus(0, 2, "n", NATURAL),
        _stimulus(1, 0, "a"),  # image "a" again (a GA elite): scored by the mean of its presentations
        _stimulus(1, 1, "c"),
        _stimulus(1, 2, "d"),  # not told yet: not a candidate
    ]
    responses = [
        _response(0, 0, [9.0, 0.0]),
        _response(0, 1, [5.0, 0.0]),
        _response(0, 2, [99.0, 0.0]),  # natural images are never candidates
        _response(1, 0, [1.0, 0.0]),
        _response(1, 1, [4.0, 0.0], [8.0, 0.0]),  # two rig repeats: their mean, 6
    ]
    top = top_candidates(stimuli, responses, [0], "mean", 3)
    assert [(c.stimulus.stimulus_id, c.first_score) for c in top] == [
        ("g1-s1", 6.0),
        ("g0-s0", 5.0),  # "a": (9 + 1) / 2, represented by its first presentation
        ("g0-s1", 5.0),  # ties keep the order of first presentation
    ]
    assert [c.stimulus.stimulus_id for c in top_candidates(stimuli, responses, [0], "mean", 1)] == ["g1-s1"]
    assert top_candidates(stimuli, [], [0], "mean", 3) == []


def test_repetition_order_spreads_repeats() -> None:
    slots = repetition_order(seed=3, generation=7, candidates=4, repeats=3)
    assert sorted(slots) == sorted([0, 1, 2, 3] * 3)
    # One shuffled round per repeat: each image once per round.
    assert all(sorted(slots[r * 4 : (r + 1) * 4]) == [0, 1, 2, 3] for r in range(3))
    assert slots == repetition_order(3, 7, 4, 3)  # deterministic, so a replayed Ask matches
    assert slots != repetition_order(4, 7, 4, 3)


def test_confirmed_summary_leaves_the_selecting_measurement_out() -> None:
    first = {"x": (2, 10.0), "y": (5, 7.0)}
    repeat_of = ["x", "", "y", "x", "y"]
    responses = [
        _response(9, 0, [3.0, 1.0]),
        _response(9, 1, [50.0, 50.0]),  # a natural reference: not a candidate
        _response(9, 2, [6.0, 2.0], [8.0, 2.0]),  # two rig repeats count as two measurements
        _response(9, 3, [5.0, 3.0]),
        _response(9, 4, [4.0, 0.0]),
    ]
    summary = confirmed_summary(first, repeat_of, responses, [0, 1], "mean")
    best = summary["confirmed"]
    # x: (3+1)/2=2, (5+3)/2=4 -> mean 3; y: 4, 5, 2 -> mean 11/3. y wins though x measured higher first.
    assert best["stimulus_id"] == "y" and best["generation"] == 5 and best["first_score"] == 7.0
    assert best["n"] == 3 and best["mean_score"] == pytest.approx(11 / 3)
    assert best["std_score"] == pytest.approx(np.std([4, 5, 2], ddof=1))
    assert best["sem_score"] == pytest.approx(best["std_score"] / np.sqrt(3))
    assert best["target_rates"] == pytest.approx([6.0, 4 / 3])
    assert [e["stimulus_id"] for e in summary["confirmation_candidates"]] == ["y", "x"]
    assert summary["confirmation_candidates"][1]["mean_score"] == pytest.approx(3.0)
    assert confirmed_summary(first, repeat_of, [], [0], "mean") == {
        "confirmed": {},
        "confirmation_candidates": [],
    }


# ------------------------------------------------------------------------------------------------
# A session over gRPC


def _rates(gen: PendingGeneration) -> dict[str, np.ndarray]:
    """A deterministic 'neuron': target neuron 1 responds with a value fixed by the image's hash plus
    noise fixed by the stimulus id, so re-presentations of one image differ as real repeats would."""
    told: dict[str, np.ndarray] = {}
    for s in gen.stimuli:
        base = int(s.sha256[:6], 16) / 0xFFFFFF * 10
        noise = np.random.default_rng(int(s.stimulus_id[1:5]) * 1000 + s.index).normal(0, 3, NEURONS)
        told[s.stimulus_id] = (base + noise).astype(np.float32)
    return told


def _run_to_end(client: ClosedLoopClient, sid: str) -> list[PendingGeneration]:
    generations = []
    while not (gen := client.ask(sid)).finished:
        generations.append(gen)
        client.tell(sid, gen.generation, _rates(gen))
    return generations


def test_session_confirms_its_top_candidates(store_root: Path, tmp_path: Path) -> None:
    server, _ = _start_server(store_root, str(tmp_path / "journal.sqlite3"))
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            naturals = [natural_png(i) for i in range(3)]
            info = client.create_session(
                neuron_count=NEURONS,
                target_neurons=[1],
                population_size=POPULATION,
                max_generations=5,
                seed=4,
                natural_images=naturals,
                natural_per_generation=1,
                confirmation=True,
                confirm_top=3,
                confirm_repeats=4,
            )
            sid = info.session_id
            confirmation = info.settings.confirmation
            assert (confirmation.top_candidates, confirmation.repeats, confirmation.disabled) == (3, 4, False)
            generations = _run_to_end(client, sid)
            final = client.get_session(sid)
            with pytest.raises(InvalidInput, match="more than 1000"):
                client.create_session(
                    neuron_count=NEURONS, max_generations=5, confirm_top=500, confirm_repeats=3
                )
            # Without a word about it, short sessions do not confirm (the defaults start at 10 generations).
            plain = client.create_session(neuron_count=NEURONS, max_generations=3, population_size=POPULATION)
            assert plain.settings.confirmation.disabled
            assert client.create_session(
                neuron_count=NEURONS, max_generations=12, population_size=POPULATION
            ).settings.confirmation.top_candidates == default_top(POPULATION)
            h5 = client.export_session(sid, tmp_path / "s.h5", format="hdf5")
            nwb_path = client.export_session(sid, tmp_path / "s.nwb")
    finally:
        server.stop(0)

    assert len(generations) == 5 and final.status == "finished"
    evolved, confirm = generations[:4], generations[4]
    # The confirmation generation: 3 images x 4 repeats plus its natural reference, nothing new.
    repeats = [s for s in confirm.stimuli if s.repeat_of]
    assert len(repeats) == 12 and len(confirm.stimuli) == 13
    assert [s.kind for s in confirm.stimuli if not s.repeat_of] == ["natural"]
    first = {s.stimulus_id: s for g in evolved for s in g.stimuli}
    assert all(first[s.repeat_of].sha256 == s.sha256 and first[s.repeat_of].image == s.image for s in repeats)
    assert {s.repeat_of for s in repeats} == {c.stimulus_id for c in final.best.confirmation_candidates}
    assert all(sum(r.repeat_of == c for r in repeats) == 4 for c in {s.repeat_of for s in repeats})

    # Which images were re-presented: the three with the highest single measured objective.
    scores = {
        sid_: float(values[1])
        for g in evolved
        for sid_, values in _rates(g).items()
        if first[sid_].kind == "synthetic"
    }
    top3 = sorted(scores, key=lambda k: -scores[k])[:3]
    assert {s.repeat_of for s in repeats} == set(top3)

    # The confirmed best is the highest mean over the re-presentations (the first measurement left out).
    told = _rates(confirm)
    means = {c: np.mean([told[r.stimulus_id][1] for r in repeats if r.repeat_of == c]) for c in top3}
    winner = max(means, key=lambda c: means[c])
    confirmed = final.best.confirmed
    assert confirmed is not None and confirmed.stimulus_id == winner and confirmed.n == 4
    assert confirmed.mean_score == pytest.approx(means[winner], rel=1e-5)
    assert confirmed.first_score == pytest.approx(scores[winner], rel=1e-5)
    assert confirmed.std_score > 0 and confirmed.sem_score == pytest.approx(confirmed.std_score / 2)
    assert confirmed.generation == int(winner[1:5])
    # The single best measurement is still reported, separately, from the evolving generations only.
    assert final.best.stimulus_id == top3[0] and final.best.score == pytest.approx(scores[top3[0]], rel=1e-5)
    assert [c.mean_score for c in final.best.confirmation_candidates] == pytest.approx(
        sorted(means.values(), reverse=True), rel=1e-5
    )
    assert final.presentations_told == 4 * (POPULATION + 1) + 13

    # Exports carry every re-presentation, marked, sharing its original's image row.
    with h5py.File(h5, "r") as f:
        pres = f["presentations"]
        repeat_of = list(pres["repeat_of"].asstr()[:])
        ids = list(pres["stimulus_id"].asstr()[:])
        rows = pres["image_index"][:]
        assert sum(bool(r) for r in repeat_of) == 12
        for i, original in enumerate(repeat_of):
            if original:
                assert rows[i] == rows[ids.index(original)]
        assert f["stimuli/images"].shape[0] == 4 * POPULATION + 3  # no copies for the repeats
    back = read_hdf5(h5)
    assert back.generations[4].meta["repeat_of"] == [s.repeat_of for s in confirm.stimuli]
    assert back.record.best["confirmed"]["stimulus_id"] == winner
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(nwb_path), "r") as nwb_io:
        trials = nwb_io.read().trials.to_dataframe()
        assert (trials["repeat_of"] != "").sum() == 12


@pytest.mark.slow  # a server in a child process, killed and restarted
def test_confirmation_survives_sigkill(store_root: Path, tmp_path: Path) -> None:
    """Killed halfway through telling the confirmation generation, a restarted server asks the same
    re-presentations and reports the same confirmed best as an uninterrupted run."""
    journal = tmp_path / "journal.sqlite3"
    request = {
        "neuron_count": NEURONS,
        "target_neurons": [1],
        "population_size": POPULATION,
        "max_generations": 4,
        "seed": 21,
        "session_id": "confirm-kill",
        "confirm_top": 4,
        "confirm_repeats": 3,
    }
    server = ServerProcess(store_root, journal, tmp_path / "server.log")
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            sid = client.create_session(**request).session_id
            for _ in range(3):
                gen = client.ask(sid)
                client.tell(sid, gen.generation, _rates(gen))
            pending = client.ask(sid)
            assert sum(bool(s.repeat_of) for s in pending.stimuli) == 12
            half = dict(list(_rates(pending).items())[:5])
            client.tell(sid, pending.generation, half, partial=True)
    finally:
        server.kill()

    server = ServerProcess(store_root, journal, tmp_path / "server.log")
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            resumed = client.ask(sid)
            assert [(s.stimulus_id, s.sha256, s.repeat_of) for s in resumed.stimuli] == [
                (s.stimulus_id, s.sha256, s.repeat_of) for s in pending.stimuli
            ]
            summary = client.tell(sid, resumed.generation, _rates(resumed))
            assert summary.finished and summary.best.confirmed is not None
            killed = client.get_session(sid)
    finally:
        server.kill()

    reference_server, _ = _start_server(store_root, str(tmp_path / "reference.sqlite3"))
    try:
        with ClosedLoopClient(f"127.0.0.1:{reference_server.port}", timeout=30) as client:
            client.create_session(**request)
            _run_to_end(client, sid)
            reference = client.get_session(sid)
    finally:
        reference_server.stop(0)
    assert killed.best.confirmed == reference.best.confirmed
    assert killed.best.confirmation_candidates == reference.best.confirmation_candidates
    stored = SqliteJournal(journal)
    try:
        assert len(stored.responses(sid, 3)) == 12
    finally:
        stored.close()


def test_confirmation_without_an_end_is_refused(store_root: Path, tmp_path: Path) -> None:
    server, _ = _start_server(store_root, str(tmp_path / "journal.sqlite3"))
    try:
        with ClosedLoopClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            with pytest.raises(InvalidInput, match="needs max_generations") as exc:
                client.create_session(neuron_count=NEURONS, confirmation=True)
            assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
