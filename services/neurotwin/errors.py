"""Error types shared by every layer.

Each error carries the gRPC status code it maps to, so servicers translate exceptions in one place
and the engines below them never import grpc.
"""

from __future__ import annotations

import grpc


class NeurotwinError(Exception):
    """Base class; ``code`` is the gRPC status a servicer reports for it."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(NeurotwinError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DataError(InvalidInput):
    """A recording or image file that cannot be used; names the file and the field."""

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path} [{field}]" if field else self.path
        super().__init__(f"{where}: {problem}")


class NotFound(NeurotwinError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class ModelStoreError(NeurotwinError):
    """A model directory that exists but is broken (missing file, corrupt model, card mismatch)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FailedPrecondition(NeurotwinError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(NeurotwinError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NeurotwinError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NeurotwinError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(NeurotwinError):
    code = grpc.StatusCode.CANCELLED
