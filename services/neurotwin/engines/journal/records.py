"""What the journal stores (plain records) and the interface every back end implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
