"""Model lifecycle: which predictor versions are loaded, hot reload from the store, safe unloading.

The manager serves, for every predictor in the store, the versions its VersionPolicy keeps among the
versions that load. It polls the store; a new version is validated, loaded and warmed up in the
background (the poll thread) and only then swapped in, by replacing one dictionary reference, so a
request sees either the old set of versions or the new one. A version that fails any step is marked
FAILED (status and metric) and left out of the policy, so with "latest 1" the previous version keeps
serving. It is retried only when its files change. A version that leaves the set is retired: new
requests no longer reach it, and its session is released once its in-flight requests finish.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neurotwin.card import PredictorCard
from neurotwin.engines.batcher import Batcher, BatcherSettings, BatchObserver
from neurotwin.errors import ModelStoreError, NeurotwinError, NotFound, Unavailable
from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion, VersionPolicy, validate_predictor

log = logging.getLogger(__name__)


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionInfo:
    version: int
    state: VersionState
    message: str = ""
    since: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ManagerSettings:
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    batcher: BatcherSettings = field(default_factory=BatcherSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    # How often to look for new or removed versions; 0 turns polling off (refresh() still works).
    poll_seconds: float = 5.0
    # How long a retired version waits for its in-flight requests before its session is released.
    unload_grace_seconds: float = 60.0


class ManagerObserver(Protocol):
    """Metrics hooks for the manager; the server wires these to Prometheus."""

    def batch_observer(self, model: str, version: int) -> BatchObserver | None:
        """Hooks for the batcher of a version being loaded."""

    def load_failed(self, model: str, version: int, message: str) -> None:
        """A version was refused."""

    def versions_changed(self, model: str, ready: list[int]) -> None:
        """The set of ready versions of a model changed (empty when the model left the store)."""


class LoadedVersion:
    """A ready predictor version: its card, ONNX Runtime session and batcher."""

    def __init__(self, model: ModelVersion, card: PredictorCard, session: PredictorSession, batcher: Batcher):
        self.model = model
        self.card = card
        self.session = session
        self.batcher = batcher
        self.neuron_index = {neuron: i for i, neuron in enumerate(card.neuron_ids)}
        self._users = 0
        self._retired = False
        self._cond = threading.Condition(threading.Lock())

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    def enter(self) -> bool:
        """Count one request in; False once the version is retired (the caller re-resolves)."""
        with self._cond:
            if self._retired:
                return False
            self._users += 1
            return True

    def exit(self) -> None:
        with self._cond:
            self._users -= 1
            if self._users == 0 and self._retired:
                self._cond.notify_all()

    def predict(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> np.ndarray:
        """float32 [N, neurons]; images are checked against the card first (InvalidInput)."""
        return self.batcher.infer(self.session.check(images), deadline, on_cancel)

    def retire(self, timeout: float) -> bool:
        """Refuse new requests, wait for in-flight ones, release the session; True if none was cut off."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retired = True
            while self._users > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            clean = self._users == 0
        clean = self.batcher.close(max(0.0, deadline - time.monotonic())) and clean
        self.session.close()
        return clean


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """Changes when any file of the version is rewritten, so a fixed broken version is retried."""
    parts: list[Any] = []
    for name in ("model.onnx", "card.json"):
        try:
            stat = os.stat(path / name)
            parts.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            parts.append(None)
    return tuple(parts)


