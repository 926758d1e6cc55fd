"""The numbers a closed-loop session report shows, extracted from ``session_export.SessionData``.

No rendering here: ``session_report`` turns a ``SessionSummary`` into PNG figures and HTML, and a live
view can render the same summary its own way. Scores are the session's objective (``mean`` or
``contrast`` over the target neurons) of the responses averaged over repeats, as the optimizer saw them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurotwin.engines.journal import NATURAL, SYNTHETIC, ResponseRecord, StimulusRecord
from neurotwin.engines.objectives import objective_scores
from neurotwin.engines.session_export import SessionData


@dataclass(frozen=True)
class GenerationScores:
    """Objective statistics of one told generation (NaN where a kind was not shown)."""

    generation: int
    synthetic_mean: float
    synthetic_max: float
    natural_mean: float
    natural_max: float
    # Best synthetic score over this and all earlier generations.
    best_so_far: float


@dataclass(frozen=True)
class StimulusScore:
    """One image as presented: its first measured score, and the scores of later presentations of the
    same image (same sha256), which confirm or deflate a lucky first measurement."""

    stimulus_id: str
    generation: int
    index: int
    kind: str
    sha256: str
    image: bytes | None
    score: float
    # Target neurons' responses (averaged over repeats) at the first presentation, target order.
    target_rates: tuple[float, ...]
    repeats: int
    confirmations: tuple[float, ...] = ()
    natural_name: str = ""

    @property
    def confirmed_score(self) -> float:
        """Mean over the later presentations; NaN when the image was shown only once."""
        return float(np.mean(self.confirmations)) if self.confirmations else math.nan


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    status: str
    # Unix seconds: the session's time zero (rig's session start, else creation) and creation.
    start_time: float
    created: float
    settings: dict[str, Any]
    metadata: dict[str, Any]
    response_units: str
    objective: str
    target_neuron_ids: tuple[str, ...]
    generations_told: int
    presentations_told: int
    generations: tuple[GenerationScores, ...]
    # The best distinct synthetic images by first measured score, best first.
    best: tuple[StimulusScore, ...]
    # The best natural reference image (None when the session shows none).
    best_natural: StimulusScore | None
    # The last told generation's images, in presentation order.
    last_generation: tuple[StimulusScore, ...]
    # True when some image was presented more than once (confirmations exist).
    has_repeats: bool = field(default=False)


def _scores(data: SessionData, means: np.ndarray) -> np.ndarray:
    if not len(means):
        return np.zeros(0)
    return objective_scores(means, data.config["target_neurons"], data.config["objective"])


def mean_responses(responses: list[ResponseRecord], neurons: int) -> np.ndarray:
    """[presentations, neurons] float64: each response averaged over its repeats, as
    ``ResponseRecord.mean``; one numpy call per distinct repeat count, not one per presentation (the
    live dashboard summarizes sessions of thousands while they run)."""
    means = np.zeros((len(responses), neurons))
    by_repeats: dict[int, list[int]] = defaultdict(list)
    for i, response in enumerate(responses):
        by_repeats[response.repeats.shape[0]].append(i)
    for rows in by_repeats.values():
        stacked = np.stack([responses[i].repeats for i in rows])
        means[rows] = stacked.mean(axis=1, dtype=np.float64)
    return means


def _nan_stat(values: list[float], stat: Any) -> float:
    return float(stat(values)) if values else math.nan


def summarize_session(data: SessionData, top: int = 8) -> SessionSummary:
    """Everything the report shows, as plain numbers, bytes and strings."""
    config = data.config
    targets = [int(t) for t in config["target_neurons"]]
    ids = list(config.get("neuron_ids") or [f"neuron{i}" for i in range(int(config["neuron_count"]))])
    pairs: list[tuple[StimulusRecord, ResponseRecord]] = sorted(
        data.told(), key=lambda pair: (pair[0].generation, pair[0].index)
    )
    means = mean_responses([r for _, r in pairs], int(config["neuron_count"]))
    scores = _scores(data, means)
    names = {n.index: n.name for n in data.natural}

    by_image: dict[str, list[int]] = defaultdict(list)
    for i, (stimulus, _) in enumerate(pairs):
        by_image[stimulus.sha256].append(i)

    def view(i: int) -> StimulusScore:
        stimulus, response = pairs[i]
        later = [j for j in by_image[stimulus.sha256] if j > i]
        return StimulusScore(
            stimulus_id=stimulus.stimulus_id,
            generation=stimulus.generation,
            index=stimulus.index,
            kind=stimulus.kind,
            sha256=stimulus.sha256,
            image=stimulus.image,
            score=float(scores[i]),
            target_rates=tuple(float(means[i, t]) for t in targets),
            repeats=int(response.repeats.shape[0]),
            confirmations=tuple(float(scores[j]) for j in later),
            natural_name=names.get(stimulus.natural_index, "") if stimulus.natural_index is not None else "",
        )

    generations = _generation_scores(pairs, scores, data)
    # First presentation of each distinct image, so a re-shown elite is one entry with confirmations.
    first = [indices[0] for indices in by_image.values()]
    synthetic = sorted(
        (i for i in first if pairs[i][0].kind == SYNTHETIC),
        key=lambda i: (-scores[i], pairs[i][0].generation),
    )
    natural = sorted((i for i in first if pairs[i][0].kind == NATURAL), key=lambda i: -scores[i])
    last = max((s.generation for s, _ in pairs), default=-1)
    return SessionSummary(
        session_id=data.record.session_id,
        status=data.record.status,
        start_time=data.start_time,
        created=data.record.created,
        settings=dict(config),
        metadata=data.metadata.to_dict(),
        response_units=data.response_units,
        objective=str(config["objective"]),
        target_neuron_ids=tuple(ids[t] for t in targets),
        generations_told=sum(1 for g in data.generations if g.told is not None),
        presentations_told=len(pairs),
        generations=generations,
        best=tuple(view(i) for i in synthetic[:top]),
        best_natural=view(natural[0]) if natural else None,
        last_generation=tuple(view(i) for i, (s, _) in enumerate(pairs) if s.generation == last),
        has_repeats=any(len(indices) > 1 for indices in by_image.values()),
    )


def _generation_scores(
    pairs: list[tuple[StimulusRecord, ResponseRecord]], scores: np.ndarray, data: SessionData
) -> tuple[GenerationScores, ...]:
    told = {g.generation for g in data.generations if g.told is not None}
    per: dict[int, dict[str, list[float]]] = defaultdict(lambda: {SYNTHETIC: [], NATURAL: []})
    for (stimulus, _), score in zip(pairs, scores, strict=True):
        if stimulus.generation in told:
            per[stimulus.generation][stimulus.kind].append(float(score))
    rows = []
    best = -math.inf
    for generation in sorted(per):
        synthetic, natural = per[generation][SYNTHETIC], per[generation][NATURAL]
        best = max([best, *synthetic])
        rows.append(
            GenerationScores(
                generation=generation,
                synthetic_mean=_nan_stat(synthetic, np.mean),
                synthetic_max=_nan_stat(synthetic, np.max),
                natural_mean=_nan_stat(natural, np.mean),
                natural_max=_nan_stat(natural, np.max),
                best_so_far=best if math.isfinite(best) else math.nan,
            )
        )
    return tuple(rows)
