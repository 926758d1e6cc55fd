"""Closed-loop sessions as they run, for the live dashboard: the session list, each session's summary as
JSON, its stimulus images and the static report's figures, read from the journal.

The numbers are ``session_summary.summarize_session``'s, the figures ``session_report``'s, so the live
view and ``rig-sim --report`` show the same. Summarizing reads every told presentation (about 0.1 s
per thousand on a busy 2-core machine), and it shares the process with the rig's Asks and Tells, so:

- a summary is cached per session and recomputed only when what it shows changed: presentations
  told, generations completed or the status (an Ask that proposes a generation changes none of them);
- from rows read incrementally: a told generation's stimuli and responses never change, so they are
  kept and only the generations after them are read again;
- and at most once per ``min_interval_s`` (1 s) however fast Tells come and however many browsers
  poll: a poll within that second gets the previous summary (its revision says which) and the next
  poll the new one. A long session takes longer to summarize (3,000 presentations: about a second
  on a loaded 2-core machine), so the interval also stretches to ``COST_FACTOR`` times what the last
  summary took: watching a session costs the server at most about a fifth of a core.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from neurotwin.engines.journal import Journal, NaturalImage, ResponseRecord, SessionRecord, StimulusRecord
from neurotwin.engines.session_export import SessionData
from neurotwin.engines.session_metadata import RecordingMetadata
from neurotwin.errors import NotFound
from neurotwin.reports.session_report import FIGURES, RENDERERS, SETTING_KEYS
from neurotwin.reports.session_summary import SessionSummary, StimulusScore, summarize_session

DEFAULT_TOP = 8
DEFAULT_MIN_INTERVAL_S = 1.0
# Least time between two summaries of a session, as a multiple of what the last one took.
COST_FACTOR = 5.0


def told_state(record: SessionRecord) -> tuple[int, int, str]:
    """What a summary depends on, from the session row: it changes exactly when the summary does."""
    return record.presentations_told, record.generation, record.status


@dataclass(frozen=True)
class Snapshot:
    """A session's summary, computed from the journal as of ``record`` (read before the rows)."""

    record: SessionRecord
    summary: SessionSummary
    # time.monotonic() when it was computed, and the seconds computing it took.
    computed: float
    cost: float = 0.0

    @property
    def revision(self) -> int:
        return self.record.revision


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


