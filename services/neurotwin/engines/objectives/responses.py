"""Scoring measured responses (a closed-loop session's objective) with the same algebra, in numpy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    pass

from neurotwin.engines.objectives.algebra import Objective
from neurotwin.engines.objectives.terms import Population

# How a closed-loop session scores measured responses (journaled by name in its settings).
RESPONSE_OBJECTIVES = ("mean", "contrast")


def response_objective(kind: str, targets: Sequence[int], neuron_count: int) -> Objective:
    """A closed-loop session's objective over its recorded neurons.

    ``"mean"``: the mean rate of the targets; ``"contrast"``: that minus the mean rate of every
    other recorded neuron.
    """
    targets = [int(t) for t in targets]
    if kind == "mean":
        return Population(targets)
    if kind == "contrast":
        chosen = set(targets)
        others = [i for i in range(neuron_count) if i not in chosen]
        if not others:
            raise InvalidInput("objective 'contrast' needs at least one recorded neuron that is not a target")
        return Population(targets) - Population(others)
    raise InvalidInput(f"objective {kind!r}: expected one of {RESPONSE_OBJECTIVES}")


def objective_scores(means: np.ndarray, targets: Sequence[int], kind: str) -> np.ndarray:
    """Per-stimulus score of responses averaged over repeats, ``means`` [n, neurons] (float64)."""
    means = np.asarray(means, dtype=np.float64)
    return response_objective(kind, targets, means.shape[1]).score_array(means)
