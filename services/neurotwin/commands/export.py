"""``neurotwin export torchserve --model NAME[:VERSION]``: package a stored twin as a TorchServe model
archive (.mar).

The archive holds the twin's ONNX graph, its card, a ``model-config.yaml`` with TorchServe's batching
and worker settings, ``requirements.txt`` (the handler's own packages, which TorchServe installs with
``install_py_dep_per_model=true``), and ``neurotwin/training/torchserve_handler.py``, which runs the
graph with ONNX Runtime and answers with the same rates as ``neurotwin serve predictor``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from neurotwin.commands._options import (
    add_model,
    add_model_store,
    model_ref,
    open_store,
    parse_model_ref,
    resolve,
    subparser_options,
)
from neurotwin.errors import FailedPrecondition, InvalidInput
from neurotwin.store import PREDICTORS, ModelStore, validate_predictor

HELP = "export a twin to other serving systems (TorchServe)"
HANDLER_MODULE = "neurotwin.training.torchserve_handler"
# What the handler imports beyond the standard library (TorchServe's worker itself also needs torch
# and pyyaml, which its wheel does not declare: deploy/README.md lists the full set).
HANDLER_REQUIREMENTS = ("numpy>=1.26", "Pillow>=10", "onnxruntime>=1.18")


def configure(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    ts = targets.add_parser(
        "torchserve",
        help="write <out>/<name>.mar for TorchServe",
        description="Package a stored twin as a TorchServe model archive (.mar).",
        **subparser_options(),
    )
    add_model(ts, required=False)
    # The old positional MODEL, kept for scripts (with a notice; see run()).
    ts.add_argument("legacy_model", nargs="?", type=parse_model_ref, default=None, help=argparse.SUPPRESS)
    add_model_store(ts)
    ts.add_argument("--out", default=None, help="folder for the .mar (default: <store>/torchserve)")
    ts.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default 8)")
    ts.add_argument(
        "--max-batch-delay-ms", type=int, default=5, help="TorchServe maxBatchDelay in ms (default 5)"
    )
    ts.add_argument("--workers", type=int, default=1, help="min and max workers per model (default 1)")
    ts.add_argument(
        "--response-timeout", type=int, default=30, help="TorchServe responseTimeout in s (default 30)"
    )


def handler_path() -> Path:
    spec = importlib.util.find_spec(HANDLER_MODULE)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(f"cannot find {HANDLER_MODULE}")
    return Path(spec.origin)


def model_config(batch_size: int, max_batch_delay_ms: int, workers: int, response_timeout: int) -> str:
    """TorchServe's per-model YAML (read from the archive since TorchServe 0.8)."""
    for name, value in (
        ("batch size", batch_size),
        ("workers", workers),
        ("response timeout", response_timeout),
    ):
        if value < 1:
            raise InvalidInput(f"{name} must be at least 1, got {value}")
    if max_batch_delay_ms < 0:
        raise InvalidInput(f"max batch delay must be >= 0, got {max_batch_delay_ms}")
    return (
        f"minWorkers: {workers}\n"
        f"maxWorkers: {workers}\n"
        f"batchSize: {batch_size}\n"
        f"maxBatchDelay: {max_batch_delay_ms}\n"
        f"responseTimeout: {response_timeout}\n"
    )


def export_torchserve(
    store_root: str | os.PathLike[str],
    name: str,
    version: int | None = None,
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    max_batch_delay_ms: int = 5,
    workers: int = 1,
    response_timeout: int = 30,
) -> Path:
    """Write ``<out>/<name>.mar`` and return its path."""
    if importlib.util.find_spec("model_archiver") is None:
        raise FailedPrecondition("torch-model-archiver is not installed (pip install torch-model-archiver)")
    store = ModelStore(store_root)
    model = store.resolve(PREDICTORS, name, version)
    validate_predictor(model)
    out_dir = Path(out) if out is not None else store.root / "torchserve"
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = model_config(batch_size, max_batch_delay_ms, workers, response_timeout)
    # Staged beside the target so the final rename is atomic: a TorchServe watching the folder
    # never loads half an archive.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        config_file = staging / "model-config.yaml"
        config_file.write_text(config_text)
        requirements = staging / "requirements.txt"
        requirements.write_text("".join(f"{line}\n" for line in HANDLER_REQUIREMENTS))
        # The archiver copies its inputs to $TMPDIR/<model name>; a private TMPDIR keeps two
        # exports of the same name (parallel tests, two users) from trampling each other.
        scratch = staging / "tmp"
        scratch.mkdir()
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            model.name,
            "--version",
            str(model.version),
            "--serialized-file",
            str(model.model_path),
            "--handler",
            str(handler_path()),
            "--extra-files",
            str(model.card_path),
            "--config-file",
            str(config_file),
            "--requirements-file",
            str(requirements),
            "--export-path",
            str(staging),
            "--force",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)}
        )
        built = staging / f"{model.name}.mar"
        if result.returncode != 0 or not built.is_file():
            output = (result.stderr or result.stdout).strip()
            raise FailedPrecondition(f"torch-model-archiver failed ({result.returncode}): {output}")
        target = out_dir / f"{model.name}.mar"
        built.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run(args: argparse.Namespace) -> int:
    if args.legacy_model is not None:
        if args.model is not None:
            raise InvalidInput("give the twin once, as --model NAME[:VERSION]")
        print("neurotwin: 'export torchserve MODEL' is deprecated; use --model MODEL", file=sys.stderr)
        args.model = args.legacy_model
    ref = model_ref(args)
    if ref is None:
        raise InvalidInput("--model NAME[:VERSION] is required")
    store = open_store(args, (PREDICTORS,))
    resolve(store, PREDICTORS, ref)
    path = export_torchserve(
        store.root,
        ref.name,
        version=ref.version,
        out=args.out,
        batch_size=args.batch_size,
        max_batch_delay_ms=args.max_batch_delay_ms,
        workers=args.workers,
        response_timeout=args.response_timeout,
    )
    print(path)
    return 0
