"""Plumbing every neurotwin gRPC server shares: TLS, bearer-token auth, health (with the health
port's probe of the main port), reflection (v1 and v1alpha), Prometheus metrics, admission by kind of
call and error translation (``server.gate``), graceful drain, and the optional HTTP listener
(``server.http``) that shares all of these.

Servicers stay thin: they raise ``neurotwin.errors`` exceptions and this layer turns them into the
right status code, counts them, and refuses new calls while the process drains.
"""

from __future__ import annotations

import logging
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from neurotwin import __version__
from neurotwin.errors import InvalidInput
from neurotwin.server import reflection_v1
from neurotwin.server.config import ServerSettings
from neurotwin.server.gate import HEALTH_PREFIX, GateInterceptor
from neurotwin.server.health_probe import MainPortProbe, ProbeSocket
from neurotwin.server.slots import CallLimits, CallSlots, IdleStreamWatchdog, parse_stream_caps

if TYPE_CHECKING:
    from neurotwin.server.http import HttpServer

log = logging.getLogger(__name__)

__all__ = ["HEALTH_PREFIX", "LATENCY_BUCKETS", "GrpcServer", "ServerMetrics", "deadline_from"]

REFLECTION_PREFIX = "/grpc.reflection."
# Least time given to responses of finished handlers to reach the wire when a drain stops the server.
_FLUSH_SECONDS = 1.0
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    30,
    60,
    300,
)


