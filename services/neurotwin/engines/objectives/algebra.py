"""The objective algebra: the base class, sums and multiples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from neurotwin.errors import InvalidInput

if TYPE_CHECKING:
    from torch import Tensor

    from neurotwin.engines.objectives.spec_data import ObjectiveSpec


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
        """Plain-data description; only combinations :func:`build_objective` can express have one:
        one base term (a neuron, a population or one-hot, optionally read through an agreement of
        ensemble members) plus at most one non-negative multiple of a term that adds to a spec
        (diversity)."""
        terms = self.terms()
        main = [(w, t) for w, t in terms if not t.adds_to_spec]
        extra = [(w, t) for w, t in terms if t.adds_to_spec]
        if len(main) != 1 or main[0][0] != 1.0 or len(extra) > 1 or (extra and extra[0][0] < 0):
            raise InvalidInput("objective has no plain-data form (one base term plus a diversity weight)")
        spec = main[0][1].base_spec()
        for weight, term in extra:
            term.add_to_spec(spec, weight)
        return spec

    # -- plain-data hooks (leaf terms override) --------------------------------------------------------

    @property
    def adds_to_spec(self) -> bool:
        """True for terms a spec carries as a weight beside its base term (diversity)."""
        return False

    def base_spec(self) -> ObjectiveSpec:
        """The spec of this term as the base term of an objective."""
        raise InvalidInput(f"{self!r} has no plain-data form")

    def add_to_spec(self, spec: ObjectiveSpec, weight: float) -> None:
        """Record ``weight`` times this term in ``spec`` (only for terms that ``adds_to_spec``)."""
        raise InvalidInput(f"{self!r} has no plain-data form")

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
