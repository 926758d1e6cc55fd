"""Fail closed: a configured token source without tokens, or TLS without its key, stops the server from
starting (rather than serving everyone in plaintext); metrics and health bind loopback unless told."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neurotwin.errors import InvalidInput
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings

from tests._tls import make_tls_files


def _start(**settings: object) -> GrpcServer:
    server = GrpcServer(ServerSettings(**{"port": 0, "metrics_port": -1, "grace_seconds": 1, **settings}))
    server.start()
    return server


@pytest.mark.parametrize(
    "content",
    ["", "\n\n   \n", "# tokens for the rig\n#another\n", "   # indented comment\n\n"],
    ids=["empty", "blank", "comments", "indented-comment"],
)
def test_token_file_without_tokens_is_a_startup_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(InvalidInput, match="holds no tokens"):
        GrpcServer(ServerSettings(port=0, metrics_port=-1, auth_token_file=str(path)))


def test_indented_comment_is_not_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("  # not a token\nreal-token\n")
    assert ServerSettings(auth_token_file=str(path)).tokens() == frozenset({"real-token"})


def test_blank_token_list_is_a_startup_error() -> None:
    with pytest.raises(InvalidInput, match="only blank"):
        GrpcServer(ServerSettings(port=0, metrics_port=-1, auth_tokens=[" ", ""]))


def test_serve_refuses_to_start_with_an_empty_token_file(tmp_path: Path) -> None:
    """The CLI as an operator runs it: one line naming the file, non-zero exit, nothing listening."""
    path = tmp_path / "tokens"
    path.write_text("# fill me in\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "neurotwin.cli", "serve", "predictor", "--model-store", str(tmp_path)]
    command += ["--port", str(port), "--metrics-port", "-1", "--auth-token-file", str(path)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode != 0
    assert "holds no tokens" in result.stderr
    assert "auth off" not in result.stderr.replace("with auth off", "")


def test_tls_settings_without_both_files_are_startup_errors(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    cases: list[tuple[dict[str, str], str]] = [
        ({"tls_cert": str(tls.server_cert)}, "tls_key not set"),
        ({"tls_key": str(tls.server_key)}, "tls_cert not set"),
        # A client CA alone used to be ignored, serving plaintext to anyone.
        ({"tls_client_ca": str(tls.ca_cert)}, "tls_cert and tls_key not set"),
        ({"tls_cert": str(tls.server_cert), "tls_key": str(tmp_path / "missing.key")}, "missing.key"),
    ]
    empty = tmp_path / "empty.key"
    empty.write_text("")
    cases.append(({"tls_cert": str(tls.server_cert), "tls_key": str(empty)}, "is empty"))
    for settings, message in cases:
        server = GrpcServer(ServerSettings(port=0, metrics_port=-1, **settings))
        with pytest.raises(InvalidInput, match=message):
            server.start()
        server.stop(0)


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for a UDP connect
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_metrics_and_health_bind_loopback_unless_configured() -> None:
    server = _start(host="0.0.0.0", metrics_port=0, health_port=0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as page:
            assert page.status == 200
        assert server._metrics_http.server_address[0] == "127.0.0.1"
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        other = _other_address()
        if other is not None:
            for port in (server.metrics_port, server.health_port):
                with pytest.raises(OSError):
                    socket.create_connection((other, port), timeout=2).close()
    finally:
        server.stop(0)
    # Configured explicitly, as the Kubernetes manifests do, they listen on every interface.
    server = _start(metrics_port=0, metrics_host="0.0.0.0", health_port=0, health_host="0.0.0.0")
    try:
        assert server._metrics_http.server_address[0] == "0.0.0.0"
        other = _other_address()
        if other is not None:
            socket.create_connection((other, server.metrics_port), timeout=2).close()
            socket.create_connection((other, server.health_port), timeout=2).close()
    finally:
        server.stop(0)
