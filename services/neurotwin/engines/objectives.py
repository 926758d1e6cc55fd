"""Synthesis objectives: what a stimulus should do to the twin's neurons, as a score per image.

Every objective maps ``(rates [B, K], images [B, 3, H, W], groups [B] or None)`` to a score per image
``[B]`` (higher is better), differentiable in both inputs. ``groups`` says which images belong to the
same request, for terms that compare images with each other (diversity); None means one group.

A twin ensemble gives member rates ``[B, M, K]`` instead of ``[B, K]``. Objectives score the members'
mean unless they read the members themselves: :class:`Agreement` scores its inner objective on every
member and combines the members' scores (mean, soft-min, min) minus a penalty on their spread, so an
image has to drive every member, not exploit one (Walker et al. 2019 and Bashivan et al. 2019 synthesize
against ensembles for the same reason).

Objectives compose like numbers: ``neuron(3) + 0.1 * diversity()``, ``2 * a - b``. The gRPC layer
builds them from plain data with :func:`build_objective` (an :class:`ObjectiveSpec` or a dict), and
:meth:`Objective.to_spec` goes back, so a request can be journaled and replayed.

Measured responses are scored by the same algebra without gradients: :meth:`Objective.score_array`
takes float64 numpy rates, and :func:`response_objective` builds a closed-loop session's objective
(``"mean"`` or ``"contrast"``) from its target neurons. torch is imported only where a term needs it,
so reading journaled sessions (exports, reports) does not load it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "AGGREGATES",
    "KINDS",
    "Agreement",
    "Diversity",
    "Neuron",
    "Objective",
    "ObjectiveSpec",
    "OneHotPopulation",
    "Population",
    "Scaled",
    "Sum",
    "agreement",
    "build_objective",
    "diversity",
    "neuron",
    "objective_scores",
    "one_hot_population",
    "population",
    "resolve_neurons",
    "response_objective",
]

KINDS = ("neuron", "population", "one_hot")
# How a closed-loop session scores measured responses (journaled by name in its settings).
RESPONSE_OBJECTIVES = ("mean", "contrast")
DIVERSITY_SPACES = ("images", "rates")
AGGREGATES = ("mean", "softmin", "min")


class Objective:
    """Base class. Subclasses implement :meth:`score`."""

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        raise NotImplementedError

    @property
    def reads_members(self) -> bool:
        """True if :meth:`score` takes member rates [B, M, K]; others get the members' mean [B, K]."""
        return False

    def __call__(self, rates: Tensor, images: Tensor | None = None, groups: Tensor | None = None) -> Tensor:
        if rates.dim() == 3 and not self.reads_members:
            rates = rates.mean(dim=1)
        elif rates.dim() not in (2, 3):
            raise InvalidInput(f"rates must be [B, K] or member rates [B, M, K], got {list(rates.shape)}")
        out = self.score(rates, images, groups)
        if out.shape != rates.shape[:1]:
            raise RuntimeError(f"{self!r} returned shape {tuple(out.shape)}, expected ({rates.shape[0]},)")
        return out

    def score_array(self, rates: np.ndarray) -> np.ndarray:
        """Scores of measured or predicted rates ``[B, K]`` as float64 numpy, without images.

        Terms made of plain rate arithmetic (neurons, populations, sums, multiples) compute it in
        numpy; any other term runs its torch ``score`` in float64 on the CPU.
        """
        import torch

        values = torch.as_tensor(np.asarray(rates, dtype=np.float64))
        with torch.no_grad():
            return self(values).numpy().astype(np.float64, copy=False)

    @property
    def target(self) -> int | None:
        """The neuron whose rate is reported as "the activation" of an image (None if there is none)."""
        return None

    @property
    def neurons(self) -> list[int]:
        """Every neuron index the objective reads (for validation against a twin)."""
        return []

    @property
    def uses_images(self) -> bool:
        return False

    def terms(self) -> list[tuple[float, Objective]]:
        """The objective as a weighted sum of leaf terms."""
        return [(1.0, self)]

    def to_spec(self) -> ObjectiveSpec:
        """Plain-data description; only combinations :func:`build_objective` can express have one."""
        return _spec_from_terms(self.terms())

    # -- algebra --------------------------------------------------------------------------------------

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            return NotImplemented
        return Sum([self, other])

    def __radd__(self, other: Objective | float) -> Objective:
        # sum([...]) starts from 0.
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __mul__(self, factor: float) -> Objective:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Scaled(self, float(factor))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return Scaled(self, -1.0)

    def __sub__(self, other: Objective) -> Objective:
        return Sum([self, Scaled(other, -1.0)])


