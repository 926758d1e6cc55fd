"""Dynamic batching for one model version.

Concurrent requests are merged into one runtime call of up to ``max_batch_size`` images and the
output rows are handed back to each caller in order. Batching only pays when requests overlap, so:

- Fast path: when nothing is queued or running and the traffic is not concurrent (the last batch
  held one request, or the runtime has been idle for ``max_queue_delay``), the caller's own thread
  runs its request at once. No handoff to another thread and no waiting for ``max_queue_delay``: a
  lone client sees the runtime's latency plus a lock. Under concurrent traffic the fast path stays
  off, because the first caller back after a batch would otherwise run alone and split every
  merged batch in two.
- Otherwise the request joins a bounded queue (full -> ResourceExhausted). One worker thread per
  batcher forms a batch as soon as the runtime is free: it waits until ``max_batch_size`` images are
  queued or the oldest request has waited ``max_queue_delay``, whichever comes first. Requests that
  arrive while a batch runs have usually waited that long already, so under load there is no extra
  wait either.
- Work whose deadline has passed or whose call was cancelled is dropped before compute and frees
  its queue slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from neurotwin.errors import Cancelled, DeadlineExceeded, InvalidInput, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

RunFn = Callable[[np.ndarray], np.ndarray]

_QUEUED, _RUNNING, _DONE = 0, 1, 2
_DEADLINE_SLACK_S = 0.05


@dataclass(frozen=True)
class BatcherSettings:
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.002
    # Requests (not images) waiting; beyond it new requests get RESOURCE_EXHAUSTED.
    max_queue_size: int = 256

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_s < 0:
            raise InvalidInput(f"max_queue_delay must be >= 0, got {self.max_queue_delay_s}")
        if self.max_queue_size < 1:
            raise InvalidInput(f"max_queue_size must be >= 1, got {self.max_queue_size}")


class BatchObserver(Protocol):
    """Metrics hooks; called outside the batcher's lock, from request or worker threads."""

    def queued(self, seconds: float) -> None:
        """Time one request waited before its batch started."""

    def computed(self, seconds: float, images: int, requests: int) -> None:
        """One runtime call: its duration, batch size in images, and how many requests it merged."""

    def dropped(self, reason: str) -> None:
        """A request removed before compute: reason is "deadline" or "cancelled"."""

    def rejected(self) -> None:
        """A request refused because the queue was full."""


class NullObserver:
    def queued(self, seconds: float) -> None:
        pass

    def computed(self, seconds: float, images: int, requests: int) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def rejected(self) -> None:
        pass


class _Pending:
    __slots__ = ("count", "deadline", "done", "enqueued", "error", "images", "result", "state")

    def __init__(self, images: np.ndarray, deadline: float | None) -> None:
        self.images = images
        self.count = int(images.shape[0])
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.state = _QUEUED
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None


