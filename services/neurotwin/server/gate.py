"""The interceptor in front of every gRPC method: admission by kind of call (``slots``), and for
every method except health checks, drain and token refusals, error translation and metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from grpc._cython import cygrpc

from neurotwin.errors import NeurotwinError
from neurotwin.server.health_probe import UNIX_PEER_PREFIX
from neurotwin.server.slots import HEALTH, STREAM, UNARY, StreamActivity
from neurotwin.server.statuses import abort_with

if TYPE_CHECKING:
    from neurotwin.server.common import GrpcServer

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_CHECK = HEALTH_PREFIX + "Check"


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _abort_for(exc: BaseException, context: grpc.ServicerContext) -> None:
    abort_with(exc, context, f"a call from {context.peer()}")


def _closer(context: grpc.ServicerContext) -> Callable[[str], None]:
    """Ends a call from another thread with DEADLINE_EXCEEDED and a message.

    The servicer context can only abort from the call's own thread, which is the one blocked on the
    idle client; the core call can be cancelled with a status from anywhere.
    """

    def close(message: str) -> None:
        call = getattr(getattr(context, "_rpc_event", None), "call", None)
        try:
            call.cancel(cygrpc.StatusCode.deadline_exceeded, message)  # type: ignore[union-attr]
        except Exception:
            # Another grpc build: cancel without a message rather than leave the stream open.
            context.cancel()

    return close


def _kind(method: str, handler: Any) -> str:
    if method == HEALTH_CHECK:
        return HEALTH
    return STREAM if handler.request_streaming or handler.response_streaming else UNARY


class GateInterceptor(grpc.ServerInterceptor):
    """Admission by kind for every call; auth, drain, error translation and metrics for every method
    except health checks."""

    def __init__(self, server: GrpcServer) -> None:
        self._server = server
        # method -> (the service's handler, our wrapped handler). A wrapped handler depends only on
        # the method and its handler, so it is built once instead of on every call (closures, a new
        # handler and metric label lookups cost about as much as the rest of a small Predict).
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._build(handler, method))
        wrapped = cached[1]
        if method.startswith(HEALTH_PREFIX):
            return wrapped
        # Drain and tokens are checked on every call: they change while the server runs.
        metadata = details.invocation_metadata
        refusal = self._server.refusal(dict(metadata) if metadata else {})
        if refusal is not None:
            service, name = _split_method(method)
            return self._refuse(handler, service, name, *refusal)
        return wrapped

    def _build(self, handler: Any, method: str) -> Any:
        kind = _kind(method, handler)
        if method.startswith(HEALTH_PREFIX):
            wrapped = self._admit(handler, method, kind)
        else:
            service, name = _split_method(method)
            wrapped = self._wrap(handler, service, name, method, kind)
        # Bounded: only methods some registered service answers get here (unknown ones return None).
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _admit(self, handler: Any, method: str, kind: str) -> Any:
        """Health: only the slot budget (no auth, no drain refusal, no metrics)."""
        slots = self._server.slots
        watchdog = self._server.watchdog

        def unary_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                refused = slots.acquire(kind, method)
                if refused is not None:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
                try:
                    return behaviour(request, context)
                finally:
                    slots.release(kind, method)

            return call

        def stream_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                refused = slots.acquire(kind, method)
                if refused is not None:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
                activity = StreamActivity(method, _closer(context))
                watchdog.watch(activity)
                try:
                    yield from activity.responses(behaviour(request, context))
                finally:
                    watchdog.forget(activity)
                    slots.release(kind, method)

            return call

        return _replace_behaviour(handler, unary_response, stream_response, wrap=True)

    def _refuse(self, handler: Any, service: str, name: str, code: grpc.StatusCode, message: str) -> Any:
        metrics = self._server.metrics

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            metrics.requests.labels(service, name, code.name).inc()
            context.abort(code, message)

        return _replace_behaviour(handler, deny, deny)

    def _wrap(self, handler: Any, service: str, name: str, method: str, kind: str) -> Any:
        metrics = self._server.metrics
        server = self._server
        slots = server.slots
        watchdog = server.watchdog
        streaming_requests = bool(handler.request_streaming)
        # Metric children looked up once per method (labels() takes a lock and builds a key).
        latency = metrics.latency.labels(service, name)
        in_flight = metrics.in_flight.labels(service)
        counted: dict[grpc.StatusCode, Any] = {}

        def count(code: grpc.StatusCode) -> None:
            child = counted.get(code)
            if child is None:
                child = counted[code] = metrics.requests.labels(service, name, code.name)
            child.inc()

        def admit(context: grpc.ServicerContext) -> None:
            """Refuse (by aborting) a call from the probe socket or over its kind's budget."""
            if context.peer().startswith(UNIX_PEER_PREFIX):
                # The probe socket skips TLS: only health checks may use it.
                count(grpc.StatusCode.PERMISSION_DENIED)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "only health checks on this socket")
            refused = slots.acquire(kind, method)
            if refused is not None:
                count(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)

        def finish(
            context: grpc.ServicerContext,
            started: float,
            error: BaseException | None,
            closed_idle: bool = False,
        ) -> None:
            slots.release(kind, method)
            server.call_finished()
            code = context.code() if hasattr(context, "code") else None
            if closed_idle:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            if code is None:
                code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
            if not context.is_active() and code == grpc.StatusCode.OK and error is None:
                code = grpc.StatusCode.CANCELLED
            count(code)
            latency.observe(time.perf_counter() - started)
            in_flight.dec()

        def unary_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                admit(context)
                started = time.perf_counter()
                server.call_started()
                in_flight.inc()
                error: BaseException | None = None
                activity: StreamActivity | None = None
                if streaming_requests:
                    activity = StreamActivity(method, _closer(context))
                    watchdog.watch(activity)
                    request = activity.requests(request)
                try:
                    return behaviour(request, context)
                except Exception as exc:
                    error = exc
                    if activity is not None and activity.closed:
                        return None
                    if context.code() is None or isinstance(exc, NeurotwinError):
                        _abort_for(exc, context)
                    raise
                finally:
                    if activity is not None:
                        watchdog.forget(activity)
                    finish(context, started, error, activity is not None and activity.closed)

            return call

        def stream_response(behaviour: Callable) -> Callable:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                admit(context)
                started = time.perf_counter()
                server.call_started()
                in_flight.inc()
                error: BaseException | None = None
                activity = StreamActivity(method, _closer(context))
                watchdog.watch(activity)
                if streaming_requests:
                    request = activity.requests(request)
                try:
                    yield from activity.responses(behaviour(request, context))
                except Exception as exc:
                    error = exc
                    if activity.closed:
                        return
                    if context.code() is None or isinstance(exc, NeurotwinError):
                        _abort_for(exc, context)
                    raise
                finally:
                    watchdog.forget(activity)
                    finish(context, started, error, activity.closed)

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