class Sum(Objective):
    def __init__(self, parts: Sequence[Objective]) -> None:
        flat: list[Objective] = []
        for part in parts:
            flat += part.parts if isinstance(part, Sum) else [part]
        self.parts = flat

    @property
    def reads_members(self) -> bool:
        return any(p.reads_members for p in self.parts)

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        total = self.parts[0](rates, images, groups)
        for part in self.parts[1:]:
            total = total + part(rates, images, groups)
        return total

    def score_array(self, rates: np.ndarray) -> np.ndarray:
        total = self.parts[0].score_array(rates)
        for part in self.parts[1:]:
            total = total + part.score_array(rates)
        return total

    @property
    def target(self) -> int | None:
        return next((p.target for p in self.parts if p.target is not None), None)

    @property
    def neurons(self) -> list[int]:
        return sorted({n for p in self.parts for n in p.neurons})

    @property
    def uses_images(self) -> bool:
        return any(p.uses_images for p in self.parts)

    def terms(self) -> list[tuple[float, Objective]]:
        return [t for p in self.parts for t in p.terms()]

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts)


class Scaled(Objective):
    def __init__(self, inner: Objective, factor: float) -> None:
        if isinstance(inner, Scaled):
            inner, factor = inner.inner, inner.factor * factor
        self.inner, self.factor = inner, factor

    @property
    def reads_members(self) -> bool:
        return self.inner.reads_members

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        return self.factor * self.inner(rates, images, groups)

    def score_array(self, rates: np.ndarray) -> np.ndarray:
        return self.factor * self.inner.score_array(rates)

    @property
    def target(self) -> int | None:
        return self.inner.target

    @property
    def neurons(self) -> list[int]:
        return self.inner.neurons

    @property
    def uses_images(self) -> bool:
        return self.inner.uses_images

    def terms(self) -> list[tuple[float, Objective]]:
        return [(self.factor * w, t) for w, t in self.inner.terms()]

    def __repr__(self) -> str:
        return f"{self.factor:g} * ({self.inner!r})"


class Neuron(Objective):
    """The rate of one neuron ("stretch" in Bashivan et al. 2019)."""

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        return rates[:, self.index]

    def score_array(self, rates: np.ndarray) -> np.ndarray:
        return np.asarray(rates, dtype=np.float64)[:, self.index]

    @property
    def target(self) -> int:
        return self.index

    @property
    def neurons(self) -> list[int]:
        return [self.index]

    def __repr__(self) -> str:
        return f"neuron({self.index})"


