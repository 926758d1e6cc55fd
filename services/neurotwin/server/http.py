"""HTTP/REST beside gRPC: a Starlette app served by uvicorn in a thread of the gRPC server's process.

It shares what the gRPC side has: the engines (services add their routes at attach time), the
bearer tokens and TLS certificate (and client CA), the drain (new requests get 503 while in-flight
ones finish, then it stops with the gRPC server), and the Prometheus registry. Every path needs the
token except ``/v2/health/*``, the probes' endpoints, as grpc.health.v1 is exempt on the gRPC side.

A path prefix that browsers load (the dashboard under ``/ui/``) may register a ``BrowserAuth``: a
browser cannot put a bearer header on a page load, so such paths also accept what it admits (a
cookie the dashboard issues for the token) and answer refusals their own way (a login redirect).

Routes raise ``neurotwin.errors`` exceptions; here they become the Open Inference Protocol's error
body ``{"error": "..."}`` with the matching HTTP status. Unexpected errors are logged and answered
with a 500 that carries no internal detail.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.server.statuses import report, status_for

if TYPE_CHECKING:
    from neurotwin.server.common import GrpcServer

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/v2/health/"
_START_TIMEOUT_S = 30.0
# HTTP status for each error code (as grpc-gateway maps them, except that an overloaded queue is a
# 503 with Retry-After, as Triton answers it, rather than a 429).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def response_for(code: grpc.StatusCode, message: str) -> JSONResponse:
    status = HTTP_STATUS.get(code, 500)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="neurotwin"'
    elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        headers["Retry-After"] = "1"
    return error_response(status, message if status != 500 else "internal error", headers)


async def _neurotwin_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NeurotwinError)
    code = status_for(exc)
    if HTTP_STATUS.get(code, 500) == 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return response_for(code, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Logged here under a fresh id (the same id the client gets); Starlette re-raises after answering,
    # and the gate, seeing the answer already sent, does not log it twice.
    _, message = report(exc, f"HTTP {request.method} {request.url.path}")
    return error_response(500, message)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed (gzip/deflate), refusing anything over ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPException(415, f"Content-Encoding {encoding!r} not supported; use gzip or deflate")
    # gzip framing for "gzip", zlib framing for "deflate" (what HTTP's "deflate" means).
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data ({exc})") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise HTTPException(413, f"decompressed request body exceeds the limit of {limit} bytes")
    return data


class BrowserAuth(Protocol):
    """Another credential than the bearer header, for ``prefix`` (no trailing slash) and below."""

    prefix: str

    def admits(self, method: str, path: str, headers: dict[str, str]) -> bool:
        """True when the request may pass without a valid bearer header."""
        ...

    def refused(self, method: str, path: str) -> Response:
        """The answer to a request that has neither credential."""
        ...


class _Gate:
    """ASGI middleware: auth, drain, in-flight accounting, metrics and logging of unexpected errors."""

    def __init__(self, app: Any, http: HttpServer) -> None:
        self.app = app
        self.http = http

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.http.server
        started = time.perf_counter()
        status = [0]

        async def send_and_record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path: str = scope["path"]
        counted = not path.startswith(HEALTH_PREFIX)
        try:
            if counted:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                refusal = server.refusal(headers)
                if refusal is not None and refusal[0] == grpc.StatusCode.UNAUTHENTICATED:
                    browser = self.http.browser_auth(path)
                    if browser is not None:
                        if not browser.admits(scope["method"], path, headers):
                            await browser.refused(scope["method"], path)(scope, receive, send_and_record)
                            return
                        refusal = None
                if refusal is not None:
                    await response_for(*refusal)(scope, receive, send_and_record)
                    return
                server.call_started()
            try:
                await self.app(scope, receive, send_and_record)
            except Exception as exc:
                if not status[0]:
                    _, message = report(exc, f"HTTP {scope['method']} {path}")
                    await error_response(500, message)(scope, receive, send_and_record)
            finally:
                if counted:
                    server.call_finished()
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.http.requests.labels(template, scope["method"], str(status[0])).inc()
            self.http.latency.labels(template, scope["method"]).observe(time.perf_counter() - started)


class HttpServer:
    """The HTTP listener of a GrpcServer; services add Starlette routes before ``start``."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.settings = server.settings
        self.routes: list[BaseRoute] = []
        self._browser_auth: list[BrowserAuth] = []
        self.port: int | None = None
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        registry = server.metrics.registry
        self.requests = Counter(
            "neurotwin_http_requests",
            "Finished HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "neurotwin_http_request_seconds",
            "Wall time of HTTP requests, from arrival to the response",
            ["route", "method"],
            registry=registry,
        )

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        self.routes.extend(routes)

    def add_browser_auth(self, auth: BrowserAuth) -> None:
        self._browser_auth.append(auth)

    def browser_auth(self, path: str) -> BrowserAuth | None:
        return next(
            (a for a in self._browser_auth if path == a.prefix or path.startswith(a.prefix + "/")), None
        )

    @property
    def max_body_bytes(self) -> int:
        return self.settings.max_message_bytes

    def _bind(self) -> socket.socket:
        s = self.settings
        host = s.http_host or s.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, s.http_port))
        except OSError as exc:
            sock.close()
            raise InvalidInput(f"cannot listen for HTTP on {host}:{s.http_port}: {exc.strerror}") from None
        sock.listen(128)
        sock.set_inheritable(True)
        return sock

    def start(self) -> None:
        import uvicorn

        s = self.settings
        app = Starlette(
            routes=self.routes,
            exception_handlers={
                NeurotwinError: _neurotwin_error,
                HTTPException: _http_error,
                Exception: _internal_error,
            },
        )
        tls: dict[str, Any] = {}
        if s.tls_cert and s.tls_key:
            tls = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
            if s.tls_client_ca:
                tls.update(ssl_ca_certs=s.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            _Gate(app, self),
            # Leave logging to the process (the CLI configures it); uvicorn's records propagate.
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            # The drain has already waited for in-flight requests when the listener is stopped.
            timeout_graceful_shutdown=1,
            # Beyond this many connections and requests at once, uvicorn answers 503 at once rather
            # than letting slow or idle clients pile up; idle keep-alive connections close after 5 s.
            limit_concurrency=s.max_http_requests,
            timeout_keep_alive=5,
            **tls,
        )
        try:
            config.load()  # here rather than in the thread, so that a bad certificate fails start()
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"HTTP TLS: {exc}") from None
        sock = self._bind()
        self.port = sock.getsockname()[1]
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._uvicorn.serve(sockets=[sock])), name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise InvalidInput(f"HTTP server on port {self.port} did not start")
            time.sleep(0.01)
        log.info("HTTP on %s:%d (%s)", s.http_host or s.host, self.port, "TLS" if tls else "plaintext")

    def stop(self, timeout: float = 5.0) -> None:
        if self._uvicorn is None or self._thread is None:
            return
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("HTTP server did not stop within %.1f s", timeout)
