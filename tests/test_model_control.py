"""Explicit model control (Triton's repository load/unload) with unmodified tritonclient, over gRPC
and HTTP: token-protected, off unless enabled, and how it meets the version policy (a load serves
the versions the policy selects at that moment; nothing is polled in between).

tritonclient runs in subprocesses (see test_kserve); each run performs a list of steps and reports
their outcomes as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from neurotwin.errors import InvalidInput
from neurotwin.server import predictor
from neurotwin.server.common import GrpcServer
from neurotwin.server.config import ServerSettings

from tests._models import make_broken_predictor, make_predictor
from tests._serving import predictor_server

TOKEN = "model-control-token"

STEPS_SCRIPT = r"""
import json, sys
import numpy as np
protocol, url, token, steps = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if protocol == "grpc":
    import tritonclient.grpc as triton
else:
    import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

client = triton.InferenceServerClient(url=url)
images = np.zeros((1, 32, 32, 3), np.uint8)
results = []
for action, model, with_token in steps:
    headers = {"authorization": f"Bearer {token}"} if with_token else {}
    try:
        if action == "load":
            client.load_model(model, headers=headers)
            value = "ok"
        elif action == "unload":
            client.unload_model(model, headers=headers)
            value = "ok"
        elif action == "ready":
            value = client.is_model_ready(model, headers=headers)
        elif action == "index":
            if protocol == "grpc":
                rows = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
            else:
                rows = client.get_model_repository_index(headers=headers)
            value = sorted([r["name"], r.get("version", ""), r.get("state", "")] for r in rows)
        elif action == "infer":
            tensor = triton.InferInput("images", [1, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(images)
            result = client.infer(model, [tensor], headers=dict(headers))
            response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
            value = response["model_version"]
        results.append(["ok", value])
    except InferenceServerException as exc:
        results.append(["error", str(exc.status()), exc.message()])
print(json.dumps(results))
"""


def run_steps(protocol: str, server: GrpcServer, steps: list[tuple[str, str, bool]]) -> list[list[Any]]:
    port = server.port if protocol == "grpc" else server.http_port
    run = subprocess.run(
        [sys.executable, "-c", STEPS_SCRIPT, protocol, f"127.0.0.1:{port}", TOKEN, json.dumps(steps)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


UNAUTHENTICATED = {"grpc": "StatusCode.UNAUTHENTICATED", "http": "401"}
NOT_FOUND = {"grpc": "StatusCode.NOT_FOUND", "http": "404"}
FAILED = {"grpc": "StatusCode.FAILED_PRECONDITION", "http": "400"}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_explicit_load_unload_and_version_policy(protocol: str, tmp_path: Path) -> None:
    make_predictor(tmp_path, "tiny")
    make_predictor(tmp_path, "other", neurons=3)
    server = {"http_port": 0, "auth_tokens": [TOKEN]}
    with predictor_server(tmp_path, server=server, model_control="explicit", poll_seconds=1) as (
        grpc_server,
        _,
    ):
        results = run_steps(
            protocol,
            grpc_server,
            [
                ("unload", "tiny", False),  # no token
                ("load", "tiny", False),
                ("unload", "tiny", True),
                ("ready", "tiny", True),
                ("infer", "tiny", True),
                ("index", "", True),
                ("ready", "other", True),  # the others keep serving
                ("unload", "tiny", True),  # already unloaded
                ("load", "nope", True),
                ("load", "tiny", True),
                ("infer", "tiny", True),
            ],
        )
        assert results[0][:2] == ["error", UNAUTHENTICATED[protocol]]
        assert results[1][:2] == ["error", UNAUTHENTICATED[protocol]]
        assert results[2] == ["ok", "ok"]
        assert results[3] == ["ok", False]
        assert results[4][:2] == ["error", NOT_FOUND[protocol]]
        assert results[5] == ["ok", [["other", "1", "READY"], ["tiny", "", "UNAVAILABLE"]]]
        assert results[6] == ["ok", True]
        assert results[7][:2] == ["error", NOT_FOUND[protocol]]
        assert results[8][:2] == ["error", NOT_FOUND[protocol]] and "no model named 'nope'" in results[8][2]
        assert results[9] == ["ok", "ok"]
        assert results[10] == ["ok", "1"]

        # A new version in the store is not picked up by polling (poll_seconds is ignored in
        # explicit mode): the next load applies the version policy (latest:1) to the store.
        make_predictor(tmp_path, "tiny", version=2, seed=1)
        make_broken_predictor(tmp_path, "other", version=2)
        time.sleep(1.5)  # longer than poll_seconds: a poll, if one ran, would have swapped v2 in
        results = run_steps(
            protocol,
            grpc_server,
            [
                ("infer", "tiny", True),
                ("load", "tiny", True),
                ("infer", "tiny", True),
                ("load", "other", True),  # v2 is refused: v1 keeps serving
                ("infer", "other", True),
            ],
        )
        assert results[0] == ["ok", "1"]
        assert results[1] == ["ok", "ok"]
        assert results[2] == ["ok", "2"]
        assert results[3] == ["ok", "ok"]
        assert results[4] == ["ok", "1"]


def test_a_model_with_no_loadable_version_fails_to_load(tmp_path: Path) -> None:
    make_predictor(tmp_path, "tiny")
    server = {"http_port": 0, "auth_tokens": [TOKEN]}
    with predictor_server(tmp_path, server=server, model_control="explicit") as (grpc_server, _):
        make_broken_predictor(tmp_path, "broken")
        results = run_steps("http", grpc_server, [("load", "broken", True), ("ready", "broken", True)])
    assert results[0][:2] == ["error", FAILED["http"]]
    assert "no version could be loaded" in results[0][2] and "v1:" in results[0][2]
    assert results[1] == ["ok", False]


def test_explicit_model_control_needs_tokens(tmp_path: Path) -> None:
    make_predictor(tmp_path, "tiny")
    server = GrpcServer(ServerSettings(port=0, metrics_port=-1))
    settings = predictor.Settings(model_store=str(tmp_path), model_control="explicit", poll_seconds=0)
    with pytest.raises(InvalidInput, match="set auth tokens"):
        predictor.attach(server, settings)
    with pytest.raises(InvalidInput, match="expected 'poll' or 'explicit'"):
        predictor.attach(server, predictor.Settings(model_store=str(tmp_path), model_control="manual"))