class Population(Objective):
    """A weighted sum of rates (weights default to the mean; negative weights suppress)."""

    def __init__(self, indices: Sequence[int], weights: Sequence[float] | None = None) -> None:
        if not indices:
            raise InvalidInput("population objective: no neurons given")
        self.indices = [int(i) for i in indices]
        weights_given = weights
        if weights is None:
            weights = [1.0 / len(self.indices)] * len(self.indices)
        if len(weights) != len(self.indices):
            raise InvalidInput(f"population objective: {len(self.indices)} neurons, {len(weights)} weights")
        self.weights = [float(w) for w in weights]
        # A mean stays a mean in numpy (bit for bit what sessions journaled before the algebra scored them).
        self.is_mean = weights_given is None
        self._tensors: tuple[Tensor, Tensor] | None = None

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        if self._tensors is None:
            import torch

            self._tensors = (
                torch.tensor(self.indices, dtype=torch.long),
                torch.tensor(self.weights, dtype=torch.float32),
            )
        index, weight = self._tensors
        picked = rates.index_select(1, index.to(rates.device))
        return picked @ weight.to(rates.device, rates.dtype)

    def score_array(self, rates: np.ndarray) -> np.ndarray:
        picked = np.asarray(rates, dtype=np.float64)[:, self.indices]
        if self.is_mean:
            return picked.mean(axis=1)
        return picked @ np.asarray(self.weights, dtype=np.float64)

    @property
    def target(self) -> int:
        # The neuron that matters most to the objective is the one reported.
        return self.indices[max(range(len(self.weights)), key=lambda i: self.weights[i])]

    @property
    def neurons(self) -> list[int]:
        return list(self.indices)

    def __repr__(self) -> str:
        return f"population({self.indices}, {self.weights})"


class OneHotPopulation(Objective):
    """Drive one neuron and suppress the others: the target's softmax over the population.

    Bashivan, Kar & DiCarlo (2019). ``temperature`` sets how sharply the rates are compared (in the
    rates' units); ``log`` scores the log-softmax instead, which keeps gradients alive when the target
    starts far below the rest.
    """

    def __init__(
        self,
        target: int,
        population: Sequence[int] | None = None,
        temperature: float = 1.0,
        log: bool = False,
    ) -> None:
        if not temperature > 0 or not math.isfinite(temperature):
            raise InvalidInput(f"one-hot objective: temperature must be positive, got {temperature}")
        self.index = int(target)
        self.population = None if population is None else sorted({int(p) for p in population} | {self.index})
        self.temperature = float(temperature)
        self.log = bool(log)

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        import torch

        if self.population is None:
            pool, position = rates, self.index
        else:
            index = torch.tensor(self.population, dtype=torch.long, device=rates.device)
            pool, position = rates.index_select(1, index), self.population.index(self.index)
        logits = pool / self.temperature
        if self.log:
            return torch.log_softmax(logits, dim=1)[:, position]
        return torch.softmax(logits, dim=1)[:, position]

    @property
    def target(self) -> int:
        return self.index

    @property
    def neurons(self) -> list[int]:
        return [self.index] if self.population is None else list(self.population)

    def __repr__(self) -> str:
        pop = "all" if self.population is None else self.population
        return f"one_hot({self.index}, population={pop}, T={self.temperature:g}, log={self.log})"


class Diversity(Objective):
    """Minus the mean correlation of an image with the other images of its request.

    ``on="images"`` compares pixels; ``on="rates"`` compares population responses. Each vector is
    centred on its own mean before the cosine, so uniformly bright images do not look alike just for
    being positive. An image alone in its group scores 0.
    """

    def __init__(self, on: str = "images") -> None:
        if on not in DIVERSITY_SPACES:
            raise InvalidInput(f"diversity: 'on' must be one of {DIVERSITY_SPACES}, got {on!r}")
        self.on = on

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        import torch

        if self.on == "images":
            if images is None:
                raise InvalidInput("diversity on images needs the images")
            features = images.reshape(images.shape[0], -1)
        else:
            features = rates
        features = features.float()
        centred = features - features.mean(dim=1, keepdim=True)
        unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-8)
        similarity = unit @ unit.t()
        n = similarity.shape[0]
        same = torch.ones(n, n, dtype=torch.bool, device=similarity.device)
        if groups is not None:
            g = groups.to(similarity.device)
            same = g[:, None] == g[None, :]
        peers = same & ~torch.eye(n, dtype=torch.bool, device=similarity.device)
        counts = peers.sum(dim=1)
        total = (similarity * peers).sum(dim=1)
        return -torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total)).to(rates.dtype)

    @property
    def uses_images(self) -> bool:
        return self.on == "images"

    def __repr__(self) -> str:
        return f"diversity(on={self.on!r})"


