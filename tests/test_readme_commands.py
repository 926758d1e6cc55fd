"""The README's commands, run as written, so the README cannot drift from the CLI again.

Every ``neurotwin ...`` / ``.venv/bin/neurotwin ...`` command in README.md's code blocks runs for real,
in README order, in a scratch folder holding a copy of the bundled model store (``./model_store``, the
default) and a ``photo.jpg``. The README's own ``serve all`` is started first and stays up for the
client commands; its ports come from ``NEUROTWIN_SERVER_PORT=0`` and ``..._METRICS_PORT=0`` (free
ports, on a shared machine), and the ``127.0.0.1:8001`` the commands name is replaced by the port it
got (``$NEUROTWIN_ADDRESS`` likewise for commands that rely on the default address). ``synthesize-all``
(every neuron of the twin: an hour on a CPU) runs as one slice of a sharded sweep, its shard count
given the way the Kubernetes Job gives it, ``$NEUROTWIN_SYNTHESIZE_ALL_SHARD_COUNT``: one neuron.

Commands on ``../shared`` data (``train ../shared/data/cowley_v4 ...``): their flags are parsed and the
recording is loaded as the command would load it, from synthetic sessions in the same layout placed at
``../shared/data/cowley_v4``; the training itself (minutes) is not run here (``test_cli_train.py``
trains for real on small data). ``neurotwin ...`` commands quoted inline in the README's prose, and
those in deploy/README.md (which need a cluster or TorchServe), are parsed by the real parser only.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from neurotwin.cli import COMMANDS, build_parser
from PIL import Image

from tests._recordings import write_session_layout

REPO = Path(__file__).resolve().parents[1]
NEUROTWIN = str(Path(sys.executable).parent / "neurotwin")
README_ADDRESS = "127.0.0.1:8001"
PROGRAMS = {"neurotwin", ".venv/bin/neurotwin"}
SHARD_COUNT_ENV = "NEUROTWIN_SYNTHESIZE_ALL_SHARD_COUNT"


def block_commands(markdown: str) -> list[list[str]]:
    """Argument lists of the neurotwin commands in fenced code blocks (continuations joined, ``&&``
    chains split, comments dropped)."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for segment in line.split("&&"):
                words = shlex.split(segment, comments=True)
                if words and words[0] in PROGRAMS:
                    commands.append(words[1:])
    return commands


def inline_commands(markdown: str) -> list[list[str]]:
    """``neurotwin ...`` spans in the prose that are whole command lines: a known command and a flag
    with a value (`neurotwin serve`, `neurotwin serve --config` or `neurotwin COMMAND --help` are
    mentions)."""
    commands = []
    for span in re.findall(r"`(neurotwin [^`]+)`", markdown):
        args = shlex.split(" ".join(span.split()))[1:]
        pairs = itertools.pairwise(args)
        if args[0] in COMMANDS and any(a.startswith("--") and not b.startswith("--") for a, b in pairs):
            commands.append(args)
    return commands


def parse(args: list[str]) -> object:
    parser, _ = build_parser(args)
    return parser.parse_args(args)


def _workspace(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "model_store", work / "model_store")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(work / "photo.jpg")
    # ../shared/data/cowley_v4 as seen from the workspace, in the real layout.
    layout = write_session_layout(tmp_path, sessions=("190925", "201025"), n_images=24, n_neurons=6, size=32)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    layout.rename(tmp_path / "shared" / "data" / "cowley_v4")
    return work


def _start_server(args: list[str], work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [NEUROTWIN, *args], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        found = re.search(r"serving .* on (\S+?):(\d+)", line)
        if found:
            return process, f"127.0.0.1:{found.group(2)}"
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"'neurotwin {' '.join(args)}' did not come up (exit {process.poll()})")


def _check_shared_data_command(args: list[str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags parse, and the recording the command names loads as the command loads it."""
    parsed = parse(args)
    if args[0] == "train":
        from neurotwin.commands.train import load_targets, parse_out

        monkeypatch.chdir(work)
        targets, helpers = load_targets(parsed)  # type: ignore[arg-type]
        assert list(targets) == ["201025"] and list(helpers) == ["190925"]
        parse_out(parsed.out, parsed.model_store)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # every README command in turn, synthesis included
def test_readme_commands_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (REPO / "model_store" / "predictors" / "v4-201025").is_dir():
        pytest.skip("the bundled model store is not in this checkout")
    commands = block_commands((REPO / "README.md").read_text())
    names = [c[0] for c in commands]
    for expected in ("serve", "train", "models", "predict", "synthesize", "rig-sim", "export-session"):
        assert expected in names, f"README shows no 'neurotwin {expected}'"
    work = _workspace(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEUROTWIN_")}
    env.update(NEUROTWIN_SERVER_PORT="0", NEUROTWIN_SERVER_METRICS_PORT="0", OMP_NUM_THREADS="1")
    server: subprocess.Popen[str] | None = None
    outputs: dict[str, str] = {}
    try:
        for args in commands:
            text = " ".join(args)
            if args[0] == "serve":
                assert server is None, "the README starts one server"
                server, address = _start_server(args, work, env)
                env["NEUROTWIN_ADDRESS"] = address
                continue
            if any(a.startswith("../shared") for a in args):
                _check_shared_data_command(args, work, monkeypatch)
                continue
            if README_ADDRESS in text:
                assert server is not None, f"'{text}' needs the README's server, started before it"
                args = [a.replace(README_ADDRESS, env["NEUROTWIN_ADDRESS"]) for a in args]
            run_env = dict(env)
            if args[0] == "synthesize-all":
                run_env[SHARD_COUNT_ENV] = "1000"
            result = subprocess.run(
                [NEUROTWIN, *args], cwd=work, env=run_env, capture_output=True, text=True, timeout=900
            )
            assert result.returncode == 0, f"neurotwin {text}\n{result.stderr[-3000:]}"
            outputs[text] = result.stdout
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert server is not None and server.returncode == 0

    predicted = next(out for text, out in outputs.items() if text.startswith("predict"))
    assert "predicted rates in spikes per 100 ms window" in predicted
    assert "v4-201025" in next(out for text, out in outputs.items() if text.startswith("models"))
    assert (work / "out" / "contact_sheet.png").is_file()
    assert len([p for p in (work / "sweep").iterdir() if p.is_dir()]) == 1, "one neuron's folder"
    for report in ("demo-report", "report"):
        assert (work / report / "index.html").is_file() and (work / report / "score_curve.png").is_file()
    assert (work / "demo.nwb").is_file() and (work / "s.nwb").is_file()
    # The README's server journaled the demo session where export-session looks by default.
    assert (work / "closed_loop_journal.sqlite3").is_file()


def test_readme_inline_and_deploy_commands_parse() -> None:
    readme = (REPO / "README.md").read_text()
    deploy = (REPO / "deploy" / "README.md").read_text()
    quoted = inline_commands(readme) + block_commands(deploy) + inline_commands(deploy)
    assert any(args[0] == "recode-generator" for args in quoted)
    assert any(args[:2] == ["export", "torchserve"] for args in quoted)
    for args in quoted:
        parse(args)


def test_extraction() -> None:
    text = (
        "x `neurotwin models --model-store a`, `neurotwin serve --config` and `neurotwin COMMAND --help`\n"
        "```bash\n.venv/bin/pip install x && .venv/bin/neurotwin serve all\n"
        "neurotwin train data --session 1 \\\n    --out y  # comment\n```\n"
    )
    assert block_commands(text) == [["serve", "all"], ["train", "data", "--session", "1", "--out", "y"]]
    assert inline_commands(text) == [["models", "--model-store", "a"]]
