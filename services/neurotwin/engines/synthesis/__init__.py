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

Modules: ``requests`` (pairs, requests, events), ``jobs`` (a job and its runner), ``scheduler`` (the
batching scheduler) and ``runs`` (synthesize, naive_synthesis).
"""

from neurotwin.engines.synthesis.jobs import SynthesisJob, render_latents, score_latents
from neurotwin.engines.synthesis.requests import (
    DEFAULT_POPULATION,
    MAX_IMAGES_PER_JOB,
    MAX_INIT_CANDIDATES,
    METHODS,
    ModelPair,
    Progress,
    SchedulerStats,
    SynthesisRequest,
    SynthesisResult,
    TickInfo,
)
from neurotwin.engines.synthesis.runs import naive_synthesis, synthesize
from neurotwin.engines.synthesis.scheduler import SynthesisScheduler
from neurotwin.errors import SynthesisFailed
from neurotwin.runtimes.devices import default_device

__all__ = [
    "DEFAULT_POPULATION",
    "MAX_IMAGES_PER_JOB",
    "MAX_INIT_CANDIDATES",
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
