"""The closed-loop engine: sessions' lifecycle, Ask and Tell, journaled and idempotent.

See the package docstring (``neurotwin.engines.closed_loop``) for the rules it keeps.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from neurotwin.engines.closed_loop.confirmation import confirmation_generation, confirmed_summary
from neurotwin.engines.closed_loop.creation import new_driver, resolve_session
from neurotwin.engines.closed_loop.driver import OptimizerDriver, latent_prior
from neurotwin.engines.closed_loop.guidance import guidance_outputs
from neurotwin.engines.closed_loop.models import SessionModels
from neurotwin.engines.closed_loop.presentation import (
    Naturals,
    Synthetic,
    choose_presented,
    lay_out,
    natural_indices,
    natural_order,
)
from neurotwin.engines.closed_loop.responses import check_responses
from neurotwin.engines.closed_loop.scoring import (
    generation_summary,
    natural_summary,
    objective_scores,
    score_generation,
    updated_best,
)
from neurotwin.engines.closed_loop.settings import (
    SessionConfig,
    SessionRequest,
    session_id_or_new,
)
from neurotwin.engines.closed_loop.state import LiveSession, Pending
from neurotwin.engines.closed_loop.views import (
    Generation,
    SessionView,
    Stimulus,
    TellResult,
    ToldResponse,
    empty_best,
)
from neurotwin.engines.journal import (
    CLOSED,
    FINISHED,
    OPEN,
    Completion,
    GenerationRecord,
    Journal,
    ResponseRecord,
    SessionRecord,
)
from neurotwin.engines.registry import ModelRegistry, RegistrySettings
from neurotwin.engines.session_limits import SessionLimits
from neurotwin.errors import (
    ConcurrentModification,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ReplayMismatch,
    ResourceExhausted,
)
from neurotwin.imagecodec import decode_image, resize_batch
from neurotwin.runtimes.onnx_session import SessionSettings
from neurotwin.store import ModelStore

log = logging.getLogger(__name__)

LOCK_STRIPES = 256


T = TypeVar("T")


class ClosedLoopEngine:
    """All closed-loop sessions of one server (or one replica sharing a PostgreSQL journal)."""

    def __init__(
        self,
        store: ModelStore,
        journal: Journal,
        *,
        max_sessions: int = 64,
        natural_root: str = "",
        max_natural_images: int = 10000,
        default_generator: str = "v4-dcgan",
        device: str = "cpu",
        twin_threads: int = 0,
        limits: SessionLimits | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.store = store
        self.journal = journal
        self.max_sessions = max_sessions
        self.natural_root = natural_root
        self.max_natural_images = max_natural_images
        self.limits = limits or SessionLimits()
        self.default_generator = default_generator
        self.device = device
        self.twin_threads = twin_threads
        # A server passes its shared registry; on our own (tests, tools) one that follows no policy
        # changes (no polling) and runs twins on the CPU, released at shutdown.
        own = registry is None
        if registry is None:
            registry = ModelRegistry(
                store.root,
                RegistrySettings(
                    poll_seconds=0, session=SessionSettings(device="cpu", intra_op_threads=twin_threads)
                ),
            )
        registry.start()
        self.models = SessionModels(registry, device, own_registry=own)
        self._lock = threading.Lock()
        # Striped rather than one lock per id, so ids a client invents cannot grow a dict forever.
        self._session_locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._live: dict[str, LiveSession] = {}

    def _session_lock(self, session_id: str) -> threading.Lock:
        digest = hashlib.blake2b(session_id.encode(), digest_size=4).digest()
        return self._session_locks[int.from_bytes(digest, "little") % LOCK_STRIPES]

    # -- creation -----------------------------------------------------------------------------------
    def create_session(self, request: SessionRequest) -> SessionView:
        session_id = session_id_or_new(request.session_id)
        fingerprint = request.fingerprint()
        with self._session_lock(session_id):
            existing = self._existing(session_id, fingerprint)
            if existing is not None:
                return existing
            open_count = len(self.journal.list_sessions(open_only=True))
            if open_count >= self.max_sessions:
                raise ResourceExhausted(
                    f"{open_count} sessions are open (limit {self.max_sessions}); close one first"
                )
            config, natural = resolve_session(
                self.models,
                session_id,
                request,
                fingerprint,
                default_generator=self.default_generator,
                natural_root=self.natural_root,
                max_natural_images=self.max_natural_images,
                limits=self.limits,
            )
            driver = new_driver(self.models, config)
            now = time.time()
            record = SessionRecord(
                session_id=session_id, config=config.to_dict(), created=now, updated=now, best=empty_best()
            )
            if not self.journal.create_session(record, natural, driver.state()):
                # Another replica created it between our check and our insert.
                existing = self._existing(session_id, fingerprint)
                assert existing is not None
                return existing
            log.info(
                "closed-loop session %s created (%s, %s)", session_id, config.generator, config.optimizer
            )
            return self._view(record)

    def _existing(self, session_id: str, fingerprint: str) -> SessionView | None:
        """The session with this id if it exists with the same settings (a retried create)."""
        try:
            existing = self.journal.get_session(session_id)
        except NotFound:
            return None
        if existing.config.get("fingerprint") != fingerprint:
            raise FailedPrecondition(f"session {session_id!r} exists with different settings")
        return self._view(existing)

    # -- loading ------------------------------------------------------------------------------------
    def _get_live(self, session_id: str) -> LiveSession:
        """The in-memory session, reloaded if the journal moved on (another replica, or a restart)."""
        revision = self.journal.revision(session_id)
        with self._lock:
            live = self._live.get(session_id)
        if live is not None and live.record.revision == revision:
            return live
        live = self._load(session_id)
        with self._lock:
            self._live[session_id] = live
        return live

    def _evict(self, session_id: str) -> None:
        with self._lock:
            self._live.pop(session_id, None)

    def _load(self, session_id: str) -> LiveSession:
        record = self.journal.get_session(session_id)
        config = SessionConfig.from_dict(record.config)
        live = LiveSession(record, config)
        live.generator = self.models.generator(config.generator, config.generator_version)
        if config.twin:
            live.twin = self.models.twin(config.twin, config.twin_version, guidance_outputs(config))
        live.driver = OptimizerDriver(config, latent_prior(live.generator))
        live.driver.load(self.journal.optimizer_state(session_id))
        if config.natural_count:
            live.natural_names = [n.name for n in self.journal.natural_images(session_id, with_data=False)]
            live.natural_order = natural_order(config)
        if config.refit_readout and live.twin is not None:
            self._load_readout_data(live)
        stimuli = self.journal.stimuli(session_id, record.generation)
        if stimuli and record.status == OPEN:
            generation = next(
                g for g in self.journal.generations(session_id) if g.generation == record.generation
            )
            responses = {r.index: r for r in self.journal.responses(session_id, record.generation)}
            synthetic = generation.meta.get("synthetic_positions", [])
            live.pending = Pending(generation, stimuli, responses, list(synthetic))
            self._replay_ask(live)
        return live

    def _replay_ask(self, live: LiveSession) -> None:
        """Re-ask the restored optimizer: it must reproduce the journaled candidates bit for bit."""
        assert live.pending is not None and live.driver is not None
        if live.config.is_confirmation(live.record.generation):
            return  # re-presents journaled images; the optimizer proposes nothing
        candidates = live.driver.propose(live.config.candidates)
        digest = hashlib.sha256(np.ascontiguousarray(candidates).tobytes()).hexdigest()
        journaled = live.pending.generation.meta.get("candidates_sha256")
        if journaled and digest != journaled:
            raise ReplayMismatch(
                f"session {live.record.session_id}: the optimizer restored from the journal proposes "
                f"different latents for generation {live.record.generation} than it did before the restart "
                "(different optimizer library version?)"
            )

    def _load_readout_data(self, live: LiveSession) -> None:
        cfg = live.config
        stimuli = {
            (s.generation, s.index): s
            for s in self.journal.stimuli(live.record.session_id, with_images=False)
        }
        told = [
            r for r in self.journal.responses(live.record.session_id) if r.generation < live.record.generation
        ]
        if not told:
            return
        means = np.stack([r.mean for r in told])
        scores = objective_scores(means, cfg.target_neurons, cfg.objective)
        for response, score in zip(told, scores, strict=True):
            live.guide.learn(stimuli[(response.generation, response.index)].predicted, float(score))

    # -- Ask ----------------------------------------------------------------------------------------
    def ask(self, session_id: str, with_images: bool = True) -> Generation:
        return self._on_session(session_id, lambda live: self._ask(live, with_images))

    def _on_session(self, session_id: str, operation: Callable[[LiveSession], T]) -> T:
        """Run ``operation`` on the session's live state under its lock, keeping that state true to the
        journal: another replica's write (ConcurrentModification) reloads and retries, up to 3 times."""
        with self._session_lock(session_id):
            for attempt in range(3):
                live = self._get_live(session_id)
                try:
                    return operation(live)
                except ConcurrentModification:
                    # Another replica wrote this generation first: reload and retry (an Ask then
                    # returns theirs).
                    self._evict(session_id)
                    if attempt == 2:
                        raise
                except (InvalidInput, FailedPrecondition):
                    raise  # refused before anything changed: the loaded state is still right
                except BaseException:
                    # The optimizer may have moved without the journal: rebuild from the journal.
                    self._evict(session_id)
                    raise
        raise AssertionError("unreachable")

    def _ask(self, live: LiveSession, with_images: bool) -> Generation:
        cfg = live.config
        if live.finished:
            return Generation(cfg.session_id, live.record.generation, True, [], cfg.image_format)
        new = live.pending is None
        if new:
            self._propose(live)
        view = self._generation_view(live, with_images)
        view.new = new
        return view

    def _generation_view(self, live: LiveSession, with_images: bool) -> Generation:
        assert live.pending is not None
        cfg = live.config
        stimuli = []
        repeat_of = live.pending.generation.meta.get("repeat_of") or [""] * len(live.pending.stimuli)
        for s in live.pending.stimuli:
            rates: list[float] = []
            if s.predicted is not None:
                rates = [float(s.predicted[m]) for m in cfg.twin_neurons]
            stimuli.append(
                Stimulus(
                    stimulus_id=s.stimulus_id,
                    index=s.index,
                    kind=s.kind,
                    image=s.image if with_images else None,
                    sha256=s.sha256,
                    natural_name=live.natural_names[s.natural_index] if s.natural_index is not None else "",
                    predicted_rates=rates,
                    predicted_score=s.predicted_score,
                    repeat_of=repeat_of[s.index],
                )
            )
        generation = live.pending.generation
        return Generation(
            cfg.session_id, generation.generation, False, stimuli, cfg.image_format, generation.created
        )

    def _propose(self, live: LiveSession) -> None:
        cfg = live.config
        assert live.driver is not None
        g = live.record.generation
        if cfg.is_confirmation(g):
            self._propose_confirmation(live)
            return
        candidates = live.driver.propose(cfg.candidates)
        meta: dict[str, Any] = {
            "candidates": len(candidates),
            "candidates_sha256": hashlib.sha256(np.ascontiguousarray(candidates).tobytes()).hexdigest(),
        }
        from neurotwin.engines.render import render_stimuli

        # Candidates are rendered at the generator's resolution; the twin resizes them once to its
        # input, and only the presented ones are resized to the session's image size and encoded.
        native = render_stimuli(live.generator, candidates, cfg.generator_resolution)
        predicted: np.ndarray | None = None
        guide = np.zeros(len(candidates))
        if live.twin is not None:
            predicted = live.twin.predict(native)
            guide, ranking = live.guide.scores(predicted.astype(np.float64))
            meta.update(ranking)
        chosen, choice = choose_presented(guide, cfg.population_size)
        meta.update(choice)
        shown = resize_batch(native[chosen], cfg.image_size, cfg.image_size)
        stimuli, synthetic_positions = lay_out(
            cfg, g, Synthetic(candidates, shown, chosen, predicted, guide), self._naturals(live, g)
        )
        meta["synthetic_positions"] = synthetic_positions
        self._journal_generation(
            live, GenerationRecord(generation=g, created=time.time(), meta=meta), stimuli
        )

    def _naturals(self, live: LiveSession, g: int) -> Naturals:
        """The natural references generation ``g`` shows, with the twin's view of them."""
        cfg = live.config
        k = cfg.natural_per_generation
        indices = natural_indices(live.natural_order, g, k) if k else []
        natural = self.journal.natural_images(cfg.session_id, indices) if k else []
        natural_predicted: np.ndarray | None = None
        natural_guide = np.zeros(len(natural))
        if live.twin is not None and natural:
            decoded = np.stack([decode_image(n.data) for n in natural])
            natural_predicted = live.twin.predict(decoded)
            natural_guide = live.guide.scores(natural_predicted.astype(np.float64))[0]
        return Naturals(natural, natural_predicted, natural_guide)

    def _journal_generation(self, live: LiveSession, record: GenerationRecord, stimuli: list[Any]) -> None:
        live.record.revision = self.journal.add_generation(
            live.config.session_id, live.record.revision, record, stimuli
        )
        live.pending = Pending(record, stimuli, {}, record.meta["synthetic_positions"])

    def _propose_confirmation(self, live: LiveSession) -> None:
        """The confirmation generation: the best distinct images so far, re-presented."""
        g = live.record.generation
        stimuli, meta = confirmation_generation(self.journal, live.config, g, self._naturals(live, g))
        self._journal_generation(
            live, GenerationRecord(generation=g, created=time.time(), meta=meta), stimuli
        )

    # -- Tell ---------------------------------------------------------------------------------------
    def tell(
        self, session_id: str, generation: int, responses: Sequence[ToldResponse], partial: bool = False
    ) -> TellResult:
        return self._on_session(session_id, lambda live: self._tell(live, generation, responses, partial))

    def _tell(
        self, live: LiveSession, generation: int, responses: Sequence[ToldResponse], partial: bool
    ) -> TellResult:
        cfg = live.config
        current = live.record.generation
        if live.record.status == CLOSED:
            raise FailedPrecondition(f"session {cfg.session_id} is closed")
        if generation < current:
            return self._retell_completed(live, generation, responses)
        if live.finished:
            raise FailedPrecondition(
                f"session {cfg.session_id} finished after {current} generations; generation {generation} "
                "was never asked"
            )
        if generation > current or live.pending is None:
            what = "pending" if live.pending is not None else "next to be asked"
            raise FailedPrecondition(
                f"generation {generation} has not been asked; generation {current} is {what} (Ask first)"
            )
        pending = live.pending
        by_id = pending.by_id()
        records = check_responses(cfg.neuron_count, generation, responses, by_id)
        new: list[ResponseRecord] = []
        for record in records:
            told = pending.responses.get(record.index)
            if told is None:
                new.append(record)
            elif told.digest() != record.digest():
                sid = pending.stimuli[record.index].stimulus_id
                raise FailedPrecondition(
                    f"stimulus {sid} of generation {generation} was already told different responses"
                )
        told_indices = set(pending.responses) | {r.index for r in new}
        missing = [s.stimulus_id for s in pending.stimuli if s.index not in told_indices]
        if missing and not partial:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise FailedPrecondition(
                f"generation {generation} is incomplete: no responses for {len(missing)} of "
                f"{len(pending.stimuli)} stimuli ({shown}); tell them all, or set partial"
            )
        completion = None
        if not missing:
            completion = self._complete(live, [*pending.responses.values(), *new])
        if new or completion is not None:
            live.record.revision = self.journal.add_responses(
                cfg.session_id, live.record.revision, new, completion
            )
            live.record.presentations_told += len(new)
            for record in new:
                pending.responses[record.index] = record
        if completion is not None:
            live.record.generation = completion.generation + 1
            live.record.best = completion.best
            live.record.status = completion.status
            live.pending = None
        return TellResult(
            session_id=cfg.session_id,
            generation=generation,
            generation_complete=completion is not None,
            missing_stimulus_ids=missing,
            best=live.record.best,
            generations_told=live.record.generation,
            presentations_told=live.record.presentations_told,
            finished=live.finished,
            stored=len(new),
            completed_now=completion is not None,
        )

    def _retell_completed(
        self, live: LiveSession, generation: int, responses: Sequence[ToldResponse]
    ) -> TellResult:
        """A Tell for a completed generation: fine when it repeats what was told, else stale."""
        cfg = live.config
        stimuli = {
            s.stimulus_id: s for s in self.journal.stimuli(cfg.session_id, generation, with_images=False)
        }
        records = check_responses(cfg.neuron_count, generation, responses, stimuli)
        stored = {r.index: r for r in self.journal.responses(cfg.session_id, generation)}
        for record in records:
            told = stored.get(record.index)
            if told is None or told.digest() != record.digest():
                raise FailedPrecondition(
                    f"generation {generation} is already complete (stale Tell); the pending generation is "
                    f"{live.record.generation}"
                )
        return TellResult(
            session_id=cfg.session_id,
            generation=generation,
            generation_complete=True,
            missing_stimulus_ids=[],
            best=live.record.best,
            generations_told=live.record.generation,
            presentations_told=live.record.presentations_told,
            finished=live.finished,
        )

    def _complete(self, live: LiveSession, responses: list[ResponseRecord]) -> Completion:
        """Score the finished generation, step the optimizer, and build what to journal."""
        cfg = live.config
        assert live.pending is not None and live.driver is not None
        pending = live.pending
        g = pending.generation.generation
        scored = score_generation(cfg, g, pending.stimuli, responses, pending.synthetic_positions)
        if cfg.is_confirmation(g):
            # Nothing new for the optimizer: the confirmation re-measures what it has seen.
            meta = pending.generation.meta
            first = {k: (int(v[0]), float(v[1])) for k, v in meta["confirm_first"].items()}
            confirmed = confirmed_summary(
                first, meta["repeat_of"], responses, cfg.target_neurons, cfg.objective
            )
            best = {**updated_best(live.record.best, cfg, scored), **confirmed}
            summary = natural_summary(scored)
            if confirmed["confirmed"]:
                summary.update(
                    confirmed_mean=confirmed["confirmed"]["mean_score"],
                    confirmed_n=confirmed["confirmed"]["n"],
                )
        else:
            live.driver.update(scored.latents, scored.synthetic_scores)
            best = updated_best(live.record.best, cfg, scored)
            summary = generation_summary(scored, best, live.driver.trajectory())
        state = live.driver.state()
        if cfg.refit_readout and live.twin is not None:
            for s, score in zip(pending.stimuli, scored.scores, strict=True):
                live.guide.learn(s.predicted, float(score))
        limit = cfg.max_generations
        status = FINISHED if limit > 0 and g + 1 >= limit else OPEN
        return Completion(
            generation=g, told=time.time(), summary=summary, optimizer_state=state, best=best, status=status
        )

    # -- queries and lifecycle ----------------------------------------------------------------------
    def _view(self, record: SessionRecord) -> SessionView:
        config = SessionConfig.from_dict(record.config)
        pending = False
        if record.status == OPEN:
            with self._lock:
                live = self._live.get(record.session_id)
            if live is not None and live.record.revision == record.revision:
                pending = live.pending is not None
            else:
                pending = bool(self.journal.stimuli(record.session_id, record.generation, with_images=False))
        return SessionView(
            session_id=record.session_id,
            status=record.status,
            config=config,
            created=record.created,
            updated=record.updated,
            generation=record.generation,
            pending=pending,
            generations_told=record.generation,
            presentations_told=record.presentations_told,
            best=record.best,
        )

    def get_session(self, session_id: str) -> SessionView:
        return self._view(self.journal.get_session(session_id))

    def list_sessions(self, open_only: bool = False) -> list[SessionView]:
        return [self._view(r) for r in self.journal.list_sessions(open_only)]

    def open_session_count(self) -> int:
        return len(self.journal.list_sessions(open_only=True))

    def close_session(self, session_id: str) -> SessionView:
        with self._session_lock(session_id):
            for _ in range(3):
                record = self.journal.get_session(session_id)
                if record.status == CLOSED:
                    break
                try:
                    self.journal.set_status(session_id, record.revision, CLOSED)
                    break
                except ConcurrentModification:
                    continue
            self._evict(session_id)
        log.info("closed-loop session %s closed", session_id)
        return self.get_session(session_id)

    def export(
        self,
        session_id: str,
        path: str | Path,
        fmt: str = "nwb",
        with_images: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write the session to ``path``; ``metadata`` fields replace the session's in this file."""
        from neurotwin.engines.session_export import export_session

        self.journal.get_session(session_id)
        return export_session(
            self.journal, session_id, Path(path), fmt, with_images=with_images, metadata=metadata
        )

    def shutdown(self) -> None:
        with self._lock:
            self._live.clear()
        self.models.close()
