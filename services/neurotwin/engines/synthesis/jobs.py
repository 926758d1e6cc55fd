"""One synthesis job: its events, its runner (gradient or evolution), its start and its result."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
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
)
from neurotwin.engines.synthesis.requests import (
    ModelPair,
    Progress,
    SynthesisRequest,
    SynthesisResult,
)
from neurotwin.errors import (
    Cancelled,
    DeadlineExceeded,
    NeurotwinError,
    OutOfRange,
    SynthesisFailed,
    Unavailable,
)

DONE = object()


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
        self._expired = False
        self._finished = threading.Event()
        self.runner: Runner | None = None

    # -- consumer side --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the scheduler to stop this job; it stops before its next step."""
        self._cancel.set()

    def expire(self) -> None:
        """Stop this job as past its deadline (the caller's clock said so first): reported as such."""
        self._expired = True
        self._cancel.set()

    @property
    def expired(self) -> bool:
        return self._expired

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
            if item is DONE:
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
        self._events.put(DONE)
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
        self._events.put(DONE)
        self._release()

    def _release(self) -> None:
        # Drop device tensors now: a consumer may hold the job object long after it ended.
        self.runner = None
        self._finished.set()


class Runner:
    step: int = 0


class GradientRunner(Runner):
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


class EvolutionRunner(Runner):
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
    device = torch.device(device) if device is not None else module_device(pair.prior)
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
    device = torch.device(device) if device is not None else module_device(pair.prior)
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


def module_device(module: nn.Module) -> torch.device:
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def resolve_transform(value: bool | Transform | None, config: GradientConfig) -> Transform | None:
    use = config.transforms if value is None else value
    if use is True:
        from neurotwin.runtimes.generators import robustness_transforms

        return robustness_transforms
    if use is False or use is None:
        return None
    return use


def latent_bounds(pair: ModelPair) -> tuple[float | None, float | None] | None:
    prior = pair.latent_prior()
    low, high = prior.get("min"), prior.get("max")
    if low is None and high is None:
        return None
    return (None if low is None else float(low), None if high is None else float(high))


def starting_latents(
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


def not_finite(job: SynthesisJob, what: str, rates: Tensor) -> NeurotwinError:
    """Whose fault a non-finite objective or gradient is: the request's when the twin's rates are
    finite (its weights or step size overflow), the models' otherwise."""
    if bool(torch.isfinite(rates).all()):
        return OutOfRange(
            f"{job.id}: the {what} overflowed at step {job.step} on finite rates: the request's "
            "objective weights or learning rate are too large"
        )
    return SynthesisFailed(f"{job.id}: the twin's rates are not finite at step {job.step}")


def stop_error(job: SynthesisJob, when: str) -> NeurotwinError | None:
    """Why a job must stop now, or None. The deadline first: a client's deadline also cancels its
    call, and that is a deadline, not a cancellation."""
    deadline = job.request.deadline
    if job.expired or (deadline is not None and time.monotonic() >= deadline):
        return DeadlineExceeded(f"{job.id}: deadline passed {when}")
    if job.cancelled:
        return Cancelled(f"{job.id}: cancelled {when}")
    return None


def stopped(job: SynthesisJob) -> bool:
    """Cancelled, or past its deadline (the scheduler finishes it before its next step)."""
    deadline = job.request.deadline
    return job.cancelled or (deadline is not None and time.monotonic() >= deadline)


def build_runner(job: SynthesisJob, device: torch.device) -> Runner:
    request, pair = job.request, job.pair
    seeds = np.random.SeedSequence(int(request.seed))
    latent_seed, transform_seed, *lane_seeds = (
        int(s.generate_state(1)[0]) for s in seeds.spawn(2 + request.n_images)
    )
    latent_gen = torch.Generator().manual_seed(latent_seed)
    prior_info = pair.latent_prior()
    std = float(prior_info.get("std", 1.0)) or 1.0
    bounds = latent_bounds(pair)
    n = int(request.n_images)
    if request.method == "gradient":
        base = request.gradient or GradientConfig(latent_std=std, bounds=bounds)
        config = replace(base, steps=int(request.budget))
        latents = starting_latents(pair, request, n, latent_gen, device).float().to(device)
        transform = resolve_transform(request.transforms, config)
        return GradientRunner(latents, config, transform, torch.Generator().manual_seed(transform_seed))
    population = request.population_size()
    generations = request.total_steps()
    lanes: list[AskTellOptimizer] = []
    if request.method == "cmaes":
        cfg = request.cmaes or CMAESConfig(sigma0=0.5 * std, bounds=bounds)
        cfg = replace(cfg, population=population)
        starts = starting_latents(pair, request, n, latent_gen, device).double().cpu().numpy()
        lanes = [CMAES(starts[i], cfg, seed=lane_seeds[i]) for i in range(n)]
    else:
        gcfg = request.genetic or GeneticConfig(latent_std=std, bounds=bounds)
        gcfg = replace(gcfg, population=population)
        starts = starting_latents(pair, request, n * population, latent_gen, device).double().cpu().numpy()
        lanes = [
            GeneticAlgorithm(starts[i * population : (i + 1) * population], gcfg, seed=lane_seeds[i])
            for i in range(n)
        ]
    return EvolutionRunner(lanes, generations)


def build_result(
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
