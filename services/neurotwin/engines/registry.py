"""The model registry: one place per server process from which every service gets its models.

Predictor versions (ONNX Runtime session + batcher) are served as the version policy selects among
the versions that pass validation (``engines/model_validation.py``: checksums, finite outputs,
reference outputs). The registry polls the store: a new version is validated, loaded and warmed up
in the background and only then swapped in, by replacing one dictionary reference, so a request sees
either the old set of versions or the new one. A version that fails any step is marked FAILED
(status, metric, log) and left out of the policy, so with "latest:1" the previous version keeps
serving. It is retried only when its files change. A version that leaves the set is retired: new
requests no longer reach it, and it is released once its in-flight requests finish.

Generators and torch twins (``engines/registry_derived.py``) come from the same registry: a twin is
converted only from a predictor version that passed validation, so "newest" means the newest
version Predict serves, for every service.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from neurotwin.engines.batcher import Batcher, BatcherSettings, BatchObserver
from neurotwin.engines.model_handles import LoadedVersion, RefCounted, checked_out
from neurotwin.engines.model_validation import validate_predictor as validate_predictor_outputs
from neurotwin.engines.model_validation import verify_files
from neurotwin.engines.model_versions import VersionInfo, VersionState, fingerprint, refusal_message
from neurotwin.errors import ModelStoreError, NotFound, Unavailable
from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion, VersionPolicy, validate_predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrySettings:
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    # How often to look for new or removed versions; 0 turns polling off (refresh() still works).
    poll_seconds: float = 5.0
    # How long a retired version waits for its in-flight requests before it is released.
    unload_grace_seconds: float = 60.0
    # On-demand models kept loaded: predictor versions outside the policy that a caller pinned,
    # generators, torch twins (least recently used ones are retired first).
    max_pinned_versions: int = 4
    max_generators: int = 8
    max_twins: int = 4


class RegistryObserver(Protocol):
    """Hooks for metrics; the server wires these to Prometheus. Every method is optional."""

    def batch_observer(self, model: str, version: int) -> BatchObserver | None:
        """Hooks for the batcher of a predictor version being loaded."""

    def load_failed(self, model: str, version: int, message: str) -> None:
        """A predictor version was refused."""

    def versions_changed(self, model: str, ready: list[int]) -> None:
        """The set of ready versions of a model changed (empty when the model left the store)."""


class ModelRegistry:
    def __init__(
        self,
        store_root: str | os.PathLike[str],
        settings: RegistrySettings | None = None,
        observer: Any = None,
    ) -> None:
        from neurotwin.engines.registry_derived import DerivedModels

        self.store = ModelStore(store_root)
        self.settings = settings or RegistrySettings()
        # Observers get every hook they define; a shared registry has one per service.
        self.observers: list[Any] = [observer] if observer is not None else []
        # name -> version -> LoadedVersion; replaced as a whole, never mutated, so readers need no lock.
        self._served: dict[str, dict[int, LoadedVersion]] = {}
        self._status: dict[str, dict[int, VersionInfo]] = {}
        self._failed: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._retirees: list[threading.Thread] = []
        # Explicit model control: the models to serve, or None for every model in the store.
        self._selected: set[str] | None = None
        self.derived = DerivedModels(self)
        self.started = False
        self.ready = False

    # -- observers ----------------------------------------------------------------------------------

    def notify(self, hook: str, *args: Any) -> None:
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if method is not None:
                try:
                    method(*args)
                except Exception:
                    log.exception("model registry observer %s failed", hook)

    def _batch_observer(self, name: str, version: int) -> BatchObserver | None:
        for observer in self.observers:
            method = getattr(observer, "batch_observer", None)
            if method is not None:
                return method(name, version)
        return None

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Load what the policy selects now (blocking), then watch the store; a no-op when started."""
        if self.started:
            return
        self.started = True
        self._stop.clear()
        self.refresh()
        self.ready = True
        if self.settings.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._poller.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching and release everything once in-flight requests finish."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
            self._poller = None
        with self._lock:
            served, self._served = self._served, {}
        for versions in served.values():
            for loaded in versions.values():
                self._retire(loaded)
        self.derived.clear()
        for thread in list(self._retirees):
            thread.join(timeout)
        self.ready = False
        self.started = False

    def reconfigure(self, settings: RegistrySettings, force: bool = False) -> None:
        """Serve with other settings (a service that owns them attached after one that did not):
        everything loaded is released and loaded again. Without ``force``, same settings: no-op."""
        if settings == self.settings and not force:
            return
        was_started = self.started
        self.stop()
        self.settings = settings
        self._failed.clear()
        self.derived = type(self.derived)(self)
        if was_started:
            self.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("model store poll failed; keeping the current models")

    # -- lookups ------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._served) | set(self._status))

    def get(self, name: str, version: int | None = None) -> LoadedVersion:
        """The ready version (newest when ``version`` is None or 0), or NotFound / Unavailable."""
        served = self._served.get(name)
        if served:
            if not version:
                return served[max(served)]
            loaded = served.get(version)
            if loaded is not None:
                return loaded
        with self._lock:
            info = dict(self._status.get(name, {}))
            known = sorted(set(self._served) | set(self._status))
        if version and version in info and info[version].state == VersionState.LOADING:
            raise Unavailable(f"model {name!r} version {version} is still loading; retry shortly")
        if not info and not served:
            raise NotFound(f"no model named {name!r} (models: {known})")
        ready = sorted(served or [])
        if version:
            state = f" ({info[version].state.value}: {info[version].message})" if version in info else ""
            raise NotFound(f"model {name!r} has no ready version {version}{state}; ready versions: {ready}")
        failures = "; ".join(f"v{v} {i.state.value}: {i.message}" for v, i in sorted(info.items()))
        raise NotFound(f"model {name!r} has no ready version ({failures})")

    def knows(self, name: str) -> bool:
        """Whether the model is in the store as far as the registry has seen (for metric labels)."""
        return name in self._served or name in self._status

    def acquire(self, name: str, version: int | None = None) -> LoadedVersion:
        """A served version counted as in use until ``exit`` (or the end of a ``with``)."""
        return checked_out(lambda: self.get(name, version), f"model {name!r}")

    def acquire_pinned(self, name: str, version: int | None) -> LoadedVersion:
        """Like ``acquire``, but a version outside the policy (a session made with it) is loaded on
        demand, after the same validation. None or 0: the newest served version."""
        if not version:
            return self.acquire(name)
        served = self._served.get(name, {})
        if version in served:
            return self.acquire(name, version)
        if self._selected is not None and name not in self._selected:
            raise NotFound(f"model {name!r} is unloaded (explicit model control)")
        return self.derived.pinned_version(name, version)

    def predict(
        self,
        name: str,
        version: int | None,
        images: np.ndarray,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> tuple[LoadedVersion, np.ndarray]:
        """Rates from the requested version (newest when None): the version used and float32 [N, K]."""
        with self.acquire(name, version) as loaded:
            return loaded, loaded.predict(images, deadline, on_cancel)

    def status(self) -> dict[str, list[VersionInfo]]:
        """Every known predictor version of every model, oldest first."""
        with self._lock:
            return {
                name: [versions[v] for v in sorted(versions)]
                for name, versions in sorted(self._status.items())
                if versions
            }

    # -- reload -------------------------------------------------------------------------------------

    def _set_status(self, name: str, version: int, state: VersionState, message: str = "") -> None:
        with self._lock:
            self._status.setdefault(name, {})[version] = VersionInfo(version, state, message)

    def refresh(self) -> None:
        """Bring the loaded versions in line with the store and the policy (one pass)."""
        with self._refresh_lock:
            on_disk = set(self.store.names(PREDICTORS))
            if self._selected is not None:
                on_disk &= self._selected
            for name in sorted(on_disk | set(self._served) | set(self._status)):
                self._refresh_model(name, on_disk)

    def load_model(self, name: str) -> None:
        """Serve ``name`` (again): the versions the policy selects now (explicit model control).

        New versions are loaded and versions gone from the store retired, as a poll would; a model
        none of whose versions loads raises ModelStoreError with the reasons.
        """
        if name not in self.store.names(PREDICTORS):
            raise NotFound(f"no model named {name!r} in the model store {self.store.root}")
        with self._refresh_lock:
            if self._selected is not None:
                self._selected.add(name)
            self._refresh_model(name, {name})
        if name not in self._served:
            infos = self.status().get(name, [])
            reasons = "; ".join(f"v{i.version}: {i.message}" for i in infos) or "no versions"
            raise ModelStoreError(f"model {name!r}: no version could be loaded ({reasons})")

    def unload_model(self, name: str) -> None:
        """Stop serving ``name`` until ``load_model``; in-flight requests finish first."""
        with self._refresh_lock:
            if not self.knows(name):
                raise NotFound(f"model {name!r} is not loaded (models: {self.names()})")
            if self._selected is None:
                self._selected = set(self.store.names(PREDICTORS))
            self._selected.discard(name)
            self._refresh_model(name, set())
        self.derived.forget_model(name)

    def _refresh_model(self, name: str, on_disk: set[str]) -> None:
        try:
            versions = self.store.versions(PREDICTORS, name) if name in on_disk else []
        except Exception as exc:  # a bad folder name must not stop the other models
            log.warning("skipping model folder %r: %s", name, exc)
            versions = []
        folder = self.store.root / PREDICTORS / name
        prints = {v: fingerprint(folder / str(v), PREDICTORS) for v in versions}
        # Forget failures of versions that are gone or whose files changed (those get another try).
        for key in [k for k in self._failed if k[0] == name]:
            if key[1] not in prints or prints[key[1]] != self._failed[key]:
                del self._failed[key]
        current = self._served.get(name, {})
        fresh: dict[int, LoadedVersion] = {}
        # A refused version drops out of the policy, which may then pick an older one: repeat until
        # every wanted version is loaded (each pass loads or refuses at least one, so it ends).
        while True:
            wanted = set(self.settings.policy.select([v for v in versions if (name, v) not in self._failed]))
            missing = sorted(wanted - current.keys() - fresh.keys(), reverse=True)
            if not missing:
                break
            for version in missing:
                loaded = self._load(ModelVersion(PREDICTORS, name, version, folder / str(version)))
                if loaded is None:
                    self._failed[(name, version)] = prints[version]
                else:
                    fresh[version] = loaded
        pool = {**current, **fresh}
        new = {v: pool[v] for v in sorted(pool) if v in wanted}
        leaving = [pool[v] for v in pool if v not in wanted]
        if new.keys() == current.keys() and not leaving:
            self._drop_stale_status(name, versions)
            return
        with self._lock:
            served = dict(self._served)
            if new:
                served[name] = new
            else:
                served.pop(name, None)
            self._served = served
            for version in new:
                self._status.setdefault(name, {})[version] = (
                    self._status[name][version]
                    if version in current
                    else VersionInfo(version, VersionState.READY)
                )
        if new.keys() != current.keys():
            log.info("model %s: serving versions %s (was %s)", name, sorted(new), sorted(current))
            self.notify("versions_changed", name, sorted(new))
        for loaded in leaving:
            self._retire(loaded, status=True)
        self._drop_stale_status(name, versions)

    def _drop_stale_status(self, name: str, versions: list[int]) -> None:
        """Forget versions deleted from the store (a retiring one goes once it is released)."""
        with self._lock:
            known = self._status.get(name, {})
            for version in [v for v, i in known.items() if v not in versions]:
                if known[version].state != VersionState.UNLOADING:
                    del known[version]
            if not known:
                self._status.pop(name, None)

    def open_version(self, model: ModelVersion) -> LoadedVersion:
        """Validate, open and warm up one predictor version; ModelStoreError (or another error) if refused."""
        session: PredictorSession | None = None
        started = time.perf_counter()
        try:
            record = verify_files(model)
            card = validate_predictor(model)
            session = PredictorSession(model.model_path, card, self.settings.session)
            session.warm_up((1,))
            validation = validate_predictor_outputs(model, card, record, session.run)
        except BaseException:
            if session is not None:
                session.close()
            raise
        batcher = Batcher(
            session.run,
            self.settings.batcher,
            self._batch_observer(model.name, model.version),
            name=f"model {model.name!r} v{model.version}",
        )
        log.info(
            "loaded %s on %s in %.2f s (%d neurons, %d x %d input; %s)",
            model,
            session.providers[0],
            time.perf_counter() - started,
            card.neuron_count,
            card.input.height,
            card.input.width,
            validation,
        )
        return LoadedVersion(model, card, session, batcher, validation=str(validation))

    def _load(self, model: ModelVersion) -> LoadedVersion | None:
        """``open_version``; on failure log it, mark it FAILED, tell the observers, return None."""
        self._set_status(model.name, model.version, VersionState.LOADING)
        try:
            return self.open_version(model)
        except Exception as exc:
            message = refusal_message(exc)
            log.error("refusing %s: %s", model, message)
            self._set_status(model.name, model.version, VersionState.FAILED, message)
            self.notify("load_failed", model.name, model.version, message)
            self.notify("refused", PREDICTORS, model.name, model.version, message)
            return None

    def _retire(self, loaded: RefCounted, status: bool = False) -> None:
        """Release ``loaded`` in the background once its requests finish (UNLOADING meanwhile)."""
        name, version = getattr(loaded, "name", ""), getattr(loaded, "version", 0)
        if status:
            with self._lock:
                info = self._status.setdefault(name, {}).get(version)
                self._status[name][version] = (
                    replace(info, state=VersionState.UNLOADING, since=time.time())
                    if info
                    else VersionInfo(version, VersionState.UNLOADING)
                )
        if not isinstance(loaded, LoadedVersion):
            # Twins and generators hold nothing but memory, which their users' references keep as
            # long as needed: no new request gets them from now on, and there is nothing to wait for.
            loaded.retire(0.0)
            return
        # Twins converted from this version go with it.
        self.derived.forget_version(name, version)

        def unload() -> None:
            clean = loaded.retire(self.settings.unload_grace_seconds)
            log.info(
                "released %s %s v%s%s",
                type(loaded).__name__,
                name,
                version,
                "" if clean else " (grace period over)",
            )
            if not status:
                return
            with self._lock:
                known = self._status.get(name, {})
                if known.get(version) is not None and known[version].state == VersionState.UNLOADING:
                    del known[version]
                if not known:
                    self._status.pop(name, None)

        thread = threading.Thread(target=unload, name=f"unload-{name}-{version}", daemon=True)
        self._retirees = [t for t in self._retirees if t.is_alive()] + [thread]
        thread.start()
