"""Shared by the dashboard tests: a real server (closed loop over gRPC, HTTP listener with the
dashboard) on loopback, plain HTTP requests that do not follow redirects, and a rig's generation."""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from neurotwin.client.closed_loop import ClosedLoopClient
from neurotwin.engines.closed_loop import ClosedLoopEngine
from neurotwin.server import closed_loop as service
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings

from tests._closed_loop import GENERATOR, NEURONS

TOKEN = "dashboard-test-token"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    # Every Set-Cookie header (http.client joins repeated headers in `headers`).
    cookies: list[str]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Served:
    server: GrpcServer
    engine: ClosedLoopEngine
    client: ClosedLoopClient
    token: str | None

    @property
    def http_port(self) -> int:
        assert self.server.http_port is not None
        return self.server.http_port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        bearer: bool = False,
    ) -> Reply:
        headers = dict(headers or {})
        if bearer:
            assert self.token is not None
            headers["Authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                data,
                response.msg.get_all("Set-Cookie") or [],
            )
        finally:
            connection.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)


@contextlib.contextmanager
def dashboard_server(
    store_root: Path, journal: str | Path, token: str | None = TOKEN, **closed_loop: Any
) -> Iterator[Served]:
    """Closed loop + HTTP (with the dashboard) on free ports; ``token`` None runs without auth."""
    server = GrpcServer(
        ServerSettings(
            port=0, metrics_port=-1, http_port=0, grace_seconds=2, auth_tokens=[token] if token else []
        )
    )
    # Summaries follow every Tell at once here (the default waits up to a second between them).
    options = {
        "default_generator": GENERATOR,
        "max_sessions": 8,
        "dashboard_refresh_seconds": 0,
        **closed_loop,
    }
    engine = service.attach(
        server, service.Settings(model_store=str(store_root), journal=str(journal), **options)
    )
    server.start()
    client = ClosedLoopClient(
        f"127.0.0.1:{server.port}", timeout=30, retries=2, retry_delay=0.05, token=token
    )
    try:
        yield Served(server, engine, client, token)
    finally:
        client.close()
        server.stop(0)


def tell_generation(client: ClosedLoopClient, session_id: str, seed: int, repeats: int = 2) -> int:
    """One generation as a rig runs it: Ask, then Tell responses of every stimulus; its number."""
    generation = client.ask(session_id)
    rng = np.random.default_rng([seed, generation.generation])
    responses = {
        s.stimulus_id: rng.poisson(5.0, (repeats, NEURONS)).astype(np.float32) for s in generation.stimuli
    }
    client.tell(session_id, generation.generation, responses)
    return generation.generation
