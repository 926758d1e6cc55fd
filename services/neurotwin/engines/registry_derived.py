"""The registry's on-demand models: predictor versions pinned outside the policy, generators, and
torch twins converted from validated predictor versions.

None of them is loaded before a service asks for it; each passes the same validation as a served
predictor version (checksums, finite outputs, reference outputs) before anyone gets it, and a refused
version is reported like one (log, observers) and skipped: "newest generator" is the newest that
passed. A twin is only ever converted from a predictor version that passed, and goes when it does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from neurotwin.engines.model_cache import ModelCache
from neurotwin.engines.model_handles import LoadedGenerator, LoadedTwin, LoadedVersion
from neurotwin.engines.model_validation import validate_generator, verify_files
from neurotwin.engines.model_versions import VersionInfo, VersionState, fingerprint, refusal_message
from neurotwin.errors import ModelStoreError, NotFound
from neurotwin.store import GENERATORS, PREDICTORS, ModelVersion

if TYPE_CHECKING:
    from neurotwin.engines.registry import ModelRegistry

log = logging.getLogger(__name__)


class DerivedModels:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        settings = registry.settings
        self.pinned: ModelCache[LoadedVersion] = ModelCache(settings.max_pinned_versions, registry._retire)
        self.generators: ModelCache[LoadedGenerator] = ModelCache(settings.max_generators, registry._retire)
        self.twins: ModelCache[LoadedTwin] = ModelCache(settings.max_twins, registry._retire)
        self._lock = threading.Lock()
        self._generator_status: dict[str, dict[int, VersionInfo]] = {}

    def _refused(self, kind: str, model: ModelVersion, exc: BaseException) -> ModelStoreError:
        message = refusal_message(exc)
        log.error("refusing %s: %s", model, message)
        self.registry.notify("refused", kind, model.name, model.version, message)
        if kind == PREDICTORS:
            self.registry.notify("load_failed", model.name, model.version, message)
        return exc if isinstance(exc, ModelStoreError) else ModelStoreError(f"{model}: {message}")

    # -- predictor versions outside the policy ------------------------------------------------------

    def pinned_version(self, name: str, version: int) -> LoadedVersion:
        model = self.registry.store.resolve(PREDICTORS, name, version)

        def load() -> LoadedVersion:
            try:
                return self.registry.open_version(model)
            except Exception as exc:
                raise self._refused(PREDICTORS, model, exc) from exc

        return self.pinned.checkout((name, version), load, fingerprint(model.path, PREDICTORS))

    # -- generators -------------------------------------------------------------------------------

    def generator(self, name: str, version: int | None = None, device: Any = "cpu") -> LoadedGenerator:
        """A validated generator version counted in (``exit`` it): ``version``, or when None or 0
        the newest one that passes validation."""
        store = self.registry.store
        versions = store.versions(GENERATORS, name)
        if not versions:
            raise NotFound(f"no generator named {name!r} in {store.root}")
        if version and version not in versions:
            raise NotFound(f"generator {name!r} has no version {version} (has {versions})")
        candidates = [version] if version else sorted(versions, reverse=True)
        reasons = []
        for candidate in candidates:
            model = store.resolve(GENERATORS, name, candidate)
            try:
                return self.generators.checkout(
                    (name, candidate, str(device)),
                    lambda model=model: self._open_generator(model, device),
                    fingerprint(model.path, GENERATORS),
                )
            except ModelStoreError as exc:
                reasons.append(f"v{candidate}: {exc}")
        raise ModelStoreError(f"generator {name!r}: no version passes validation ({'; '.join(reasons)})")

    def _open_generator(self, model: ModelVersion, device: Any) -> LoadedGenerator:
        from neurotwin.runtimes.generators import load_generator

        self._set_generator_status(model, VersionState.LOADING)
        try:
            record = verify_files(model)
            module = load_generator(model, device)
            validation = validate_generator(model, module, record)
        except Exception as exc:
            refused = self._refused(GENERATORS, model, exc)
            self._set_generator_status(model, VersionState.FAILED, str(refused))
            raise refused from exc
        self._set_generator_status(model, VersionState.READY, str(validation))
        log.info("loaded generator %s on %s (%s)", model, device, validation)
        return LoadedGenerator(model, module, module.card, validation=str(validation))

    def _set_generator_status(self, model: ModelVersion, state: VersionState, message: str = "") -> None:
        with self._lock:
            self._generator_status.setdefault(model.name, {})[model.version] = VersionInfo(
                model.version, state, message, time.time()
            )

    def generator_status(self) -> dict[str, list[VersionInfo]]:
        """Generator versions loaded or refused so far, oldest first."""
        with self._lock:
            return {n: [v[k] for k in sorted(v)] for n, v in sorted(self._generator_status.items())}

    # -- torch twins ------------------------------------------------------------------------------

    def twin(
        self,
        name: str,
        version: int | None = None,
        *,
        device: Any = "cpu",
        outputs: Sequence[int] | None = None,
        parity_images: int = 4,
        members: bool = False,
    ) -> LoadedTwin:
        """The differentiable twin of a validated predictor version, counted in (``exit`` it).

        ``version`` None or 0: the newest version the registry serves. ``outputs``: prune the graph to
        those neurons (``load_differentiable_twin(..., outputs=)``). ``members``: an ensemble twin
        returns its members' rates [N, M, K] (``module.member_count`` says M; 1 for other twins), so
        objectives can ask the members to agree.
        """
        kept = tuple(int(i) for i in outputs) if outputs is not None else None
        with self.registry.acquire_pinned(name, version) as loaded:
            model = loaded.model
            return self.twins.checkout(
                (name, model.version, kept, str(device), parity_images, members),
                lambda: self._open_twin(loaded, device, kept, parity_images, members),
                fingerprint(model.path, PREDICTORS),
            )

    def _open_twin(
        self,
        loaded: LoadedVersion,
        device: Any,
        outputs: tuple[int, ...] | None,
        parity_images: int,
        members: bool,
    ) -> LoadedTwin:
        from neurotwin.runtimes.onnx_torch import load_differentiable_twin

        model = loaded.model
        started = time.perf_counter()
        try:
            # The files must still be the ones validated when the version was loaded.
            verify_files(model)
            spec = loaded.card.output
            member_output = spec.member_output if members and spec.members > 1 else None
            module, card = load_differentiable_twin(
                model,
                device,
                parity_images=parity_images,
                outputs=outputs,
                output_names=None if member_output is None else [member_output],
            )
            module.member_count = spec.members if member_output is not None else 1
        except ModelStoreError as exc:
            raise self._refused("twins", model, exc) from exc
        log.info(
            "converted twin %s%s on %s in %.2f s",
            model,
            f" (outputs {list(outputs)})" if outputs is not None else "",
            device,
            time.perf_counter() - started,
        )
        return LoadedTwin(model, module, card, outputs)

    # -- retirement -------------------------------------------------------------------------------

    def forget_version(self, name: str, version: int) -> None:
        """A predictor version left the registry: its twins go too (in-flight users finish first)."""
        self.twins.drop(lambda key: key[0] == name and key[1] == version)

    def forget_model(self, name: str) -> None:
        self.twins.drop(lambda key: key[0] == name)
        self.pinned.drop(lambda key: key[0] == name)

    def clear(self) -> None:
        for cache in (self.twins, self.pinned, self.generators):
            for model in cache.clear():
                self.registry._retire(model)
