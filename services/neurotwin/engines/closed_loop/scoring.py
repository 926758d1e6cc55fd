"""Scoring a told generation: the session's objective on the measured responses, best so far, summary.

The objective itself is ``neurotwin.engines.objectives.response_objective`` (the same algebra
synthesis uses), evaluated on the responses averaged over repeats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.engines.journal import NATURAL, ResponseRecord, StimulusRecord
from neurotwin.engines.objectives import objective_scores

__all__ = [
    "ScoredGeneration",
    "generation_summary",
    "natural_summary",
    "objective_scores",
    "score_generation",
    "updated_best",
]


@dataclass
class ScoredGeneration:
    """A complete generation's responses and scores, in presentation order."""

    generation: int
    stimuli: list[StimulusRecord]
    means: np.ndarray
    scores: np.ndarray
    # Presentation positions of the synthetic stimuli, in the order the optimizer is told.
    synthetic_positions: list[int]

    @property
    def latents(self) -> np.ndarray:
        return np.stack([self.stimuli[p].latent for p in self.synthetic_positions])

    @property
    def synthetic_scores(self) -> np.ndarray:
        return self.scores[self.synthetic_positions]

    @property
    def natural_positions(self) -> list[int]:
        return [s.index for s in self.stimuli if s.kind == NATURAL]


def score_generation(
    config: SessionConfig,
    generation: int,
    stimuli: list[StimulusRecord],
    responses: Sequence[ResponseRecord],
    synthetic_positions: list[int],
) -> ScoredGeneration:
    by_index = {r.index: r for r in responses}
    means = np.stack([by_index[s.index].mean for s in stimuli])
    scores = objective_scores(means, config.target_neurons, config.objective)
    return ScoredGeneration(generation, stimuli, means, scores, list(synthetic_positions))


def updated_best(best: dict[str, Any], config: SessionConfig, scored: ScoredGeneration) -> dict[str, Any]:
    """The session's best synthetic and best natural stimulus after this generation.

    A generation without new synthetic stimuli (the confirmation) only updates the natural best.
    """
    best = dict(best)
    synthetic = scored.synthetic_positions
    synthetic_scores = scored.synthetic_scores
    scores = scored.scores
    i = int(np.argmax(synthetic_scores)) if synthetic else -1
    if synthetic and (best["generation"] < 0 or synthetic_scores[i] > best["score"]):
        p = synthetic[i]
        best.update(
            generation=scored.generation,
            stimulus_id=scored.stimuli[p].stimulus_id,
            score=float(synthetic_scores[i]),
            target_rates=[float(v) for v in scored.means[p, config.target_neurons]],
        )
    natural_positions = scored.natural_positions
    if natural_positions:
        j = natural_positions[int(np.argmax(scores[natural_positions]))]
        if not np.isfinite(best["best_natural_score"]) or scores[j] > best["best_natural_score"]:
            best.update(
                best_natural_stimulus_id=scored.stimuli[j].stimulus_id,
                best_natural_score=float(scores[j]),
            )
    if synthetic:
        best.update(
            last_generation_mean=float(synthetic_scores.mean()),
            last_generation_max=float(synthetic_scores.max()),
        )
    return best


def generation_summary(
    scored: ScoredGeneration, best: dict[str, Any], trajectory: dict[str, float]
) -> dict[str, Any]:
    """The journaled per-generation summary (the exported optimizer trajectory)."""
    synthetic_scores = scored.synthetic_scores
    summary: dict[str, Any] = {
        "synthetic_mean": float(synthetic_scores.mean()),
        "synthetic_max": float(synthetic_scores.max()),
        "synthetic_median": float(np.median(synthetic_scores)),
        "best_so_far": float(best["score"]),
        "latent_mean": [float(v) for v in scored.latents.mean(axis=0)],
        **{f"optimizer_{k}": v for k, v in trajectory.items()},
    }
    summary.update(natural_summary(scored))
    return summary


def natural_summary(scored: ScoredGeneration) -> dict[str, Any]:
    """Objective statistics of the generation's natural references (empty without any)."""
    natural_positions = scored.natural_positions
    if not natural_positions:
        return {}
    return {
        "natural_mean": float(scored.scores[natural_positions].mean()),
        "natural_max": float(scored.scores[natural_positions].max()),
    }
