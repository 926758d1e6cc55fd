"""Error types shared by every layer, and nothing else: no protocol is imported here.

Each error class has a protocol-neutral ``kind`` (the canonical error space gRPC and Google APIs
share); ``neurotwin.server.statuses`` maps kinds to gRPC status codes (and the HTTP layer maps those
to HTTP statuses) in one place, so engines, runtimes and training never import grpc.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    OUT_OF_RANGE = "out_of_range"
    ABORTED = "aborted"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    UNIMPLEMENTED = "unimplemented"
    DATA_LOSS = "data_loss"
    INTERNAL = "internal"
    UNKNOWN = "unknown"


class NeurotwinError(Exception):
    """Base class; ``kind`` says what went wrong independently of the protocol that reports it.

    An error a client received from a server also carries ``code``: the protocol status as sent
    (set by ``neurotwin.client``; None for errors raised in this process).
    """

    kind: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    code: Any = None


class InvalidInput(NeurotwinError, ValueError):
    kind = ErrorKind.INVALID_ARGUMENT


class DataError(InvalidInput):
    """A recording or image file that cannot be used; names the file and the field."""

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path} [{field}]" if field else self.path
        super().__init__(f"{where}: {problem}")


class NotFound(NeurotwinError, LookupError):
    kind = ErrorKind.NOT_FOUND


class FailedPrecondition(NeurotwinError):
    kind = ErrorKind.FAILED_PRECONDITION


class ModelStoreError(NeurotwinError):
    """A model directory that exists but is broken (missing file, corrupt model, card mismatch)."""

    kind = ErrorKind.FAILED_PRECONDITION


class UnsupportedOperator(ModelStoreError):
    """An ONNX graph uses ops (or op settings) the torch converter cannot evaluate; ``ops`` names them."""

    def __init__(self, source: object, ops: dict[str, int] | list[str], detail: str = "") -> None:
        self.ops = dict(ops) if isinstance(ops, dict) else {o: 1 for o in ops}
        listed = ", ".join(f"{op} (x{n})" if n > 1 else op for op, n in sorted(self.ops.items()))
        msg = f"{source}: cannot convert to torch, unsupported ONNX ops: {listed}"
        super().__init__(msg + (f"; {detail}" if detail else ""))


class ReplayMismatch(NeurotwinError):
    """A session restored from its journal does not reproduce what it journaled (another library version?)."""

    kind = ErrorKind.FAILED_PRECONDITION


class ConcurrentModification(NeurotwinError):
    """Someone else (another replica or thread) changed the session since it was read; retry."""

    kind = ErrorKind.ABORTED


class ResourceExhausted(NeurotwinError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(NeurotwinError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(NeurotwinError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(NeurotwinError):
    kind = ErrorKind.CANCELLED


class OutOfRange(NeurotwinError):
    """A value within its type but outside what the computation can carry (an objective that
    overflows to infinity on finite rates): the request's fault, not the server's."""

    kind = ErrorKind.OUT_OF_RANGE


class OptimizerFault(NeurotwinError):
    """An optimizer broke its own contract (e.g. latents of the wrong shape): a bug, not bad input."""


class SynthesisFailed(NeurotwinError):
    """A synthesis job that cannot go on (objective not finite, a step that raised); others go on."""


class ParityError(NeurotwinError):
    """ONNX Runtime disagrees with torch beyond tolerance: the exported graph is not the trained model."""


class RemoteError(NeurotwinError):
    """A server error without a more specific class here; ``kind`` is what the server's status means."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.UNKNOWN, code: Any = None) -> None:
        super().__init__(message)
        self.kind = kind  # type: ignore[misc]  # per instance: whatever the server sent
        self.code = code


# The class a client raises for an error of each kind it receives (RemoteError for the rest).
RECEIVED_ERRORS: dict[ErrorKind, type[NeurotwinError]] = {
    ErrorKind.INVALID_ARGUMENT: InvalidInput,
    ErrorKind.NOT_FOUND: NotFound,
    ErrorKind.FAILED_PRECONDITION: FailedPrecondition,
    ErrorKind.RESOURCE_EXHAUSTED: ResourceExhausted,
    ErrorKind.UNAVAILABLE: Unavailable,
    ErrorKind.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorKind.CANCELLED: Cancelled,
    ErrorKind.OUT_OF_RANGE: OutOfRange,
}
