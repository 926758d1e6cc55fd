"""Checking a Tell's responses: every fault that shows in the values alone, before anything is stored."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from neurotwin.engines.closed_loop.views import ToldResponse
from neurotwin.engines.journal import ResponseRecord, StimulusRecord
from neurotwin.errors import InvalidInput


def check_responses(
    neuron_count: int,
    generation: int,
    responses: Sequence[ToldResponse],
    stimuli: dict[str, StimulusRecord],
) -> list[ResponseRecord]:
    """The responses as journal records; raises InvalidInput naming the first bad one."""
    n = neuron_count
    seen: set[str] = set()
    now = time.time()
    records = []
    if not responses:
        raise InvalidInput("Tell without responses")
    for r in responses:
        sid = r.stimulus_id
        if sid in seen:
            raise InvalidInput(f"stimulus {sid!r} appears twice in one Tell")
        seen.add(sid)
        stimulus = stimuli.get(sid)
        if stimulus is None:
            raise InvalidInput(f"stimulus {sid!r} is not part of generation {generation}")
        has_rates = r.rates is not None and len(r.rates) > 0
        has_repeats = r.repeats is not None and len(r.repeats) > 0
        if has_rates == has_repeats:
            raise InvalidInput(f"stimulus {sid!r}: give rates or repeats (exactly one of them)")
        rows = [list(r.rates)] if has_rates else [list(rep) for rep in r.repeats or ()]
        for i, row in enumerate(rows):
            if len(row) != n:
                what = "rates" if has_rates else f"repeat {i}"
                raise InvalidInput(
                    f"stimulus {sid!r}: {what} has {len(row)} values, expected {n} (neuron_count)"
                )
        values = np.asarray(rows, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InvalidInput(f"stimulus {sid!r}: responses must be finite (found NaN or Inf)")
        values32 = values.astype(np.float32)
        if not np.isfinite(values32).all():
            raise InvalidInput(f"stimulus {sid!r}: responses overflow float32")
        for name, value in (("onset_time", r.onset), ("duration", r.duration)):
            if value is not None and not np.isfinite(value):
                raise InvalidInput(f"stimulus {sid!r}: {name} must be finite")
        if r.duration is not None and r.duration < 0:
            raise InvalidInput(f"stimulus {sid!r}: duration {r.duration} must be >= 0")
        records.append(
            ResponseRecord(
                generation=generation,
                index=stimulus.index,
                repeats=values32,
                received=now,
                # None is unknown; an onset of 0.0 is the session clock's first instant.
                onset=r.onset,
                duration=r.duration or None,
            )
        )
    return records
