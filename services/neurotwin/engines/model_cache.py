"""Models loaded on first use and kept while useful: generators, torch twins, predictor versions
a session pinned outside the version policy.

Loads run outside the cache lock, one per key at a time, so a slow load does not hold up requests
for models already loaded. A key whose load failed is remembered with the fingerprint of its files
and not tried again until they change. The least recently used entries beyond ``capacity`` are
retired: requests holding them finish first.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from neurotwin.engines.model_handles import RefCounted
from neurotwin.errors import ModelStoreError

log = logging.getLogger(__name__)

Model = TypeVar("Model", bound=RefCounted)


class ModelCache(Generic[Model]):
    def __init__(self, capacity: int, retire: Callable[[RefCounted], None]) -> None:
        self.capacity = max(1, capacity)
        self._retire = retire
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[Hashable, Model] = collections.OrderedDict()
        self._loading: dict[Hashable, threading.Lock] = {}
        self._failed: dict[Hashable, tuple[Any, str]] = {}

    def failure(self, key: Hashable, fingerprint: Any) -> str | None:
        """Why ``key`` was refused, while its files are as they were then; None otherwise."""
        with self._lock:
            failed = self._failed.get(key)
        if failed is None or failed[0] != fingerprint:
            return None
        return failed[1]

    def checkout(self, key: Hashable, load: Callable[[], Model], fingerprint: Any = None) -> Model:
        """The model for ``key``, counted in (the caller calls ``exit``), loading it if needed.

        A failed load raises its error (a ModelStoreError for a refused version) and is remembered
        until ``fingerprint`` changes.
        """
        for _ in range(3):
            model = self._get_or_load(key, load, fingerprint)
            if model.enter():
                return model
        raise ModelStoreError(f"{key}: retired while being checked out; retry")

    def _get_or_load(self, key: Hashable, load: Callable[[], Model], fingerprint: Any) -> Model:
        with self._lock:
            model = self._entries.get(key)
            if model is not None:
                self._entries.move_to_end(key)
                return model
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                model = self._entries.get(key)
                if model is not None:
                    return model
                failed = self._failed.get(key)
            if failed is not None and failed[0] == fingerprint:
                raise ModelStoreError(failed[1])
            try:
                model = load()
            except ModelStoreError as exc:
                with self._lock:
                    self._failed[key] = (fingerprint, str(exc))
                    self._loading.pop(key, None)
                raise
            except BaseException:
                with self._lock:
                    self._loading.pop(key, None)
                raise
            with self._lock:
                self._failed.pop(key, None)
                self._entries[key] = model
                self._loading.pop(key, None)
                evicted = []
                while len(self._entries) > self.capacity:
                    evicted.append(self._entries.popitem(last=False)[1])
            for old in evicted:
                self._retire(old)
            return model

    def drop(self, matches: Callable[[Hashable], bool]) -> None:
        """Retire every entry whose key matches (e.g. the twins of a version that left the store)."""
        with self._lock:
            keys = [k for k in self._entries if matches(k)]
            gone = [self._entries.pop(k) for k in keys]
        for model in gone:
            self._retire(model)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def get(self, key: Hashable) -> Model | None:
        with self._lock:
            return self._entries.get(key)

    def clear(self) -> list[Model]:
        with self._lock:
            gone = list(self._entries.values())
            self._entries.clear()
            self._failed.clear()
        return gone
