"""Blocking client for ``neurotwin.v1.ClosedLoop``: what a recording rig's control code calls.

    with ClosedLoopClient("127.0.0.1:8001") as client:
        session = client.create_session(neuron_count=96, target_neurons=[12], max_generations=75)
        while True:
            gen = client.ask(session.session_id)
            if gen.finished:
                break
            responses = {s.stimulus_id: record(s.image) for s in gen.stimuli}   # rig code
            summary = client.tell(session.session_id, gen.generation, responses)
        client.export_session(session.session_id, "session.nwb")

Ask, Tell, GetSession, ListSessions, CloseSession and ExportSession are idempotent on the server, so
the client retries them when the server is briefly unreachable (e.g. restarting on its journal) or a
concurrent replica won a race (UNAVAILABLE, ABORTED). CreateSession is retried only when the caller
chose the session id, which makes it idempotent too. Failed calls raise ``neurotwin.errors``
exceptions whose ``code`` is the gRPC status.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from neurotwin.client._channel import DEFAULT_ADDRESS, ChannelConfig, translate_error
from neurotwin.errors import ErrorKind, InvalidInput, RemoteError
from neurotwin.imagecodec import decode_image
from neurotwin.v1 import closed_loop_pb2 as pb
from neurotwin.v1 import closed_loop_pb2_grpc as pb_grpc

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)


@dataclass(frozen=True)
class ConfirmedStimulus:
    """A candidate re-presented for confirmation: its first measurement and the repeats' statistics."""

    stimulus_id: str
    generation: int
    first_score: float
    mean_score: float
    std_score: float
    sem_score: float
    n: int
    target_rates: list[float]

    @classmethod
    def from_message(cls, m: pb.ConfirmedStimulus) -> ConfirmedStimulus:
        return cls(
            stimulus_id=m.stimulus_id,
            generation=m.generation,
            first_score=m.first_score,
            mean_score=m.mean_score,
            std_score=m.std_score,
            sem_score=m.sem_score,
            n=m.n,
            target_rates=list(m.target_rates),
        )


@dataclass(frozen=True)
class BestSoFar:
    generation: int
    stimulus_id: str
    score: float
    target_rates: list[float]
    best_natural_stimulus_id: str
    best_natural_score: float
    last_generation_mean: float
    last_generation_max: float
    # After the confirmation generation: the confirmed best (None before), and every candidate, best first.
    confirmed: ConfirmedStimulus | None = None
    confirmation_candidates: list[ConfirmedStimulus] = field(default_factory=list)

    @classmethod
    def from_message(cls, m: pb.BestSoFar) -> BestSoFar:
        return cls(
            generation=m.generation,
            stimulus_id=m.stimulus_id,
            score=m.score,
            target_rates=list(m.target_rates),
            best_natural_stimulus_id=m.best_natural_stimulus_id,
            best_natural_score=m.best_natural_score,
            last_generation_mean=m.last_generation_mean,
            last_generation_max=m.last_generation_max,
            confirmed=ConfirmedStimulus.from_message(m.confirmed) if m.HasField("confirmed") else None,
            confirmation_candidates=[ConfirmedStimulus.from_message(c) for c in m.confirmation_candidates],
        )


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    status: str
    generation: int
    pending: bool
    generations_told: int
    presentations_told: int
    best: BestSoFar
    latent_dim: int
    natural_image_count: int
    created_time: float
    updated_time: float
    settings: pb.CreateSessionRequest = field(repr=False)

    @classmethod
    def from_message(cls, m: pb.ClosedLoopSession) -> SessionInfo:
        return cls(
            session_id=m.session_id,
            status=m.status,
            generation=m.generation,
            pending=m.pending,
            generations_told=m.generations_told,
            presentations_told=m.presentations_told,
            best=BestSoFar.from_message(m.best),
            latent_dim=m.latent_dim,
            natural_image_count=m.natural_image_count,
            created_time=m.created_time,
            updated_time=m.updated_time,
            settings=m.settings,
        )


@dataclass(frozen=True)
class PresentedStimulus:
    stimulus_id: str
    index: int
    kind: str
    image: bytes
    sha256: str
    natural_name: str
    predicted_rates: list[float]
    predicted_score: float
    # A confirmation re-presentation: the stimulus id of the image's first presentation ("" otherwise).
    repeat_of: str = ""

    def pixels(self) -> np.ndarray:
        """The image as uint8 [H, W, 3]."""
        return decode_image(self.image, what=self.stimulus_id)

    def check(self) -> None:
        """Raise if the bytes do not match the sha256 the server journaled."""
        if self.image and hashlib.sha256(self.image).hexdigest() != self.sha256:
            raise InvalidInput(f"stimulus {self.stimulus_id}: image bytes do not match their sha256")


