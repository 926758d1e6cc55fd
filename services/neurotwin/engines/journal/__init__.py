"""Durable journal of closed-loop sessions: SQLite (WAL) by default, PostgreSQL for several replicas.

Everything a session needs to carry on after a crash is written here, in one transaction per call,
before the call is acknowledged: the session's settings, its natural reference images, each proposed
generation (latents, image bytes and their sha256), each told response (every repeat), and the
optimizer state after each completed generation.

Concurrency: every session row has a ``revision`` that each write bumps, conditionally on the revision
the writer last read. Two replicas (or two threads) racing on one session therefore cannot both win;
the loser gets ``ConcurrentModification`` (gRPC ABORTED), reloads, and retries.

Both back ends share one SQL text; only connection handling, parameter style and column types differ.
Modules: ``records`` (the records and the ``Journal`` interface), ``sql`` (the shared SQL) and
``backends`` (SQLite, PostgreSQL, ``open_journal``).
"""

from neurotwin.engines.journal.backends import PostgresJournal, SqliteJournal, open_journal
from neurotwin.engines.journal.records import (
    CLOSED,
    DEFAULT_JOURNAL,
    FINISHED,
    NATURAL,
    OPEN,
    SCHEMA_VERSION,
    SYNTHETIC,
    Completion,
    GenerationRecord,
    Journal,
    NaturalImage,
    ResponseRecord,
    SessionRecord,
    StimulusRecord,
)
from neurotwin.engines.journal.sql import SqlJournal
from neurotwin.errors import ConcurrentModification

__all__ = [
    "CLOSED",
    "DEFAULT_JOURNAL",
    "FINISHED",
    "NATURAL",
    "OPEN",
    "SCHEMA_VERSION",
    "SYNTHETIC",
    "Completion",
    "ConcurrentModification",
    "GenerationRecord",
    "Journal",
    "NaturalImage",
    "PostgresJournal",
    "ResponseRecord",
    "SessionRecord",
    "SqlJournal",
    "SqliteJournal",
    "StimulusRecord",
    "open_journal",
]
