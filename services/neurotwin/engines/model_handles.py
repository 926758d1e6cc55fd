"""Loaded models as reference-counted handles: a version stays alive while a request uses it.

Every model the registry hands out (a predictor version's ONNX Runtime session and batcher, a
generator, a converted torch twin) is a :class:`RefCounted`. A request counts itself in with
``enter`` (or ``with``) and out with ``exit``; when the registry retires a model (a newer version, an
unload, eviction) new requests no longer get it, and its resources are released only once the last
request using it has counted out (or a grace period ends).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from neurotwin.card import GeneratorCard, PredictorCard
from neurotwin.engines.batcher import Batcher
from neurotwin.errors import Unavailable
from neurotwin.runtimes.onnx_session import PredictorSession
from neurotwin.store import ModelVersion


class RefCounted:
    """A model in use by requests; ``retire`` waits for them, then releases the model."""

    def __init__(self) -> None:
        self._users = 0
        self._retired = False
        self._cond = threading.Condition(threading.Lock())

    def enter(self) -> bool:
        """Count one request in; False once the model is retired (the caller re-resolves)."""
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

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

    @property
    def users(self) -> int:
        return self._users

    @property
    def retired(self) -> bool:
        return self._retired

    def release(self, timeout: float) -> bool:
        """Free what the model holds (sessions, memory); True if nothing was cut off."""
        return True

    def retire(self, timeout: float) -> bool:
        """Refuse new requests, wait up to ``timeout`` for in-flight ones, release; True: none cut off."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._retired = True
            while self._users > 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            clean = self._users == 0
        return self.release(max(0.0, deadline - time.monotonic())) and clean


def checked_out(resolve: Callable[[], RefCounted], what: str) -> Any:
    """``resolve()`` counted in; re-resolves when the model was retired between lookup and enter."""
    for _ in range(3):
        model = resolve()
        if model.enter():
            return model
    # Only reachable when versions are swapped faster than a lookup, i.e. practically never.
    raise Unavailable(f"{what} is being reloaded; retry")


class LoadedVersion(RefCounted):
    """A ready predictor version: its card, ONNX Runtime session and batcher."""

    def __init__(
        self,
        model: ModelVersion,
        card: PredictorCard,
        session: PredictorSession,
        batcher: Batcher,
        validation: str = "",
    ) -> None:
        super().__init__()
        self.model = model
        self.card = card
        self.session = session
        self.batcher = batcher
        self.validation = validation
        self.neuron_index = {neuron: i for i, neuron in enumerate(card.neuron_ids)}

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    def predict(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> np.ndarray:
        """float32 [N, neurons]; images are checked against the card first (InvalidInput)."""
        return self.batcher.infer(self.session.check(images), deadline, on_cancel)

    def release(self, timeout: float) -> bool:
        clean = self.batcher.close(timeout)
        self.session.close()
        return clean


class LoadedGenerator(RefCounted):
    """A validated generator version (an ``ImagePrior`` in eval mode on its device)."""

    def __init__(self, model: ModelVersion, module: Any, card: GeneratorCard, validation: str = "") -> None:
        super().__init__()
        self.model = model
        self.module = module
        self.card = card
        self.validation = validation

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version


class LoadedTwin(RefCounted):
    """A validated predictor version converted to a differentiable torch module (optionally pruned to
    some outputs: column j is neuron ``outputs[j]``)."""

    def __init__(
        self, model: ModelVersion, module: Any, card: PredictorCard, outputs: Sequence[int] | None
    ) -> None:
        super().__init__()
        self.model = model
        self.module = module
        self.card = card
        self.outputs = tuple(outputs) if outputs is not None else None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version