def summary_json(snapshot: Snapshot, image_url: Callable[[StimulusScore], str]) -> dict[str, Any]:
    """What the dashboard draws for one session; ``image_url`` says where each stimulus's image is."""
    s = snapshot.summary
    return {
        "session_id": s.session_id,
        "revision": snapshot.revision,
        "status": s.status,
        "created": s.created,
        "updated": snapshot.record.updated,
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


@dataclass
class _Rows:
    """A session's journal rows (no pixels) of its first ``final`` generations, all told: final."""

    final: int
    stimuli: list[StimulusRecord]
    responses: list[ResponseRecord]
    natural: list[NaturalImage]


# Reading this many generations one query each is slower than one query for all.
_PER_GENERATION_READS = 4


class LiveSessions:
    """Read side of the journal for the dashboard, with summaries and figures cached per session."""

    def __init__(
        self,
        journal: Journal,
        top: int = DEFAULT_TOP,
        cache_size: int = 32,
        min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
        image_generations: int = 16,
    ) -> None:
        self.journal = journal
        self.top = top
        self.cache_size = cache_size
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._summaries: OrderedDict[str, Snapshot] = OrderedDict()
        # (session, figure) -> (revision of the snapshot it was drawn from, PNG)
        self._figures: OrderedDict[tuple[str, str], tuple[int, bytes]] = OrderedDict()
        # (session, generation) -> {index: (image, sha256)}
        self._images: OrderedDict[tuple[str, int], dict[int, tuple[bytes, str]]] = OrderedDict()
        self.image_generations = image_generations
        self._rows: OrderedDict[str, _Rows] = OrderedDict()

    def sessions(self) -> list[dict[str, Any]]:
        # Newest first: the running session is usually the one wanted.
        records = sorted(self.journal.list_sessions(), key=lambda r: (-r.created, r.session_id))
        return [session_list_json(r) for r in records]

    def snapshot(self, session_id: str) -> Snapshot:
        """The session's summary: the cached one while it is current (or younger than the minimum
        interval), else a new one."""
        record = self.journal.get_session(session_id)
        with self._lock:
            cached = self._summaries.get(session_id)
        if cached is not None:
            if told_state(cached.record) == told_state(record):
                return cached
            if self.min_interval_s > 0:
                wait = max(self.min_interval_s, COST_FACTOR * cached.cost)
                if time.monotonic() - cached.computed < wait:
                    return cached
        # The record was read before the rows, so a summary is never older than its record says (a
        # Tell landing meanwhile makes it newer, and the next record recomputes it).
        started = time.monotonic()
        summary = summarize_session(self._collect(session_id, record), top=self.top)
        finished = time.monotonic()
        snapshot = Snapshot(record, summary, finished, finished - started)
        with self._lock:
            current = self._summaries.get(session_id)
            if current is None or current.revision <= snapshot.revision:
                self._summaries[session_id] = snapshot
            self._summaries.move_to_end(session_id)
            while len(self._summaries) > self.cache_size:
                self._summaries.popitem(last=False)
        return snapshot

    def _collect(self, session_id: str, record: SessionRecord) -> SessionData:
        """What ``session_export.collect`` reads (without pixels), re-reading only unfinished rows."""
        generations = self.journal.generations(session_id)
        with self._lock:
            rows = self._rows.get(session_id)
        if rows is None or rows.final > len(generations):
            rows = _Rows(0, [], [], self.journal.natural_images(session_id, with_data=False))
        # Like collect: only rows of generations seen in the first read, so that one proposed
        # meanwhile does not appear half read.
        fresh = [g.generation for g in generations if g.generation >= rows.final]
        if len(fresh) <= _PER_GENERATION_READS:
            stimuli = [s for g in fresh for s in self.journal.stimuli(session_id, g, with_images=False)]
            responses = [r for g in fresh for r in self.journal.responses(session_id, g)]
        else:
            wanted = set(fresh)
            stimuli = [
                s for s in self.journal.stimuli(session_id, with_images=False) if s.generation in wanted
            ]
            responses = [r for r in self.journal.responses(session_id) if r.generation in wanted]
        data = SessionData(
            record,
            generations,
            rows.stimuli + stimuli,
            rows.responses + responses,
            rows.natural,
            RecordingMetadata.from_dict(record.config.get("metadata")),
        )
        # Generations told without a gap from the first are final (their last Tell wrote the
        # responses and the generation's told time in one transaction).
        final = rows.final
        for g in generations[rows.final :]:
            if g.generation != final or g.told is None:
                break
            final += 1
        kept = _Rows(
            final,
            rows.stimuli + [s for s in stimuli if s.generation < final],
            rows.responses + [r for r in responses if r.generation < final],
            rows.natural,
        )
        with self._lock:
            self._rows[session_id] = kept
            self._rows.move_to_end(session_id)
            while len(self._rows) > max(1, self.cache_size // 4):
                self._rows.popitem(last=False)
        return data

    def image(self, session_id: str, generation: int, index: int) -> tuple[bytes, str]:
        """The encoded image (PNG or JPEG, as the rig got it) and its sha256."""
        # A page asks for a generation's images one by one; the journal reads them a generation at
        # a time, kept for the next requests (a proposed generation's images never change).
        key = (session_id, generation)
        with self._lock:
            images = self._images.get(key)
            if images is not None:
                self._images.move_to_end(key)
        if images is None:
            images = {
                s.index: (s.image, s.sha256)
                for s in self.journal.stimuli(session_id, generation=generation, with_images=True)
                if s.image is not None
            }
            if images:
                with self._lock:
                    self._images[key] = images
                    while len(self._images) > self.image_generations:
                        self._images.popitem(last=False)
        found = images.get(index)
        if found is not None:
            return found
        self.journal.get_session(session_id)  # NotFound for an unknown session
        raise NotFound(f"session {session_id!r} has no stimulus {index} in generation {generation}")

    def _with_images(self, session_id: str, summary: SessionSummary) -> SessionSummary:
        """The summary with the pixels of the stimuli it shows (read per generation, not all)."""
        shown = [*summary.best, *summary.last_generation]
        if summary.best_natural is not None:
            shown.append(summary.best_natural)
        images: dict[tuple[int, int], bytes | None] = {}
        for generation in sorted({s.generation for s in shown}):
            for stimulus in self.journal.stimuli(session_id, generation=generation, with_images=True):
                images[(stimulus.generation, stimulus.index)] = stimulus.image

        def filled(s: StimulusScore) -> StimulusScore:
            return replace(s, image=images.get((s.generation, s.index)))

        return replace(
            summary,
            best=tuple(filled(s) for s in summary.best),
            best_natural=filled(summary.best_natural) if summary.best_natural else None,
            last_generation=tuple(filled(s) for s in summary.last_generation),
        )

    def figure(self, snapshot: Snapshot, name: str) -> bytes:
        """One of the static report's PNG figures for ``snapshot`` (matplotlib: slow, so cached)."""
        if name not in FIGURES:
            raise NotFound(f"no report figure {name!r}; figures: {', '.join(FIGURES)}")
        key = (snapshot.summary.session_id, name)
        with self._lock:
            cached = self._figures.get(key)
        if cached is not None and cached[0] == snapshot.revision:
            return cached[1]
        summary = snapshot.summary
        if name != "score_curve":  # the image grids need pixels
            summary = self._with_images(summary.session_id, summary)
        png = RENDERERS[name](summary)
        with self._lock:
            self._figures[key] = (snapshot.revision, png)
            while len(self._figures) > max(3, self.cache_size // 4):
                self._figures.popitem(last=False)
        return png