class ModelManager:
    def __init__(
        self,
        store_root: str | os.PathLike[str],
        settings: ManagerSettings | None = None,
        observer: ManagerObserver | None = None,
    ) -> None:
        self.store = ModelStore(store_root)
        self.settings = settings or ManagerSettings()
        self.observer = observer
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
        self.ready = False

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load what the policy selects now (blocking), then watch the store in the background."""
        self.refresh()
        self.ready = True
        if self.settings.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._poller.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching and unload everything once in-flight requests finish."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout)
        with self._lock:
            served, self._served = self._served, {}
        for versions in served.values():
            for loaded in versions.values():
                self._retire(loaded, wait=False)
        for thread in list(self._retirees):
            thread.join(timeout)
        self.ready = False

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("model store poll failed; keeping the current models")

    # -- lookups ----------------------------------------------------------------------------------

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
        """Whether the model is in the store as far as the manager has seen (for metric labels)."""
        return name in self._served or name in self._status

    def acquire(self, name: str, version: int | None = None) -> LoadedVersion:
        """A ready version counted as in use until ``release``; it is not unloaded meanwhile."""
        for _ in range(3):
            loaded = self.get(name, version)
            if loaded.enter():
                return loaded
        # Only reachable when versions are swapped faster than a lookup, i.e. practically never.
        raise Unavailable(f"model {name!r} is being reloaded; retry")

    def predict(
        self,
        name: str,
        version: int | None,
        images: np.ndarray,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> tuple[LoadedVersion, np.ndarray]:
        """Rates from the requested version (newest when None): the version used and float32 [N, K]."""
        loaded = self.acquire(name, version)
        try:
            return loaded, loaded.predict(images, deadline, on_cancel)
        finally:
            loaded.exit()

    def status(self) -> dict[str, list[VersionInfo]]:
        """Every known version of every model, oldest first."""
        with self._lock:
            return {
                name: [versions[v] for v in sorted(versions)]
                for name, versions in sorted(self._status.items())
                if versions
            }

    # -- reload -----------------------------------------------------------------------------------

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

    def _refresh_model(self, name: str, on_disk: set[str]) -> None:
        try:
            versions = self.store.versions(PREDICTORS, name) if name in on_disk else []
        except Exception as exc:  # a bad folder name must not stop the other models
            log.warning("skipping model folder %r: %s", name, exc)
            versions = []
        folder = self.store.root / PREDICTORS / name
        prints = {v: _fingerprint(folder / str(v)) for v in versions}
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
            if self.observer is not None:
                self.observer.versions_changed(name, sorted(new))
        for loaded in leaving:
            self._retire(loaded, wait=False)
        self._drop_stale_status(name, versions)

    def _drop_stale_status(self, name: str, versions: list[int]) -> None:
        """Forget versions deleted from the store (a retiring one goes once it is unloaded)."""
        with self._lock:
            known = self._status.get(name, {})
            for version in [v for v, i in known.items() if v not in versions]:
                if known[version].state != VersionState.UNLOADING:
                    del known[version]
            if not known:
                self._status.pop(name, None)

    def _load(self, model: ModelVersion) -> LoadedVersion | None:
        """Validate, open and warm up one version; on failure log it, mark it FAILED, return None."""
        self._set_status(model.name, model.version, VersionState.LOADING)
        started = time.perf_counter()
        session: PredictorSession | None = None
        try:
            card = validate_predictor(model)
            session = PredictorSession(model.model_path, card, self.settings.session)
            session.warm_up((1,))
        except Exception as exc:
            if session is not None:
                session.close()
            message = str(exc) if isinstance(exc, NeurotwinError) else f"{type(exc).__name__}: {exc}"
            log.error("refusing %s: %s", model, message)
            self._set_status(model.name, model.version, VersionState.FAILED, message)
            if self.observer is not None:
                self.observer.load_failed(model.name, model.version, message)
            return None
        batch_observer = self.observer.batch_observer(model.name, model.version) if self.observer else None
        batcher = Batcher(
            session.run, self.settings.batcher, batch_observer, name=f"model {model.name!r} v{model.version}"
        )
        log.info(
            "loaded %s on %s in %.2f s (%d neurons, %d x %d input)",
            model,
            session.providers[0],
            time.perf_counter() - started,
            card.neuron_count,
            card.input.height,
            card.input.width,
        )
        return LoadedVersion(model, card, session, batcher)

    def _retire(self, loaded: LoadedVersion, wait: bool) -> None:
        name, version = loaded.name, loaded.version
        with self._lock:
            info = self._status.setdefault(name, {}).get(version)
            self._status[name][version] = (
                replace(info, state=VersionState.UNLOADING, since=time.time())
                if info
                else VersionInfo(version, VersionState.UNLOADING)
            )

        def unload() -> None:
            clean = loaded.retire(self.settings.unload_grace_seconds)
            log.info("unloaded %s%s", loaded.model, "" if clean else " (grace period over)")
            with self._lock:
                known = self._status.get(name, {})
                if known.get(version) is not None and known[version].state == VersionState.UNLOADING:
                    del known[version]
                if not known:
                    self._status.pop(name, None)

        thread = threading.Thread(target=unload, name=f"unload-{name}-{version}", daemon=True)
        self._retirees = [t for t in self._retirees if t.is_alive()] + [thread]
        thread.start()
        if wait:
            thread.join()
