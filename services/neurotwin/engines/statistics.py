"""Per model-version inference statistics, as Triton's statistics extension reports them.

Two sources feed one ``VersionStatistics``:

- each version's batcher (it is the batcher's observer): how long every request waited for its batch
  (queue), how long the model execution it was part of took (compute_infer), and per batch size how
  many executions ran and how long they took;
- every prediction call, whatever its protocol (``RequestTiming``): success or failure with the
  request's whole duration, the time spent reading its input (compute_input) and preparing its
  output (compute_output).

Counts only grow; a version gets fresh counters when it is (re)loaded, as in Triton.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Duration:
    """A count of events and their total duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class VersionStatistics:
    """The counters of one model version; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        # batch size (images) -> executions of that size and their total duration.
        self.batches: dict[int, Duration] = {}

    # -- BatchObserver (called by the version's batcher) --------------------------------------------

    def queued(self, seconds: float) -> None:
        with self._lock:
            self.queue.add(round(seconds * 1e9))

    def computed(self, seconds: float, images: int, requests: int) -> None:
        ns = round(seconds * 1e9)
        with self._lock:
            # Each request of the batch spent the whole execution in compute, as Triton counts it.
            self.compute_infer.add(ns * requests, requests)
            self.inference_count += images
            self.execution_count += 1
            self.batches.setdefault(images, Duration()).add(ns)

    def dropped(self, reason: str) -> None:
        """Dropped requests fail; their caller's RequestTiming counts them."""

    def rejected(self) -> None:
        """Refused requests fail; their caller's RequestTiming counts them."""

    # -- requests ---------------------------------------------------------------------------------

    def start(self) -> RequestTiming:
        return RequestTiming(self)

    def finished(self, ok: bool, total_ns: int, input_ns: int, output_ns: int) -> None:
        with self._lock:
            if ok:
                self.success.add(total_ns)
                self.compute_input.add(input_ns)
                self.compute_output.add(output_ns)
            else:
                self.fail.add(total_ns)
            self.last_inference_ms = time.time_ns() // 1_000_000

    def to_json(self, name: str, version: int) -> dict[str, object]:
        """Triton's ModelStatistics in its JSON form (also the gRPC message's field names)."""
        with self._lock:
            return {
                "name": name,
                "version": str(version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_json(),
                    "fail": self.fail.to_json(),
                    "queue": self.queue.to_json(),
                    "compute_input": self.compute_input.to_json(),
                    "compute_infer": self.compute_infer.to_json(),
                    "compute_output": self.compute_output.to_json(),
                },
                # Batches are assembled by slicing and concatenating arrays, which we do not time
                # separately, so only compute_infer is reported per batch size.
                "batch_stats": [
                    {"batch_size": size, "compute_infer": self.batches[size].to_json()}
                    for size in sorted(self.batches)
                ],
            }


class RequestTiming:
    """Times one prediction request: ``inputs_ready()``, ``outputs_started()``, then ``finish(ok)``."""

    __slots__ = ("_input_done", "_output_started", "_started", "_stats")

    def __init__(self, stats: VersionStatistics) -> None:
        self._stats = stats
        self._started = time.perf_counter_ns()
        self._input_done = 0
        self._output_started = 0

    def inputs_ready(self) -> None:
        self._input_done = time.perf_counter_ns()

    def outputs_started(self) -> None:
        self._output_started = time.perf_counter_ns()

    def finish(self, ok: bool) -> None:
        now = time.perf_counter_ns()
        input_ns = self._input_done - self._started if self._input_done else 0
        output_ns = now - self._output_started if self._output_started else 0
        self._stats.finished(ok, now - self._started, input_ns, output_ns)


class InferenceStatistics:
    """The statistics of every model version the server has loaded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionStatistics] = {}

    def loaded(self, name: str, version: int) -> VersionStatistics:
        """Fresh counters for a version being (re)loaded; also its batcher's observer."""
        stats = VersionStatistics()
        with self._lock:
            self._versions[(name, version)] = stats
        return stats

    def version(self, name: str, version: int) -> VersionStatistics:
        """The counters of a version (created if it was loaded without ``loaded``)."""
        stats = self._versions.get((name, version))
        if stats is None:
            with self._lock:
                stats = self._versions.setdefault((name, version), VersionStatistics())
        return stats

    def to_json(self, versions: list[tuple[str, int]]) -> dict[str, object]:
        """Triton's ModelStatisticsResponse for these (model, version) pairs."""
        return {"model_stats": [self.version(n, v).to_json(n, v) for n, v in versions]}
