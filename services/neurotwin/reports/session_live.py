"""Closed-loop sessions as they run, for the live dashboard: the session list, each session's summary as
JSON, its stimulus images and the static report's figures, read from the journal.

The numbers are ``session_summary.summarize_session``'s, the figures ``session_report``'s, so the live
view and ``rig-sim --report`` show the same. A session's summary is computed once per journal revision
(every Ask that proposes, every Tell and every status change bumps it) and cached, so that many
browsers polling a running session cost one journal read per change, not one per poll.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neurotwin.engines.journal import Journal, SessionRecord
from neurotwin.engines.session_export import collect
from neurotwin.errors import NotFound
from neurotwin.reports.session_report import FIGURES, RENDERERS, SETTING_KEYS
from neurotwin.reports.session_summary import SessionSummary, StimulusScore, summarize_session

DEFAULT_TOP = 8


@dataclass(frozen=True)
class Snapshot:
    """A session's summary as of one journal revision."""

    revision: int
    summary: SessionSummary


def _number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: they become null ("not measured")."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def stimulus_json(stimulus: StimulusScore, image_url: Callable[[StimulusScore], str]) -> dict[str, Any]:
    return {
        "stimulus_id": stimulus.stimulus_id,
        "generation": stimulus.generation,
        "index": stimulus.index,
        "kind": stimulus.kind,
        "natural_name": stimulus.natural_name,
        "sha256": stimulus.sha256,
        "score": _number(stimulus.score),
        "target_rates": [_number(v) for v in stimulus.target_rates],
        "repeats": stimulus.repeats,
        "confirmations": [_number(v) for v in stimulus.confirmations],
        "confirmed_score": _number(stimulus.confirmed_score),
        "image_url": image_url(stimulus),
    }


def summary_json(
    snapshot: Snapshot, record: SessionRecord, image_url: Callable[[StimulusScore], str]
) -> dict[str, Any]:
    """What the dashboard draws for one session; ``image_url`` says where each stimulus's image is."""
    s = snapshot.summary
    return {
        "session_id": s.session_id,
        "revision": snapshot.revision,
        "status": s.status,
        "created": s.created,
        "updated": record.updated,
        "start_time": s.start_time,
        "objective": s.objective,
        "response_units": s.response_units,
        "target_neuron_ids": list(s.target_neuron_ids),
        "generations_told": s.generations_told,
        "presentations_told": s.presentations_told,
        "max_generations": s.settings.get("max_generations") or 0,
        "settings": {k: s.settings[k] for k in SETTING_KEYS if s.settings.get(k) not in (None, "")},
        "metadata": s.metadata,
        "generations": [
            {
                "generation": g.generation,
                "synthetic_mean": _number(g.synthetic_mean),
                "synthetic_max": _number(g.synthetic_max),
                "natural_mean": _number(g.natural_mean),
                "natural_max": _number(g.natural_max),
                "best_so_far": _number(g.best_so_far),
            }
            for g in s.generations
        ],
        "best": [stimulus_json(b, image_url) for b in s.best],
        "best_natural": stimulus_json(s.best_natural, image_url) if s.best_natural else None,
        "last_generation": [stimulus_json(x, image_url) for x in s.last_generation],
        "has_repeats": s.has_repeats,
    }


def session_list_json(record: SessionRecord) -> dict[str, Any]:
    """One row of the session list: what the journal's session row has, no per-stimulus reads."""
    config = record.config
    best = record.best or {}
    return {
        "session_id": record.session_id,
        "status": record.status,
        "revision": record.revision,
        "created": record.created,
        "updated": record.updated,
        "generations_told": record.generation,
        "presentations_told": record.presentations_told,
        "max_generations": config.get("max_generations") or 0,
        "optimizer": config.get("optimizer", ""),
        "description": config.get("description", ""),
        "best_score": _number(best.get("score")),
        "best_natural_score": _number(best.get("best_natural_score")),
    }


class LiveSessions:
    """Read side of the journal for the dashboard, with summaries and figures cached per revision."""

    def __init__(self, journal: Journal, top: int = DEFAULT_TOP, cache_size: int = 32) -> None:
        self.journal = journal
        self.top = top
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._summaries: OrderedDict[str, Snapshot] = OrderedDict()
        self._figures: OrderedDict[str, tuple[int, dict[str, bytes]]] = OrderedDict()

    def sessions(self) -> list[dict[str, Any]]:
        # Newest first: the running session is usually the one wanted.
        records = sorted(self.journal.list_sessions(), key=lambda r: (-r.created, r.session_id))
        return [session_list_json(r) for r in records]

    def record(self, session_id: str) -> SessionRecord:
        return self.journal.get_session(session_id)

    def snapshot(self, session_id: str, revision: int | None = None) -> Snapshot:
        """The summary at ``revision`` (read it first with ``record``), computed once per revision."""
        if revision is None:
            revision = self.journal.revision(session_id)
        with self._lock:
            cached = self._summaries.get(session_id)
            if cached is not None and cached.revision == revision:
                self._summaries.move_to_end(session_id)
                return cached
        # The revision was read before the rows, so a summary is never older than its revision
        # (a change landing meanwhile makes it newer, and the next revision recomputes it).
        summary = summarize_session(collect(self.journal, session_id, with_images=False), top=self.top)
        snapshot = Snapshot(revision, summary)
        with self._lock:
            self._summaries[session_id] = snapshot
            self._summaries.move_to_end(session_id)
            while len(self._summaries) > self.cache_size:
                self._summaries.popitem(last=False)
        return snapshot

    def image(self, session_id: str, generation: int, index: int) -> tuple[bytes, str]:
        """The encoded image (PNG or JPEG, as the rig got it) and its sha256."""
        for stimulus in self.journal.stimuli(session_id, generation=generation, with_images=True):
            if stimulus.index == index and stimulus.image is not None:
                return stimulus.image, stimulus.sha256
        self.journal.get_session(session_id)  # NotFound for an unknown session
        raise NotFound(f"session {session_id!r} has no stimulus {index} in generation {generation}")

    def figures(self, session_id: str, revision: int) -> dict[str, bytes]:
        """The static report's PNG figures at ``revision`` (rendered with matplotlib, so cached)."""
        with self._lock:
            cached = self._figures.get(session_id)
            if cached is not None and cached[0] == revision:
                return cached[1]
        summary = summarize_session(collect(self.journal, session_id, with_images=True), top=self.top)
        figures = {name: RENDERERS[name](summary) for name in FIGURES}
        with self._lock:
            self._figures[session_id] = (revision, figures)
            while len(self._figures) > max(1, self.cache_size // 4):
                self._figures.popitem(last=False)
        return figures
