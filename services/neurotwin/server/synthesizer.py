"""The stimulus-synthesis service: ``neurotwin.v1.StimulusSynthesizer``.

Thin by design: a request is validated and turned into a job of the synthesis engine
(``neurotwin.engines.synthesis``), whose scheduler steps all concurrent jobs on the same twin and
generator as one batch; the job's progress events and final result are turned back into messages.

:class:`SynthesizerService` holds everything but gRPC (the model cache, the scheduler, metrics), so
``neurotwin synthesize`` runs exactly the same code in-process, without a server. ``attach`` puts it on
a :class:`~neurotwin.server.common.GrpcServer`, which brings TLS, tokens, health, reflection, metrics
export and graceful drain.

Cancellation: when the call ends early (client cancel, deadline, drain timeout), gRPC runs the call's
callback, which cancels the job; the scheduler checks cancellation and deadlines before every step,
so the work stops within one step.
"""

from __future__ import annotations

import collections
import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry

from neurotwin.card import PredictorCard
from neurotwin.engines.objectives import ObjectiveSpec, build_objective
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.engines.synthesis import (
    MAX_IMAGES_PER_JOB,
    Progress,
    SynthesisJob,
    SynthesisRequest,
    SynthesisResult,
    SynthesisScheduler,
)
from neurotwin.engines.synthesis.pairs import PIXELS, LoadedPair, PairCache
from neurotwin.engines.transfer_defaults import TransferDefaults
from neurotwin.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NeurotwinError,
    NotFound,
    ResourceExhausted,
)
from neurotwin.imagecodec import encode_image, resize_uint8
from neurotwin.runtimes.devices import select_device
from neurotwin.server.common import GrpcServer, deadline_from
from neurotwin.server.synthesizer_metrics import SynthesizerMetrics
from neurotwin.store import (
    GENERATORS,
    default_store_root,
    validate_generator,
)
from neurotwin.v1 import synthesizer_pb2 as pb
from neurotwin.v1 import synthesizer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SECTION = "synthesizer"
SERVICE_NAME = "neurotwin.v1.StimulusSynthesizer"
# The generator-free prior: a Fourier pixel parameterization built at the twin's input size.
IMAGE_FORMATS = {"": "png", "png": "png", "jpeg": "jpeg", "jpg": "jpeg"}
METHOD_NAMES = {
    pb.SynthesizeRequest.METHOD_UNSPECIFIED: "gradient",
    pb.SynthesizeRequest.GRADIENT: "gradient",
    pb.SynthesizeRequest.CMAES: "cmaes",
    pb.SynthesizeRequest.GENETIC: "genetic",
}
MIN_IMAGE_SIZE = 8
# Sane ranges for request numbers: latents are unit-scale and rates are O(1-100), so larger values
# only overflow (to a non-finite objective) without meaning anything.
MAX_LEARNING_RATE = 1e3
# A call that ends with less time than this left ended at its deadline.
_DEADLINE_SLACK_S = 0.1
MAX_OBJECTIVE_WEIGHT = 1e6


