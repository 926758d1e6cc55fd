"""What the synthesizer does by default so its stimuli hold up on models (and neurons) it did not use.

Each setting here was measured on ``bench/transfer.py`` (stimuli made on the served twin, scored by
independent twins of the same neurons; BENCHMARKS.md, transfer) and is applied to every request the
service builds, on top of what the request asks for:

- ``init_candidates``: starting codes pre-screened on the twin (best of N prior samples);
- ``clip_norm``: gradient ascent keeps each code within this norm (units of sqrt(D) x the prior's code
  std), near where natural codes lie, so the generator keeps making images it was trained to make;
- ``blur``: the robustness transforms also blur (largest sigma as a fraction of the image size);
- ``members`` / ``member_temperature`` / ``member_disagreement``: on an ensemble twin (one whose card
  names a ``member_output``), single-neuron objectives become :class:`Agreement` over the members
  (``softmin``/``min``, or a disagreement penalty), the soft-min temperature in units of the neuron's
  predicted maximum over natural images; the default, ``mean`` without penalty, scores the members'
  mean rate, which transferred best.

Kept apart from the gRPC layer so the service, the CLI and the benchmark apply the same rules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from neurotwin.engines.objectives import AGGREGATES, Agreement, Objective
from neurotwin.engines.synthesis import ModelPair, SynthesisRequest
from neurotwin.errors import InvalidInput

__all__ = ["TransferDefaults"]


@dataclass(frozen=True)
class TransferDefaults:
    init_candidates: int = 0
    clip_norm: float = 0.0
    blur: float = 0.0
    # Mean beat soft-min on both priors (BENCHMARKS.md, transfer): the ensemble's mean rate.
    members: str = "mean"
    member_temperature: float = 0.1
    member_disagreement: float = 0.0

    def __post_init__(self) -> None:
        if self.init_candidates < 0:
            raise InvalidInput(f"init_candidates must be >= 0, got {self.init_candidates}")
        for name in ("clip_norm", "blur", "member_disagreement"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{name} must be finite and >= 0, got {value}")
        if self.members not in AGGREGATES:
            raise InvalidInput(f"members must be one of {AGGREGATES}, got {self.members!r}")
        if not self.member_temperature > 0 or not math.isfinite(self.member_temperature):
            raise InvalidInput(f"member_temperature must be positive, got {self.member_temperature}")

    def apply(self, pair: ModelPair, request: SynthesisRequest, members: int = 1) -> SynthesisRequest:
        """``request`` with these defaults; ``members`` > 1 when the pair's twin returns member rates."""
        out = request
        if self.init_candidates and not out.init_candidates:
            out = replace(out, init_candidates=self.init_candidates)
        if out.method == "gradient" and out.gradient is not None:
            gradient = out.gradient
            if self.clip_norm and gradient.clip_norm is None:
                gradient = replace(gradient, clip_norm=self.clip_norm)
            out = replace(out, gradient=gradient)
            if self.blur and gradient.transforms and out.transforms is None:
                from neurotwin.runtimes.generators import robustness_transforms

                out = replace(out, transforms=functools.partial(robustness_transforms, blur=self.blur))
        if members > 1:
            out = replace(out, objective=self.member_objective(pair, out.objective))
        return out

    def member_objective(self, pair: ModelPair, objective: Objective) -> Objective:
        """A single-neuron objective as agreement of an ensemble's members; others unchanged."""
        target = objective.target
        if (
            objective.reads_members
            or objective.uses_images
            or target is None
            or objective.neurons != [target]
        ):
            return objective
        if self.members == "mean" and not self.member_disagreement:
            return objective
        scale = pair.predicted_max(target) or 1.0
        return Agreement(
            objective, self.members, self.member_temperature * scale, self.member_disagreement * 1.0
        )
