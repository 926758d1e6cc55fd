"""One grammar across every ``neurotwin`` command, and one clear line for the faults users make.

The parsers are built as the CLI builds them and walked: no prefix matching anywhere, the same
spelling for the store, twins and generators, old spellings hidden and announced. Faults run for real:
missing and empty stores, unknown models and versions, unreadable images, nothing at --address, ports
in use (the serve cases in a child process, since serve installs signal handlers).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from neurotwin.cli import COMMANDS, build_parser, main
from neurotwin.commands._options import ModelRef, parse_model_ref
from neurotwin.imagecodec import encode_png

from tests._models import make_predictor, random_images
from tests._serving import predictor_server

NEUROTWIN = str(Path(sys.executable).parent / "neurotwin")
# (command, nested target) -> what it must take
READS_STORE = {
    "train",
    "evaluate",
    "register",
    "models",
    "train-generator",
    "recode-generator",
    "serve",
    "synthesize",
    "synthesize-all",
    "rig-sim",
    "export torchserve",
}
NAMES_A_TWIN = {
    *("evaluate", "register", "predict", "synthesize", "synthesize-all", "rig-sim", "export torchserve"),
}
NAMES_A_GENERATOR = {"synthesize", "synthesize-all", "rig-sim", "recode-generator"}
OLD_SPELLINGS = {
    "--store",
    "--twin",
    "--version",
    "--model-version",
    "--generator-version",
    "--name",
    "--guide-twin",
}


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, and nested ones (``export torchserve``), configured as the CLI does."""
    for name in COMMANDS:
        top, _ = build_parser([name])
        yield "", top
        stack = [(name, _subparsers(top)[name])]
        while stack:
            label, parser = stack.pop()
            yield label, parser
            for child, nested in _subparsers(parser).items():
                stack.append((f"{label} {child}", nested))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in parser._actions for flag in a.option_strings if a.help != argparse.SUPPRESS}


def _hidden(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for a in parser._actions for flag in a.option_strings if a.help == argparse.SUPPRESS}


def test_every_parser_follows_the_grammar() -> None:
    seen = set()
    for label, parser in _parsers():
        assert parser.allow_abbrev is False, f"{label or 'neurotwin'}: prefixes must not match"
        if not label:
            continue
        seen.add(label)
        options = _options(parser)
        assert not OLD_SPELLINGS & set(options), f"{label}: old spellings stay hidden"
        if label in READS_STORE:
            assert "--model-store" in options, f"{label}: --model-store"
        if label in NAMES_A_TWIN:
            assert options["--model"].type is parse_model_ref, f"{label}: --model NAME[:VERSION]"
        if label in NAMES_A_GENERATOR:
            assert options["--generator"].type is parse_model_ref, f"{label}: --generator NAME[:VERSION]"
        if "--address" in options:
            assert {"--token", "--tls-ca"} <= set(options), f"{label}: a client's connection flags"
    assert seen >= READS_STORE | NAMES_A_TWIN | {"export-session"}
    rig_sim = dict(_parsers())["rig-sim"]
    assert {"--twin", "--guide-twin"} <= _hidden(rig_sim)


def test_model_references() -> None:
    assert parse_model_ref("v4-201025") == ModelRef("v4-201025")
    assert parse_model_ref("v4-201025:3") == ModelRef("v4-201025", 3)
    assert str(ModelRef("a", 2)) == "a:2"
    assert parse_model_ref("model_store/predictors/x") == ModelRef("model_store/predictors/x")
    assert parse_model_ref("store/predictors/x:2") == ModelRef("store/predictors/x", 2)
    for bad in ("", "x:", "x:0", "x:latest", ":3", "bad:name:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_model_ref(bad)


def test_prefixes_are_errors_and_old_spellings_announce_themselves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's old failure: --model silently becoming --model-store.
    for argv in (["rig-sim", "--mod", "x"], ["models", "--model-st", str(tmp_path)], ["--verb", "models"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()
    assert main(["models", "--store", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "neurotwin: --store is deprecated; use --model-store\n"
    assert str(tmp_path) in captured.out and "(empty)" in captured.out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    make_predictor(root, "tiny", neurons=4, size=32)
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"neurotwin {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_common_faults_are_one_line(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert main(["models", "--model-store", str(missing)]) == 1
    assert f"model store {missing} does not exist" in _one_line(capsys, "models")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "torchserve", "--model", "tiny", "--model-store", str(empty)]) == 1
    assert "holds no predictors" in _one_line(capsys, "export")

    assert main(["export", "torchserve", "--model", "nope", "--model-store", str(store)]) == 1
    assert "no predictor named 'nope'" in (line := _one_line(capsys, "export")) and "(it has: tiny)" in line
    assert main(["export", "torchserve", "--model", "tiny:9", "--model-store", str(store)]) == 1
    assert "has no version 9" in _one_line(capsys, "export")

    closed = f"127.0.0.1:{_closed_port()}"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert main(["predict", str(broken), "--model", "tiny", "--address", closed]) == 1
    assert str(broken) in _one_line(capsys, "predict")
    assert main(["predict", str(tmp_path / "absent.png"), "--model", "tiny", "--address", closed]) == 1
    assert "absent.png: cannot read" in _one_line(capsys, "predict")

    good = tmp_path / "good.png"
    good.write_bytes(encode_png(random_images(1, 32)[0]))
    assert main(["predict", str(good), "--model", "tiny", "--address", closed, "--timeout", "5"]) == 1
    assert f"no neurotwin server reachable at {closed}" in _one_line(capsys, "predict")
    argv = ["rig-sim", "--model", "tiny", "--model-store", str(store), "--address", closed]
    assert main(argv) == 1
    assert f"no neurotwin server reachable at {closed}: no answer within" in _one_line(capsys, "rig-sim")
    assert main(["rig-sim", "--model", "absent", "--model-store", str(store)]) == 1
    assert "no predictor named 'absent'" in _one_line(capsys, "rig-sim")


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NEUROTWIN, "serve", *args], capture_output=True, text=True, timeout=120)


def test_serve_start_up_faults_are_one_line(store: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _serve("all", "--model-store", str(tmp_path / "empty"), "--port", "0", "--metrics-port", "-1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "holds no predictors" in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for flags, expected in (
            (("--port", port, "--metrics-port", "-1"), f"cannot listen on 127.0.0.1:{port} for gRPC"),
            (("--port", "0", "--metrics-port", port), f"cannot listen on 127.0.0.1:{port} for metrics"),
        ):
            result = _serve("predictor", "--model-store", str(store), "--predictor-poll-seconds", "0", *flags)
            errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
            assert result.returncode == 1 and len(errors) == 1, result.stderr
            assert errors[0].startswith("neurotwin serve: error: ") and expected in errors[0]
            assert "Traceback" not in result.stderr


def test_predict_prints_the_units(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(encode_png(random_images(1, 32)[0]))
    with predictor_server(store) as (server, _):
        address = f"127.0.0.1:{server.port}"
        assert main(["predict", str(image), "--model", "tiny:1", "--address", address]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert header.startswith("model tiny v1: predicted rates in spikes per 100 ms window")
        assert main(["predict", str(image), "--model", "tiny", "--address", address, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["units"] == "spikes per 100 ms window"