@dataclass
class Settings:
    """Settings of the synthesizer service (section ``synthesizer``, env ``NEUROTWIN_SYNTHESIZER_*``)."""

    model_store: str = field(default_factory=default_store_root)
    # Generator used when a request names none ("pixels": the Fourier pixel parameterization). The
    # bundled GAN searched on its 4096-d hidden code drives neurons much further than on its input
    # noise (BENCHMARKS.md, synthesis).
    default_generator: str = "v4-dcgan-h2"
    # "auto" (CUDA when available), "cpu" or "cuda".
    device: str = "auto"
    # Jobs admitted at once (queued + running); beyond it, RESOURCE_EXHAUSTED.
    max_jobs: int = 16
    # Most images one request may ask for.
    max_images: int = 16
    # Images per batched forward pass; more concurrent images take several passes per step.
    max_batch_images: int = 256
    # Default budgets: gradient steps; twin evaluations per image for CMA-ES and the genetic algorithm.
    gradient_budget: int = 200
    cmaes_budget: int = 3000
    genetic_budget: int = 3000
    # Largest budgets a request may ask for.
    max_gradient_steps: int = 5000
    max_evaluations: int = 100_000
    # Largest output image side in pixels (outputs are resized from the twin's input size).
    max_image_size: int = 1024
    # Random jitter/scale/rotation of the images during gradient ascent (robust, less adversarial).
    gradient_transforms: bool = True
    # What makes stimuli hold up on independent twins (engines/transfer_defaults.py; measured by
    # bench/transfer.py, BENCHMARKS.md): starting codes screened on the twin, a code-norm clip and blur
    # during gradient ascent, and agreement of an ensemble twin's members.
    init_candidates: int = TransferDefaults.init_candidates
    gradient_clip_norm: float = TransferDefaults.clip_norm
    gradient_blur: float = TransferDefaults.blur
    twin_members: str = TransferDefaults.members
    member_temperature: float = TransferDefaults.member_temperature
    member_disagreement: float = TransferDefaults.member_disagreement
    # bfloat16 autocast on CUDA.
    amp: bool = False
    # Twin/generator pairs kept loaded (least recently used ones are dropped first).
    max_loaded_pairs: int = 4
    # Images ONNX Runtime and the converted twin are compared on when a twin is loaded; 0 skips it.
    parity_images: int = 4

    def torch_device(self) -> torch.device:
        return select_device(self.device, "synthesizer device")

    def budget_for(self, method: str) -> int:
        return {"gradient": self.gradient_budget, "cmaes": self.cmaes_budget}.get(method, self.genetic_budget)


FLAG_HELP = {
    "default_generator": "generator used when a request names none; 'pixels' for no generator "
    "(default v4-dcgan-h2)",
    "device": "auto, cpu or cuda (default auto)",
    "max_jobs": "synthesis jobs admitted at once, queued + running; beyond it RESOURCE_EXHAUSTED "
    "(default 16)",
    "max_images": "most images one request may ask for (default 16)",
    "max_batch_images": "images per batched forward pass (default 256)",
    "gradient_budget": "default gradient steps (default 200)",
    "cmaes_budget": "default CMA-ES twin evaluations per image (default 3000)",
    "genetic_budget": "default genetic-algorithm twin evaluations per image (default 3000)",
    "max_gradient_steps": "largest gradient budget a request may ask for (default 5000)",
    "max_evaluations": "largest CMA-ES/GA budget a request may ask for (default 100000)",
    "max_image_size": "largest output image side in pixels (default 1024)",
    "gradient_transforms": "jitter/scale/rotate images during gradient ascent (default true)",
    "init_candidates": "prior samples scored on the twin to pick each image's starting code; 0 for random "
    "starts (default 0)",
    "gradient_clip_norm": "largest code norm in gradient ascent, in sqrt(D) x code std; 0 for none "
    "(default 0)",
    "gradient_blur": "largest blur sigma of the robustness transforms, as a fraction of the image size "
    "(default 0)",
    "twin_members": "how an ensemble twin's members must agree: mean, softmin or min (default mean)",
    "member_temperature": "soft-min temperature, in units of the neuron's natural maximum (default 0.1)",
    "member_disagreement": "penalty on the spread of an ensemble twin's members (default 0)",
    "amp": "bfloat16 autocast on CUDA (default false)",
    "max_loaded_pairs": "twin/generator pairs kept loaded (default 4)",
    "parity_images": "images for the ONNX-vs-torch parity check when a twin loads; 0 skips it (default 4)",
}


# -- the service -----------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """What the service remembers of a recent job (for status pages and tests)."""

    job: SynthesisJob
    key: str
    method: str
    submitted: float


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {value}")
    return value


