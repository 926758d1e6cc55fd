"""The scheduler: continuous batching of synthesis jobs that share a (twin, prior) pair."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neurotwin.engines.render import (
    ensemble_mean,
    prior_and_rates,
    prior_images,
    resize_chw,
    to_uint8,
    twin_rates,
    twin_view,
)
from neurotwin.engines.synthesis.jobs import (
    EvolutionRunner,
    GradientRunner,
    SynthesisJob,
    build_result,
    build_runner,
    not_finite,
    render_latents,
    stop_error,
    stopped,
)
from neurotwin.engines.synthesis.requests import (
    ModelPair,
    Progress,
    SchedulerStats,
    SynthesisRequest,
    SynthesisResult,
    TickInfo,
)
from neurotwin.errors import (
    Cancelled,
    DeadlineExceeded,
    NeurotwinError,
    ResourceExhausted,
    SynthesisFailed,
    Unavailable,
)
from neurotwin.runtimes.devices import default_device


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
            stop = stop_error(job, "before it started")
            if stop is not None:
                self._finish_error(job, stop)
                continue
            try:
                job.pair.to(self.device)
                job.runner = build_runner(job, self.device)
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
        with self._lock:
            active = list(self._active)
        for job in active:
            stop = stop_error(job, f"at step {job.step}")
            if stop is not None:
                self._finish_error(job, stop)

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
            gradient = [j for j in jobs if isinstance(j.runner, GradientRunner)]
            evolution = [j for j in jobs if isinstance(j.runner, EvolutionRunner)]
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
            j.request.n_images * (1 if isinstance(j.runner, GradientRunner) else j.request.population_size())
            for j in jobs
        )
        kind = "gradient" if any(isinstance(j.runner, GradientRunner) for j in jobs) else "evolution"
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
        assert all(isinstance(r, GradientRunner) for r in runners)
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
                    raise not_finite(job, "objective", part_rates)
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
            assert isinstance(runner, GradientRunner)
            if not bool(torch.isfinite(grad).all()):
                self._finish_error(job, not_finite(job, "gradient", part_rates))
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
                if index and all(stopped(j) for j in jobs):
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
            assert isinstance(runner, EvolutionRunner)
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
                    raise not_finite(job, "objective", part_rates)
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
        assert isinstance(runner, (GradientRunner, EvolutionRunner))
        return build_result(
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
