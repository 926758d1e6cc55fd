"""Preferred stimuli for every neuron of a twin, in slices that separate processes run on their own.

A *sweep* synthesizes images for each neuron of one twin version with one prior, method, budget and
seed. It is cut into ``shards`` slices (:func:`shard_neurons`) so that the pods of a Kubernetes
Indexed Job, one slice each, share the work without talking to each other: they only share the sweep
folder (``sweep_folder.py``). A slice run again skips the neurons whose result is complete and redoes
the rest: restarts are cheap and safe.

Jobs run on a :class:`SynthesisScheduler` driven from the calling thread, several neurons at a time,
so on a GPU their steps share one batched forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurotwin.engines.objectives import ObjectiveSpec, build_objective
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.sweep_folder import RESULT_FORMAT, SweepFolder, SweepSpec
from neurotwin.engines.synthesis import (
    ModelPair,
    SynthesisJob,
    SynthesisRequest,
    SynthesisResult,
    SynthesisScheduler,
)
from neurotwin.engines.transfer_defaults import TransferDefaults
from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.imagecodec import encode_png

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_GENERATOR",
    "DEFAULT_IMAGES",
    "NeuronOutcome",
    "SliceOutcome",
    "neuron_request",
    "run_slice",
    "shard_neurons",
]

# The synthesizer service's defaults (neurotwin.server.synthesizer.Settings): a sweep makes the same
# images a client asking the service with no options would get. tests/test_synthesis_job.py keeps
# the two equal.
DEFAULT_GENERATOR = "v4-dcgan-h2"
DEFAULT_BUDGETS = {"gradient": 200, "cmaes": 3000, "genetic": 3000}
DEFAULT_IMAGES = 4


def shard_neurons(count: int, index: int, shards: int) -> range:
    """The neurons of slice ``index`` of ``shards``: every ``shards``-th neuron from ``index``.

    Disjoint and complete for any count (slices differ in size by at most one neuron), and fixed by
    the three numbers alone, so every pod computes the same split without coordination.
    """
    if shards < 1:
        raise InvalidInput(f"shard count must be at least 1, got {shards}")
    if not 0 <= index < shards:
        raise InvalidInput(f"shard index {index} is outside 0..{shards - 1} (shard count {shards})")
    return range(index, count, shards)


# -- running a slice -------------------------------------------------------------------------------------


def neuron_request(pair: ModelPair, spec: SweepSpec, neuron: int) -> SynthesisRequest:
    """The engine request for one neuron, set up as the synthesizer service sets up a request
    that names only the twin and the neuron (single-neuron objective, no diversity term)."""
    objective = build_objective(ObjectiveSpec("neuron", [neuron]), spec.neuron_ids)
    gradient = None
    if spec.method == "gradient":
        prior = pair.latent_prior()
        low, high = prior.get("min"), prior.get("max")
        gradient = GradientConfig(
            steps=spec.budget,
            latent_std=float(prior.get("std", 1.0)) or 1.0,
            bounds=None if low is None and high is None else (low, high),
            transforms=True,
        )
    request = SynthesisRequest(
        objective=objective,
        method=spec.method,
        budget=spec.budget,
        n_images=spec.num_images,
        seed=spec.seed,
        gradient=gradient,
        name=f"{spec.model}:{spec.model_version} neuron {neuron}",
    )
    # The service's transfer defaults (screened starts, clip, blur, ensemble members' agreement) too.
    return TransferDefaults().apply(pair, request, int(getattr(pair.twin, "member_count", 1)))


@dataclass
class NeuronOutcome:
    neuron: int
    neuron_id: str
    folder: Path | None
    best_activation: float = float("nan")
    best_ratio: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class SliceOutcome:
    neurons: list[int]
    skipped: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    partials_removed: int = 0


def _record(
    spec: SweepSpec, neuron: int, pair: ModelPair, result: SynthesisResult, extra: dict[str, Any]
) -> dict[str, Any]:
    reference = pair.predicted_max(neuron)
    activation = result.rates[:, neuron]
    best = int(np.argmax(activation))
    images = [
        {
            "file": f"image_{i:02d}.png",
            "activation": float(activation[i]),
            "activation_ratio": float(activation[i] / reference) if reference else None,
            "objective": float(result.score[i]),
            "rates": [round(float(v), 6) for v in result.rates[i]],
        }
        for i in range(len(activation))
    ]
    return {
        "format": RESULT_FORMAT,
        **{k: v for k, v in asdict(spec).items() if k != "neuron_ids"},
        "neuron": neuron,
        "neuron_id": spec.neuron_ids[neuron],
        "natural_max": reference,
        "best_image": best,
        "best_activation": float(activation[best]),
        "best_ratio": float(activation[best] / reference) if reference else None,
        "steps": int(result.steps),
        "evaluations": int(result.evaluations),
        "elapsed_seconds": round(float(result.elapsed), 3),
        "finished": datetime.now(UTC).isoformat(timespec="milliseconds"),
        **extra,
        "images": images,
    }


def run_slice(
    pair: ModelPair,
    spec: SweepSpec,
    folder: SweepFolder,
    neurons: Iterable[int],
    *,
    device: torch.device,
    concurrency: int = 8,
    max_batch_images: int = 256,
    extra: dict[str, Any] | None = None,
    on_neuron: Callable[[NeuronOutcome], None] | None = None,
) -> SliceOutcome:
    """Synthesize every neuron of ``neurons`` that has no complete result in ``folder`` yet.

    Up to ``concurrency`` neurons run at once on one scheduler (their steps batched together). A
    neuron whose job fails is reported and left without a result; the others go on. ``extra`` is
    added to each result file (shard, device, software version).
    """
    if concurrency < 1:
        raise InvalidInput(f"concurrency must be at least 1, got {concurrency}")
    outcome = SliceOutcome(neurons=list(neurons))
    outcome.partials_removed = folder.clear_partials(outcome.neurons)
    todo = []
    for neuron in outcome.neurons:
        if folder.read_result(spec, neuron) is not None:
            outcome.skipped.append(neuron)
        else:
            todo.append(neuron)
    scheduler = SynthesisScheduler(device=device, max_jobs=concurrency, max_batch_images=max_batch_images)
    running: dict[SynthesisJob, int] = {}
    queue = list(reversed(todo))
    while queue or running:
        while queue and len(running) < concurrency:
            neuron = queue.pop()
            running[scheduler.submit(pair, neuron_request(pair, spec, neuron))] = neuron
        scheduler.run_once()
        for job in [j for j in running if j.done]:
            neuron = running.pop(job)
            report = _finish(job, neuron, pair, spec, folder, extra or {})
            if report.error:
                outcome.failed[neuron] = report.error
            else:
                outcome.done.append(neuron)
            if on_neuron is not None:
                on_neuron(report)
    return outcome


def _finish(
    job: SynthesisJob,
    neuron: int,
    pair: ModelPair,
    spec: SweepSpec,
    folder: SweepFolder,
    extra: dict[str, Any],
) -> NeuronOutcome:
    neuron_id = spec.neuron_ids[neuron]
    try:
        result = job.result(timeout=0)
    except NeurotwinError as exc:
        return NeuronOutcome(neuron, neuron_id, None, error=str(exc))
    record = _record(spec, neuron, pair, result, extra)
    pngs = [encode_png(image) for image in result.images]
    path = folder.write_neuron(spec, neuron, record, pngs, result.latents)
    return NeuronOutcome(
        neuron, neuron_id, path, record["best_activation"], record["best_ratio"], float(result.elapsed)
    )
