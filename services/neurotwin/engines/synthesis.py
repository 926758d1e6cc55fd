"""The synthesis engine: find images that drive a twin's neurons, many requests batched on one device.

A :class:`SynthesisJob` is one request: twin + prior (a :class:`ModelPair`), an objective, a method
(``gradient``, ``cmaes`` or ``genetic``), a budget, a number of images and a seed. Its events are
:class:`Progress` (step, activation per image, elapsed, previews every ``preview_every`` steps) and a
final :class:`SynthesisResult` (uint8 images at the twin's input size, latents, every neuron's rate on
those exact uint8 images, and the target's activation relative to its maximum over natural images).

The :class:`SynthesisScheduler` works like continuous batching in LLM servers: each tick, all running
jobs on the same (twin, prior) pair take one step together as ONE batched forward (and, for gradient
jobs, one backward); jobs join and leave between ticks. Each job keeps its own optimizer, random
generator and objective, so batching changes nothing about a job but its speed. A job whose objective
goes NaN, or whose step raises, fails alone: if a batched step fails, its jobs are retried one by one
and only the guilty one is failed. Cancellation and deadlines are checked before every step.

:func:`naive_synthesis` is the plain eager loop (one image at a time, no batching) that the benchmark
compares against.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neurotwin.engines.objectives import Objective
from neurotwin.engines.optimizers import (
    CMAES,
    AskTellOptimizer,
    CMAESConfig,
    GeneticAlgorithm,
    GeneticConfig,
    GradientAscent,
    GradientConfig,
)
from neurotwin.engines.render import (
    Transform,
    ensemble_mean,
    from_uint8,
    prior_and_rates,
    prior_images,
    resize_chw,
    to_uint8,
    twin_rates,
    twin_view,
)
from neurotwin.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NeurotwinError,
    OutOfRange,
    ResourceExhausted,
    SynthesisFailed,
    Unavailable,
)
from neurotwin.runtimes.devices import default_device

__all__ = [
    "METHODS",
    "ModelPair",
    "Progress",
    "SchedulerStats",
    "SynthesisFailed",
    "SynthesisJob",
    "SynthesisRequest",
    "SynthesisResult",
    "SynthesisScheduler",
    "TickInfo",
    "default_device",
    "naive_synthesis",
    "render_latents",
    "score_latents",
    "synthesize",
]

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


# ---------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------

_DONE = object()


class SynthesisJob:
    """A submitted request. Consume :meth:`events` (or call :meth:`result`); :meth:`cancel` stops it."""

    _ids = itertools.count(1)

    def __init__(self, pair: ModelPair, request: SynthesisRequest) -> None:
        self.id = f"syn-{next(self._ids)}"
        self.pair = pair
        self.request = request
        self.objective = request.objective
        self.total_steps = request.total_steps()
        self.state = "queued"
        self.step = 0
        self.evaluations = 0
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.error: NeurotwinError | None = None
        self._result: SynthesisResult | None = None
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self.runner: _Runner | None = None

    # -- consumer side --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the scheduler to stop this job; it stops before its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def events(self, timeout: float | None = None) -> Iterator[Progress | SynthesisResult]:
        """Progress events, then the result. Raises the job's NeurotwinError if it fails or is cancelled.

        ``timeout`` bounds the wait for each event (Unavailable when it passes).
        """
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise Unavailable(f"{self.id}: no progress for {timeout} s") from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self, timeout: float | None = None) -> SynthesisResult:
        """Block until the job ends; the result, or its error raised."""
        if not self._finished.wait(timeout):
            raise DeadlineExceeded(f"{self.id}: not finished within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self._result is not None
        return self._result

    # -- scheduler side -------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.monotonic() - (self.started or self.submitted)

    def _emit(self, event: Progress) -> None:
        self._events.put(event)

    def _succeed(self, result: SynthesisResult) -> None:
        if self._finished.is_set():
            return
        self._result = result
        self.state = "done"
        self._events.put(result)
        self._events.put(_DONE)
        self._release()

    def _fail(self, error: NeurotwinError) -> None:
        if self._finished.is_set():
            return
        self.error = error
        self.state = (
            "cancelled"
            if isinstance(error, Cancelled)
            else "deadline"
            if isinstance(error, DeadlineExceeded)
            else "failed"
        )
        self._events.put(error)
        self._events.put(_DONE)
        self._release()

    def _release(self) -> None:
        # Drop device tensors now: a consumer may hold the job object long after it ended.
        self.runner = None
        self._finished.set()


class _Runner:
    step: int = 0


class _GradientRunner(_Runner):
    def __init__(
        self,
        latents: Tensor,
        config: GradientConfig,
        transform: Transform | None,
        generator: torch.Generator,
    ) -> None:
        self.opt = GradientAscent(latents, config)
        self.transform = transform
        self.generator = generator  # transforms' random draws, per job

    @property
    def step(self) -> int:  # type: ignore[override]
        return self.opt.step_index

    @property
    def done(self) -> bool:
        return self.opt.done

    def final_latents(self) -> Tensor:
        return self.opt.latents.detach()


class _EvolutionRunner(_Runner):
    """One ask/tell optimizer per requested image (independent runs, evaluated in one batch)."""

    def __init__(self, lanes: list[AskTellOptimizer], generations: int) -> None:
        self.lanes = lanes
        self.generations = generations
        # The target's rate on each run's best candidate so far (reported as its activation).
        self.best_activation = np.full(len(lanes), np.nan)

    @property
    def step(self) -> int:  # type: ignore[override]
        return self.lanes[0].generation

    @property
    def done(self) -> bool:
        return self.step >= self.generations

    def ask(self) -> np.ndarray:
        return np.concatenate([lane.ask() for lane in self.lanes], axis=0)

    def tell(self, scores: np.ndarray, activation: np.ndarray | None = None) -> None:
        """Scores [n * P] in ask() order; ``activation`` [n * P] is the target's rate per candidate."""
        parts = np.split(scores, len(self.lanes))
        acts = np.split(activation, len(self.lanes)) if activation is not None else [None] * len(self.lanes)
        for i, (lane, part, act) in enumerate(zip(self.lanes, parts, acts, strict=True)):
            before = lane.best_score
            lane.tell(part)
            if act is not None and lane.best_score > before:
                self.best_activation[i] = act[int(np.argmax(part))]

    def final_latents(self) -> Tensor:
        return torch.from_numpy(np.stack([lane.best_latent for lane in self.lanes])).float()  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------
