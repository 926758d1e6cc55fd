"""Running requests to the end on the calling thread: batched, or the naive eager baseline."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from neurotwin.engines.render import (
    prior_and_rates,
    prior_images,
    twin_rates,
    twin_view,
)
from neurotwin.engines.synthesis.jobs import (
    EvolutionRunner,
    GradientRunner,
    SynthesisJob,
    build_result,
    build_runner,
)
from neurotwin.engines.synthesis.requests import (
    ModelPair,
    SynthesisRequest,
    SynthesisResult,
)
from neurotwin.engines.synthesis.scheduler import (
    SynthesisScheduler,
)
from neurotwin.runtimes.devices import default_device


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
        runner = build_runner(job, device)
        if isinstance(runner, GradientRunner):
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
            assert isinstance(runner, EvolutionRunner)
            while not runner.done:
                z = torch.from_numpy(runner.ask()).float().to(device)
                with torch.no_grad():
                    images, rates = prior_and_rates(pair.prior, pair.twin, z, pair.input_size)
                    score = request.objective(rates, images if request.objective.uses_images else None, None)
                runner.tell(score.double().cpu().numpy())
                evaluations += z.shape[0]
        steps = runner.step
        finals.append(runner.final_latents())
    return build_result(
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