@dataclass(frozen=True)
class PendingGeneration:
    session_id: str
    generation: int
    finished: bool
    stimuli: list[PresentedStimulus]
    image_format: str
    created_time: float

    @property
    def stimulus_ids(self) -> list[str]:
        return [s.stimulus_id for s in self.stimuli]

    def pixels(self) -> np.ndarray:
        """All images as uint8 [N, H, W, 3], in presentation order."""
        return np.stack([s.pixels() for s in self.stimuli])

    @classmethod
    def from_message(cls, m: pb.AskResponse) -> PendingGeneration:
        return cls(
            session_id=m.session_id,
            generation=m.generation,
            finished=m.finished,
            image_format=m.image_format,
            created_time=m.created_time,
            stimuli=[
                PresentedStimulus(
                    stimulus_id=s.stimulus_id,
                    index=s.index,
                    kind=s.kind,
                    image=s.image,
                    sha256=s.sha256,
                    natural_name=s.natural_name,
                    predicted_rates=list(s.predicted_rates),
                    predicted_score=s.predicted_score,
                    repeat_of=s.repeat_of,
                )
                for s in m.stimuli
            ],
        )


@dataclass(frozen=True)
class TellSummary:
    session_id: str
    generation: int
    generation_complete: bool
    missing_stimulus_ids: list[str]
    best: BestSoFar
    generations_told: int
    presentations_told: int
    finished: bool

    @classmethod
    def from_message(cls, m: pb.TellResponse) -> TellSummary:
        return cls(
            session_id=m.session_id,
            generation=m.generation,
            generation_complete=m.generation_complete,
            missing_stimulus_ids=list(m.missing_stimulus_ids),
            best=BestSoFar.from_message(m.best),
            generations_told=m.generations_told,
            presentations_told=m.presentations_told,
            finished=m.finished,
        )


def _model_ref(model: str | tuple[str, int] | None) -> pb.ClosedLoopModelRef | None:
    """``"name"``, ``"name:3"`` or ``("name", 3)``."""
    if not model:
        return None
    if isinstance(model, tuple):
        return pb.ClosedLoopModelRef(name=model[0], version=int(model[1]))
    name, _, version = model.partition(":")
    if version and not version.isdigit():
        raise InvalidInput(f"model {model!r}: expected NAME or NAME:VERSION")
    return pb.ClosedLoopModelRef(name=name, version=int(version or 0))


def _metadata(values: Mapping[str, Any] | None) -> pb.RecordingMetadata:
    data = dict(values or {})
    if isinstance(data.get("experimenter"), str):
        data["experimenter"] = [data["experimenter"]]
    try:
        return pb.RecordingMetadata(**{k: v for k, v in data.items() if v})
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"metadata: {exc}") from exc


def stimulus_response(
    stimulus_id: str, values: Any, onset: float | None = None, duration: float | None = None
) -> pb.StimulusResponse:
    """1-D values -> rates (a mean per neuron); 2-D [repeats, neurons] -> one row per repeat."""
    array = np.asarray(values, dtype=np.float32)
    message = pb.StimulusResponse(
        stimulus_id=stimulus_id,
        onset_time=onset or 0.0,
        onset_known=onset is not None,
        duration=duration or 0.0,
    )
    if array.ndim == 1:
        message.rates.extend(array.tolist())
    elif array.ndim == 2:
        message.repeats.extend(pb.ResponseRepeat(rates=row.tolist()) for row in array)
    else:
        raise InvalidInput(f"stimulus {stimulus_id}: responses must be [neurons] or [repeats, neurons]")
    return message