class Agreement(Objective):
    """An objective every member of a twin ensemble has to agree on.

    ``inner`` (a rate objective: neuron, population, one-hot) is scored on each member's rates, giving
    ``s [B, M]``, and the members' scores are combined:

    - ``mean``: their average (the same as scoring the ensemble mean for linear objectives);
    - ``softmin``: ``-T * log(mean(exp(-s / T)))``, between the mean (large ``temperature`` T) and the
      worst member (T -> 0): an image counts only as much as the members least driven by it;
    - ``min``: the worst member (its gradient reaches one member at a time).

    ``disagreement`` > 0 subtracts that multiple of the members' standard deviation, a penalty on images
    the members disagree about. With plain rates [B, K] (a single twin) it is ``inner`` unchanged.
    """

    def __init__(
        self,
        inner: Objective,
        aggregate: str = "softmin",
        temperature: float = 1.0,
        disagreement: float = 0.0,
    ) -> None:
        if aggregate not in AGGREGATES:
            raise InvalidInput(f"agreement: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if not temperature > 0 or not math.isfinite(temperature):
            raise InvalidInput(f"agreement: temperature must be positive, got {temperature}")
        if not disagreement >= 0 or not math.isfinite(disagreement):
            raise InvalidInput(f"agreement: disagreement weight must be finite and >= 0, got {disagreement}")
        if inner.uses_images or inner.reads_members:
            raise InvalidInput("agreement: the inner objective must read rates only (add diversity outside)")
        self.inner = inner
        self.aggregate = aggregate
        self.temperature = float(temperature)
        self.disagreement = float(disagreement)

    @property
    def reads_members(self) -> bool:
        return True

    def score(self, rates: Tensor, images: Tensor | None, groups: Tensor | None) -> Tensor:
        import torch

        if rates.dim() == 2:
            rates = rates[:, None, :]
        batch, members, count = rates.shape
        per_member = self.inner(rates.reshape(batch * members, count), None, None).reshape(batch, members)
        if self.aggregate == "mean" or members == 1:
            combined = per_member.mean(dim=1)
        elif self.aggregate == "softmin":
            t = self.temperature
            combined = -t * (torch.logsumexp(-per_member / t, dim=1) - math.log(members))
        else:
            combined = per_member.min(dim=1).values
        if self.disagreement > 0 and members > 1:
            combined = combined - self.disagreement * per_member.std(dim=1, unbiased=False)
        return combined

    @property
    def target(self) -> int | None:
        return self.inner.target

    @property
    def neurons(self) -> list[int]:
        return self.inner.neurons

    def __repr__(self) -> str:
        return (
            f"agreement({self.inner!r}, {self.aggregate}, T={self.temperature:g}, "
            f"disagreement={self.disagreement:g})"
        )


# Short constructors, lucent-style.
def neuron(index: int) -> Objective:
    return Neuron(index)


def population(indices: Sequence[int], weights: Sequence[float] | None = None) -> Objective:
    return Population(indices, weights)


def one_hot_population(
    target: int, population: Sequence[int] | None = None, temperature: float = 1.0, log: bool = False
) -> Objective:
    return OneHotPopulation(target, population, temperature, log)


def diversity(on: str = "images") -> Objective:
    return Diversity(on)


def agreement(
    inner: Objective, aggregate: str = "softmin", temperature: float = 1.0, disagreement: float = 0.0
) -> Objective:
    return Agreement(inner, aggregate, temperature, disagreement)


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


# ---------------------------------------------------------------------------------------------------
# Plain-data descriptions
# ---------------------------------------------------------------------------------------------------


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


def _spec_from_terms(terms: list[tuple[float, Objective]]) -> ObjectiveSpec:
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
