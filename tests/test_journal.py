"""The closed-loop journal on real SQLite files and a real PostgreSQL database (skipped without one)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from neurotwin.engines.journal import (
    CLOSED,
    NATURAL,
    OPEN,
    SYNTHETIC,
    Completion,
    ConcurrentModification,
    GenerationRecord,
    Journal,
    NaturalImage,
    PostgresJournal,
    ResponseRecord,
    SessionRecord,
    SqliteJournal,
    open_journal,
)
from neurotwin.errors import NotFound


@pytest.fixture(params=["sqlite", "postgresql"])
def journal_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "journal.sqlite3")
    return request.getfixturevalue("postgres_url")


def _session(session_id: str = "s1") -> SessionRecord:
    return SessionRecord(
        session_id=session_id, config={"neuron_count": 3, "seed": 7}, created=100.0, updated=100.0
    )


def _natural() -> list[NaturalImage]:
    return [NaturalImage(i, f"img{i}.png", f"{i:064x}", bytes([i]) * (10 + i)) for i in range(4)]


def _stimuli(generation: int) -> list:
    from neurotwin.engines.journal import StimulusRecord

    rng = np.random.default_rng(generation)
    return [
        StimulusRecord(
            generation=generation,
            index=0,
            stimulus_id=f"g{generation}-s0",
            kind=SYNTHETIC,
            sha256="a" * 64,
            image=b"\x89PNG fake",
            latent=rng.standard_normal(5),
            predicted=rng.random(3).astype(np.float32),
            predicted_score=0.25,
        ),
        StimulusRecord(
            generation=generation,
            index=1,
            stimulus_id=f"g{generation}-s1",
            kind=NATURAL,
            sha256="b" * 64,
            image=b"natural",
            natural_index=2,
        ),
    ]


def _response(generation: int, index: int, value: float, repeats: int = 1) -> ResponseRecord:
    rates = np.full((repeats, 3), value, dtype=np.float32) + np.arange(repeats, dtype=np.float32)[:, None]
    return ResponseRecord(generation, index, rates, received=200.0 + index, onset=1.5 if index else None)


def test_round_trip_and_revisions(journal_url: str) -> None:
    journal = open_journal(journal_url)
    try:
        assert journal.create_session(_session(), _natural(), b"state-0")
        assert not journal.create_session(_session(), [], b"other"), "an existing id must not be overwritten"
        assert journal.optimizer_state("s1") == b"state-0"
        record = journal.get_session("s1")
        assert (record.status, record.revision, record.generation, record.config["seed"]) == (OPEN, 0, 0, 7)

        natural = journal.natural_images("s1", [3, 0, 3])
        assert [n.index for n in natural] == [3, 0, 3] and natural[0].data == bytes([3]) * 13
        assert [n.data for n in journal.natural_images("s1", with_data=False)] == [b""] * 4
        with pytest.raises(NotFound):
            journal.natural_images("s1", [9])

        stimuli = _stimuli(0)
        rev = journal.add_generation("s1", 0, GenerationRecord(0, 150.0, meta={"k": 1}), stimuli)
        assert rev == 1 == journal.revision("s1")
        loaded = journal.stimuli("s1", 0)
        assert loaded[0].latent is not None and np.array_equal(loaded[0].latent, stimuli[0].latent)
        assert loaded[0].latent.dtype == np.float64
        assert np.array_equal(loaded[0].predicted, stimuli[0].predicted)
        assert loaded[1].natural_index == 2 and loaded[1].latent is None and loaded[1].image == b"natural"
        assert journal.stimuli("s1", 0, with_images=False)[0].image is None

        # A stale revision loses: nothing is written.
        with pytest.raises(ConcurrentModification):
            journal.add_responses("s1", 0, [_response(0, 0, 1.0)])
        assert journal.responses("s1") == []

        rev = journal.add_responses("s1", rev, [_response(0, 0, 1.0, repeats=3)])
        assert journal.get_session("s1").presentations_told == 1
        done = Completion(0, 300.0, {"synthetic_max": 1.0}, b"state-1", {"score": 1.0}, status=OPEN)
        rev = journal.add_responses("s1", rev, [_response(0, 1, 2.0)], done)
        record = journal.get_session("s1")
        assert (record.revision, record.generation, record.presentations_told) == (rev, 1, 2)
        assert record.best == {"score": 1.0} and journal.optimizer_state("s1") == b"state-1"
        responses = journal.responses("s1", 0)
        assert responses[0].repeats.shape == (3, 3) and responses[0].repeats[2, 0] == 3.0
        assert responses[0].onset is None and responses[1].onset == 1.5
        generations = journal.generations("s1")
        assert generations[0].told == 300.0 and generations[0].summary == {"synthetic_max": 1.0}
        assert generations[0].meta == {"k": 1}

        rev = journal.set_status("s1", rev, CLOSED)
        assert journal.get_session("s1").status == CLOSED
        assert [s.session_id for s in journal.list_sessions()] == ["s1"]
        assert journal.list_sessions(open_only=True) == []
        with pytest.raises(NotFound):
            journal.get_session("nope")
        with pytest.raises(NotFound):
            journal.add_generation("nope", 0, GenerationRecord(0, 1.0), [])
    finally:
        journal.close()


def test_failed_write_leaves_nothing_behind(journal_url: str) -> None:
    """A transaction that fails half-way (a duplicate response row) rolls back every part of it."""
    journal = open_journal(journal_url)
    try:
        journal.create_session(_session(), [], b"s")
        rev = journal.add_generation("s1", 0, GenerationRecord(0, 1.0), _stimuli(0))
        rev = journal.add_responses("s1", rev, [_response(0, 0, 1.0)])
        with pytest.raises(Exception):  # noqa: B017 - the driver's own integrity error type
            journal.add_responses("s1", rev, [_response(0, 1, 2.0), _response(0, 0, 5.0)])
        record = journal.get_session("s1")
        assert (record.revision, record.presentations_told) == (rev, 1)
        assert [r.index for r in journal.responses("s1")] == [0]
        # The journal is still usable after the rollback.
        journal.add_responses("s1", rev, [_response(0, 1, 2.0)])
        assert journal.get_session("s1").presentations_told == 2
    finally:
        journal.close()


def test_two_writers_on_one_journal(journal_url: str) -> None:
    """Two replicas (two journal objects) racing on one session: the second writer is refused."""
    first, second = open_journal(journal_url), open_journal(journal_url)
    try:
        first.create_session(_session(), [], b"s")
        seen = second.get_session("s1").revision
        first.add_generation("s1", 0, GenerationRecord(0, 1.0), _stimuli(0))
        with pytest.raises(ConcurrentModification):
            second.add_generation("s1", seen, GenerationRecord(0, 1.0), _stimuli(0))
        assert len(second.stimuli("s1")) == 2
    finally:
        first.close()
        second.close()


def test_sqlite_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "j.sqlite3"
    journal = SqliteJournal(path)
    journal.create_session(_session(), _natural(), b"s")
    journal.add_generation("s1", 0, GenerationRecord(0, 1.0), _stimuli(0))
    journal.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = open_journal(f"sqlite:///{path}")
    assert isinstance(again, SqliteJournal)
    assert again.get_session("s1").revision == 1 and len(again.stimuli("s1")) == 2
    again.close()


def test_open_journal_picks_the_backend(tmp_path: Path, postgres_url: str) -> None:
    journal: Journal = open_journal(postgres_url)
    try:
        assert isinstance(journal, PostgresJournal)
    finally:
        journal.close()
    assert isinstance(open_journal(tmp_path / "x.sqlite3"), SqliteJournal)
