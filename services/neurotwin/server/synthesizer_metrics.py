"""The synthesizer's Prometheus metrics: jobs, scheduler occupancy, throughput and GPU memory."""

from __future__ import annotations

import collections
import threading
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from neurotwin.engines.synthesis import SynthesisScheduler, TickInfo
from neurotwin.server.common import LATENCY_BUCKETS

JOB_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
OCCUPANCY_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class SynthesizerMetrics:
    """Service metrics, registered on the server's registry (or a private one in-process)."""

    RATE_WINDOW_S = 10.0

    def __init__(self, registry: CollectorRegistry, scheduler: SynthesisScheduler) -> None:
        self._scheduler = scheduler
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.jobs = Counter(
            "neurotwin_synthesizer_jobs",
            "Finished synthesis jobs by method and outcome (ok, cancelled, deadline, failed)",
            ["method", "outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "neurotwin_synthesizer_jobs_rejected",
            "Requests refused at admission (scheduler full) or as invalid",
            ["reason"],
            registry=registry,
        )
        self.job_seconds = Histogram(
            "neurotwin_synthesizer_job_seconds",
            "Wall time of a synthesis job, from submission to its result",
            ["method"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.queued_seconds = Histogram(
            "neurotwin_synthesizer_queued_seconds",
            "Time a job waited before its first step",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            "neurotwin_synthesizer_step_seconds",
            "Time of one batched step (forward, and backward for gradient jobs)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.job_steps = Counter(
            "neurotwin_synthesizer_job_steps",
            "Optimization steps taken, counted once per job in each batched step",
            registry=registry,
        )
        self.batch_jobs = Histogram(
            "neurotwin_synthesizer_batch_jobs",
            "Jobs sharing one batched step (batch occupancy)",
            buckets=OCCUPANCY_BUCKETS,
            registry=registry,
        )
        self.batch_images = Histogram(
            "neurotwin_synthesizer_batch_images",
            "Images in one batched step",
            buckets=IMAGE_BUCKETS,
            registry=registry,
        )
        steps_rate = Gauge(
            "neurotwin_synthesizer_steps_per_second",
            f"Job steps per second over the last {self.RATE_WINDOW_S:g} s",
            registry=registry,
        )
        steps_rate.set_function(self.steps_per_second)
        active = Gauge("neurotwin_synthesizer_jobs_active", "Jobs taking steps", registry=registry)
        active.set_function(lambda: scheduler.stats().active)
        queued = Gauge(
            "neurotwin_synthesizer_jobs_queued",
            "Jobs admitted, waiting for their first step",
            registry=registry,
        )
        queued.set_function(lambda: scheduler.stats().pending)
        if scheduler.device.type == "cuda":
            device = scheduler.device
            allocated = Gauge(
                "neurotwin_synthesizer_gpu_memory_allocated_bytes",
                "GPU memory held by tensors on the synthesis device",
                registry=registry,
            )
            allocated.set_function(lambda: torch.cuda.memory_allocated(device))
            reserved = Gauge(
                "neurotwin_synthesizer_gpu_memory_reserved_bytes",
                "GPU memory reserved by torch's caching allocator on the synthesis device",
                registry=registry,
            )
            reserved.set_function(lambda: torch.cuda.memory_reserved(device))
            peak = Gauge(
                "neurotwin_synthesizer_gpu_memory_peak_bytes",
                "Peak GPU memory held by tensors since the service started",
                registry=registry,
            )
            peak.set_function(lambda: torch.cuda.max_memory_allocated(device))

    def on_tick(self, tick: TickInfo) -> None:
        self.step_seconds.labels(tick.method).observe(tick.seconds)
        self.job_steps.inc(tick.jobs)
        self.batch_jobs.observe(tick.jobs)
        self.batch_images.observe(tick.images)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tick.jobs))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()

    def steps_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / self.RATE_WINDOW_S
