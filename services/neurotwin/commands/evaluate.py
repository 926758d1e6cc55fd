"""``neurotwin evaluate DATA --model NAME[:VERSION]``: score a stored ONNX twin on a recording through
ONNX Runtime.

``--model`` is a predictor name in the store (with an optional version), a model folder (its latest
version) or a version folder. The old form ``evaluate MODEL DATA`` still works, with a notice.
By default every image of the recording is scored; ``--part test`` (or val/train) uses the split recorded
in the model's card, which requires the same recording (checked by its sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from neurotwin.commands._options import add_model, add_model_store, model_ref, parse_model_ref
from neurotwin.commands.models import resolve_predictor
from neurotwin.errors import InvalidInput
from neurotwin.store import validate_predictor

HELP = "evaluate a stored twin on a recording"


def configure(parser: argparse.ArgumentParser) -> None:
    # nargs="+" only so that the old "evaluate MODEL DATA" can still be recognised (see _positionals).
    parser.add_argument(
        "data", nargs="+", metavar="DATA", help="recording (any format `neurotwin train` reads)"
    )
    add_model(
        parser,
        help="twin NAME[:VERSION] in the model store, or a model or version folder",
        required=False,
    )
    add_model_store(parser)
    parser.add_argument("--responses", default=None, help="responses .npy for a zip/folder of images")
    parser.add_argument("--session", default=None, help="session id in a sessions folder")
    parser.add_argument(
        "--part",
        choices=("all", "test", "val", "train"),
        default="all",
        help="images to score: all, or a part of the split recorded in the card (same recording only)",
    )
    parser.add_argument("--report", default=None, help="write plots and an HTML page to this folder")
    parser.add_argument("--json", action="store_true", help="print all metrics as JSON")


def run(args: argparse.Namespace) -> int:
    from neurotwin.training.datasets import load_recording
    from neurotwin.training.evaluate import headline, summarize
    from neurotwin.training.export import onnx_predict, ort_session

    _positionals(args)
    version = resolve_predictor(model_ref(args), args)
    card = validate_predictor(version)
    recording = load_recording(args.data, responses=args.responses, session=args.session)
    if recording.n_neurons != card.neuron_count:
        raise InvalidInput(
            f"{args.data} has {recording.n_neurons} neurons but {version} predicts {card.neuron_count}"
        )
    if list(recording.neuron_ids) != list(card.neuron_ids):
        print(f"note: neuron ids of {args.data} differ from the card's; matching by position")
    indices = np.arange(recording.n_images)
    if args.part != "all":
        split = card.training.get("split") or {}
        if card.training.get("sha256") != recording.sha256:
            raise InvalidInput(
                f"--part {args.part}: {args.data} is not the recording {version} was trained on "
                "(sha256 differs); use --part all"
            )
        if args.part not in split:
            raise InvalidInput(f"--part {args.part}: the card of {version} records no such split part")
        indices = np.asarray(split[args.part], dtype=np.int64)
    subset = recording.subset(indices)
    session = ort_session(version.model_path.read_bytes())
    predicted = onnx_predict(session, subset.images)
    metrics = summarize(predicted, subset.responses.T, subset.repeats, part=args.part)
    if args.json:
        print(json.dumps({"model": str(version), "data": str(args.data), "metrics": metrics}, indent=1))
    else:
        print(f"{version} on {args.data}: {headline(metrics)}")
    if args.report:
        from neurotwin.training.report import write_report

        page = write_report(
            Path(args.report),
            predicted,
            subset.responses.T,
            recording.neuron_ids,
            metrics,
            title=f"{version} on {Path(args.data).name}",
            details={"model": str(version.path), "data": str(args.data), "part": args.part},
        )
        if not args.json:
            print(f"report {page}")
    return 0


def _positionals(args: argparse.Namespace) -> None:
    """DATA alone, or the old ``MODEL DATA`` (with a notice) when --model is not given."""
    if len(args.data) == 2 and args.model is None:
        print(
            "neurotwin: 'evaluate MODEL DATA' is deprecated; use 'evaluate DATA --model MODEL'",
            file=sys.stderr,
        )
        args.model = parse_model_ref(args.data[0])
        args.data = args.data[1:]
    if len(args.data) != 1:
        raise InvalidInput(f"expected one recording, got {len(args.data)}: {' '.join(args.data)}")
    if args.model is None:
        raise InvalidInput("--model NAME[:VERSION] is required")
    args.data = args.data[0]
