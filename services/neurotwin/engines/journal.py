"""Durable journal of closed-loop sessions: SQLite (WAL) by default, PostgreSQL for several replicas.

Everything a session needs to carry on after a crash is written here, in one transaction per call,
before the call is acknowledged: the session's settings, its natural reference images, each proposed
generation (latents, image bytes and their sha256), each told response (every repeat), and the
optimizer state after each completed generation.

Concurrency: every session row has a ``revision`` that each write bumps, conditionally on the revision
the writer last read. Two replicas (or two threads) racing on one session therefore cannot both win;
the loser gets ``ConcurrentModification`` (gRPC ABORTED), reloads, and retries.

Both back ends share the SQL below; only connection handling, parameter style and column types differ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.errors import ConcurrentModification, InvalidInput, NotFound, Unavailable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Where `neurotwin serve` journals closed-loop sessions unless told otherwise.
DEFAULT_JOURNAL = "closed_loop_journal.sqlite3"
OPEN, FINISHED, CLOSED = "open", "finished", "closed"
SYNTHETIC, NATURAL = "synthetic", "natural"


@dataclass
class SessionRecord:
    session_id: str
    config: dict[str, Any]
    created: float
    updated: float
    status: str = OPEN
    revision: int = 0
    # Index of the generation Ask returns next (equals the number of generations fully told).
    generation: int = 0
    presentations_told: int = 0
    # Best-so-far summary (JSON), as reported by Tell.
    best: dict[str, Any] = field(default_factory=dict)


@dataclass
class NaturalImage:
    index: int
    name: str
    sha256: str
    data: bytes


@dataclass
class GenerationRecord:
    generation: int
    created: float
    told: float | None = None
    # What was known when it was proposed (e.g. how candidates were ranked).
    meta: dict[str, Any] = field(default_factory=dict)
    # Set when fully told: objective statistics and optimizer trajectory values.
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class StimulusRecord:
    generation: int
    index: int
    stimulus_id: str
    kind: str
    sha256: str
    image: bytes | None = None
    # float64 latent code (synthetic stimuli), or the index into the natural set (natural ones).
    latent: np.ndarray | None = None
    natural_index: int | None = None
    # The twin's predicted rates for all of its outputs, and the score the stimulus was ranked by.
    predicted: np.ndarray | None = None
    predicted_score: float | None = None


@dataclass
class ResponseRecord:
    generation: int
    index: int
    # float32 [repeats, neurons] exactly as told.
    repeats: np.ndarray
    received: float
    onset: float | None = None
    duration: float | None = None

    @property
    def mean(self) -> np.ndarray:
        return self.repeats.mean(axis=0, dtype=np.float64)

    def digest(self) -> bytes:
        """Identity of the told values, to tell an identical retry from a conflicting one."""
        shape = np.asarray(self.repeats.shape, dtype=np.int64).tobytes()
        return shape + np.ascontiguousarray(self.repeats, dtype=np.float32).tobytes()


@dataclass
class Completion:
    """What a Tell that completes a generation writes besides the responses."""

    generation: int
    told: float
    summary: dict[str, Any]
    optimizer_state: bytes
    best: dict[str, Any]
    status: str = OPEN


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


class Journal(ABC):
    """Durable store of closed-loop sessions. Every write method commits before it returns."""

    url: str

    @abstractmethod
    def create_session(
        self, record: SessionRecord, natural: Sequence[NaturalImage], optimizer_state: bytes
    ) -> bool:
        """Insert a new session; False (and nothing written) when the id is taken."""

    @abstractmethod
    def get_session(self, session_id: str) -> SessionRecord: ...

    @abstractmethod
    def list_sessions(self, open_only: bool = False) -> list[SessionRecord]: ...

    @abstractmethod
    def revision(self, session_id: str) -> int: ...

    @abstractmethod
    def optimizer_state(self, session_id: str) -> bytes: ...

    @abstractmethod
    def natural_images(
        self, session_id: str, indices: Sequence[int] | None = None, with_data: bool = True
    ) -> list[NaturalImage]:
        """The session's natural set (all, or the given indices in the given order, repeats allowed)."""

    @abstractmethod
    def add_generation(
        self,
        session_id: str,
        expected_revision: int,
        generation: GenerationRecord,
        stimuli: Sequence[StimulusRecord],
    ) -> int:
        """Journal a proposed generation; returns the session's new revision."""

    @abstractmethod
    def add_responses(
        self,
        session_id: str,
        expected_revision: int,
        responses: Sequence[ResponseRecord],
        completion: Completion | None = None,
    ) -> int:
        """Journal told responses (and, when they complete a generation, the optimizer's new state)."""

    @abstractmethod
    def set_status(self, session_id: str, expected_revision: int, status: str) -> int: ...

    @abstractmethod
    def generations(self, session_id: str) -> list[GenerationRecord]: ...

    @abstractmethod
    def stimuli(
        self, session_id: str, generation: int | None = None, with_images: bool = True
    ) -> list[StimulusRecord]: ...

    @abstractmethod
    def responses(self, session_id: str, generation: int | None = None) -> list[ResponseRecord]: ...

    @abstractmethod
    def close(self) -> None: ...


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


class SqliteJournal(SqlJournal):
    """One SQLite file in WAL mode with synchronous=FULL: a commit is on disk before we acknowledge.

    WAL lets readers (exports, GetSession) run while a write is in progress; FULL makes each commit
    fsync the log, so an acknowledged response survives a power cut as well as a killed process.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        super().__init__()
        self.path = Path(path)
        self.url = str(self.path)
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise InvalidInput(f"sqlite synchronous {synchronous!r}: expected FULL, EXTRA or NORMAL")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Transactions are explicit (BEGIN IMMEDIATE below), so the module's implicit ones are off.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except (OSError, sqlite3.Error) as exc:
            raise InvalidInput(f"journal {self.path}: cannot open SQLite database ({exc})") from exc
        if str(mode).lower() != "wal":
            raise InvalidInput(f"journal {self.path}: SQLite refused WAL mode (got {mode!r})")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._create_schema()

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        cur = self._conn.cursor()
        # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read.
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresJournal(SqlJournal):
    """PostgreSQL through psycopg 3; several server replicas may share one database.

    Tables live in the connection's search_path schema (put ``options=-csearch_path%3Dmyschema`` in
    the URL to choose one). A dropped connection is reopened on the next call; the call that saw it
    fails with UNAVAILABLE and is safe to retry, since no partial transaction is ever committed.
    """

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as exc:
            raise InvalidInput(
                "a postgresql:// journal needs psycopg 3: pip install 'psycopg[binary]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self._conn: Any = None
        self._connect()
        self._create_schema()

    def _connect(self) -> None:
        try:
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:
            raise Unavailable(f"journal {_redact(self.url)}: cannot connect to PostgreSQL ({exc})") from exc

    def _sql(self, text: str) -> str:
        # The shared SQL uses '?' placeholders and contains no literal '?' or '%'.
        return text.replace("?", "%s")

    def _lock_schema(self, cur: Any) -> None:
        # Replicas starting together would otherwise race on CREATE TABLE IF NOT EXISTS.
        cur.execute("SELECT pg_advisory_xact_lock(727372)")

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._connect()
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur
        except self._psycopg.OperationalError as exc:
            raise Unavailable(f"journal {_redact(self.url)}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url


def open_journal(url: str | Path) -> Journal:
    """``postgresql://...`` (or ``postgres://``) -> PostgreSQL; anything else is a SQLite file path."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresJournal(text)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    return SqliteJournal(text)
