"""The separate health port's view of the main port: NOT_SERVING while the main port cannot serve.

The health port has its own listener and threads, so it would answer SERVING even when the main
port is wedged, and the kubelet would never restart the pod. The probe therefore asks the main
server itself, every period: a real health Check through a private Unix socket that the main
server also listens on (same poller, same thread pool, plaintext so that TLS and client
certificates need no special case), and whether unary calls have been stuck at their limit with
none finishing. Either failing turns every status on the health port to NOT_SERVING until it passes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNIX_PEER_PREFIX = "unix:"


class ProbeSocket:
    """A Unix socket path in a private (0700) temporary folder, removed on ``close``."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="neurotwin-probe-")
        os.chmod(self._folder, 0o700)
        self.address = f"unix:{self._folder}/main.sock"

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)


class MainPortProbe:
    """Mirrors the main statuses onto ``port_health`` while the main port answers, else NOT_SERVING."""

    def __init__(
        self,
        address: str,
        port_health: health.HealthServicer,
        statuses: Callable[[], dict[str, bool]],
        unary_stuck: Callable[[], bool],
        period: float,
    ) -> None:
        self._address = address
        self._port_health = port_health
        self._statuses = statuses
        self._unary_stuck = unary_stuck
        self._period = max(period, 0.05)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = True
        self.reason = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self._period * 2 + 5)

    def check_once(self, channel: grpc.Channel) -> str:
        """Why the main port cannot serve now, or "" when it can."""
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._period
            )
        except grpc.RpcError as exc:
            return f"health check on the main port failed: {exc.code().name}"
        if reply.status != SERVING:
            return "main port reports NOT_SERVING"
        if self._unary_stuck():
            return "every unary slot has been busy with no call finishing"
        return ""

    def publish(self) -> None:
        """Set the health port's statuses from the main ones and the last probe."""
        for name, serving in self._statuses().items():
            self._port_health.set(name, SERVING if serving and self.healthy else NOT_SERVING)

    def _run(self) -> None:
        with grpc.insecure_channel(self._address) as channel:
            while not self._stop.is_set():
                reason = self.check_once(channel)
                healthy = not reason
                if healthy != self.healthy:
                    if reason:
                        log.warning("health port now NOT_SERVING: %s", reason)
                    else:
                        log.info("main port answers again; health port mirrors it")
                    self.healthy, self.reason = healthy, reason
                    self.publish()
                self._stop.wait(self._period)
