"""A session as held in memory between calls; rebuilt from the journal whenever the journal moved on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neurotwin.engines.closed_loop.driver import OptimizerDriver
from neurotwin.engines.closed_loop.guidance import Guide, Twin
from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.engines.journal import OPEN, GenerationRecord, ResponseRecord, SessionRecord, StimulusRecord


@dataclass
class Pending:
    """The generation asked and not yet completely told."""

    generation: GenerationRecord
    stimuli: list[StimulusRecord]
    responses: dict[int, ResponseRecord]
    # Presentation positions of the synthetic stimuli, in the order the optimizer is told.
    synthetic_positions: list[int]

    def by_id(self) -> dict[str, StimulusRecord]:
        return {s.stimulus_id: s for s in self.stimuli}


class LiveSession:
    """A session loaded into memory: its journal record, optimizer, models and pending generation."""

    def __init__(self, record: SessionRecord, config: SessionConfig) -> None:
        self.record = record
        self.config = config
        self.driver: OptimizerDriver | None = None
        self.generator: Any = None
        self.twin: Twin | None = None
        self.pending: Pending | None = None
        self.natural_names: list[str] = []
        self.natural_order: np.ndarray = np.zeros(0, dtype=np.int64)
        self.guide = Guide(config)

    @property
    def finished(self) -> bool:
        limit = self.config.max_generations
        return self.record.status != OPEN or (limit > 0 and self.record.generation >= limit)
