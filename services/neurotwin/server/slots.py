"""Admission of gRPC calls: separate concurrency limits for health checks, unary calls and streams
(with a cap per streaming method), and a watchdog that closes streams whose client has gone idle.

Why: the gRPC sync server runs every call on a thread of one fixed pool. Without limits, as many
streams as there are threads, each waiting for a client that never sends, take every thread, and
nothing else is answered, health checks included. Here each kind of call has its own budget, the
pool has a thread for every slot of every budget (plus a few for refusals), and a call that finds
its budget spent is refused at once with RESOURCE_EXHAUSTED instead of queueing behind the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from neurotwin.errors import InvalidInput

log = logging.getLogger(__name__)

HEALTH = "health"
UNARY = "unary"
STREAM = "stream"
# Threads beyond the slots, so that refusing a call never waits for a thread held by an admitted one.
REFUSAL_THREADS = 8


def parse_stream_caps(entries: list[str] | tuple[str, ...]) -> dict[str, int]:
    """``["PredictStream=8", "neurotwin.v1.Synthesizer/Synthesize=2"]`` -> {method: cap}."""
    caps: dict[str, int] = {}
    for entry in entries:
        method, sep, value = entry.partition("=")
        method = method.strip().strip("/")
        try:
            cap = int(value)
        except ValueError:
            cap = -1
        if not sep or not method or cap < 1:
            raise InvalidInput(f"stream_caps entry {entry!r}: expected METHOD=N with N >= 1")
        caps[method] = cap
    return caps


@dataclass(frozen=True)
class CallLimits:
    """How many calls of each kind may run at once, and how long a stream may wait on its client."""

    health: int = 8
    unary: int = 64
    streams: int = 32
    # Cap for one streaming method when stream_caps does not name it.
    per_stream_method: int = 16
    stream_caps: dict[str, int] = field(default_factory=dict)
    # A stream blocked on its client (no request arriving, or a response the client does not read)
    # for this long is closed with DEADLINE_EXCEEDED; 0 turns the watchdog off.
    stream_idle_seconds: float = 120.0

    def __post_init__(self) -> None:
        for name in ("health", "unary", "streams", "per_stream_method"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"call limit {name} must be >= 1, got {getattr(self, name)}")
        if self.stream_idle_seconds < 0:
            raise InvalidInput(f"stream_idle_seconds must be >= 0, got {self.stream_idle_seconds}")

    @property
    def threads(self) -> int:
        """Threads the server needs so that no admitted call ever waits for one."""
        return self.health + self.unary + self.streams + REFUSAL_THREADS

    def stream_cap(self, full_method: str) -> int:
        """The cap for one streaming method, looked up by full name, then by its short name."""
        full = full_method.strip("/")
        if full in self.stream_caps:
            return self.stream_caps[full]
        short = full.rpartition("/")[2]
        return self.stream_caps.get(short, self.per_stream_method)


class CallSlots:
    """Counts calls in flight per kind and per streaming method; admission never blocks."""

    def __init__(self, limits: CallLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._in_use = {HEALTH: 0, UNARY: 0, STREAM: 0}
        self._per_method: dict[str, int] = {}
        # When the unary slots last became all taken (each release and re-take restarts it).
        self._unary_full_since = 0.0

    def acquire(self, kind: str, full_method: str) -> str | None:
        """Take a slot; returns None when admitted, else why the call is refused."""
        limit = {HEALTH: self.limits.health, UNARY: self.limits.unary, STREAM: self.limits.streams}[kind]
        with self._lock:
            if self._in_use[kind] >= limit:
                what = {HEALTH: "health checks", UNARY: "unary calls", STREAM: "streams"}[kind]
                return f"server busy: {limit} {what} already in progress (limit {kind}={limit}); retry later"
            if kind == STREAM:
                cap = self.limits.stream_cap(full_method)
                held = self._per_method.get(full_method, 0)
                if held >= cap:
                    short = full_method.rpartition("/")[2]
                    return f"server busy: {cap} {short} streams already open (limit {short}={cap}); retry"
                self._per_method[full_method] = held + 1
            self._in_use[kind] += 1
            if kind == UNARY and self._in_use[kind] == limit:
                self._unary_full_since = time.monotonic()
            return None

    def release(self, kind: str, full_method: str) -> None:
        with self._lock:
            self._in_use[kind] -= 1
            if kind == STREAM:
                left = self._per_method.get(full_method, 1) - 1
                if left > 0:
                    self._per_method[full_method] = left
                else:
                    self._per_method.pop(full_method, None)

    def in_use(self, kind: str) -> int:
        with self._lock:
            return self._in_use[kind]

    def unary_stuck(self, window: float) -> bool:
        """Every unary slot taken and none given back for ``window`` seconds: unary calls cannot run."""
        with self._lock:
            full = self._in_use[UNARY] >= self.limits.unary
            return full and time.monotonic() - self._unary_full_since > window


class StreamActivity:
    """Whether one stream is waiting on its client, and since when.

    The handler's thread waits on the client inside the request iterator's ``next`` and between
    yielding a response and being resumed (gRPC sends it meanwhile, held by flow control when the
    client does not read). Time spent computing is not waiting, so a slow model never looks idle.
    """

    def __init__(self, method: str, close: Callable[[str], None]) -> None:
        self.method = method
        self._close = close
        self._waiting_since: float | None = None
        self.closed = False

    def waiting(self) -> None:
        self._waiting_since = time.monotonic()

    def working(self) -> None:
        self._waiting_since = None

    def idle_for(self, now: float) -> float:
        since = self._waiting_since
        return 0.0 if since is None else now - since

    def close(self, reason: str) -> None:
        self.closed = True
        self._close(reason)

    def requests(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """The client's messages, with the time spent waiting for each one marked."""
        while True:
            self.waiting()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.working()
            yield item

    def responses(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """The handler's responses, with the time gRPC spends handing each one over marked."""
        for item in iterator:
            self.waiting()
            yield item
            self.working()


class IdleStreamWatchdog:
    """Closes streams that have waited on their client longer than the limit."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._active: set[StreamActivity] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.closed_count = 0

    def start(self) -> None:
        if self.idle_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="idle-streams", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def watch(self, activity: StreamActivity) -> None:
        with self._lock:
            self._active.add(activity)

    def forget(self, activity: StreamActivity) -> None:
        with self._lock:
            self._active.discard(activity)

    def _run(self) -> None:
        period = min(max(self.idle_seconds / 4, 0.05), 1.0)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [a for a in self._active if not a.closed and a.idle_for(now) > self.idle_seconds]
            for activity in idle:
                log.warning(
                    "closing %s stream idle for %.0f s (stream_idle_seconds=%g)",
                    activity.method,
                    activity.idle_for(now),
                    self.idle_seconds,
                )
                self.closed_count += 1
                activity.close(
                    f"stream closed: waited on the client for more than {self.idle_seconds:g} s "
                    "(limit stream_idle_seconds)"
                )
