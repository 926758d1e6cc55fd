"""Objectives as plain data (what a request carries and a journal replays), validated against a twin."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    pass

from neurotwin.engines.objectives.algebra import Objective
from neurotwin.engines.objectives.terms import (
    AGGREGATES,
    Agreement,
    Diversity,
    Neuron,
    OneHotPopulation,
    Population,
)

KINDS = ("neuron", "population", "one_hot")


@dataclass
class ObjectiveSpec:
    """What a request says about its objective.

    - ``kind="neuron"``: ``neurons=[k]``;
    - ``kind="population"``: ``neurons`` weighted by ``weights`` (default: their mean);
    - ``kind="one_hot"``: ``neurons[0]`` is the target, ``population`` the neurons it competes with
      (default: all of the twin's), compared at ``temperature``.

    ``diversity`` > 0 adds that multiple of :class:`Diversity` (``diversity_on``). Neurons are indices
    or neuron ids from the twin's card. ``members`` says how a twin ensemble's members are combined
    (:class:`Agreement`: ``mean``, ``softmin`` at ``member_temperature``, ``min``) and ``disagreement``
    weighs the penalty on their spread; ``members="mean"`` with no penalty is the plain objective on the
    ensemble mean, and on a single twin every setting is the plain objective.
    """

    kind: str = "neuron"
    neurons: list[int | str] = field(default_factory=list)
    weights: list[float] | None = None
    population: list[int | str] | None = None
    temperature: float = 1.0
    log: bool = False
    diversity: float = 0.0
    diversity_on: str = "images"
    members: str = "mean"
    member_temperature: float = 1.0
    disagreement: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectiveSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"objective: unknown fields {sorted(unknown)}")
        values = dict(data)
        if "neurons" in values and isinstance(values["neurons"], (int, str)):
            values["neurons"] = [values["neurons"]]
        return cls(**values)


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


def spec_from_terms(terms: list[tuple[float, Objective]]) -> ObjectiveSpec:
    main = [(w, t) for w, t in terms if not isinstance(t, Diversity)]
    extra = [(w, t) for w, t in terms if isinstance(t, Diversity)]
    if len(main) != 1 or main[0][0] != 1.0 or len(extra) > 1 or (extra and extra[0][0] < 0):
        raise InvalidInput("objective has no plain-data form (one base term plus a diversity weight)")
    _, base = main[0]
    members: Agreement | None = None
    if isinstance(base, Agreement):
        members, base = base, base.inner
    spec: ObjectiveSpec
    if isinstance(base, Neuron):
        spec = ObjectiveSpec("neuron", [base.index])
    elif isinstance(base, Population):
        spec = ObjectiveSpec("population", list(base.indices), list(base.weights))
    elif isinstance(base, OneHotPopulation):
        spec = ObjectiveSpec(
            "one_hot",
            [base.index],
            population=None if base.population is None else list(base.population),
            temperature=base.temperature,
            log=base.log,
        )
    else:
        raise InvalidInput(f"{base!r} has no plain-data form")
    if members is not None:
        spec.members, spec.member_temperature = members.aggregate, members.temperature
        spec.disagreement = members.disagreement
    if extra:
        weight, term = extra[0]
        assert isinstance(term, Diversity)
        spec.diversity, spec.diversity_on = weight, term.on
    return spec
