"""Levers for ``bench/transfer.py --lever``: changes to a synthesis request the service built, so one
benchmark measures each against the same twins.

A lever is ``key=value`` pairs joined by commas, e.g. ``clip=1.5,blur=0.02`` or ``ens=2,agg=softmin``:

- ``steps=N`` gradient steps; ``lr=F`` the gradient's first step size;
- ``clip=F`` largest code norm (units of sqrt(D) x the prior's code std; natural codes sit near 1.2);
  ``decay=F`` the DGN-AM code decay per step; ``high=F`` per-unit upper bound at the prior's code mean
  + F std (hidden-code priors);
- ``jitter=F`` ``scale=F`` (+-) ``rotate=F`` (degrees) ``blur=F`` (sigma / image size): the robustness
  transforms' strengths; ``transforms=0`` turns them off;
- ``init=N`` start from the best of N prior samples (pre-screened on the twin, for every method);
- ``ens=K`` synthesize on an ensemble of twin A and K more twins of the same session (single-session
  Lite0 twins, seeds 10, 11, ...; trained and cached by the bench), ``agg=mean|softmin|min``,
  ``temp=F`` (soft-min temperature, relative to each neuron's natural maximum on A) and
  ``disagree=F`` (penalty on the members' spread) combine them (``Agreement``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from neurotwin.engines.objectives import Agreement, Scaled
from neurotwin.engines.synthesis import ModelPair, SynthesisRequest

FLOAT_KEYS = ("lr", "clip", "decay", "high", "jitter", "scale", "rotate", "blur", "temp", "disagree")
INT_KEYS = ("steps", "ens", "transforms", "init")
TEXT_KEYS = ("agg",)


@dataclass
class Lever:
    text: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    # One ensemble pair per (twin, prior): the scheduler batches jobs whose pairs share a key.
    _pairs: dict[str, ModelPair] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, text: str) -> Lever:
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key in FLOAT_KEYS:
                values[key] = float(value)
            elif key in INT_KEYS:
                values[key] = int(value)
            elif key in TEXT_KEYS:
                values[key] = value
            else:
                raise SystemExit(f"--lever: unknown key {key!r} in {text!r}")
        return cls(text, values)

    @property
    def ensemble_size(self) -> int:
        return int(self.values.get("ens", 0))

    def describe(self) -> str:
        return self.text or "defaults"

    def apply(
        self, pair: ModelPair, request: SynthesisRequest, members: list[Any], natural_max: float
    ) -> tuple[ModelPair, SynthesisRequest]:
        """The pair and request with the lever applied (``members``: extra differentiable twins)."""
        v = self.values
        if request.method == "gradient" and request.gradient is not None:
            gradient = request.gradient
            if "steps" in v:
                request = replace(request, budget=int(v["steps"]))
            if "lr" in v:
                gradient = replace(gradient, lr=v["lr"])
            if "clip" in v:
                gradient = replace(gradient, clip_norm=v["clip"])
            if "decay" in v:
                gradient = replace(gradient, decay=v["decay"])
            if "high" in v:
                prior = pair.latent_prior()
                low = (gradient.bounds or (None, None))[0]
                gradient = replace(gradient, bounds=(low, prior["mean"] + v["high"] * prior["std"]))
            request = replace(request, gradient=replace(gradient, steps=request.budget))
            transform_keys = {"jitter", "scale", "rotate", "blur"} & set(v)
            if v.get("transforms", 1) == 0:
                request = replace(request, transforms=False)
            elif transform_keys:
                from neurotwin.runtimes.generators import robustness_transforms

                kwargs: dict[str, Any] = {}
                if "jitter" in v:
                    kwargs["jitter"] = v["jitter"]
                if "scale" in v:
                    kwargs["scale"] = (1 - v["scale"], 1 + v["scale"])
                if "rotate" in v:
                    kwargs["rotate_degrees"] = v["rotate"]
                if "blur" in v:
                    kwargs["blur"] = v["blur"]
                request = replace(request, transforms=functools.partial(robustness_transforms, **kwargs))
        if "init" in v:
            request = replace(request, init_candidates=int(v["init"]))
        if members:
            from neurotwin.runtimes.twin_ensemble import TwinEnsemble

            key = f"{pair.key}+{len(members)}"
            if key not in self._pairs:
                self._pairs[key] = ModelPair(
                    TwinEnsemble([pair.twin, *members]), pair.prior, pair.card, key=key
                )
            pair = self._pairs[key]
            aggregate = str(v.get("agg", "mean"))
            if aggregate != "mean" or v.get("disagree", 0):
                # Members are compared in units of the neuron's natural maximum on A.
                scale = 1.0 / max(natural_max, 1e-6)
                inner = Scaled(request.objective, scale)
                objective = Agreement(
                    inner, aggregate, float(v.get("temp", 0.1)), float(v.get("disagree", 0.0))
                )
                request = replace(request, objective=objective)
        return pair, request
