"""What the closed-loop data plane returns and takes: plain dataclasses, no protocol types."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from neurotwin.engines.closed_loop.settings import SessionConfig


@dataclass
class Stimulus:
    stimulus_id: str
    index: int
    kind: str
    image: bytes | None
    sha256: str
    natural_name: str = ""
    predicted_rates: list[float] = field(default_factory=list)
    predicted_score: float | None = None
    # For a confirmation re-presentation: the stimulus id of the image's first presentation.
    repeat_of: str = ""


@dataclass
class Generation:
    session_id: str
    generation: int
    finished: bool
    stimuli: list[Stimulus]
    image_format: str
    created: float = 0.0
    # True when this call proposed (and journaled) the generation; False when it was pending already.
    new: bool = False


@dataclass
class ToldResponse:
    """One stimulus' responses as a caller gives them: ``rates`` (a mean) or ``repeats``, not both."""

    stimulus_id: str
    rates: Sequence[float] | None = None
    repeats: Sequence[Sequence[float]] | None = None
    onset: float | None = None
    duration: float | None = None


@dataclass
class TellResult:
    session_id: str
    generation: int
    generation_complete: bool
    missing_stimulus_ids: list[str]
    best: dict[str, Any]
    generations_told: int
    presentations_told: int
    finished: bool
    # Responses newly journaled by this call (0 for a pure retry), and whether it completed the generation.
    stored: int = 0
    completed_now: bool = False


@dataclass
class SessionView:
    session_id: str
    status: str
    config: SessionConfig
    created: float
    updated: float
    generation: int
    pending: bool
    generations_told: int
    presentations_told: int
    best: dict[str, Any]


def empty_best() -> dict[str, Any]:
    return {
        "generation": -1,
        "stimulus_id": "",
        "score": float("nan"),
        "target_rates": [],
        "best_natural_stimulus_id": "",
        "best_natural_score": float("nan"),
        "last_generation_mean": float("nan"),
        "last_generation_max": float("nan"),
        # Set by the confirmation generation (closed_loop.confirmation.confirmed_summary).
        "confirmed": {},
        "confirmation_candidates": [],
    }
