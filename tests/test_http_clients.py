"""The HTTP examples of docs/HTTP.md, run as written against a real server with the bundled twin.

- The MATLAB example in GNU Octave (Debian's ``octave`` package): Octave runs the MATLAB code
  unchanged except ``webwrite``, which in Octave sends only form fields; a ``webwrite.m`` with
  MATLAB's documented behaviour for a JSON body (POST it unchanged, decode the JSON reply) stands in,
  posting with curl. The rates Octave ends up with must be the twin's for the images it built, which
  checks the row-major ordering both ways.
- The curl commands of the LabVIEW/curl note.
Both skip when octave-cli or curl is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from neurotwin.server.common import GrpcServer
from neurotwin.store import PREDICTORS, ModelStore

from tests._models import reference_rates
from tests._serving import predictor_server

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "HTTP.md"
BUNDLED = ROOT / "model_store"
DOC_URL = "http://127.0.0.1:8000"
TOKEN = "rig-token"

# MATLAB's webwrite for a char body and MediaType application/json, written for Octave.
WEBWRITE_M = r"""
function response = webwrite (url, data, options)
  body = [tempname() ".json"];
  reply = [tempname() ".json"];
  fid = fopen (body, "w");
  fwrite (fid, data);
  fclose (fid);
  headers = "";
  fields = options.HeaderFields;
  for i = 1:rows (fields)
    headers = [headers sprintf(" -H '%s: %s'", fields{i, 1}, fields{i, 2})];
  endfor
  command = sprintf ("curl -sS --fail-with-body --max-time %d -H 'Content-Type: %s'%s",
                     options.Timeout, options.MediaType, headers);
  command = [command sprintf(" --data-binary @%s -o %s '%s'", body, reply, url)];
  [status, output] = system (command);
  if (status != 0)
    error ("webwrite: %s %s", output, fileread (reply));
  endif
  response = jsondecode (fileread (reply));
endfunction
"""

# Appended to the example: what it sent and what it got, for the comparison here.
REPORT_M = r"""
fid = fopen (getenv ("RESULT_FILE"), "w");
sent = struct ("size", size (images), "images", double (images(:))', "rates", rates);
fprintf (fid, "%s", jsonencode (sent));
fclose (fid);
"""


def _code_block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"docs/HTTP.md has no {language} example"
    return match.group(1)


@pytest.fixture(scope="module")
def served() -> Iterator[GrpcServer]:
    server = {"http_port": 0, "auth_tokens": [TOKEN]}
    with predictor_server(BUNDLED, server=server) as (grpc_server, _):
        yield grpc_server


def _needs(*programs: str) -> None:
    for program in programs:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed")


def test_matlab_example_runs_in_octave(served: GrpcServer, tmp_path: Path) -> None:
    _needs("octave-cli", "curl")
    example = _code_block("matlab")
    assert DOC_URL in example
    script = example.replace(DOC_URL, f"http://127.0.0.1:{served.http_port}") + REPORT_M
    (tmp_path / "example.m").write_text(script)
    (tmp_path / "webwrite.m").write_text(WEBWRITE_M)
    result_file = tmp_path / "result.json"
    env = {**os.environ, "NEUROTWIN_TOKEN": TOKEN, "RESULT_FILE": str(result_file)}
    run = subprocess.run(
        ["octave-cli", "--norc", "--no-history", "--path", str(tmp_path), str(tmp_path / "example.m")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0 and result_file.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(result_file.read_text())
    images = np.asarray(result["images"], dtype=np.uint8).reshape(result["size"], order="F")
    assert images.shape == (2, 112, 112, 3)
    version = ModelStore(BUNDLED).resolve(PREDICTORS, "v4-201025")
    rates = np.asarray(result["rates"], dtype=np.float32)
    assert rates.shape == (2, 89)
    np.testing.assert_allclose(rates, reference_rates(version, images), rtol=1e-4, atol=1e-5)


def test_curl_commands(served: GrpcServer, tmp_path: Path) -> None:
    _needs("curl")
    images = np.random.default_rng(4).integers(0, 256, size=(1, 112, 112, 3), dtype=np.uint8)
    tensor = {
        "name": "images",
        "datatype": "UINT8",
        "shape": [1, 112, 112, 3],
        "data": images.ravel().tolist(),
    }
    (tmp_path / "request.json").write_text(json.dumps({"inputs": [tensor]}))
    commands = _code_block("bash").replace("\\\n", " ").strip().splitlines()
    assert len(commands) == 2
    env = {**os.environ, "NEUROTWIN_TOKEN": TOKEN}
    outputs = []
    for command in commands:
        command = command.replace(DOC_URL, f"http://127.0.0.1:{served.http_port}")
        run = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )
        assert run.returncode == 0, (command, run.stderr)
        outputs.append(run.stdout)
    answer = json.loads(outputs[1])
    version = ModelStore(BUNDLED).resolve(PREDICTORS, "v4-201025")
    rates = np.reshape(answer["outputs"][0]["data"], answer["outputs"][0]["shape"])
    np.testing.assert_allclose(rates, reference_rates(version, images), rtol=1e-4, atol=1e-5)
    # Without the token, curl -f fails (401).
    bare = commands[0].replace(DOC_URL, f"http://127.0.0.1:{served.http_port}")
    run = subprocess.run(
        ["bash", "-c", bare],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"NEUROTWIN_TOKEN": "wrong"},
    )
    assert run.returncode == 22, run.stderr
