"""The leaf objectives: a neuron, a population, one-hot, diversity, agreement across ensemble members."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    from torch import Tensor

from neurotwin.engines.objectives.algebra import Objective
from neurotwin.engines.objectives.spec_data import ObjectiveSpec

DIVERSITY_SPACES = ("images", "rates")
AGGREGATES = ("mean", "softmin", "min")


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

    def base_spec(self) -> ObjectiveSpec:
        return ObjectiveSpec("neuron", [self.index])

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

    def base_spec(self) -> ObjectiveSpec:
        return ObjectiveSpec("population", list(self.indices), list(self.weights))

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

    def base_spec(self) -> ObjectiveSpec:
        return ObjectiveSpec(
            "one_hot",
            [self.index],
            population=None if self.population is None else list(self.population),
            temperature=self.temperature,
            log=self.log,
        )

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

    @property
    def adds_to_spec(self) -> bool:
        return True

    def add_to_spec(self, spec: ObjectiveSpec, weight: float) -> None:
        spec.diversity, spec.diversity_on = weight, self.on

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

    def base_spec(self) -> ObjectiveSpec:
        spec = self.inner.base_spec()
        spec.members, spec.member_temperature = self.aggregate, self.temperature
        spec.disagreement = self.disagreement
        return spec

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
