"""The closed-loop service: ``neurotwin.v1.ClosedLoop`` over ``neurotwin.engines.closed_loop``.

The servicer converts messages to engine calls and back; durability, idempotency and validation live
in the engine, error codes in ``server.common``. ``serve closed-loop`` attaches it to the shared server.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

from neurotwin.engines.closed_loop import (
    ClosedLoopEngine,
    Generation,
    SessionRequest,
    SessionView,
    TellResult,
    ToldResponse,
)
from neurotwin.engines.journal import DEFAULT_JOURNAL, open_journal
from neurotwin.engines.registry import ModelRegistry
from neurotwin.engines.session_limits import SessionLimits
from neurotwin.errors import InvalidInput
from neurotwin.server.common import LATENCY_BUCKETS, GrpcServer
from neurotwin.store import ModelStore, default_store_root
from neurotwin.v1 import closed_loop_pb2 as pb
from neurotwin.v1 import closed_loop_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SECTION = "closed_loop"
SERVICE_NAME = "neurotwin.v1.ClosedLoop"


@dataclass
class Settings:
    """Settings of the closed-loop service (section ``closed_loop``, env ``NEUROTWIN_CLOSED_LOOP_*``,
    flags ``--closed-loop-<setting>``)."""

    model_store: str = field(default_factory=default_store_root)
    # A SQLite file (WAL mode) or a postgresql:// URL shared by replicas.
    journal: str = DEFAULT_JOURNAL
    # SQLite durability: FULL fsyncs every commit (survives power loss); NORMAL only survives crashes.
    sqlite_synchronous: str = "FULL"
    # Open sessions allowed at once (CreateSession beyond it: RESOURCE_EXHAUSTED).
    max_sessions: int = 64
    # natural_source paths are resolved inside this folder and may not leave it; with none set,
    # natural_source is refused (the images come inline as natural_images instead).
    natural_root: str = ""
    max_natural_images: int = 10000
    # Admission by cost (see engines.session_limits): bytes one Ask may journal and return, journal
    # bytes of a session bounded by max_generations, description length, decoded pixels per natural
    # image.
    max_generation_bytes: int = SessionLimits.max_generation_bytes
    max_session_bytes: int = SessionLimits.max_session_bytes
    max_description_chars: int = SessionLimits.max_description_chars
    max_natural_pixels: int = SessionLimits.max_natural_pixels
    # Generator used when CreateSession names none.
    default_generator: str = "v4-dcgan"
    # Torch device for generators ("cpu", "cuda", "cuda:1").
    generator_device: str = "cpu"
    # ONNX Runtime intra-op threads for guidance twins (0: automatic).
    twin_threads: int = 0
    # Torch and BLAS (numpy, pycma) threads for the whole process; 0 leaves the libraries' defaults.
    # On a busy CPU, small generators and CMA-ES updates run many times faster on one thread than on
    # several that spin waiting for each other.
    compute_threads: int = 0
    export_chunk_bytes: int = 1 << 20
    # The live dashboard (/ui/ with --http-port) recomputes a running session's summary at most this
    # often, however many browsers poll it (0: whenever it changed).
    dashboard_refresh_seconds: float = 1.0


# Help per setting; ``neurotwin serve`` turns each setting into a flag --closed-loop-<setting>.
FLAG_HELP = {
    "journal": "SQLite journal path or postgresql:// URL (default closed_loop_journal.sqlite3)",
    "sqlite_synchronous": "SQLite synchronous mode: FULL (default), EXTRA or NORMAL",
    "max_sessions": "open sessions allowed at once (default 64)",
    "natural_root": "folder that natural_source paths must lie in (default: none, natural_source off)",
    "max_generation_bytes": "most bytes of images one Ask may journal and return (default 48 MiB)",
    "max_session_bytes": "most journal bytes of a session with max_generations (default 8 GiB)",
    "max_description_chars": "longest session description (default 4096)",
    "max_natural_pixels": "most decoded pixels per natural image (default 2048 x 2048)",
    "max_natural_images": "most natural reference images per session (default 10000)",
    "default_generator": "generator used when a session names none (default v4-dcgan)",
    "generator_device": "torch device for generators (default cpu)",
    "twin_threads": "ONNX Runtime threads per guidance twin (0: automatic); on a server the twins use the "
    "shared model registry's sessions (the predictor flags)",
    "export_chunk_bytes": "ExportSession chunk size in bytes (default 1 MiB)",
    "compute_threads": "torch and BLAS threads for the whole process (0: the libraries' defaults)",
    "dashboard_refresh_seconds": "most often the /ui/ dashboard recomputes a running session (default 1 s)",
}


# ------------------------------------------------------------------------------------------------
# Message conversion


def metadata_dict(message: pb.RecordingMetadata) -> dict[str, Any]:
    """The fields a RecordingMetadata message sets (empty strings and zeros are "not given")."""
    data: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        value = getattr(message, descriptor.name)
        if value:
            data[descriptor.name] = list(value) if descriptor.is_repeated else value
    return data


def session_request(message: pb.CreateSessionRequest) -> SessionRequest:
    guidance = message.guidance if message.HasField("guidance") else None
    return SessionRequest(
        session_id=message.session_id,
        generator=message.generator.name,
        generator_version=message.generator.version,
        optimizer=message.optimizer,
        optimizer_options=dict(message.optimizer_options),
        population_size=message.population_size,
        natural_per_generation=message.natural_per_generation,
        natural_source=message.natural_source,
        natural_images=list(message.natural_images),
        neuron_count=message.neuron_count,
        neuron_ids=list(message.neuron_ids),
        target_neurons=list(message.target_neurons),
        objective=message.objective,
        seed=message.seed if message.HasField("seed") else None,
        max_generations=message.max_generations,
        image_size=message.image_size,
        image_format=message.image_format,
        twin=guidance.twin.name if guidance else "",
        twin_version=guidance.twin.version if guidance else 0,
        twin_neurons=list(guidance.twin_neurons) if guidance else [],
        candidates_per_presentation=guidance.candidates_per_presentation if guidance else 0,
        refit_readout=guidance.refit_readout if guidance else False,
        description=message.description,
        metadata=metadata_dict(message.metadata),
        confirm_requested=message.HasField("confirmation"),
        confirm_disabled=message.confirmation.disabled,
        confirm_top=message.confirmation.top_candidates,
        confirm_repeats=message.confirmation.repeats,
    )


def confirmed_message(entry: dict[str, Any]) -> pb.ConfirmedStimulus:
    return pb.ConfirmedStimulus(
        stimulus_id=entry["stimulus_id"],
        generation=int(entry["generation"]),
        first_score=float(entry["first_score"]),
        mean_score=float(entry["mean_score"]),
        std_score=float(entry["std_score"]),
        sem_score=float(entry["sem_score"]),
        n=int(entry["n"]),
        target_rates=[float(v) for v in entry["target_rates"]],
    )


def best_message(best: dict[str, Any]) -> pb.BestSoFar:
    return pb.BestSoFar(
        generation=int(best.get("generation", -1)),
        stimulus_id=best.get("stimulus_id", ""),
        score=float(best.get("score", math.nan)),
        target_rates=[float(v) for v in best.get("target_rates", [])],
        best_natural_stimulus_id=best.get("best_natural_stimulus_id", ""),
        best_natural_score=float(best.get("best_natural_score", math.nan)),
        last_generation_mean=float(best.get("last_generation_mean", math.nan)),
        last_generation_max=float(best.get("last_generation_max", math.nan)),
        confirmed=confirmed_message(best["confirmed"]) if best.get("confirmed") else None,
        confirmation_candidates=[confirmed_message(e) for e in best.get("confirmation_candidates", [])],
    )


def session_message(view: SessionView) -> pb.ClosedLoopSession:
    c = view.config
    settings = pb.CreateSessionRequest(
        session_id=c.session_id,
        generator=pb.ClosedLoopModelRef(name=c.generator, version=c.generator_version),
        optimizer=c.optimizer,
        optimizer_options=c.optimizer_options,
        population_size=c.population_size,
        natural_per_generation=c.natural_per_generation,
        natural_source=c.natural_source,
        neuron_count=c.neuron_count,
        neuron_ids=c.neuron_ids,
        target_neurons=c.target_neurons,
        objective=c.objective,
        seed=c.seed,
        max_generations=c.max_generations,
        image_size=c.image_size,
        image_format=c.image_format,
        description=c.description,
        metadata=pb.RecordingMetadata(**c.metadata),
        confirmation=pb.Confirmation(
            top_candidates=c.confirm_top, repeats=c.confirm_repeats, disabled=c.confirm_top == 0
        ),
    )
    if c.twin:
        settings.guidance.CopyFrom(
            pb.TwinGuidance(
                twin=pb.ClosedLoopModelRef(name=c.twin, version=c.twin_version),
                twin_neurons=c.twin_neurons,
                candidates_per_presentation=c.candidates_per_presentation,
                refit_readout=c.refit_readout,
            )
        )
    return pb.ClosedLoopSession(
        session_id=view.session_id,
        status=view.status,
        settings=settings,
        created_time=view.created,
        updated_time=view.updated,
        generation=view.generation,
        pending=view.pending,
        generations_told=view.generations_told,
        presentations_told=view.presentations_told,
        best=best_message(view.best),
        latent_dim=c.latent_dim,
        natural_image_count=c.natural_count,
    )


def ask_message(generation: Generation) -> pb.AskResponse:
    return pb.AskResponse(
        session_id=generation.session_id,
        generation=generation.generation,
        finished=generation.finished,
        image_format=generation.image_format,
        created_time=generation.created,
        stimuli=[
            pb.ClosedLoopStimulus(
                stimulus_id=s.stimulus_id,
                index=s.index,
                kind=s.kind,
                image=s.image or b"",
                sha256=s.sha256,
                natural_name=s.natural_name,
                predicted_rates=s.predicted_rates,
                predicted_score=math.nan if s.predicted_score is None else s.predicted_score,
                repeat_of=s.repeat_of,
            )
            for s in generation.stimuli
        ],
    )


def told_responses(message: pb.TellRequest) -> list[ToldResponse]:
    return [
        ToldResponse(
            stimulus_id=r.stimulus_id,
            rates=list(r.rates) if len(r.rates) else None,
            repeats=[list(rep.rates) for rep in r.repeats] if len(r.repeats) else None,
            onset=r.onset_time if (r.onset_known or r.onset_time) else None,
            duration=r.duration or None,
        )
        for r in message.responses
    ]


def tell_message(result: TellResult) -> pb.TellResponse:
    return pb.TellResponse(
        session_id=result.session_id,
        generation=result.generation,
        generation_complete=result.generation_complete,
        missing_stimulus_ids=result.missing_stimulus_ids,
        best=best_message(result.best),
        generations_told=result.generations_told,
        presentations_told=result.presentations_told,
        finished=result.finished,
    )


def _session_id(value: str) -> str:
    if not value:
        raise InvalidInput("session_id is required")
    return value


# ------------------------------------------------------------------------------------------------
# Servicer


class ClosedLoopMetrics:
    def __init__(self, server: GrpcServer, engine: ClosedLoopEngine) -> None:
        registry = server.metrics.registry
        self.ask_seconds = Histogram(
            "neurotwin_closed_loop_ask_seconds",
            "Ask handling time, proposing (rendering, ranking, journaling) a new generation or not",
            ["new_generation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tell_seconds = Histogram(
            "neurotwin_closed_loop_tell_seconds",
            "Tell handling time, validating and journaling responses and stepping the optimizer",
            ["generation_complete"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.presentations = Counter(
            "neurotwin_closed_loop_presentations",
            "Stimulus responses told (journaled) across sessions",
            registry=registry,
        )
        self.generations = Counter(
            "neurotwin_closed_loop_generations",
            "Generations completed across sessions",
            registry=registry,
        )
        self.sessions_open = Gauge(
            "neurotwin_closed_loop_sessions_open",
            "Open closed-loop sessions in the journal",
            registry=registry,
        )
        self.sessions_open.set_function(lambda: float(engine.open_session_count()))


class ClosedLoopServicer(pb_grpc.ClosedLoopServicer):
    def __init__(self, engine: ClosedLoopEngine, metrics: ClosedLoopMetrics, chunk_bytes: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.chunk_bytes = max(4096, chunk_bytes)

    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> Any:
        return session_message(self.engine.create_session(session_request(request)))

    def Ask(self, request: pb.AskRequest, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        generation = self.engine.ask(_session_id(request.session_id), with_images=not request.omit_images)
        self.metrics.ask_seconds.labels(str(generation.new).lower()).observe(time.perf_counter() - started)
        return ask_message(generation)

    def Tell(self, request: pb.TellRequest, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        session_id = _session_id(request.session_id)
        result = self.engine.tell(session_id, request.generation, told_responses(request), request.partial)
        self.metrics.presentations.inc(result.stored)
        if result.completed_now:
            self.metrics.generations.inc()
        self.metrics.tell_seconds.labels(str(result.generation_complete).lower()).observe(
            time.perf_counter() - started
        )
        return tell_message(result)

    def GetSession(self, request: pb.GetSessionRequest, context: grpc.ServicerContext) -> Any:
        return session_message(self.engine.get_session(_session_id(request.session_id)))

    def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.ServicerContext) -> Any:
        views = self.engine.list_sessions(open_only=request.open_only)
        return pb.ListSessionsResponse(sessions=[session_message(v) for v in views])

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> Any:
        return session_message(self.engine.close_session(_session_id(request.session_id)))

    def ExportSession(self, request: pb.ExportSessionRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        session_id = _session_id(request.session_id)
        fmt = (request.format or "nwb").lower()
        suffix = {"nwb": ".nwb", "hdf5": ".h5"}.get(fmt)
        if suffix is None:
            raise InvalidInput(f"export format {request.format!r}: expected 'nwb' or 'hdf5'")
        folder = Path(tempfile.mkdtemp(prefix="neurotwin-export-"))
        try:
            path = self.engine.export(
                session_id,
                folder / f"{session_id}{suffix}",
                fmt,
                with_images=not request.omit_images,
                metadata=metadata_dict(request.metadata),
            )
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            size = path.stat().st_size
            with path.open("rb") as f:
                # The first chunk always goes out (with the metadata), even for an empty file.
                chunk = pb.ExportChunk(
                    data=f.read(self.chunk_bytes),
                    filename=path.name,
                    total_bytes=size,
                    sha256=digest.hexdigest(),
                )
                while True:
                    yield chunk
                    data = f.read(self.chunk_bytes)
                    if not data:
                        break
                    chunk = pb.ExportChunk(data=data)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def build_engine(settings: Settings, registry: ModelRegistry | None = None) -> ClosedLoopEngine:
    """The engine over the configured journal; models from ``registry`` (a server's shared one), or
    from a registry of its own when None."""
    from neurotwin.engines.journal import SqliteJournal

    journal_url = settings.journal
    if journal_url.startswith(("postgresql://", "postgres://")):
        journal = open_journal(journal_url)
    else:
        journal = SqliteJournal(
            journal_url.removeprefix("sqlite:///"), synchronous=settings.sqlite_synchronous
        )
    return ClosedLoopEngine(
        ModelStore(settings.model_store),
        journal,
        max_sessions=settings.max_sessions,
        natural_root=settings.natural_root,
        max_natural_images=settings.max_natural_images,
        default_generator=settings.default_generator,
        device=settings.generator_device,
        twin_threads=settings.twin_threads,
        limits=SessionLimits(
            max_generation_bytes=settings.max_generation_bytes,
            max_session_bytes=settings.max_session_bytes,
            max_description_chars=settings.max_description_chars,
            max_natural_pixels=settings.max_natural_pixels,
        ),
        registry=registry,
    )


def limit_threads(count: int) -> None:
    """Cap torch's and the BLAS libraries' thread pools (process-wide)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(count)
    threadpool_limits(limits=count, user_api="blas")


def attach(server: GrpcServer, settings: Settings) -> ClosedLoopEngine:
    if settings.compute_threads > 0:
        limit_threads(settings.compute_threads)
    from neurotwin.server.models import shared_registry

    engine = build_engine(settings, shared_registry(server, settings.model_store))
    # pycma takes seconds to import (longer on a busy machine); not in the first CreateSession.
    from neurotwin.engines.optimizers import preload

    threading.Thread(target=preload, name="import-cma", daemon=True).start()
    metrics = ClosedLoopMetrics(server, engine)
    servicer = ClosedLoopServicer(engine, metrics, settings.export_chunk_bytes)

    def stop() -> None:
        engine.shutdown()
        engine.journal.close()

    server.add_service(
        lambda grpc_server: pb_grpc.add_ClosedLoopServicer_to_server(servicer, grpc_server),
        [SERVICE_NAME],
        on_stop=stop,
    )
    if server.http is not None:
        from neurotwin.server import dashboard

        dashboard.attach(server, engine, refresh_seconds=settings.dashboard_refresh_seconds)
    sessions = engine.list_sessions(open_only=True)
    log.info(
        "closed loop: journal %s with %d open session(s); model store %s",
        engine.journal.url,
        len(sessions),
        settings.model_store,
    )
    return engine
