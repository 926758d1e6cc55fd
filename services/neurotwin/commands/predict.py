"""``neurotwin predict IMAGE... --model NAME``: firing rates for image files from a running service."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from neurotwin.errors import InvalidInput

HELP = "predict firing rates for image files through a running service"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="PNG or JPEG files at the model's input size"
    )
    parser.add_argument("--model", required=True, help="predictor name")
    parser.add_argument("--version", type=int, default=None, help="model version (default: newest served)")
    parser.add_argument(
        "--address",
        default=os.environ.get("NEUROTWIN_ADDRESS", "127.0.0.1:8001"),
        help="server host:port (default $NEUROTWIN_ADDRESS or 127.0.0.1:8001)",
    )
    parser.add_argument(
        "--neurons",
        nargs="+",
        default=None,
        metavar="NEURON",
        help="neuron ids, or 0-based indices, to return (default: all)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) to trust; implies TLS")
    parser.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", help="client key (PEM) for mutual TLS")
    parser.add_argument(
        "--token",
        default=os.environ.get("NEUROTWIN_TOKEN"),
        help="bearer token (default $NEUROTWIN_TOKEN)",
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


def run(args: argparse.Namespace) -> int:
    from neurotwin.client import ChannelConfig, PredictorClient

    encoded: list[bytes] = []
    for name in args.images:
        try:
            encoded.append(Path(name).read_bytes())
        except OSError as exc:
            raise InvalidInput(f"{name}: {exc}") from exc
    config = ChannelConfig(
        address=args.address,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
    )
    with PredictorClient(config=config, timeout=args.timeout) as client:
        if args.resize:
            details = client.get_model(args.model, args.version)
            encoded = [
                _fit(data, name, details.input_height, details.input_width)
                for data, name in zip(encoded, args.images, strict=True)
            ]
        result = client.predict(
            encoded, model=args.model, version=args.version, neurons=_neurons(args.neurons)
        )
    if args.json:
        payload = {
            "model": result.model,
            "version": result.version,
            "neuron_ids": result.neuron_ids,
            "images": list(args.images),
            "rates": result.rates.tolist(),
        }
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        header = (
            f"model {result.model} v{result.version}: predicted rates, "
            f"{len(result.neuron_ids)} neurons x {len(args.images)} images"
        )
        print(format_table(list(args.images), result.neuron_ids, result.rates, header))
    return 0
