"""Objectives as plain data (what a request carries and a journal replays), validated against a twin."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    pass

from neurotwin.engines.objectives.algebra import Objective
from neurotwin.engines.objectives.spec_data import ObjectiveSpec
from neurotwin.engines.objectives.terms import (
    AGGREGATES,
    Agreement,
    Diversity,
    Neuron,
    OneHotPopulation,
    Population,
)

KINDS = ("neuron", "population", "one_hot")


def resolve_neurons(
    values: Sequence[int | str], neuron_ids: Sequence[str] | int, what: str = "neuron"
) -> list[int]:
    """Neuron indices or ids -> indices, checked against the twin (its card's ids, or a count)."""
    count = neuron_ids if isinstance(neuron_ids, int) else len(neuron_ids)
    ids = {} if isinstance(neuron_ids, int) else {n: i for i, n in enumerate(neuron_ids)}
    out: list[int] = []
    for value in values:
        if isinstance(value, str) and value in ids:
            out.append(ids[value])
            continue
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"{what} {value!r}: not a neuron id of this twin nor an index") from None
        if isinstance(value, float) and value != index:
            raise InvalidInput(f"{what} {value!r}: not an integer index")
        if not 0 <= index < count:
            raise InvalidInput(f"{what} {value!r}: out of range, the twin has {count} neurons")
        out.append(index)
    return out


def build_objective(spec: ObjectiveSpec | Mapping[str, Any], neuron_ids: Sequence[str] | int) -> Objective:
    """Validate a spec against the twin and build the objective; bad requests raise InvalidInput."""
    if not isinstance(spec, ObjectiveSpec):
        spec = ObjectiveSpec.from_dict(spec)
    if spec.kind not in KINDS:
        raise InvalidInput(f"objective kind {spec.kind!r}: expected one of {KINDS}")
    neurons = resolve_neurons(spec.neurons, neuron_ids)
    if not neurons:
        raise InvalidInput(f"objective {spec.kind!r}: at least one neuron is required")
    base: Objective
    if spec.kind == "neuron":
        if len(neurons) != 1:
            raise InvalidInput(f"objective 'neuron' takes one neuron, got {len(neurons)}; use 'population'")
        base = Neuron(neurons[0])
    elif spec.kind == "population":
        if spec.weights is not None and not all(math.isfinite(float(w)) for w in spec.weights):
            raise InvalidInput("population objective: weights must be finite")
        if len(set(neurons)) != len(neurons):
            raise InvalidInput("population objective: a neuron is listed twice")
        base = Population(neurons, spec.weights)
    else:
        if len(neurons) != 1:
            raise InvalidInput("objective 'one_hot' takes one target; list competitors in 'population'")
        pool = (
            None
            if spec.population is None
            else resolve_neurons(spec.population, neuron_ids, "population neuron")
        )
        base = OneHotPopulation(neurons[0], pool, float(spec.temperature), bool(spec.log))
    if spec.members not in AGGREGATES:
        raise InvalidInput(f"objective: members must be one of {AGGREGATES}, got {spec.members!r}")
    if spec.members != "mean" or float(spec.disagreement) != 0:
        base = Agreement(base, spec.members, float(spec.member_temperature), float(spec.disagreement))
    weight = float(spec.diversity)
    if not math.isfinite(weight) or weight < 0:
        raise InvalidInput(f"objective: diversity weight must be finite and >= 0, got {spec.diversity}")
    if weight > 0:
        return base + weight * Diversity(spec.diversity_on)
    return base