class Batcher:
    """``infer(images) -> rows`` with requests from many threads merged into shared runtime calls."""

    def __init__(
        self,
        run: RunFn,
        settings: BatcherSettings | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self.run_fn = run
        self.settings = settings or BatcherSettings()
        self.observer: BatchObserver = observer or NullObserver()
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._busy = False
        self._closing = False
        self._closed = False
        # Requests merged by the last runtime call, and when it ended: the fast-path heuristic.
        self._last_requests = 0
        self._last_finished = 0.0
        self._worker = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._worker.start()

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def infer(
        self,
        images: np.ndarray,
        deadline: float | None = None,
        on_cancel: Callable[[Callable[[], None]], Any] | None = None,
    ) -> np.ndarray:
        """Rates for ``images`` (already validated); blocks until computed.

        ``deadline`` is a time.monotonic() value. ``on_cancel`` registers a callback to run when the
        caller gives up (gRPC's ``context.add_callback``); it returning False means the call already
        ended.
        """
        if deadline is not None and deadline <= time.monotonic():
            self.observer.dropped("deadline")
            raise DeadlineExceeded(f"{self.name}: deadline passed before the request was queued")
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} was unloaded; retry to reach the current version")
            fast = (
                not self._busy
                and not self._queue
                and (
                    self._last_requests <= 1
                    or time.monotonic() - self._last_finished >= self.settings.max_queue_delay_s
                )
            )
            if fast:
                self._busy = True
            else:
                if len(self._queue) >= self.settings.max_queue_size:
                    item = None
                else:
                    item = _Pending(images, deadline)
                    self._queue.append(item)
                    self._queued_images += item.count
                    self._cond.notify_all()
        if fast:
            return self._run_inline(images)
        if item is None:
            self.observer.rejected()
            raise ResourceExhausted(
                f"{self.name}: queue full ({self.settings.max_queue_size} requests waiting); retry later"
            )
        if on_cancel is not None and on_cancel(lambda: self._abandon(item, "cancelled")) is False:
            self._abandon(item, "cancelled")
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not item.done.wait(timeout):
            self._abandon(item, "deadline")
            if not item.done.is_set():
                # Already in a running batch: its rows are computed but nobody is waiting any more.
                raise DeadlineExceeded(f"{self.name}: deadline passed during compute")
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _run_inline(self, images: np.ndarray) -> np.ndarray:
        try:
            self.observer.queued(0.0)
            started = time.perf_counter()
            out = self.run_fn(images)
            self.observer.computed(time.perf_counter() - started, int(images.shape[0]), 1)
            return out
        finally:
            with self._cond:
                self._busy = False
                self._last_requests = 1
                self._last_finished = time.monotonic()
                if self._queue or self._closing:
                    self._cond.notify_all()

    def _abandon(self, item: _Pending, reason: str) -> None:
        """Remove a request that is still queued (its caller gave up); no-op once it is running."""
        with self._cond:
            if item.state != _QUEUED:
                return
            self._queue.remove(item)
            self._queued_images -= item.count
            item.state = _DONE
        if (
            reason == "cancelled"
            and item.deadline is not None
            and item.deadline - time.monotonic() < _DEADLINE_SLACK_S
        ):
            # gRPC cancels a call when its deadline passes, possibly a hair before our estimate of
            # that deadline (taken from time_remaining() on arrival): count it as what it is.
            reason = "deadline"
        if reason == "deadline":
            item.error = DeadlineExceeded(f"{self.name}: deadline passed while queued")
        else:
            item.error = Cancelled(f"{self.name}: call cancelled while queued")
        item.done.set()
        self.observer.dropped(reason)

    def _take_batch(self) -> tuple[list[_Pending], list[_Pending]]:
        """Pop up to max_batch_size images of live requests, and the expired ones (lock held)."""
        limit = self.settings.max_batch_size
        batch: list[_Pending] = []
        expired: list[_Pending] = []
        images = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            if item.deadline is not None and item.deadline <= now:
                self._queue.popleft()
                self._queued_images -= item.count
                item.state = _DONE
                expired.append(item)
                continue
            # The first request always fits, even one larger than the limit on its own.
            if batch and images + item.count > limit:
                break
            self._queue.popleft()
            self._queued_images -= item.count
            item.state = _RUNNING
            batch.append(item)
            images += item.count
        return batch, expired

    def _loop(self) -> None:
        delay = self.settings.max_queue_delay_s
        limit = self.settings.max_batch_size
        while True:
            with self._cond:
                while not self._queue or self._busy:
                    if self._closing and not self._queue and not self._busy:
                        self._closed = True
                        self._cond.notify_all()
                        return
                    self._cond.wait()
                # Claim the runtime now, so that no inline request starts while the batch fills.
                self._busy = True
                while self._queue and self._queued_images < limit and not self._closing:
                    left = self._queue[0].enqueued + delay - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, expired = self._take_batch()
                if not batch:
                    self._busy = False
            for item in expired:
                item.error = DeadlineExceeded(f"{self.name}: deadline passed while queued")
                item.done.set()
                self.observer.dropped("deadline")
            if batch:
                self._compute(batch)
                with self._cond:
                    self._busy = False
                    self._last_requests = len(batch)
                    self._last_finished = time.monotonic()

    def _compute(self, batch: list[_Pending]) -> None:
        started_wall = time.monotonic()
        for item in batch:
            self.observer.queued(started_wall - item.enqueued)
        images = batch[0].images if len(batch) == 1 else np.concatenate([i.images for i in batch])
        try:
            started = time.perf_counter()
            out = self.run_fn(images)
            self.observer.computed(time.perf_counter() - started, int(images.shape[0]), len(batch))
        except BaseException as exc:
            for item in batch:
                item.error = exc
                item.state = _DONE
                item.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        offset = 0
        for item in batch:
            item.result = out[offset : offset + item.count]
            offset += item.count
            item.state = _DONE
            item.done.set()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting work once the queued and running requests finish; True when finished."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()
