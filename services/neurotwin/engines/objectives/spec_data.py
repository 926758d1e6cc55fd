"""An objective as plain data: what a request carries and a journal replays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from neurotwin.errors import InvalidInput


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
