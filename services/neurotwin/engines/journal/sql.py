"""The SQL both back ends share: schema, reads, and revision-checked writes in one transaction each."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from neurotwin.engines.journal.records import (
    CLOSED,
    FINISHED,
    OPEN,
    SCHEMA_VERSION,
    Completion,
    GenerationRecord,
    Journal,
    NaturalImage,
    ResponseRecord,
    SessionRecord,
    StimulusRecord,
)
from neurotwin.errors import ConcurrentModification, InvalidInput, NotFound

log = logging.getLogger(__name__)


def _array_bytes(array: np.ndarray | None, dtype: type) -> bytes | None:
    if array is None:
        return None
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _array_from(data: bytes | memoryview | None, dtype: type, shape: tuple[int, ...] | None = None) -> Any:
    if data is None:
        return None
    array = np.frombuffer(bytes(data), dtype=dtype).copy()
    return array.reshape(shape) if shape is not None else array


# Column types per dialect; the SQL text is otherwise shared.
_TYPES = {
    "sqlite": {"blob": "BLOB", "real": "REAL", "int": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "real": "DOUBLE PRECISION", "int": "BIGINT"},
}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nt_journal_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS nt_sessions (
        session_id TEXT PRIMARY KEY,
        config TEXT NOT NULL,
        created {real} NOT NULL,
        updated {real} NOT NULL,
        status TEXT NOT NULL,
        revision {int} NOT NULL,
        generation {int} NOT NULL,
        presentations_told {int} NOT NULL,
        best TEXT NOT NULL,
        optimizer_state {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS nt_natural_images (
        session_id TEXT NOT NULL REFERENCES nt_sessions(session_id),
        idx {int} NOT NULL,
        name TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        data {blob} NOT NULL,
        PRIMARY KEY (session_id, idx))""",
    """CREATE TABLE IF NOT EXISTS nt_generations (
        session_id TEXT NOT NULL REFERENCES nt_sessions(session_id),
        generation {int} NOT NULL,
        created {real} NOT NULL,
        told {real},
        meta TEXT NOT NULL,
        summary TEXT NOT NULL,
        PRIMARY KEY (session_id, generation))""",
    """CREATE TABLE IF NOT EXISTS nt_stimuli (
        session_id TEXT NOT NULL,
        generation {int} NOT NULL,
        idx {int} NOT NULL,
        stimulus_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        image {blob},
        latent {blob},
        natural_index {int},
        predicted {blob},
        predicted_score {real},
        PRIMARY KEY (session_id, generation, idx),
        FOREIGN KEY (session_id, generation) REFERENCES nt_generations(session_id, generation))""",
    """CREATE TABLE IF NOT EXISTS nt_responses (
        session_id TEXT NOT NULL,
        generation {int} NOT NULL,
        idx {int} NOT NULL,
        repeats {int} NOT NULL,
        neurons {int} NOT NULL,
        rates {blob} NOT NULL,
        received {real} NOT NULL,
        onset {real},
        duration {real},
        PRIMARY KEY (session_id, generation, idx),
        FOREIGN KEY (session_id, generation, idx) REFERENCES nt_stimuli(session_id, generation, idx))""",
)

_SESSION_COLUMNS = (
    "session_id, config, created, updated, status, revision, generation, presentations_told, best"
)
_STIMULUS_COLUMNS = (
    "generation, idx, stimulus_id, kind, sha256, {image}, latent, natural_index, predicted, predicted_score"
)