class ClosedLoopClient:
    """One channel to a closed-loop server; use as a context manager or call ``close()``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        config: ChannelConfig | None = None,
        timeout: float | None = 120.0,
        retries: int = 8,
        retry_delay: float = 0.25,
        **channel: Any,
    ) -> None:
        self.config = config or ChannelConfig(address=address, **channel)
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self._channel = self.config.open()
        self._stub = pb_grpc.ClosedLoopStub(self._channel)
        self._metadata = self.config.metadata()

    def __enter__(self) -> ClosedLoopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, retry: bool = True) -> T:
        delay = self.retry_delay
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if not retry or exc.code() not in RETRYABLE or attempt >= self.retries:
                    raise translate_error(exc) from exc
            attempt += 1
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- calls --------------------------------------------------------------------------------------
    def create_session(
        self,
        *,
        neuron_count: int,
        target_neurons: Sequence[int] = (0,),
        generator: str | tuple[str, int] | None = None,
        optimizer: str = "cma-es",
        optimizer_options: Mapping[str, float] | None = None,
        population_size: int = 40,
        natural_per_generation: int = 0,
        natural_source: str = "",
        natural_images: Sequence[bytes | str | os.PathLike[str]] = (),
        neuron_ids: Sequence[str] = (),
        objective: str = "mean",
        seed: int | None = None,
        max_generations: int = 0,
        image_size: int = 0,
        image_format: str = "png",
        twin: str | tuple[str, int] | None = None,
        twin_neurons: Sequence[int] = (),
        candidates_per_presentation: int = 0,
        refit_readout: bool = False,
        description: str = "",
        session_id: str = "",
        metadata: Mapping[str, Any] | None = None,
        confirmation: bool | None = None,
        confirm_top: int = 0,
        confirm_repeats: int = 0,
    ) -> SessionInfo:
        """``metadata``: ``neurotwin.v1.RecordingMetadata`` fields by name (subject, device, session).

        ``confirmation``: None for the server's defaults, False to switch it off, True to ask for it
        (with ``confirm_top`` candidates x ``confirm_repeats`` repeats; 0: the defaults).
        """
        images = [
            bytes(x) if isinstance(x, bytes | bytearray | memoryview) else Path(x).read_bytes()
            for x in natural_images
        ]
        request = pb.CreateSessionRequest(
            session_id=session_id,
            optimizer=optimizer,
            optimizer_options=dict(optimizer_options or {}),
            population_size=population_size,
            natural_per_generation=natural_per_generation,
            natural_source=natural_source,
            natural_images=images,
            neuron_count=neuron_count,
            neuron_ids=list(neuron_ids),
            target_neurons=list(target_neurons),
            objective=objective,
            max_generations=max_generations,
            image_size=image_size,
            image_format=image_format,
            description=description,
            metadata=_metadata(metadata),
        )
        if seed is not None:
            request.seed = seed
        if confirmation is not None or confirm_top or confirm_repeats:
            request.confirmation.CopyFrom(
                pb.Confirmation(
                    top_candidates=confirm_top, repeats=confirm_repeats, disabled=confirmation is False
                )
            )
        generator_ref = _model_ref(generator)
        if generator_ref is not None:
            request.generator.CopyFrom(generator_ref)
        twin_ref = _model_ref(twin)
        # Guidance options without a twin still go out, so the server can say what is wrong.
        if twin_ref is not None or twin_neurons or candidates_per_presentation or refit_readout:
            request.guidance.CopyFrom(
                pb.TwinGuidance(
                    twin=twin_ref,
                    twin_neurons=list(twin_neurons),
                    candidates_per_presentation=candidates_per_presentation,
                    refit_readout=refit_readout,
                )
            )
        reply = self._call(self._stub.CreateSession, request, retry=bool(session_id))
        return SessionInfo.from_message(reply)

    def ask(self, session_id: str, omit_images: bool = False) -> PendingGeneration:
        reply = self._call(self._stub.Ask, pb.AskRequest(session_id=session_id, omit_images=omit_images))
        return PendingGeneration.from_message(reply)

    def tell(
        self,
        session_id: str,
        generation: int,
        responses: Mapping[str, Any],
        *,
        partial: bool = False,
        onsets: Mapping[str, float] | None = None,
        durations: Mapping[str, float] | None = None,
    ) -> TellSummary:
        """``responses``: stimulus id -> [neurons] (mean) or [repeats, neurons] values."""
        onsets, durations = onsets or {}, durations or {}
        request = pb.TellRequest(
            session_id=session_id,
            generation=generation,
            partial=partial,
            responses=[
                stimulus_response(sid, values, onsets.get(sid), durations.get(sid))
                for sid, values in responses.items()
            ],
        )
        return TellSummary.from_message(self._call(self._stub.Tell, request))

    def get_session(self, session_id: str) -> SessionInfo:
        reply = self._call(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id))
        return SessionInfo.from_message(reply)

    def list_sessions(self, open_only: bool = False) -> list[SessionInfo]:
        reply = self._call(self._stub.ListSessions, pb.ListSessionsRequest(open_only=open_only))
        return [SessionInfo.from_message(s) for s in reply.sessions]

    def close_session(self, session_id: str) -> SessionInfo:
        reply = self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))
        return SessionInfo.from_message(reply)

    def export_session(
        self,
        session_id: str,
        path: str | os.PathLike[str],
        format: str = "nwb",
        omit_images: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Download the export to ``path`` and check its size and sha256; returns the path.
        ``metadata`` fields replace the session's in this file only."""
        request = pb.ExportSessionRequest(
            session_id=session_id, format=format, omit_images=omit_images, metadata=_metadata(metadata)
        )
        target = Path(path)
        partial = target.with_name(f".{target.name}.part")

        def download(req: pb.ExportSessionRequest, **kwargs: Any) -> tuple[int, str, str]:
            digest = hashlib.sha256()
            expected_size, expected_sha = -1, ""
            with partial.open("wb") as out:
                for chunk in self._stub.ExportSession(req, **kwargs):
                    if chunk.filename:
                        expected_size, expected_sha = chunk.total_bytes, chunk.sha256
                    out.write(chunk.data)
                    digest.update(chunk.data)
            return expected_size, expected_sha, digest.hexdigest()

        try:
            expected_size, expected_sha, actual_sha = self._call(download, request)
            size = partial.stat().st_size
            if size != expected_size or actual_sha != expected_sha:
                raise RemoteError(
                    f"export of {session_id} arrived damaged ({size} of {expected_size} bytes, sha256 "
                    f"{actual_sha[:12]} instead of {expected_sha[:12]})",
                    ErrorKind.DATA_LOSS,
                    grpc.StatusCode.DATA_LOSS,
                )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return target
