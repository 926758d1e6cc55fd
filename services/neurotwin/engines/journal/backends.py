"""The journal's back ends: one SQLite file (WAL), or PostgreSQL shared by several replicas."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neurotwin.engines.journal.records import Journal
from neurotwin.engines.journal.sql import SqlJournal
from neurotwin.errors import InvalidInput, Unavailable


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