class SynthesizerService:
    """Requests in, response messages out; no gRPC. Used by the servicer and by the CLI in-process."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        *,
        start: bool = True,
        models: ModelRegistry | None = None,
    ) -> None:
        for name in ("max_jobs", "max_images", "max_batch_images", "max_image_size"):
            if getattr(settings, name) < 1:
                raise InvalidInput(f"synthesizer {name} must be >= 1, got {getattr(settings, name)}")
        self.settings = settings
        self.device = settings.torch_device()
        self.transfer = TransferDefaults(
            init_candidates=int(settings.init_candidates),
            clip_norm=float(settings.gradient_clip_norm),
            blur=float(settings.gradient_blur),
            members=settings.twin_members,
            member_temperature=float(settings.member_temperature),
            member_disagreement=float(settings.member_disagreement),
        )
        # The server's shared model registry; in process (the CLI) one of our own, released on stop.
        self._own_models = models is None
        if models is None:
            models = ModelRegistry(settings.model_store, RegistrySettings(poll_seconds=0))
            models.start()
        self.models = models
        self.store = models.store
        self.pairs = PairCache(
            models,
            self.device,
            default_generator=settings.default_generator,
            parity_images=settings.parity_images,
            max_loaded_pairs=settings.max_loaded_pairs,
        )
        self.scheduler = SynthesisScheduler(
            device=self.device,
            max_jobs=settings.max_jobs,
            max_batch_images=settings.max_batch_images,
            amp=settings.amp,
        )
        self.metrics = SynthesizerMetrics(registry or CollectorRegistry(), self.scheduler)
        self.scheduler.on_tick = self.metrics.on_tick
        self.recent: collections.deque[JobRecord] = collections.deque(maxlen=64)
        if start:
            self.scheduler.start()
            # pycma takes seconds to import; do it now rather than in the first CMA-ES request.
            threading.Thread(
                target=importlib.import_module, args=("cma",), name="import-cma", daemon=True
            ).start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self._own_models:
            self.models.stop()

    # -- request -> engine job ----------------------------------------------------------------------

    def _method(self, request: pb.SynthesizeRequest) -> str:
        method = METHOD_NAMES.get(request.method)
        if method is None:
            raise InvalidInput(f"method {request.method}: expected GRADIENT, CMAES or GENETIC")
        return method

    def _budget(self, request: pb.SynthesizeRequest, method: str) -> int:
        budget = int(request.budget) or self.settings.budget_for(method)
        limit = self.settings.max_gradient_steps if method == "gradient" else self.settings.max_evaluations
        if budget > limit:
            unit = "steps" if method == "gradient" else "evaluations per image"
            raise InvalidInput(f"budget {budget} {unit} exceeds this server's limit of {limit}")
        if method != "gradient" and budget < 2:
            raise InvalidInput(f"budget {budget}: {method} needs at least one generation of evaluations")

        return budget

    def _objective_spec(self, objective: pb.Objective, card: PredictorCard) -> ObjectiveSpec:
        if objective.neurons and objective.neuron_ids:
            raise InvalidInput("objective: give neuron indices or neuron ids, not both")
        neurons: list[int | str] = list(objective.neurons) or list(objective.neuron_ids)
        if not neurons:
            raise InvalidInput("objective: name at least one neuron (index or id)")
        unknown = [n for n in objective.neuron_ids if n not in card.neuron_ids]
        if unknown:
            raise InvalidInput(f"objective: neuron ids {unknown[:5]} are not in the twin {card.name}")
        diversity = _finite(float(objective.diversity_weight), "objective diversity_weight")
        if not 0 <= diversity <= MAX_OBJECTIVE_WEIGHT:
            raise InvalidInput(
                f"objective diversity_weight {diversity:g}: must be in [0, {MAX_OBJECTIVE_WEIGHT:g}]"
            )
        temperature = _finite(float(objective.temperature), "objective temperature")
        if temperature < 0:
            raise InvalidInput(f"objective temperature must be >= 0, got {temperature}")
        kind = objective.kind
        if kind in (pb.Objective.KIND_UNSPECIFIED, pb.Objective.SINGLE_NEURON):
            if len(neurons) != 1:
                raise InvalidInput(
                    f"SINGLE_NEURON takes one neuron, got {len(neurons)}; use WEIGHTED_POPULATION"
                )
            if objective.weights:
                raise InvalidInput("weights are only for WEIGHTED_POPULATION")
            return ObjectiveSpec("neuron", neurons, diversity=diversity)
        if kind == pb.Objective.WEIGHTED_POPULATION:
            weights = [float(w) for w in objective.weights] or [1.0] * len(neurons)
            if len(weights) != len(neurons):
                raise InvalidInput(f"WEIGHTED_POPULATION: {len(neurons)} neurons but {len(weights)} weights")
            for w in weights:
                # Beyond this, weighted sums of rates overflow float32 long before they mean anything.
                if not abs(_finite(w, "objective weight")) <= MAX_OBJECTIVE_WEIGHT:
                    raise InvalidInput(f"objective weight {w:g}: must be within +-{MAX_OBJECTIVE_WEIGHT:g}")
            return ObjectiveSpec("population", neurons, weights=weights, diversity=diversity)
        if kind == pb.Objective.ONE_HOT_POPULATION:
            if objective.weights:
                raise InvalidInput("weights are only for WEIGHTED_POPULATION")
            return ObjectiveSpec(
                "one_hot",
                neurons[:1],
                population=neurons[1:] or None,
                temperature=temperature or 1.0,
                diversity=diversity,
            )
        raise InvalidInput(f"objective kind {kind}: expected SINGLE_NEURON, WEIGHTED_POPULATION or ONE_HOT")

    def _check_shape(self, request: pb.SynthesizeRequest) -> tuple[str, int]:
        """Checks that need no model: image count, format, size, numbers."""
        limit = min(self.settings.max_images, MAX_IMAGES_PER_JOB)
        if not 1 <= request.num_images <= limit:
            raise InvalidInput(f"num_images {request.num_images}: must be 1 to {limit}")
        fmt = IMAGE_FORMATS.get(request.image_format.strip().lower())
        if fmt is None:
            raise InvalidInput(f"image_format {request.image_format!r}: expected 'png' or 'jpeg'")
        size = int(request.image_size)
        if size and not MIN_IMAGE_SIZE <= size <= self.settings.max_image_size:
            raise InvalidInput(
                f"image_size {size}: must be 0 (the twin's input size) or "
                f"{MIN_IMAGE_SIZE} to {self.settings.max_image_size}"
            )
        lr = _finite(float(request.learning_rate), "learning_rate")
        if not 0 <= lr <= MAX_LEARNING_RATE:
            raise InvalidInput(f"learning_rate {lr:g}: must be in [0, {MAX_LEARNING_RATE:g}]")
        return fmt, size

    def build(
        self, request: pb.SynthesizeRequest, deadline: float | None = None
    ) -> tuple[LoadedPair, SynthesisRequest]:
        """Validate a request and load what it needs. InvalidInput / NotFound / ResourceExhausted."""
        self._check_shape(request)
        method = self._method(request)
        budget = self._budget(request, method)
        # Refuse before loading anything when the scheduler is already full (submit checks again).
        if self.scheduler.load >= self.settings.max_jobs:
            raise ResourceExhausted(
                f"synthesis is at its limit of {self.settings.max_jobs} concurrent requests; retry later"
            )
        loaded = self.pairs.checkout(
            request.model, request.model_version, request.generator, request.generator_version
        )
        try:
            return loaded, self._job_request(request, loaded, method, budget, deadline)
        except BaseException:
            loaded.release()
            raise

    def _job_request(
        self,
        request: pb.SynthesizeRequest,
        loaded: LoadedPair,
        method: str,
        budget: int,
        deadline: float | None,
    ) -> SynthesisRequest:
        key = loaded.key
        spec = self._objective_spec(request.objective, loaded.card)
        objective = build_objective(spec, loaded.card.neuron_ids)
        gradient = None
        if method == "gradient":
            prior = loaded.pair.latent_prior()
            low, high = prior.get("min"), prior.get("max")
            bounds = None if low is None and high is None else (low, high)
            gradient = GradientConfig(
                steps=budget,
                lr=float(request.learning_rate) or GradientConfig.lr,
                latent_std=float(prior.get("std", 1.0)) or 1.0,
                bounds=bounds,
                transforms=self.settings.gradient_transforms,
            )
        job_request = SynthesisRequest(
            objective=objective,
            method=method,
            budget=budget,
            n_images=int(request.num_images),
            seed=int(request.seed),
            preview_every=int(request.preview_every),
            gradient=gradient,
            deadline=deadline,
            name=str(key),
        )
        members = int(getattr(loaded.pair.twin, "member_count", 1))
        return self.transfer.apply(loaded.pair, job_request, members)

    def submit(
        self, request: pb.SynthesizeRequest, deadline: float | None = None
    ) -> tuple[SynthesisJob, LoadedPair]:
        try:
            loaded, job_request = self.build(request, deadline)
            try:
                job = self.scheduler.submit(loaded.pair, job_request)
            except BaseException:
                loaded.release()
                raise
        except ResourceExhausted:
            self.metrics.rejected.labels("full").inc()
            raise
        except (InvalidInput, NotFound):
            self.metrics.rejected.labels("invalid").inc()
            raise
        self.recent.append(JobRecord(job, str(loaded.key), job_request.method, time.monotonic()))
        return job, loaded

    # -- engine events -> messages ------------------------------------------------------------------

    def run(
        self,
        request: pb.SynthesizeRequest,
        deadline: float | None = None,
        on_submit: Callable[[SynthesisJob], None] | None = None,
    ) -> Iterator[pb.SynthesizeResponse]:
        """Progress messages, then the result message. Closing the iterator early cancels the job."""
        fmt, size = self._check_shape(request)
        job, loaded = self.submit(request, deadline)
        method = job.request.method
        outcome = "failed"
        try:
            if on_submit is not None:
                on_submit(job)
            for event in job.events():
                if isinstance(event, Progress):
                    yield pb.SynthesizeResponse(progress=self._progress(event, fmt, size))
                elif isinstance(event, SynthesisResult):
                    message = self._result(event, job, loaded, fmt, size)
                    outcome = "ok"
                    yield pb.SynthesizeResponse(result=message)
        except Cancelled:
            outcome = "cancelled"
            raise
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        except GeneratorExit:
            # The consumer went away (a cancelled call): stop the engine work too.
            outcome = "cancelled"
            raise
        finally:
            if not job.done:
                # The consumer left: at (about) the deadline that is the deadline, else a cancel.
                if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S:
                    job.expire()
                else:
                    job.cancel()
                if outcome == "failed":
                    outcome = "cancelled"
            # gRPC cancels a call whose deadline passed: that is a deadline, not a cancellation.
            expired = job.state == "deadline" or (deadline is not None and time.monotonic() >= deadline)
            if outcome == "cancelled" and expired:
                outcome = "deadline"
            self.metrics.jobs.labels(method, outcome).inc()
            self.metrics.job_seconds.labels(method).observe(time.monotonic() - job.submitted)
            if job.started is not None:
                self.metrics.queued_seconds.observe(job.started - job.submitted)
            # The job no longer runs (finished, failed or cancelled: a cancelled one stops at its next
            # step, and the scheduler keeps its own references meanwhile): the models may go.
            loaded.release()

    @staticmethod
    def _encode(images: np.ndarray, fmt: str, size: int) -> list[bytes]:
        out = []
        for image in images:
            if size and image.shape[:2] != (size, size):
                image = resize_uint8(image, size, size)
            out.append(encode_image(image, fmt))
        return out

    def _progress(self, event: Progress, fmt: str, size: int) -> pb.SynthesisProgress:
        message = pb.SynthesisProgress(
            step=event.step,
            evaluations=event.evaluations,
            objective=np.nan_to_num(np.asarray(event.score, dtype=np.float64)).tolist(),
            activation=np.nan_to_num(np.asarray(event.activation, dtype=np.float64)).tolist(),
            elapsed_seconds=event.elapsed,
            total_steps=event.total_steps,
        )
        if event.preview is not None:
            message.preview_images.extend(self._encode(event.preview, fmt, size))
        return message

    def _result(
        self, result: SynthesisResult, job: SynthesisJob, loaded: LoadedPair, fmt: str, size: int
    ) -> pb.SynthesisResult:
        target = result.target if result.target is not None else 0
        reference = loaded.pair.predicted_max(target)
        activation = result.rates[:, target]
        message = pb.SynthesisResult(
            model_version=loaded.key.model_version,
            generator_version=loaded.key.generator_version,
            neuron_ids=list(loaded.card.neuron_ids),
            steps=result.steps,
            evaluations=result.evaluations,
            elapsed_seconds=result.elapsed,
            target_neuron=target,
            model=loaded.key.model,
            generator=loaded.key.generator,
            queued_seconds=(job.started - job.submitted) if job.started is not None else 0.0,
        )
        encoded = self._encode(result.images, fmt, size)
        for i, data in enumerate(encoded):
            item = message.images.add()
            item.image = data
            item.latent.extend(result.latents[i].tolist())
            item.rates.extend(result.rates[i].tolist())
            item.activation = float(activation[i])
            item.activation_ratio = float(activation[i] / reference) if reference else 0.0
            item.objective = float(result.score[i])
            item.reference_max = float(reference or 0.0)
        return message

    # -- generators ---------------------------------------------------------------------------------

    def list_generators(self) -> pb.ListGeneratorsResponse:
        import json

        response = pb.ListGeneratorsResponse()
        for name in self.store.names(GENERATORS):
            versions = self.store.versions(GENERATORS, name)
            if not versions:
                continue
            info = response.generators.add(name=name, versions=versions)
            try:
                card = validate_generator(self.store.resolve(GENERATORS, name))
            except NeurotwinError as exc:
                log.warning("synthesizer: generator %s is not usable: %s", name, exc)
                continue
            info.architecture = card.architecture
            info.latent_dim = card.latent_dim
            info.resolution = card.resolution
            info.card_json = json.dumps(card.to_dict())
        # Built in: its size follows the twin it is used with, so latent_dim and resolution stay 0.
        response.generators.add(name=PIXELS, architecture="FourierPixels")
        return response


class SynthesizerServicer(pb_grpc.StimulusSynthesizerServicer):
    def __init__(self, service: SynthesizerService) -> None:
        self.service = service

    def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SynthesizeResponse]:
        def watch(job: SynthesisJob) -> None:
            def ended() -> None:
                # Runs when the call ends for any reason; after a normal finish it is a no-op. A call
                # that ends with no time left ended at its deadline, which the client's clock may
                # have reached a moment before the server's copy of it.
                remaining = context.time_remaining()
                if remaining is not None and remaining < _DEADLINE_SLACK_S:
                    job.expire()
                else:
                    job.cancel()

            if not context.add_callback(ended):
                ended()

        responses = self.service.run(request, deadline_from(context), on_submit=watch)
        try:
            for response in responses:
                if not context.is_active():
                    break
                yield response
        finally:
            responses.close()

    def ListGenerators(
        self, request: pb.ListGeneratorsRequest, context: grpc.ServicerContext
    ) -> pb.ListGeneratorsResponse:
        return self.service.list_generators()


def attach(server: GrpcServer, settings: Settings) -> SynthesizerService:
    """Start the scheduler and register StimulusSynthesizer on ``server``; returns the service."""
    from neurotwin.server.models import shared_registry

    service = SynthesizerService(
        settings, server.metrics.registry, models=shared_registry(server, settings.model_store)
    )
    servicer = SynthesizerServicer(service)
    server.add_service(
        lambda grpc_server: pb_grpc.add_StimulusSynthesizerServicer_to_server(servicer, grpc_server),
        [SERVICE_NAME],
        on_stop=service.stop,
    )
    log.info(
        "synthesizer: model store %s, device %s, default generator %s, up to %d jobs",
        settings.model_store,
        service.device,
        settings.default_generator,
        settings.max_jobs,
    )
    return service


__all__ = [
    "PIXELS",
    "SECTION",
    "SERVICE_NAME",
    "LoadedPair",
    "PairCache",
    "Settings",
    "SynthesizerMetrics",
    "SynthesizerService",
    "SynthesizerServicer",
    "attach",
]
