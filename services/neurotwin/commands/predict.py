"""``neurotwin predict IMAGE... --model NAME[:VERSION]``: firing rates for image files from a running
service, with their units (the model card's ``output.units``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neurotwin.commands._options import add_connection, add_model, channel_config, default_address, model_ref
from neurotwin.errors import InvalidInput

HELP = "predict firing rates for image files through a running service"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="PNG or JPEG files at the model's input size"
    )
    add_model(parser, help="twin NAME[:VERSION] (no version: the newest the server serves)")
    add_connection(
        parser,
        "server HOST:PORT (default: $NEUROTWIN_ADDRESS, else 127.0.0.1:8001)",
        default_address(),
    )
    parser.add_argument(
        "--neurons",
        nargs="+",
        default=None,
        metavar="NEURON",
        help="neuron ids, or 0-based indices, to return (default: all)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--resize",
        action="store_true",
        help="resize each image here to the model's input size (bilinear); the service itself takes "
        "only that size",
    )


def _neurons(values: list[str] | None) -> list[str] | list[int] | None:
    if not values:
        return None
    # All-digit arguments are indices; anything else is read as neuron ids.
    if all(v.isdigit() for v in values):
        return [int(v) for v in values]
    return values


def format_table(names: list[str], neuron_ids: list[str], rates: object, header: str) -> str:
    """Neurons down, images across: a table stays readable for many neurons and a few images."""
    labels = [Path(n).name for n in names]
    labels = [label if len(label) <= 16 else label[:7] + ".." + label[-7:] for label in labels]
    width = max(10, *(len(label) for label in labels))
    id_width = max(6, *(len(n) for n in neuron_ids))
    lines = [header, f"{'neuron':<{id_width}}  " + "  ".join(f"{label:>{width}}" for label in labels)]
    for k, neuron in enumerate(neuron_ids):
        row = "  ".join(f"{float(rates[i][k]):>{width}.4f}" for i in range(len(labels)))
        lines.append(f"{neuron:<{id_width}}  {row}")
    return "\n".join(lines)


def _fit(data: bytes, name: str, height: int, width: int) -> bytes:
    from neurotwin.imagecodec import decode_image, encode_png, resize_uint8

    return encode_png(resize_uint8(decode_image(data, what=name), height, width))


def _read_images(names: list[str]) -> list[bytes]:
    """The files' bytes, each checked to decode here, so a bad file is named rather than numbered."""
    from neurotwin.imagecodec import decode_image

    encoded = []
    for name in names:
        try:
            data = Path(name).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{name}: cannot read ({exc.strerror or exc})") from exc
        decode_image(data, what=name)
        encoded.append(data)
    return encoded


def run(args: argparse.Namespace) -> int:
    from neurotwin.client import PredictorClient

    ref = model_ref(args)
    assert ref is not None  # --model is required
    encoded = _read_images(args.images)
    with PredictorClient(config=channel_config(args), timeout=args.timeout) as client:
        # The card travels with the model's details: its units label the rates.
        details = client.get_model(ref.name, ref.version)
        if args.resize:
            encoded = [
                _fit(data, name, details.input_height, details.input_width)
                for data, name in zip(encoded, args.images, strict=True)
            ]
        result = client.predict(encoded, model=ref.name, version=ref.version, neurons=_neurons(args.neurons))
    units = details.card.output.units
    if args.json:
        payload = {
            "model": result.model,
            "version": result.version,
            "units": units,
            "neuron_ids": result.neuron_ids,
            "images": list(args.images),
            "rates": result.rates.tolist(),
        }
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        header = (
            f"model {result.model} v{result.version}: predicted rates in {units}, "
            f"{len(result.neuron_ids)} neurons x {len(args.images)} images"
        )
        print(format_table(list(args.images), result.neuron_ids, result.rates, header))
    return 0
