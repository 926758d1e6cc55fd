"""What synthesis works on and reports: model pairs, requests, progress, results, scheduler stats."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from neurotwin.engines.objectives import Objective
from neurotwin.engines.optimizers import (
    CMAESConfig,
    GeneticConfig,
    GradientConfig,
)
from neurotwin.engines.render import (
    Transform,
)
from neurotwin.errors import (
    InvalidInput,
)

METHODS = ("gradient", "cmaes", "genetic")
DEFAULT_POPULATION = {"cmaes": 40, "genetic": 20}
MAX_IMAGES_PER_JOB = 64
MAX_INIT_CANDIDATES = 4096


# ---------------------------------------------------------------------------------------------------
# Models, requests, events
# ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ModelPair:
    """A twin and a prior that jobs share. Jobs with the same ``key`` are batched together.

    ``twin``: a differentiable twin (``OnnxTorchModule`` or any module with ``forward_chw01``, or one
    taking float NHWC 0..255). ``prior``: latents ``[B, D]`` -> images ``[B, 3, R, R]`` in [0, 1] with
    ``latent_dim`` and ``sample_latents(n, generator)``. ``card``: the twin's PredictorCard.
    """

    twin: nn.Module
    prior: nn.Module
    card: Any = None
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"twin@{id(self.twin):x}|prior@{id(self.prior):x}"

    @property
    def latent_dim(self) -> int:
        return int(self.prior.latent_dim)

    @property
    def input_size(self) -> tuple[int, int]:
        height = getattr(self.twin, "input_height", None)
        width = getattr(self.twin, "input_width", None)
        if (not height or not width) and self.card is not None:
            height, width = self.card.input.height, self.card.input.width
        if not height or not width:
            raise InvalidInput("twin input size unknown: the graph has no fixed size and no card was given")
        return int(height), int(width)

    @property
    def neuron_count(self) -> int | None:
        return None if self.card is None else int(self.card.neuron_count)

    def predicted_max(self, neuron: int) -> float | None:
        stats = getattr(self.card, "neuron_stats", None)
        if stats is None or not stats.predicted_max or neuron >= len(stats.predicted_max):
            return None
        value = float(stats.predicted_max[neuron])
        return value if value > 0 and math.isfinite(value) else None

    def latent_prior(self) -> dict[str, Any]:
        getter = getattr(self.prior, "latent_prior", None)
        return dict(getter()) if callable(getter) else {"distribution": "normal", "mean": 0.0, "std": 1.0}

    def to(self, device: torch.device) -> None:
        for module in (self.twin, self.prior):
            current = next(itertools.chain(module.parameters(), module.buffers()), None)
            if current is not None and current.device != device:
                module.to(device)


@dataclass
class SynthesisRequest:
    """One synthesis request.

    ``budget``: gradient steps, or for cmaes/genetic the evaluations per image (each image is its own
    optimizer run of ``population`` candidates per generation). ``transforms``: robustness transforms
    for gradient ascent (True: the priors module's jitter/scale/rotate; a callable ``(images,
    generator) -> images``; False: none). ``deadline``: a ``time.monotonic()`` instant.

    Starting codes: by default the prior's random samples. ``init_candidates`` > 0 samples that many
    codes instead and starts from the ones the objective scores highest (pre-screening on the twin);
    ``initial_latents`` ``[C, D]`` adds given candidate codes (e.g. natural images inverted into the
    prior), screened the same way. Gradient and CMA-ES start each image from one of the best codes; the
    genetic algorithm's first generations are the best ``n_images * population``.
    """

    objective: Objective
    method: str = "gradient"
    budget: int = 200
    n_images: int = 1
    seed: int = 0
    preview_every: int = 0
    population: int | None = None
    gradient: GradientConfig | None = None
    cmaes: CMAESConfig | None = None
    genetic: GeneticConfig | None = None
    transforms: bool | Transform | None = None
    deadline: float | None = None
    name: str = ""
    init_candidates: int = 0
    initial_latents: np.ndarray | None = None

    def total_steps(self) -> int:
        if self.method == "gradient":
            return int(self.budget)
        # Whole generations within the budget: the budget is a ceiling on twin evaluations.
        return max(1, int(self.budget) // self.population_size())

    def population_size(self) -> int:
        if self.population is not None:
            return int(self.population)
        if self.method == "cmaes" and self.cmaes is not None:
            return self.cmaes.population
        if self.method == "genetic" and self.genetic is not None:
            return self.genetic.population
        return DEFAULT_POPULATION.get(self.method, 1)

    def validate(self, pair: ModelPair) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"method {self.method!r}: expected one of {METHODS}")
        if not isinstance(self.objective, Objective):
            raise InvalidInput("objective: build one with neurotwin.engines.objectives.build_objective")
        if int(self.budget) < 1:
            raise InvalidInput(f"budget must be >= 1, got {self.budget}")
        if not 1 <= int(self.n_images) <= MAX_IMAGES_PER_JOB:
            raise InvalidInput(f"n_images must be in 1..{MAX_IMAGES_PER_JOB}, got {self.n_images}")
        if self.preview_every < 0:
            raise InvalidInput(f"preview_every must be >= 0, got {self.preview_every}")
        if not 0 <= int(self.init_candidates) <= MAX_INIT_CANDIDATES:
            raise InvalidInput(
                f"init_candidates must be in 0..{MAX_INIT_CANDIDATES}, got {self.init_candidates}"
            )
        if self.initial_latents is not None:
            codes = np.asarray(self.initial_latents)
            if codes.ndim != 2 or codes.shape[1] != pair.latent_dim or not np.all(np.isfinite(codes)):
                raise InvalidInput(
                    f"initial_latents must be finite codes [C, {pair.latent_dim}], "
                    f"got shape {list(codes.shape)}"
                )
        if self.method != "gradient" and self.population_size() < 2:
            raise InvalidInput(f"population must be >= 2, got {self.population_size()}")
        if self.method != "gradient" and int(self.budget) < self.population_size():
            raise InvalidInput(
                f"budget {self.budget} evaluations is less than one {self.method} generation of "
                f"{self.population_size()} candidates; give at least {self.population_size()}"
            )
        count = pair.neuron_count
        if count is not None and any(not 0 <= n < count for n in self.objective.neurons):
            raise InvalidInput(f"objective reads neurons {self.objective.neurons}; the twin has {count}")
        if self.gradient is not None:
            replace(self.gradient, steps=int(self.budget)).validate()
        if self.genetic is not None:
            replace(self.genetic, population=self.population_size()).validate()


@dataclass
class Progress:
    job_id: str
    step: int
    total_steps: int
    evaluations: int
    activation: np.ndarray  # [n] the target neuron's rate (current images; for evolution: best so far)
    score: np.ndarray  # [n] objective value of the same images
    elapsed: float
    preview: np.ndarray | None = None  # uint8 [n, H, W, 3] at the twin's input size


@dataclass
class SynthesisResult:
    job_id: str
    method: str
    seed: int
    images: np.ndarray  # uint8 [n, H, W, 3], the twin's input size
    latents: np.ndarray  # float32 [n, D]
    rates: np.ndarray  # float32 [n, K], the twin on exactly these uint8 images
    score: np.ndarray  # [n] objective on these images
    target: int | None
    activation: np.ndarray | None  # [n] rate of the target neuron
    relative_activation: np.ndarray | None  # [n] activation / the target's max over natural images
    steps: int
    evaluations: int
    elapsed: float


@dataclass
class TickInfo:
    """One batched step of one (twin, prior) pair; passed to ``on_tick`` (metrics)."""

    key: str
    method: str  # "gradient" or "evolution"
    jobs: int
    images: int
    seconds: float


@dataclass
class SchedulerStats:
    ticks: int = 0
    batched_steps: int = 0
    job_steps: int = 0
    images: int = 0
    active: int = 0
    pending: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    deadline: int = 0
    max_jobs_per_batch: int = 0
    last_jobs_per_batch: int = 0
    # jobs in one batched step -> how many such steps
    occupancy: Counter[int] = field(default_factory=Counter)
