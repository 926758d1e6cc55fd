"""``neurotwin register MODEL.onnx --model NAME``: import an ONNX predictor trained elsewhere.

The graph must take uint8 images [N, H, W, 3] and return float rates [N, K] (opset >= 17). Its card is
written from the graph; with ``--images`` it also gets per-neuron predicted max and 99th percentile over
those images (the reference the synthesizer compares stimuli against).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neurotwin.commands._options import add_alias, add_model_store, parse_model_ref, store_root
from neurotwin.errors import InvalidInput
from neurotwin.store import ModelStore

HELP = "import an ONNX predictor trained elsewhere as a new store version"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="MODEL.onnx", help="ONNX graph: uint8 [N, H, W, 3] -> float [N, K]")
    parser.add_argument(
        "--model",
        type=parse_model_ref,
        default=None,
        metavar="NAME",
        help="twin name in the store (the next version of it is written)",
    )
    add_alias(parser, "--name", "model", "--model NAME", type=parse_model_ref)
    add_model_store(parser, "model store root to add the twin to")
    parser.add_argument("--images", default=None, help="folder or zip of reference images (natural stimuli)")
    parser.add_argument(
        "--neuron-ids",
        default=None,
        help="comma-separated ids, or a text file with one per line (default: those of an embedded card, "
        "else NAME_<k>)",
    )
    parser.add_argument(
        "--size", default=None, help="HxW input size when the graph's is dynamic (e.g. 112x112)"
    )
    parser.add_argument("--description", default="", help="free text for the card")
    parser.add_argument("--units", default=None, help="response units (default: spikes per 100 ms window)")


def _neuron_ids(text: str | None) -> list[str] | None:
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [part.strip() for part in text.split(",") if part.strip()]


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    height, sep, width = text.lower().partition("x")
    try:
        size = (int(height), int(width)) if sep else (int(height), int(height))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise InvalidInput(f"--size {text!r}: expected HxW, e.g. 112x112")
    return size


def run(args: argparse.Namespace) -> int:
    from neurotwin.training.register import register_onnx

    if args.model is None:
        raise InvalidInput("--model NAME is required (the twin's name in the store)")
    if args.model.version is not None:
        raise InvalidInput(f"--model {args.model}: register adds the next version; give the name alone")
    version, card = register_onnx(
        args.file,
        name=args.model.name,
        store=ModelStore(store_root(args)),
        images=args.images,
        neuron_ids=_neuron_ids(args.neuron_ids),
        size=_size(args.size),
        description=args.description,
        units=args.units,
    )
    stats = "" if card.neuron_stats is None else f", statistics over {card.neuron_stats.image_count} images"
    print(
        f"registered {args.file} as {version}: {card.neuron_count} neurons, "
        f"input {card.input.height}x{card.input.width}{stats}"
    )
    print(f"  wrote {version.model_path} and {version.card_path}")
    return 0
