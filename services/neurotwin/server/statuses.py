"""The one map from error kinds to gRPC status codes, and how a servicer reports an error.

Errors of the protocol-neutral kinds in ``neurotwin.errors`` become the gRPC status of the same
name; the HTTP listener maps those statuses on to HTTP (``server.http.HTTP_STATUS``). Anything that is
not a ``NeurotwinError`` is a bug: the caller gets INTERNAL with only "internal error" and an id, and
the server logs that id with the traceback, so nothing about the server's insides leaks to clients.
"""

from __future__ import annotations

import logging
import secrets
from typing import NoReturn

import grpc

from neurotwin.errors import ErrorKind, NeurotwinError

log = logging.getLogger(__name__)

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNKNOWN: grpc.StatusCode.UNKNOWN,
}
# What a received status means (clients raise the matching ``neurotwin.errors`` class).
KIND_OF_STATUS: dict[grpc.StatusCode, ErrorKind] = {status: kind for kind, status in GRPC_STATUS.items()}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status an exception is reported with (INTERNAL for anything not a NeurotwinError)."""
    if isinstance(exc, NeurotwinError):
        return GRPC_STATUS[exc.kind]
    return grpc.StatusCode.INTERNAL


def kind_of_status(code: grpc.StatusCode) -> ErrorKind:
    return KIND_OF_STATUS.get(code, ErrorKind.UNKNOWN)


def report(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """Status and message to send for ``exc``; unexpected errors are logged here under a fresh id."""
    if isinstance(exc, NeurotwinError):
        return GRPC_STATUS[exc.kind], str(exc)
    error_id = secrets.token_hex(6)
    log.error("internal error %s in %s", error_id, where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"


def abort_with(exc: BaseException, context: grpc.ServicerContext, where: str) -> NoReturn:
    """End the call with ``exc`` reported as :func:`report` says."""
    code, message = report(exc, where)
    context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")
