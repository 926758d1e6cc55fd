"""Client for ``neurotwin.v1.StimulusSynthesizer``: ``SynthesizerClient`` (blocking).

    with SynthesizerClient("127.0.0.1:8001") as client:
        result = client.synthesize("v4-201025", 12, method="gradient", num_images=4,
                                   on_progress=lambda p: print(p.step, max(p.activation)))
        result.images[0].image             # PNG bytes
        result.images[0].activation_ratio  # vs the neuron's maximum over natural images
        result.pixels()                    # uint8 [N, H, W, 3]

    for event in client.stream("v4-201025", 12, preview_every=10):   # Progress..., then Synthesis
        ...

Leaving a ``stream`` loop early (``break``, an exception, closing the iterator) cancels the call, and
the server stops the work within one optimization step. Failed calls raise ``neurotwin.errors``
exceptions whose ``code`` is the gRPC status.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from neurotwin.card import GeneratorCard
from neurotwin.client._channel import DEFAULT_ADDRESS, ChannelConfig, translate_error
from neurotwin.errors import InvalidInput, NeurotwinError, Unavailable
from neurotwin.imagecodec import decode_image
from neurotwin.v1 import synthesizer_pb2 as pb
from neurotwin.v1 import synthesizer_pb2_grpc as pb_grpc

_UNSET: Any = object()

METHODS: dict[str, int] = {
    "gradient": pb.SynthesizeRequest.GRADIENT,
    "cmaes": pb.SynthesizeRequest.CMAES,
    "genetic": pb.SynthesizeRequest.GENETIC,
}
OBJECTIVES: dict[str, int] = {
    "single": pb.Objective.SINGLE_NEURON,
    "weighted": pb.Objective.WEIGHTED_POPULATION,
    "one_hot": pb.Objective.ONE_HOT_POPULATION,
}
# Neurons: one index or id, or a list of indices or of ids (not mixed).
NeuronsLike = int | str | Sequence[int] | Sequence[str]


@dataclass(frozen=True)
class Progress:
    step: int
    evaluations: int
    objective: list[float]
    """Current objective per returned image."""
    activation: list[float]
    """Current rate of the target neuron per returned image."""
    elapsed_seconds: float
    previews: list[bytes] = field(default_factory=list)
    """Encoded images, on the steps the request asked for previews."""
    total_steps: int = 0


@dataclass(frozen=True)
class SynthesizedImage:
    image: bytes
    """Encoded (PNG or JPEG, as requested)."""
    latent: np.ndarray
    """float32 [latent_dim]: the code that generated the image."""
    rates: np.ndarray
    """float32 [neurons]: the twin's prediction for the image, in ``Synthesis.neuron_ids`` order."""
    activation: float
    activation_ratio: float
    """``activation`` over the neuron's maximum over natural images (0 when the card has no statistics)."""
    objective: float
    reference_max: float = 0.0
    """The denominator of ``activation_ratio``: the neuron's maximum over natural images (0: unknown)."""

    def pixels(self) -> np.ndarray:
        return decode_image(self.image, what="synthesized image")


@dataclass(frozen=True)
class Synthesis:
    images: list[SynthesizedImage]
    model_version: int
    generator_version: int
    neuron_ids: list[str]
    steps: int
    evaluations: int
    elapsed_seconds: float
    target_neuron: int = 0
    """Index of the neuron whose rate is each image's ``activation``."""
    model: str = ""
    generator: str = ""
    queued_seconds: float = 0.0

    @property
    def target_id(self) -> str:
        ids = self.neuron_ids
        return ids[self.target_neuron] if self.target_neuron < len(ids) else str(self.target_neuron)

    def pixels(self) -> np.ndarray:
        """uint8 [N, H, W, 3]."""
        return np.stack([img.pixels() for img in self.images])

    @property
    def activations(self) -> np.ndarray:
        return np.array([img.activation for img in self.images], dtype=np.float32)

    @property
    def activation_ratios(self) -> np.ndarray:
        return np.array([img.activation_ratio for img in self.images], dtype=np.float32)


@dataclass(frozen=True)
class GeneratorInfo:
    name: str
    versions: list[int]
    architecture: str
    latent_dim: int
    resolution: int
    card: GeneratorCard | None


def _neuron_fields(neurons: NeuronsLike) -> tuple[list[int], list[str]]:
    items: list[Any] = [neurons] if isinstance(neurons, (int, str, np.integer)) else list(neurons)
    if not items:
        raise InvalidInput("neurons: give at least one neuron index or id")
    if all(isinstance(n, str) for n in items):
        return [], [str(n) for n in items]
    if all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in items):
        if min(items) < 0:
            raise InvalidInput("neuron indices must be >= 0")
        return [int(n) for n in items], []
    raise InvalidInput("neurons: give all ids (strings) or all indices (integers)")