class ServerMetrics:
    """Per-server Prometheus registry with the metrics every service reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "neurotwin_grpc_requests",
            "Finished gRPC calls",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "neurotwin_grpc_request_seconds",
            "Wall time of gRPC calls, from arrival to the last response",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "neurotwin_grpc_in_flight", "gRPC calls being handled", ["service"], registry=self.registry
        )
        build = Info("neurotwin_build", "Build information", registry=self.registry)
        build.info({"version": __version__, "python": platform.python_version(), "grpc": grpc.__version__})


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc}") from exc
    if not data.strip():
        raise InvalidInput(f"{what} {path} is empty")
    return data


class GrpcServer:
    """One gRPC server hosting any number of neurotwin services on one port.

    Usage: ``server = GrpcServer(settings)``; each service module calls ``server.add_service(...)``;
    then ``server.start()``; ``server.wait()`` blocks until ``stop()`` (or SIGTERM) drains it.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        # The health port's own servicer: the main statuses while the main port answers (see probe).
        self.port_health = health.HealthServicer(experimental_non_blocking=True)
        self._statuses: dict[str, bool] = {}
        self._probe: MainPortProbe | None = None
        self._probe_socket: ProbeSocket | None = None
        self._tokens = settings.tokens()
        self.limits = CallLimits(
            health=settings.max_health_checks,
            unary=settings.max_workers,
            streams=settings.max_streams,
            per_stream_method=settings.max_streams_per_method,
            stream_caps=parse_stream_caps(settings.stream_caps),
            stream_idle_seconds=settings.stream_idle_seconds,
        )
        self.slots = CallSlots(self.limits)
        self.watchdog = IdleStreamWatchdog(settings.stream_idle_seconds)
        self._service_names: list[str] = [
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
            reflection_v1.SERVICE_NAME,
        ]
        self._health_names: list[str] = []
        self._stop_hooks: list[Callable[[], None]] = []
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._metrics_http: Any = None
        self._health_grpc: grpc.Server | None = None
        self._in_flight = 0
        self._in_flight_lock = threading.Condition()
        self.port: int = 0
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self.http_port: int | None = None
        # HTTP/REST listener; services add their routes to it when it exists (http_port >= 0).
        self.http: HttpServer | None = None
        if settings.http_port >= 0:
            from neurotwin.server.http import HttpServer

            self.http = HttpServer(self)
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        threads = self.limits.threads
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
            interceptors=[GateInterceptor(self)],
            options=options,
            # Every admitted call has a thread (see slots); this only bounds the queue of calls
            # waiting to be refused in a flood, so that memory stays bounded too.
            maximum_concurrent_rpcs=threads * 4,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)

    @property
    def grpc_server(self) -> grpc.Server:
        return self._grpc

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def add_service(
        self,
        register: Callable[[grpc.Server], None],
        service_names: Iterable[str],
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Register a servicer; its full service names get health status and reflection."""
        register(self._grpc)
        for name in service_names:
            self._service_names.append(name)
            self._health_names.append(name)
        if on_stop is not None:
            self._stop_hooks.append(on_stop)

    def call_started(self) -> None:
        with self._in_flight_lock:
            self._in_flight += 1

    def call_finished(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._in_flight_lock.notify_all()

    def set_serving(self, service: str, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._statuses[service] = serving
        self.health.set(service, status)
        if self._probe is not None:
            self._probe.publish()
        else:
            self.port_health.set(service, status)

    def refusal(self, metadata: dict[str, Any]) -> tuple[grpc.StatusCode, str] | None:
        """Why a new call is refused (drain, missing or bad token), or None to let it through."""
        if self._draining.is_set():
            return grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica"
        if self._tokens:
            header = metadata.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in self._tokens:
                return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        return None

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not (s.tls_cert or s.tls_key or s.tls_client_ca):
            return None
        # Any TLS setting means TLS was wanted: serving plaintext instead would fail open.
        if not (s.tls_cert and s.tls_key):
            missing = "tls_key" if s.tls_cert else "tls_cert" if s.tls_key else "tls_cert and tls_key"
            raise InvalidInput(f"TLS needs both tls_cert and tls_key: {missing} not set")
        pair = (_read(s.tls_key, "TLS key"), _read(s.tls_cert, "TLS certificate"))
        client_ca = _read(s.tls_client_ca, "TLS client CA") if s.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=client_ca, require_client_auth=bool(client_ca)
        )

    def start(self) -> None:
        s = self.settings
        reflection.enable_server_reflection(self._service_names, self._grpc)
        reflection_v1.enable(self._service_names, self._grpc)
        address = f"{s.host}:{s.port}"
        credentials = self._credentials()
        try:
            if credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise InvalidInput(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise InvalidInput(f"cannot listen on {address} (port in use?)")
        if s.health_port >= 0:
            self._probe_socket = ProbeSocket()
            self._grpc.add_insecure_port(self._probe_socket.address)
        if s.metrics_port >= 0:
            self._metrics_http, _ = start_http_server(
                s.metrics_port, addr=s.metrics_host or s.host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_http.server_port
        if s.health_port >= 0:
            self._start_health_listener()
        if self.http is not None:
            self.http.start()
            self.http_port = self.http.port
        self._grpc.start()
        self.watchdog.start()
        self.set_serving("", True)
        for name in self._health_names:
            self.set_serving(name, True)
        if self._probe_socket is not None:
            self._probe = MainPortProbe(
                self._probe_socket.address,
                self.port_health,
                lambda: dict(self._statuses),
                lambda: self.slots.unary_stuck(3 * s.health_probe_seconds),
                s.health_probe_seconds,
            )
            self._probe.start()
        log.info(
            "serving %s on %s:%d (%s, auth %s), HTTP on %s, metrics on %s",
            ", ".join(self._health_names),
            s.host,
            self.port,
            "TLS" if credentials else "plaintext",
            "on" if self._tokens else "off",
            self.http_port if self.http_port is not None else "off",
            self.metrics_port if self.metrics_port is not None else "off",
        )

    def _start_health_listener(self) -> None:
        """The same health statuses over plaintext: no TLS, no auth, no other service."""
        s = self.settings
        address = f"{s.health_host or s.host}:{s.health_port}"
        self._health_grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
            options=[("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.port_health, self._health_grpc)
        try:
            self.health_port = self._health_grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise InvalidInput(f"cannot listen on {address}: {exc}") from exc
        if self.health_port == 0:
            raise InvalidInput(f"cannot listen on {address} (port in use?)")
        self._health_grpc.start()

    def stop(self, grace: float | None = None) -> None:
        """Drain: health goes NOT_SERVING, new calls get UNAVAILABLE, in-flight calls finish."""
        if self._draining.is_set():
            self._stopped.wait()
            return
        self._draining.set()
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("draining (grace %.1f s)", grace)
        if self._probe is not None:
            self._probe.stop()
        self.health.enter_graceful_shutdown()
        self.port_health.enter_graceful_shutdown()
        # Keep listening while in-flight calls finish, so that new calls get a clear UNAVAILABLE
        # and probes see NOT_SERVING, rather than connection refused.
        deadline = time.monotonic() + grace
        with self._in_flight_lock:
            while self._in_flight > 0 and (left := deadline - time.monotonic()) > 0:
                self._in_flight_lock.wait(left)
            unfinished = self._in_flight
        if unfinished:
            log.warning("grace period over; cancelling %d unfinished call(s)", unfinished)
            flush = 0.0
        else:
            # A handler that has returned may not have written its response yet: grpc's own grace lets
            # those writes finish (stop(0) would cancel them); it ends as soon as they are done.
            flush = max(deadline - time.monotonic(), _FLUSH_SECONDS) if grace > 0 else 0.0
        if self.http is not None:
            self.http.stop(max(flush, _FLUSH_SECONDS))
        self._grpc.stop(flush).wait()
        if self._health_grpc is not None:
            self._health_grpc.stop(0).wait()
        self.watchdog.stop()
        if self._probe_socket is not None:
            self._probe_socket.close()
        for hook in reversed(self._stop_hooks):
            try:
                hook()
            except Exception:
                log.exception("error while stopping a service")
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a drain in a background thread (handlers must return quickly)."""

        def handle(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="drain", daemon=True).start()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def deadline_from(context: grpc.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return None
    return time.monotonic() + remaining
