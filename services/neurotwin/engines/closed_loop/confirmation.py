"""Confirmation re-presentations: the session's pick backed by repeated measurements, not one lucky draw.

The highest of a thousand single noisy measurements is mostly noise (the winner's curse). With
confirmation on, the last of ``max_generations`` generations proposes no new candidates: it shows the
``confirm_top`` distinct synthetic images that measured best so far, ``confirm_repeats`` times each in
a shuffled order, and the confirmed best is the one with the highest mean objective over those
re-presentations. The first (selecting) measurement is left out of that mean, since being selected
biases it upwards.

Everything here is a pure function of the journal's records and the session's seed, so a replayed Ask
reproduces the journaled confirmation generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurotwin.engines.closed_loop.presentation import Naturals, lay_out_confirmation
from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.engines.journal import SYNTHETIC, Journal, ResponseRecord, StimulusRecord
from neurotwin.engines.objectives import objective_scores
from neurotwin.errors import InvalidInput

DEFAULT_REPEATS = 5
# Defaults apply when the confirmation costs at most a tenth of the session's generations.
DEFAULT_MIN_GENERATIONS = 10
MAX_CONFIRM_PRESENTATIONS = 1000


def default_top(population: int) -> int:
    """Default distinct images to confirm: one generation's worth of presentations at 5 repeats."""
    return max(2, population // DEFAULT_REPEATS)


def resolve_confirmation(
    requested: bool, disabled: bool, top: int, repeats: int, population: int, max_generations: int
) -> tuple[int, int]:
    """(top, repeats) the session uses; (0, 0) when it does not confirm. Raises on bad values."""
    if top < 0 or repeats < 0:
        raise InvalidInput(f"confirmation top_candidates {top} and repeats {repeats} must be >= 0")
    if disabled:
        if top or repeats:
            raise InvalidInput("confirmation: disabled with top_candidates or repeats set")
        return 0, 0
    if not requested and max_generations < DEFAULT_MIN_GENERATIONS:
        # Short or open-ended sessions: the defaults would eat too much of the budget, or have no end.
        return 0, 0
    if max_generations == 0:
        raise InvalidInput(
            "confirmation needs max_generations (it takes the last generation); set it, or disable "
            "confirmation"
        )
    if max_generations < 2:
        raise InvalidInput("confirmation needs max_generations >= 2 (one to evolve, one to confirm)")
    top = top or default_top(population)
    repeats = repeats or DEFAULT_REPEATS
    if top * repeats > MAX_CONFIRM_PRESENTATIONS:
        raise InvalidInput(
            f"confirmation: {top} candidates x {repeats} repeats is more than "
            f"{MAX_CONFIRM_PRESENTATIONS} presentations"
        )
    return top, repeats


@dataclass
class Candidate:
    """A distinct synthetic image and its measured objective before confirmation."""

    stimulus: StimulusRecord
    first_score: float


def top_candidates(
    stimuli: Sequence[StimulusRecord],
    responses: Sequence[ResponseRecord],
    target_neurons: list[int],
    objective: str,
    count: int,
) -> list[Candidate]:
    """The ``count`` distinct synthetic images (by sha256) with the highest measured objective.

    An image shown more than once (a GA elite) is scored by the mean over its presentations and
    represented by its first one. Ties keep presentation order, so the choice is deterministic.
    """
    by_key = {(r.generation, r.index): r for r in responses}
    told = [s for s in stimuli if s.kind == SYNTHETIC and (s.generation, s.index) in by_key]
    if not told:
        return []
    means = np.stack([by_key[(s.generation, s.index)].mean for s in told])
    scores = objective_scores(means, target_neurons, objective)
    first: dict[str, StimulusRecord] = {}
    per_image: dict[str, list[float]] = {}
    for stimulus, score in zip(told, scores, strict=True):
        first.setdefault(stimulus.sha256, stimulus)
        per_image.setdefault(stimulus.sha256, []).append(float(score))
    keys = list(first)
    image_scores = np.array([np.mean(per_image[k]) for k in keys])
    order = np.argsort(-image_scores, kind="stable")[:count]
    return [Candidate(first[keys[i]], float(image_scores[i])) for i in order]


def repetition_order(seed: int, generation: int, candidates: int, repeats: int) -> list[int]:
    """Which candidate each confirmation slot shows: every candidate ``repeats`` times, shuffled so
    that repeats of one image are spread out (adaptation and slow drifts hit all candidates alike)."""
    rng = np.random.default_rng([seed, generation, 13])
    slots: list[int] = []
    for _ in range(repeats):
        # One shuffled round per repeat: each image is shown once per round.
        slots.extend(int(i) for i in rng.permutation(candidates))
    return slots


def confirmed_summary(
    first_presentations: dict[str, tuple[int, float]],
    repeat_of: Sequence[str],
    responses: Sequence[ResponseRecord],
    target_neurons: list[int],
    objective: str,
) -> dict[str, Any]:
    """The confirmed best and every confirmed candidate, best first, from the confirmation's responses.

    ``first_presentations`` maps each re-presented stimulus id to (generation, first measured score);
    ``repeat_of`` gives, per position of the confirmation generation, the id it re-presents ("" for
    other stimuli such as natural references). Each told repeat counts as one measurement.
    """
    rows: dict[str, list[np.ndarray]] = {}
    for response in responses:
        original = repeat_of[response.index] if response.index < len(repeat_of) else ""
        if original:
            rows.setdefault(original, []).append(np.asarray(response.repeats, dtype=np.float64))
    entries: list[dict[str, Any]] = []
    for stimulus_id, parts in rows.items():
        values = np.concatenate(parts, axis=0)
        scores = objective_scores(values, target_neurons, objective)
        n = len(scores)
        std = float(scores.std(ddof=1)) if n > 1 else 0.0
        generation, first_score = first_presentations[stimulus_id]
        entries.append(
            {
                "stimulus_id": stimulus_id,
                "generation": int(generation),
                "first_score": float(first_score),
                "mean_score": float(scores.mean()),
                "std_score": std,
                "sem_score": std / float(np.sqrt(n)),
                "n": int(n),
                "target_rates": [float(v) for v in values[:, target_neurons].mean(axis=0)],
            }
        )
    # Best first; ties keep the order of first presentation (deterministic).
    entries.sort(key=lambda e: (-e["mean_score"], e["generation"], e["stimulus_id"]))
    return {"confirmed": entries[0] if entries else {}, "confirmation_candidates": entries}


def confirmation_generation(
    journal: Journal, config: SessionConfig, generation: int, naturals: Naturals
) -> tuple[list[StimulusRecord], dict[str, Any]]:
    """The confirmation generation's stimuli and journaled meta, from everything told before it."""
    sid = config.session_id
    candidates = top_candidates(
        journal.stimuli(sid, with_images=False),
        journal.responses(sid),
        config.target_neurons,
        config.objective,
        config.confirm_top,
    )
    wanted = {(c.stimulus.generation, c.stimulus.index) for c in candidates}
    images = {
        (s.generation, s.index): s
        for g in sorted({c.stimulus.generation for c in candidates})
        for s in journal.stimuli(sid, g)
        if (s.generation, s.index) in wanted
    }
    originals = [images[(c.stimulus.generation, c.stimulus.index)] for c in candidates]
    slots = repetition_order(config.seed, generation, len(originals), config.confirm_repeats)
    stimuli, repeat_of = lay_out_confirmation(config, generation, originals, slots, naturals)
    meta: dict[str, Any] = {
        "confirmation": True,
        "synthetic_positions": [],
        "repeat_of": repeat_of,
        # Each candidate's first presentation: generation and the measured objective it was picked by.
        "confirm_first": {c.stimulus.stimulus_id: [c.stimulus.generation, c.first_score] for c in candidates},
    }
    return stimuli, meta
