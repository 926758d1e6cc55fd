"""Plumbing every neurotwin gRPC server shares: TLS, bearer-token auth, health, reflection (v1 and
v1alpha), Prometheus metrics, error translation and graceful drain, and the optional HTTP listener
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
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from neurotwin import __version__
from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.server import reflection_v1
from neurotwin.server.config import ServerSettings

if TYPE_CHECKING:
    from neurotwin.server.http import HttpServer

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
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


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _abort_for(exc: BaseException, context: grpc.ServicerContext) -> None:
    if isinstance(exc, NeurotwinError):
        context.abort(exc.code, str(exc))
    log.exception("unhandled error in %s", context.peer())
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class _GateInterceptor(grpc.ServerInterceptor):
    """Auth, drain, error translation and metrics for every method except health checks."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if method.startswith(HEALTH_PREFIX):
            return handler
        service, name = _split_method(method)
        metadata = dict(details.invocation_metadata or ())
        refusal = self._server.refusal(metadata)
        if refusal is not None:
            return self._refuse(handler, service, name, *refusal)
        return self._wrap(handler, service, name)

    def _refuse(self, handler: Any, service: str, name: str, code: grpc.StatusCode, message: str) -> Any:
        metrics = self._server.metrics

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            metrics.requests.labels(service, name, code.name).inc()
            context.abort(code, message)

        return _replace_behaviour(handler, deny, deny)

    def _wrap(self, handler: Any, service: str, name: str) -> Any:
        metrics = self._server.metrics

        server = self._server

        def finish(context: grpc.ServicerContext, started: float, error: BaseException | None) -> None:
            server.call_finished()
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
            if not context.is_active() and code == grpc.StatusCode.OK and error is None:
                code = grpc.StatusCode.CANCELLED
            metrics.requests.labels(service, name, code.name).inc()
            metrics.latency.labels(service, name).observe(time.perf_counter() - started)
            metrics.in_flight.labels(service).dec()

        def unary_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.perf_counter()
                server.call_started()
                metrics.in_flight.labels(service).inc()
                error: BaseException | None = None
                try:
                    return behaviour(request, context)
                except Exception as exc:
                    error = exc
                    if context.code() is None or isinstance(exc, NeurotwinError):
                        _abort_for(exc, context)
                    raise
                finally:
                    finish(context, started, error)

            return call

        def stream_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.perf_counter()
                server.call_started()
                metrics.in_flight.labels(service).inc()
                error: BaseException | None = None
                try:
                    yield from behaviour(request, context)
                except Exception as exc:
                    error = exc
                    if context.code() is None or isinstance(exc, NeurotwinError):
                        _abort_for(exc, context)
                    raise
                finally:
                    finish(context, started, error)

            return call

        return _replace_behaviour(handler, unary_response, stream_response, wrap=True)


def _replace_behaviour(handler: Any, unary: Callable, streaming: Callable, wrap: bool = False) -> Any:
    """Rebuild a method handler with its behaviour replaced (or wrapped when ``wrap``)."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def pick(original: Callable, factory: Callable) -> Callable:
        return factory(original) if wrap else factory

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(pick(handler.unary_unary, unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(pick(handler.unary_stream, streaming), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(pick(handler.stream_unary, unary), **kwargs)
    return grpc.stream_stream_rpc_method_handler(pick(handler.stream_stream, streaming), **kwargs)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what} {path}: {exc}") from exc


class GrpcServer:
    """One gRPC server hosting any number of neurotwin services on one port.

    Usage: ``server = GrpcServer(settings)``; each service module calls ``server.add_service(...)``;
    then ``server.start()``; ``server.wait()`` blocks until ``stop()`` (or SIGTERM) drains it.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._tokens = settings.tokens()
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
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
            interceptors=[_GateInterceptor(self)],
            options=options,
            maximum_concurrent_rpcs=None,
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
        self.health.set(service, status)

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
        if not (s.tls_cert or s.tls_key):
            return None
        if not (s.tls_cert and s.tls_key):
            raise InvalidInput("TLS needs both tls_cert and tls_key")
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
        self.set_serving("", True)
        for name in self._health_names:
            self.set_serving(name, True)
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
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
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
        self.health.enter_graceful_shutdown()
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