class SqlJournal(Journal):
    """The SQL shared by both back ends. Subclasses provide a connection and a transaction scope."""

    dialect = "sqlite"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -- back-end hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _transaction(self, write: bool) -> contextlib.AbstractContextManager[Any]:
        """A context yielding a cursor-like object with ``execute(sql, params)``; commits on exit."""

    def _sql(self, text: str) -> str:
        return text

    # -- helpers --------------------------------------------------------------------------------------
    def _exec(self, cur: Any, text: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._sql(text), tuple(params))
        return cur

    def _exec_many(self, cur: Any, text: str, rows: Sequence[tuple[Any, ...]]) -> None:
        # One statement for a generation's rows: a Tell or Ask writes 40+ of them inside its latency budget.
        if rows:
            cur.executemany(self._sql(text), rows)

    def _create_schema(self) -> None:
        types = _TYPES[self.dialect]
        with self._transaction(write=True) as cur:
            self._lock_schema(cur)
            for statement in _SCHEMA:
                self._exec(cur, statement.format(**types))
            row = self._exec(cur, "SELECT value FROM nt_journal_meta WHERE key = ?", ("schema",)).fetchone()
            if row is None:
                self._exec(
                    cur,
                    "INSERT INTO nt_journal_meta (key, value) VALUES (?, ?)",
                    ("schema", str(SCHEMA_VERSION)),
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise InvalidInput(
                    f"journal {self.url}: schema version {row[0]} is newer than this server "
                    f"understands ({SCHEMA_VERSION}); upgrade neurotwin"
                )

    def _lock_schema(self, cur: Any) -> None:
        """Serialize schema creation between processes (SQLite's write lock already does)."""

    def _bump(
        self, cur: Any, session_id: str, expected_revision: int, sets: str = "", params: Sequence = ()
    ) -> int:
        """Advance the session's revision if nobody else did since ``expected_revision``."""
        now = time.time()
        assignments = "revision = revision + 1, updated = ?" + (", " + sets if sets else "")
        cur = self._exec(
            cur,
            f"UPDATE nt_sessions SET {assignments} WHERE session_id = ? AND revision = ?",
            (now, *params, session_id, expected_revision),
        )
        if cur.rowcount != 1:
            exists = self._exec(cur, "SELECT revision FROM nt_sessions WHERE session_id = ?", (session_id,))
            row = exists.fetchone()
            if row is None:
                raise NotFound(f"no closed-loop session {session_id!r}")
            raise ConcurrentModification(
                f"session {session_id!r} changed concurrently (revision {row[0]}, expected "
                f"{expected_revision}); retry"
            )
        return expected_revision + 1

    @staticmethod
    def _session_from(row: Sequence[Any]) -> SessionRecord:
        return SessionRecord(
            session_id=row[0],
            config=json.loads(row[1]),
            created=float(row[2]),
            updated=float(row[3]),
            status=row[4],
            revision=int(row[5]),
            generation=int(row[6]),
            presentations_told=int(row[7]),
            best=json.loads(row[8]),
        )

    # -- sessions -------------------------------------------------------------------------------------
    def create_session(
        self, record: SessionRecord, natural: Sequence[NaturalImage], optimizer_state: bytes
    ) -> bool:
        with self._lock, self._transaction(write=True) as cur:
            taken = self._exec(cur, "SELECT 1 FROM nt_sessions WHERE session_id = ?", (record.session_id,))
            if taken.fetchone() is not None:
                return False
            self._exec(
                cur,
                f"INSERT INTO nt_sessions ({_SESSION_COLUMNS}, optimizer_state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.session_id,
                    json.dumps(record.config, sort_keys=True),
                    record.created,
                    record.updated,
                    record.status,
                    record.revision,
                    record.generation,
                    record.presentations_told,
                    json.dumps(record.best),
                    optimizer_state,
                ),
            )
            for image in natural:
                self._exec(
                    cur,
                    "INSERT INTO nt_natural_images (session_id, idx, name, sha256, data) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (record.session_id, image.index, image.name, image.sha256, image.data),
                )
        return True

    def get_session(self, session_id: str) -> SessionRecord:
        with self._lock, self._transaction(write=False) as cur:
            row = self._exec(
                cur, f"SELECT {_SESSION_COLUMNS} FROM nt_sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no closed-loop session {session_id!r}")
        return self._session_from(row)

    def list_sessions(self, open_only: bool = False) -> list[SessionRecord]:
        where = " WHERE status = ?" if open_only else ""
        params = (OPEN,) if open_only else ()
        with self._lock, self._transaction(write=False) as cur:
            rows = self._exec(
                cur, f"SELECT {_SESSION_COLUMNS} FROM nt_sessions{where} ORDER BY created, session_id", params
            ).fetchall()
        return [self._session_from(row) for row in rows]

    def revision(self, session_id: str) -> int:
        with self._lock, self._transaction(write=False) as cur:
            row = self._exec(
                cur, "SELECT revision FROM nt_sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no closed-loop session {session_id!r}")
        return int(row[0])

    def optimizer_state(self, session_id: str) -> bytes:
        with self._lock, self._transaction(write=False) as cur:
            row = self._exec(
                cur, "SELECT optimizer_state FROM nt_sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no closed-loop session {session_id!r}")
        return bytes(row[0])

    def natural_images(
        self, session_id: str, indices: Sequence[int] | None = None, with_data: bool = True
    ) -> list[NaturalImage]:
        data = "data" if with_data else "NULL"
        query = f"SELECT idx, name, sha256, {data} FROM nt_natural_images WHERE session_id = ?"
        params: list[Any] = [session_id]
        wanted = sorted(set(indices)) if indices is not None else None
        if wanted is not None:
            if not wanted:
                return []
            query += f" AND idx IN ({', '.join('?' * len(wanted))})"
            params += wanted
        with self._lock, self._transaction(write=False) as cur:
            rows = self._exec(cur, query + " ORDER BY idx", params).fetchall()
        images = {
            int(r[0]): NaturalImage(int(r[0]), r[1], r[2], b"" if r[3] is None else bytes(r[3])) for r in rows
        }
        if indices is None:
            return list(images.values())
        missing = sorted(set(wanted or []) - set(images))
        if missing:
            raise NotFound(f"session {session_id!r} has no natural images {missing[:5]}")
        return [images[i] for i in indices]

    # -- generations and responses -------------------------------------------------------------------
    def add_generation(
        self,
        session_id: str,
        expected_revision: int,
        generation: GenerationRecord,
        stimuli: Sequence[StimulusRecord],
    ) -> int:
        with self._lock, self._transaction(write=True) as cur:
            revision = self._bump(cur, session_id, expected_revision)
            self._exec(
                cur,
                "INSERT INTO nt_generations (session_id, generation, created, told, meta, summary) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session_id,
                    generation.generation,
                    generation.created,
                    generation.told,
                    json.dumps(generation.meta),
                    json.dumps(generation.summary),
                ),
            )
            self._exec_many(
                cur,
                "INSERT INTO nt_stimuli (session_id, generation, idx, stimulus_id, kind, sha256, "
                "image, latent, natural_index, predicted, predicted_score) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        session_id,
                        s.generation,
                        s.index,
                        s.stimulus_id,
                        s.kind,
                        s.sha256,
                        s.image,
                        _array_bytes(s.latent, np.float64),
                        s.natural_index,
                        _array_bytes(s.predicted, np.float32),
                        s.predicted_score,
                    )
                    for s in stimuli
                ],
            )
        return revision

    def add_responses(
        self,
        session_id: str,
        expected_revision: int,
        responses: Sequence[ResponseRecord],
        completion: Completion | None = None,
    ) -> int:
        with self._lock, self._transaction(write=True) as cur:
            sets = "presentations_told = presentations_told + ?"
            params: list[Any] = [len(responses)]
            if completion is not None:
                sets += ", generation = ?, best = ?, optimizer_state = ?, status = ?"
                params += [
                    completion.generation + 1,
                    json.dumps(completion.best),
                    completion.optimizer_state,
                    completion.status,
                ]
            revision = self._bump(cur, session_id, expected_revision, sets, params)
            rows = [
                (
                    session_id,
                    r.generation,
                    r.index,
                    r.repeats.shape[0],
                    r.repeats.shape[1],
                    np.ascontiguousarray(r.repeats, dtype=np.float32).tobytes(),
                    r.received,
                    r.onset,
                    r.duration,
                )
                for r in responses
            ]
            self._exec_many(
                cur,
                "INSERT INTO nt_responses (session_id, generation, idx, repeats, neurons, rates, "
                "received, onset, duration) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if completion is not None:
                self._exec(
                    cur,
                    "UPDATE nt_generations SET told = ?, summary = ? WHERE session_id = ? AND generation = ?",
                    (completion.told, json.dumps(completion.summary), session_id, completion.generation),
                )
        return revision

    def set_status(self, session_id: str, expected_revision: int, status: str) -> int:
        if status not in (OPEN, FINISHED, CLOSED):
            raise InvalidInput(f"session status {status!r}")
        with self._lock, self._transaction(write=True) as cur:
            return self._bump(cur, session_id, expected_revision, "status = ?", (status,))

    def generations(self, session_id: str) -> list[GenerationRecord]:
        with self._lock, self._transaction(write=False) as cur:
            rows = self._exec(
                cur,
                "SELECT generation, created, told, meta, summary FROM nt_generations WHERE session_id = ? "
                "ORDER BY generation",
                (session_id,),
            ).fetchall()
        return [
            GenerationRecord(
                generation=int(r[0]),
                created=float(r[1]),
                told=None if r[2] is None else float(r[2]),
                meta=json.loads(r[3]),
                summary=json.loads(r[4]),
            )
            for r in rows
        ]

    def stimuli(
        self, session_id: str, generation: int | None = None, with_images: bool = True
    ) -> list[StimulusRecord]:
        columns = _STIMULUS_COLUMNS.format(image="image" if with_images else "NULL")
        where, params = "session_id = ?", [session_id]
        if generation is not None:
            where += " AND generation = ?"
            params.append(generation)
        with self._lock, self._transaction(write=False) as cur:
            rows = self._exec(
                cur, f"SELECT {columns} FROM nt_stimuli WHERE {where} ORDER BY generation, idx", params
            ).fetchall()
        return [
            StimulusRecord(
                generation=int(r[0]),
                index=int(r[1]),
                stimulus_id=r[2],
                kind=r[3],
                sha256=r[4],
                image=None if r[5] is None else bytes(r[5]),
                latent=_array_from(r[6], np.float64),
                natural_index=None if r[7] is None else int(r[7]),
                predicted=_array_from(r[8], np.float32),
                predicted_score=None if r[9] is None else float(r[9]),
            )
            for r in rows
        ]

    def responses(self, session_id: str, generation: int | None = None) -> list[ResponseRecord]:
        where, params = "session_id = ?", [session_id]
        if generation is not None:
            where += " AND generation = ?"
            params.append(generation)
        with self._lock, self._transaction(write=False) as cur:
            rows = self._exec(
                cur,
                "SELECT generation, idx, repeats, neurons, rates, received, onset, duration "
                f"FROM nt_responses WHERE {where} ORDER BY generation, idx",
                params,
            ).fetchall()
        return [
            ResponseRecord(
                generation=int(r[0]),
                index=int(r[1]),
                repeats=_array_from(r[4], np.float32, (int(r[2]), int(r[3]))),
                received=float(r[5]),
                onset=None if r[6] is None else float(r[6]),
                duration=None if r[7] is None else float(r[7]),
            )
            for r in rows
        ]
