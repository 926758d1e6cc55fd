"""Error classes are protocol-neutral; the server layer holds the one kind -> gRPC status map."""

from __future__ import annotations

import inspect
import subprocess
import sys

import grpc
from neurotwin import errors
from neurotwin.server import statuses


def _error_classes() -> list[type[errors.NeurotwinError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.NeurotwinError)
    ]


def test_errors_module_imports_no_protocol() -> None:
    code = "import sys, neurotwin.errors; print(sorted(m for m in ('grpc', 'starlette') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_kind_has_one_status_and_back() -> None:
    assert set(statuses.GRPC_STATUS) == set(errors.ErrorKind)
    assert len(set(statuses.GRPC_STATUS.values())) == len(errors.ErrorKind)
    for kind, status in statuses.GRPC_STATUS.items():
        assert statuses.kind_of_status(status) is kind
        assert status.name == kind.name  # the canonical error space, spelled the same
    assert statuses.kind_of_status(grpc.StatusCode.OK) is errors.ErrorKind.UNKNOWN


def test_each_error_class_reports_its_kind() -> None:
    expected = {
        errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
        errors.DataError: grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.ModelStoreError: grpc.StatusCode.FAILED_PRECONDITION,
        errors.UnsupportedOperator: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ReplayMismatch: grpc.StatusCode.FAILED_PRECONDITION,
        errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ConcurrentModification: grpc.StatusCode.ABORTED,
        errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.Cancelled: grpc.StatusCode.CANCELLED,
        errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
        errors.OptimizerFault: grpc.StatusCode.INTERNAL,
        errors.SynthesisFailed: grpc.StatusCode.INTERNAL,
        errors.ParityError: grpc.StatusCode.INTERNAL,
        errors.NeurotwinError: grpc.StatusCode.INTERNAL,
        errors.RemoteError: grpc.StatusCode.UNKNOWN,
    }
    assert set(expected) == set(_error_classes()), "a new error class needs its expected status here"
    samples = {
        errors.DataError: errors.DataError("f.h5", "rates", "not finite"),
        errors.UnsupportedOperator: errors.UnsupportedOperator("m.onnx", ["Loop"]),
    }
    for cls, status in expected.items():
        exc = samples.get(cls) or cls("message")
        assert statuses.status_for(exc) == status, cls
        assert statuses.report(exc, "test") == (status, str(exc))


def test_unexpected_exceptions_report_only_an_id() -> None:
    code, message = statuses.report(KeyError("private path /etc/x"), "test")
    assert code == grpc.StatusCode.INTERNAL
    assert message.startswith("internal error (id ") and "/etc/x" not in message
    assert statuses.status_for(ValueError("x")) == grpc.StatusCode.INTERNAL


def test_error_classes_live_only_in_errors_module() -> None:
    from pathlib import Path

    root = Path(errors.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "errors.py" or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("class ") and any(
                base in stripped for base in ("Error)", "Error,", "NeurotwinError", "InvalidInput)")
            ):
                offenders.append(f"{path.relative_to(root)}: {stripped}")
    # The TorchServe handler runs where neurotwin is not installed, so it keeps its own; the predictor
    # client dresses a stream's in-band error as a grpc.RpcError to translate it like any other.
    assert sorted(offenders) == [
        "client/predictor.py: class _StreamRpcError(grpc.RpcError):",
        "training/torchserve_handler.py: class RequestError(ValueError):",
    ], offenders