# Shared computations
# ---------------------------------------------------------------------------------------------------


def render_latents(
    pair: ModelPair, latents: Tensor | np.ndarray, device: torch.device | str | None = None, chunk: int = 64
) -> np.ndarray:
    """Latents -> uint8 [n, H, W, 3] images at the twin's input size (what a rig or client is shown)."""
    device = torch.device(device) if device is not None else _module_device(pair.prior)
    z = torch.as_tensor(np.asarray(latents) if isinstance(latents, np.ndarray) else latents).float()
    out = []
    with torch.no_grad():
        for part in z.split(chunk):
            out.append(to_uint8(resize_chw(prior_images(pair.prior, part.to(device)), pair.input_size)))
    return np.concatenate(out) if out else np.zeros((0, *pair.input_size, 3), np.uint8)


def score_latents(
    pair: ModelPair,
    latents: Tensor | np.ndarray,
    objective: Objective,
    device: torch.device | str | None = None,
    chunk: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """(objective score [n], rates [n, K]) of latents through prior and twin, without gradients.

    What the closed loop uses to rank candidate codes with an attached twin.
    """
    device = torch.device(device) if device is not None else _module_device(pair.prior)
    z = torch.as_tensor(np.asarray(latents) if isinstance(latents, np.ndarray) else latents).float()
    all_rates, all_images = [], []
    with torch.no_grad():
        for part in z.split(chunk):
            images, rates = prior_and_rates(pair.prior, pair.twin, part.to(device), pair.input_size)
            all_rates.append(rates)
            all_images.append(images if objective.uses_images else images[:, :0])
        rates = torch.cat(all_rates)
        scores = objective(rates, torch.cat(all_images) if objective.uses_images else None, None)
    return scores.double().cpu().numpy(), ensemble_mean(rates).cpu().numpy()


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _resolve_transform(value: bool | Transform | None, config: GradientConfig) -> Transform | None:
    use = config.transforms if value is None else value
    if use is True:
        from neurotwin.runtimes.generators import robustness_transforms

        return robustness_transforms
    if use is False or use is None:
        return None
    return use


def _latent_bounds(pair: ModelPair) -> tuple[float | None, float | None] | None:
    prior = pair.latent_prior()
    low, high = prior.get("min"), prior.get("max")
    if low is None and high is None:
        return None
    return (None if low is None else float(low), None if high is None else float(high))


def _starting_latents(
    pair: ModelPair, request: SynthesisRequest, needed: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """``needed`` starting codes: the prior's samples, or the best-scoring of the request's candidates."""
    if not request.init_candidates and request.initial_latents is None:
        return pair.prior.sample_latents(needed, generator)
    parts = []
    if request.initial_latents is not None:
        parts.append(torch.as_tensor(np.asarray(request.initial_latents), dtype=torch.float32))
    sampled = max(int(request.init_candidates), needed - sum(p.shape[0] for p in parts))
    if sampled > 0:
        parts.append(pair.prior.sample_latents(sampled, generator).float().cpu())
    candidates = torch.cat(parts)
    scores, _ = score_latents(pair, candidates, request.objective, device)
    # Stable order: ties keep the candidates' order, so a seed reproduces the same starts.
    best = np.argsort(-scores, kind="stable")[:needed]
    return candidates[torch.from_numpy(best)]


def _not_finite(job: SynthesisJob, what: str, rates: Tensor) -> NeurotwinError:
    """Whose fault a non-finite objective or gradient is: the request's when the twin's rates are
    finite (its weights or step size overflow), the models' otherwise."""
    if bool(torch.isfinite(rates).all()):
        return OutOfRange(
            f"{job.id}: the {what} overflowed at step {job.step} on finite rates: the request's "
            "objective weights or learning rate are too large"
        )
    return SynthesisFailed(f"{job.id}: the twin's rates are not finite at step {job.step}")


def _stopped(job: SynthesisJob) -> bool:
    """Cancelled, or past its deadline (the scheduler finishes it before its next step)."""
    deadline = job.request.deadline
    return job.cancelled or (deadline is not None and time.monotonic() >= deadline)


def _build_runner(job: SynthesisJob, device: torch.device) -> _Runner:
    request, pair = job.request, job.pair
    seeds = np.random.SeedSequence(int(request.seed))
    latent_seed, transform_seed, *lane_seeds = (
        int(s.generate_state(1)[0]) for s in seeds.spawn(2 + request.n_images)
    )
    latent_gen = torch.Generator().manual_seed(latent_seed)
    prior_info = pair.latent_prior()
    std = float(prior_info.get("std", 1.0)) or 1.0
    bounds = _latent_bounds(pair)
    n = int(request.n_images)
    if request.method == "gradient":
        base = request.gradient or GradientConfig(latent_std=std, bounds=bounds)
        config = replace(base, steps=int(request.budget))
        latents = _starting_latents(pair, request, n, latent_gen, device).float().to(device)
        transform = _resolve_transform(request.transforms, config)
        return _GradientRunner(latents, config, transform, torch.Generator().manual_seed(transform_seed))
    population = request.population_size()
    generations = request.total_steps()
    lanes: list[AskTellOptimizer] = []
    if request.method == "cmaes":
        cfg = request.cmaes or CMAESConfig(sigma0=0.5 * std, bounds=bounds)
        cfg = replace(cfg, population=population)
        starts = _starting_latents(pair, request, n, latent_gen, device).double().cpu().numpy()
        lanes = [CMAES(starts[i], cfg, seed=lane_seeds[i]) for i in range(n)]
    else:
        gcfg = request.genetic or GeneticConfig(latent_std=std, bounds=bounds)
        gcfg = replace(gcfg, population=population)
        starts = _starting_latents(pair, request, n * population, latent_gen, device).double().cpu().numpy()
        lanes = [
            GeneticAlgorithm(starts[i * population : (i + 1) * population], gcfg, seed=lane_seeds[i])
            for i in range(n)
        ]
    return _EvolutionRunner(lanes, generations)


# ---------------------------------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------------------------------


class SynthesisScheduler:
    """Runs synthesis jobs; concurrent jobs on the same model pair share each batched step.

    ``max_jobs``: queued + running jobs admitted at once (beyond it, ResourceExhausted).
    ``max_batch_images``: images per batched forward; more jobs than fit take several forwards.
    ``amp``: bfloat16 autocast on CUDA. Call :meth:`start` for the background thread, or drive it
    with :meth:`run_once` / :meth:`run_until_idle`.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        max_jobs: int = 16,
        max_batch_images: int = 256,
        amp: bool = False,
        on_tick: Callable[[TickInfo], None] | None = None,
        idle_wait: float = 0.5,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.max_jobs = int(max_jobs)
        self.max_batch_images = int(max_batch_images)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.on_tick = on_tick
        self.idle_wait = idle_wait
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[SynthesisJob] = []
        self._active: list[SynthesisJob] = []
        self._stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False

    # -- public ---------------------------------------------------------------------------------------

    def submit(self, pair: ModelPair, request: SynthesisRequest) -> SynthesisJob:
        """Validate and queue a request; it joins the next tick. Raises InvalidInput, ResourceExhausted."""
        request.validate(pair)
        job = SynthesisJob(pair, request)
        with self._lock:
            if self._stopping:
                raise Unavailable("synthesis scheduler is shutting down")
            load = len(self._pending) + len(self._active)
            if load >= self.max_jobs:
                raise ResourceExhausted(f"synthesis is at its limit of {self.max_jobs} concurrent requests")
            self._pending.append(job)
            self._wake.notify_all()
        return job

    def stats(self) -> SchedulerStats:
        with self._lock:
            stats = replace(self._stats, occupancy=Counter(self._stats.occupancy))
            stats.active, stats.pending = len(self._active), len(self._pending)
            return stats

    @property
    def load(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._active)

    def start(self) -> SynthesisScheduler:
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="synthesis-scheduler", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; jobs still queued or running fail with Unavailable."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._thread = None
            leftover = self._pending + self._active
            self._pending, self._active = [], []
        for job in leftover:
            job._fail(Unavailable("synthesis scheduler stopped"))

    def pause(self) -> None:
        """Hold ticks (jobs still queue up); with :meth:`resume`, lets callers line up a batch."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._wake.notify_all()

    def __enter__(self) -> SynthesisScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_once(self) -> int:
        """One tick on the calling thread: admit, step every running job once, finish the done ones.

        Returns the number of jobs still running or queued.
        """
        self._admit()
        self._drop_stopped()
        with self._lock:
            active = list(self._active)
        if active:
            self._tick(active)
            with self._lock:
                self._stats.ticks += 1
        with self._lock:
            return len(self._active) + len(self._pending)

    def run_until_idle(self) -> None:
        while self.run_once():
            pass

    # -- loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (self._paused or not (self._pending or self._active)):
                    self._wake.wait(self.idle_wait)
                if self._stopping:
                    return
            try:
                self.run_once()
            except Exception as exc:  # pragma: no cover - a bug in the loop itself must not kill it silently
                with self._lock:
                    victims = list(self._active)
                    self._active = []
                for job in victims:
                    job._fail(SynthesisFailed(f"scheduler error: {type(exc).__name__}: {exc}"))

    def _admit(self) -> None:
        # Jobs stay in the pending list until they are running, so the admission limit counts them
        # while their optimizers are being built (the first CMA-ES import takes seconds).
        with self._lock:
            incoming = list(self._pending)
        for job in incoming:
            if job.cancelled:
                self._finish_error(job, Cancelled(f"{job.id}: cancelled before it started"))
                continue
            try:
                job.pair.to(self.device)
                job.runner = _build_runner(job, self.device)
            except NeurotwinError as exc:
                self._finish_error(job, exc)
                continue
            except Exception as exc:
                self._finish_error(
                    job, SynthesisFailed(f"{job.id}: cannot start: {type(exc).__name__}: {exc}")
                )
                continue
            job.started = time.monotonic()
            job.state = "running"
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                    self._active.append(job)

    def _drop_stopped(self) -> None:
        now = time.monotonic()
        with self._lock:
            active = list(self._active)
        for job in active:
            # The deadline first: a client's deadline also cancels its call, and that is a deadline.
            if job.request.deadline is not None and now >= job.request.deadline:
                self._finish_error(job, DeadlineExceeded(f"{job.id}: deadline passed at step {job.step}"))
            elif job.cancelled:
                self._finish_error(job, Cancelled(f"{job.id}: cancelled at step {job.step}"))

    def _finish_error(self, job: SynthesisJob, error: NeurotwinError) -> None:
        with self._lock:
            for jobs in (self._active, self._pending):
                if job in jobs:
                    jobs.remove(job)
            if isinstance(error, Cancelled):
                self._stats.cancelled += 1
            elif isinstance(error, DeadlineExceeded):
                self._stats.deadline += 1
            else:
                self._stats.failed += 1
        job._fail(error)

    def _finish_ok(self, job: SynthesisJob, result: SynthesisResult) -> None:
        with self._lock:
            if job in self._active:
                self._active.remove(job)
            self._stats.completed += 1
        job._succeed(result)

    def _tick(self, active: list[SynthesisJob]) -> None:
        groups: dict[str, list[SynthesisJob]] = {}
        for job in active:
            groups.setdefault(job.pair.key, []).append(job)
        for jobs in groups.values():
            gradient = [j for j in jobs if isinstance(j.runner, _GradientRunner)]
            evolution = [j for j in jobs if isinstance(j.runner, _EvolutionRunner)]
            for chunk in self._chunks(gradient, lambda j: j.request.n_images):
                self._step_isolated(chunk, self._gradient_step)
            for chunk in self._chunks(evolution, lambda j: j.request.n_images * j.request.population_size()):
                self._step_isolated(chunk, self._evolution_step)
        for job in active:
            runner = job.runner
            if runner is not None and not job.done and getattr(runner, "done", False):
                try:
                    self._finish_ok(job, self._finalize(job))
                except NeurotwinError as exc:
                    self._finish_error(job, exc)
                except Exception as exc:
                    self._finish_error(job, SynthesisFailed(f"{job.id}: finishing failed: {exc}"))

    def _chunks(
        self, jobs: list[SynthesisJob], images: Callable[[SynthesisJob], int]
    ) -> Iterator[list[SynthesisJob]]:
        chunk: list[SynthesisJob] = []
        size = 0
        for job in jobs:
            n = images(job)
            if chunk and size + n > self.max_batch_images:
                yield chunk
                chunk, size = [], 0
            chunk.append(job)
            size += n
        if chunk:
            yield chunk

    def _step_isolated(self, jobs: list[SynthesisJob], step: Callable[[list[SynthesisJob]], None]) -> None:
        """A batched step; if it raises, retry the jobs one by one so only the guilty one fails."""
        started = time.perf_counter()
        steps_before = [j.step for j in jobs]
        try:
            step(jobs)
        except Exception as exc:
            # Jobs that already took this step (or ended) must not step twice.
            jobs = [
                j for j, before in zip(jobs, steps_before, strict=True) if j.step == before and not j.done
            ]
            if not jobs:
                return
            if len(jobs) == 1:
                error = (
                    exc
                    if isinstance(exc, NeurotwinError)
                    else SynthesisFailed(
                        f"{jobs[0].id}: step {jobs[0].step} failed: {type(exc).__name__}: {exc}"
                    )
                )
                self._finish_error(jobs[0], error)
                return
            for job in jobs:
                self._step_isolated([job], step)
            return
        seconds = time.perf_counter() - started
        images = sum(
            j.request.n_images * (1 if isinstance(j.runner, _GradientRunner) else j.request.population_size())
            for j in jobs
        )
        kind = "gradient" if any(isinstance(j.runner, _GradientRunner) for j in jobs) else "evolution"
        with self._lock:
            s = self._stats
            s.batched_steps += 1
            s.job_steps += len(jobs)
            s.images += images
            s.last_jobs_per_batch = len(jobs)
            s.max_jobs_per_batch = max(s.max_jobs_per_batch, len(jobs))
            s.occupancy[len(jobs)] += 1
        if self.on_tick is not None:
            self.on_tick(TickInfo(jobs[0].pair.key, kind, len(jobs), images, seconds))

    def _autocast(self) -> Any:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # -- steps ----------------------------------------------------------------------------------------

    def _gradient_step(self, jobs: list[SynthesisJob]) -> None:
        pair = jobs[0].pair
        size = pair.input_size
        runners = [j.runner for j in jobs]
        assert all(isinstance(r, _GradientRunner) for r in runners)
        latents = [r.opt.latents for r in runners]  # type: ignore[union-attr]
        counts = [z.shape[0] for z in latents]
        with self._autocast():
            images = prior_images(pair.prior, torch.cat(latents))
            per_job = list(images.split(counts))
            seen = [
                twin_view(part, size, runner.transform, runner.generator)  # type: ignore[union-attr]
                for runner, part in zip(runners, per_job, strict=True)
            ]
            rates = twin_rates(pair.twin, torch.cat(seen)).float()
        losses, ok = [], []
        for job, part_rates, part_images in zip(jobs, rates.split(counts), per_job, strict=True):
            try:
                score = job.objective(part_rates, part_images if job.objective.uses_images else None, None)
                if not bool(torch.isfinite(score).all()):
                    raise _not_finite(job, "objective", part_rates)
            except NeurotwinError as exc:
                self._finish_error(job, exc)
                continue
            except Exception as exc:
                self._finish_error(
                    job, SynthesisFailed(f"{job.id}: objective failed: {type(exc).__name__}: {exc}")
                )
                continue
            losses.append(-score.sum())
            ok.append((job, score.detach(), part_rates.detach(), part_images.detach()))
        if not ok:
            return
        # Gradients for the latents only: the models' weights never accumulate .grad.
        leaves = [job.runner.opt.latents for job, *_ in ok]  # type: ignore[union-attr]
        grads = torch.autograd.grad(torch.stack(losses).sum(), leaves)
        for (job, score, part_rates, part_images), grad in zip(ok, grads, strict=True):
            runner = job.runner
            assert isinstance(runner, _GradientRunner)
            if not bool(torch.isfinite(grad).all()):
                self._finish_error(job, _not_finite(job, "gradient", part_rates))
                continue
            runner.opt.set_grad(grad)
            runner.opt.step()
            job.step = runner.step
            job.evaluations += job.request.n_images
            self._progress(job, score, part_rates, part_images)

    def _evolution_step(self, jobs: list[SynthesisJob]) -> None:
        pair = jobs[0].pair
        runners = [j.runner for j in jobs]
        asked = [r.ask() for r in runners]  # type: ignore[union-attr]
        counts = [a.shape[0] for a in asked]
        z = torch.from_numpy(np.concatenate(asked)).float().to(self.device)
        rates_parts, image_parts = [], []
        needs_images = any(j.objective.uses_images for j in jobs)
        with torch.no_grad(), self._autocast():
            for index, part in enumerate(z.split(self.max_batch_images)):
                # A large population takes several passes: stop between them once no job in the
                # batch wants the result, rather than finish a generation nobody will read.
                if index and all(_stopped(j) for j in jobs):
                    return
                images, rates = prior_and_rates(pair.prior, pair.twin, part, pair.input_size)
                rates_parts.append(rates)
                if needs_images:
                    image_parts.append(images)
        rates = torch.cat(rates_parts)
        all_images = torch.cat(image_parts) if needs_images else None
        offsets = np.cumsum([0, *counts])
        for k, job in enumerate(jobs):
            runner = job.runner
            assert isinstance(runner, _EvolutionRunner)
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            part_rates = rates[lo:hi]
            part_images = all_images[lo:hi] if all_images is not None else None
            target = job.objective.target
            try:
                with torch.no_grad():
                    score = job.objective(
                        part_rates, part_images if job.objective.uses_images else None, None
                    )
                values = score.double().cpu().numpy()
                if not np.all(np.isfinite(values)):
                    raise _not_finite(job, "objective", part_rates)
                activation = (
                    ensemble_mean(part_rates)[:, target].double().cpu().numpy()
                    if target is not None
                    else None
                )
                runner.tell(values, activation)
            except NeurotwinError as exc:
                self._finish_error(job, exc)
                continue
            except Exception as exc:
                self._finish_error(
                    job, SynthesisFailed(f"{job.id}: objective failed: {type(exc).__name__}: {exc}")
                )
                continue
            job.step = runner.step
            job.evaluations += hi - lo
            preview = None
            if job.request.preview_every and job.step % job.request.preview_every == 0:
                preview = render_latents(pair, runner.final_latents(), self.device)
            lane_best = np.array([lane.best_score for lane in runner.lanes])
            job._emit(
                Progress(
                    job.id,
                    job.step,
                    job.total_steps,
                    job.evaluations,
                    runner.best_activation.copy(),
                    lane_best,
                    job._elapsed(),
                    preview,
                )
            )

    def _progress(self, job: SynthesisJob, score: Tensor, rates: Tensor, images: Tensor) -> None:
        target = job.objective.target
        rates = ensemble_mean(rates)
        activation = rates[:, target] if target is not None else torch.full_like(score, float("nan"))
        preview = None
        if job.request.preview_every and job.step % job.request.preview_every == 0:
            preview = to_uint8(resize_chw(images, job.pair.input_size))
        job._emit(
            Progress(
                job.id,
                job.step,
                job.total_steps,
                job.evaluations,
                activation.cpu().numpy(),
                score.cpu().numpy(),
                job._elapsed(),
                preview,
            )
        )

    def _finalize(self, job: SynthesisJob) -> SynthesisResult:
        runner = job.runner
        assert isinstance(runner, (_GradientRunner, _EvolutionRunner))
        return _result(
            job.id,
            job.pair,
            job.request,
            job.objective,
            runner.final_latents(),
            self.device,
            job.step,
            job.evaluations,
            job._elapsed(),
        )


def _result(
    job_id: str,
    pair: ModelPair,
    request: SynthesisRequest,
    objective: Objective,
    latents: Tensor,
    device: torch.device,
    steps: int,
    evaluations: int,
    elapsed: float,
) -> SynthesisResult:
    """Render the final codes, quantize to uint8, and measure the twin on exactly those pixels."""
    with torch.no_grad():
        z = latents.detach().float().to(device)
        images01 = prior_images(pair.prior, z)
        pixels = to_uint8(resize_chw(images01, pair.input_size))
        rates = twin_rates(pair.twin, from_uint8(pixels, device)).float()
        score = objective(rates, images01 if objective.uses_images else None, None)
    rates_np = ensemble_mean(rates).cpu().numpy().astype(np.float32)
    target = objective.target
    activation = rates_np[:, target] if target is not None else None
    relative = None
    if activation is not None and target is not None:
        top = pair.predicted_max(target)
        relative = activation / top if top is not None else None
    return SynthesisResult(
        job_id=job_id,
        method=request.method,
        seed=int(request.seed),
        images=pixels,
        latents=z.cpu().numpy().astype(np.float32),
        rates=rates_np,
        score=score.double().cpu().numpy(),
        target=target,
        activation=activation,
        relative_activation=relative,
        steps=steps,
        evaluations=evaluations,
        elapsed=elapsed,
    )


def synthesize(
    pair: ModelPair, request: SynthesisRequest, device: torch.device | str | None = None
) -> SynthesisResult:
    """Run one request to the end on the calling thread (CLI, scripts)."""
    scheduler = SynthesisScheduler(device=device, max_jobs=1)
    job = scheduler.submit(pair, request)
    scheduler.run_until_idle()
    return job.result(timeout=0)


def naive_synthesis(
    pair: ModelPair, request: SynthesisRequest, device: torch.device | str | None = None
) -> SynthesisResult:
    """The baseline: a plain eager loop, one image at a time, no batching across images or requests.

    Same optimizers and objective as the scheduler, so timings compare the execution strategy only.
    """
    device = torch.device(device) if device is not None else default_device()
    request.validate(pair)
    pair.to(device)
    started = time.monotonic()
    finals: list[Tensor] = []
    steps = evaluations = 0
    for i in range(request.n_images):
        single = replace(request, n_images=1, seed=int(request.seed) * 1000 + i)
        job = SynthesisJob(pair, single)
        runner = _build_runner(job, device)
        if isinstance(runner, _GradientRunner):
            while not runner.done:
                images = prior_images(pair.prior, runner.opt.latents)
                seen = twin_view(images, pair.input_size, runner.transform, runner.generator)
                rates = twin_rates(pair.twin, seen)
                score = request.objective(rates, images if request.objective.uses_images else None, None)
                (grad,) = torch.autograd.grad(-score.sum(), [runner.opt.latents])
                runner.opt.set_grad(grad)
                runner.opt.step()
                evaluations += 1
        else:
            assert isinstance(runner, _EvolutionRunner)
            while not runner.done:
                z = torch.from_numpy(runner.ask()).float().to(device)
                with torch.no_grad():
                    images, rates = prior_and_rates(pair.prior, pair.twin, z, pair.input_size)
                    score = request.objective(rates, images if request.objective.uses_images else None, None)
                runner.tell(score.double().cpu().numpy())
                evaluations += z.shape[0]
        steps = runner.step
        finals.append(runner.final_latents())
    return _result(
        "naive",
        pair,
        request,
        request.objective,
        torch.cat(finals),
        device,
        steps,
        evaluations,
        time.monotonic() - started,
    )