def build_request(
    model: str,
    neurons: NeuronsLike,
    *,
    model_version: int = 0,
    objective: str = "single",
    weights: Sequence[float] = (),
    diversity: float = 0.0,
    temperature: float = 0.0,
    method: str = "gradient",
    generator: str = "",
    generator_version: int = 0,
    budget: int = 0,
    num_images: int = 1,
    image_size: int = 0,
    image_format: str = "png",
    seed: int = 0,
    preview_every: int = 0,
    learning_rate: float = 0.0,
) -> pb.SynthesizeRequest:
    """A request from plain values. ``objective``: single, weighted or one_hot; ``method``: gradient,
    cmaes or genetic; ``generator``: a stored generator name, "pixels", or "" for the server default."""
    if method not in METHODS:
        raise InvalidInput(f"method {method!r}: expected one of {sorted(METHODS)}")
    if objective not in OBJECTIVES:
        raise InvalidInput(f"objective {objective!r}: expected one of {sorted(OBJECTIVES)}")
    indices, ids = _neuron_fields(neurons)
    return pb.SynthesizeRequest(
        model=model,
        model_version=model_version,
        generator=generator,
        generator_version=generator_version,
        objective=pb.Objective(
            kind=OBJECTIVES[objective],
            neurons=indices,
            neuron_ids=ids,
            weights=[float(w) for w in weights],
            diversity_weight=float(diversity),
            temperature=float(temperature),
        ),
        method=METHODS[method],
        budget=budget,
        num_images=num_images,
        image_size=image_size,
        image_format=image_format,
        seed=seed,
        preview_every=preview_every,
        learning_rate=float(learning_rate),
    )


def parse_progress(message: pb.SynthesisProgress) -> Progress:
    return Progress(
        step=message.step,
        evaluations=message.evaluations,
        objective=list(message.objective),
        activation=list(message.activation),
        elapsed_seconds=message.elapsed_seconds,
        previews=list(message.preview_images),
        total_steps=message.total_steps,
    )


def parse_result(message: pb.SynthesisResult) -> Synthesis:
    images = [
        SynthesizedImage(
            image=img.image,
            latent=np.asarray(img.latent, dtype=np.float32),
            rates=np.asarray(img.rates, dtype=np.float32),
            activation=img.activation,
            activation_ratio=img.activation_ratio,
            objective=img.objective,
            reference_max=img.reference_max,
        )
        for img in message.images
    ]
    return Synthesis(
        images=images,
        model_version=message.model_version,
        generator_version=message.generator_version,
        neuron_ids=list(message.neuron_ids),
        steps=message.steps,
        evaluations=message.evaluations,
        elapsed_seconds=message.elapsed_seconds,
        target_neuron=message.target_neuron,
        model=message.model,
        generator=message.generator,
        queued_seconds=message.queued_seconds,
    )


def parse_events(responses: Iterator[pb.SynthesizeResponse]) -> Iterator[Progress | Synthesis]:
    """Response messages -> Progress events, then one Synthesis (shared with the in-process path)."""
    for response in responses:
        kind = response.WhichOneof("event")
        if kind == "progress":
            yield parse_progress(response.progress)
        elif kind == "result":
            yield parse_result(response.result)
            return


def collect(
    events: Iterator[Progress | Synthesis], on_progress: Callable[[Progress], None] | None = None
) -> Synthesis:
    """Drain an event stream, handing progress to ``on_progress``; returns the final result."""
    for event in events:
        if isinstance(event, Synthesis):
            return event
        if on_progress is not None:
            on_progress(event)
    raise Unavailable("the synthesis stream ended without a result")


def _generator_info(info: pb.GeneratorInfo) -> GeneratorInfo:
    card = None
    if info.card_json:
        try:
            card = GeneratorCard.from_dict(json.loads(info.card_json), source=f"{info.name} card")
        except (ValueError, NeurotwinError):
            card = None
    return GeneratorInfo(
        name=info.name,
        versions=list(info.versions),
        architecture=info.architecture,
        latent_dim=info.latent_dim,
        resolution=info.resolution,
        card=card,
    )


class SynthesizerClient:
    """Blocking client; thread-safe (one channel, many concurrent calls)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        config: ChannelConfig | None = None,
        timeout: float | None = None,
        **channel: Any,
    ) -> None:
        """``timeout`` (seconds) becomes each call's deadline unless a call gives its own; None: no
        deadline. ``channel``: ChannelConfig fields (tls_ca, tls_cert, tls_key, token, ...)."""
        self.config = config or ChannelConfig(address=address, **channel)
        self.timeout = timeout
        self._metadata = self.config.metadata()
        self.channel = self.config.open()
        self._stub = pb_grpc.StimulusSynthesizerStub(self.channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    def stream_request(
        self, request: pb.SynthesizeRequest, timeout: float | None = _UNSET
    ) -> Iterator[Progress | Synthesis]:
        """Progress events, then the Synthesis. Closing the iterator early cancels the call."""
        call = self._stub.Synthesize(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            yield from parse_events(call)
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        finally:
            # A no-op after a finished call; otherwise it tells the server to stop working for us.
            call.cancel()

    def stream(
        self, model: str, neurons: NeuronsLike, *, timeout: float | None = _UNSET, **options: Any
    ) -> Iterator[Progress | Synthesis]:
        """As :meth:`synthesize`, yielding the events instead (see ``build_request`` for options)."""
        return self.stream_request(build_request(model, neurons, **options), timeout)

    def synthesize(
        self,
        model: str,
        neurons: NeuronsLike,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> Synthesis:
        """Run one synthesis job and return its result; ``on_progress`` sees each progress event.

        ``options``: method, generator, budget, num_images, image_size, image_format, seed,
        preview_every, learning_rate, objective, weights, diversity, temperature, model_version,
        generator_version (see :func:`build_request`).
        """
        return collect(self.stream(model, neurons, timeout=timeout, **options), on_progress)

    def list_generators(self, timeout: float | None = _UNSET) -> list[GeneratorInfo]:
        try:
            response = self._stub.ListGenerators(
                pb.ListGeneratorsRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise translate_error(exc) from exc
        return [_generator_info(g) for g in response.generators]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SynthesizerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
