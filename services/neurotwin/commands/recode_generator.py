"""``neurotwin recode-generator --generator NAME[:VERSION] --code-layer K --out NEW_NAME``.

Stores a trained DCGAN prior again with synthesis working on a deeper code (see
``DCGANGenerator``'s ``code_layer``): same weights and images, a different latent space, so it is a new
model name rather than a new version of the source (clients that send latents must not be surprised).
``--generator`` may also be a folder (``<store>/generators/NAME`` or ``.../NAME/VERSION``); the old
positional SOURCE folder still works, with a notice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neurotwin.commands._options import (
    add_generator,
    add_model_store,
    generator_ref,
    output_folder,
    parse_model_ref,
    store_root,
)
from neurotwin.store import GENERATORS

HELP = "store a trained DCGAN prior with synthesis on a deeper code layer"


def configure(parser: argparse.ArgumentParser) -> None:
    add_generator(parser, help="source generator NAME[:VERSION] in the store, or its folder")
    parser.add_argument("legacy_source", nargs="?", default=None, help=argparse.SUPPRESS)
    add_model_store(parser, legacy=False)
    parser.add_argument(
        "--code-layer",
        type=int,
        required=True,
        help="0: the input noise; k >= 1: the activations after hidden layer k (1 = the projection)",
    )
    parser.add_argument(
        "--out", required=True, help="NEW_NAME (in --model-store), or <store>/generators/NEW_NAME"
    )
    parser.add_argument("--description", default="", help="card description (default: derived)")


def _source_folder(args: argparse.Namespace) -> Path:
    """``<store>/generators/NAME`` or ``.../NAME/VERSION`` for the source generator."""
    from neurotwin.errors import InvalidInput

    if args.legacy_source is not None:
        if args.generator is not None:
            raise InvalidInput("give the source once, as --generator NAME[:VERSION]")
        print("neurotwin: a positional SOURCE is deprecated; use --generator", file=sys.stderr)
        args.generator = parse_model_ref(args.legacy_source)
    ref = generator_ref(args)
    if ref is None:
        raise InvalidInput("--generator NAME[:VERSION] is required")
    path = Path(ref.name)
    if ref.version is None and ("/" in ref.name or path.is_dir()):
        return path
    base = path if "/" in ref.name else Path(store_root(args)) / GENERATORS / ref.name
    return base / str(ref.version) if ref.version is not None else base


def run(args: argparse.Namespace) -> int:
    from neurotwin.errors import InvalidInput
    from neurotwin.runtimes.generators import DCGANGenerator, load_generator
    from neurotwin.training.gan import generator_target, store_generator

    # SOURCE is <store>/generators/NAME or <store>/generators/NAME/VERSION.
    path = _source_folder(args)
    args.out = output_folder(args, GENERATORS)
    pinned = int(path.name) if path.name.isdigit() else None
    model_dir = path.parent if pinned is not None else path
    source_store, source_name = generator_target(model_dir)
    folder = source_store.resolve(GENERATORS, source_name, pinned).path
    target_store, name = generator_target(args.out)
    if (target_store.root / GENERATORS / name).resolve() == model_dir.resolve():
        raise InvalidInput("--out must name a new model: a different latent space is not a new version")
    source = load_generator(folder)
    if not isinstance(source, DCGANGenerator):
        raise InvalidInput(f"{folder}: {type(source).__name__} has no code layers (DCGANGenerator only)")
    recoded = DCGANGenerator(**{**source.hyperparameters(), "code_layer": args.code_layer})
    recoded.load_state_dict(source.state_dict())
    recoded.eval().requires_grad_(False)
    source_card = source.card
    assert source_card is not None
    description = args.description or source_card.description
    if args.code_layer and not args.description:
        description += f"; synthesis on the {recoded.latent_dim}-d code after hidden layer {args.code_layer}"
    prior = recoded.latent_prior()
    version = store_generator(
        args.out,
        recoded,
        description=description,
        training={
            **source_card.training,
            "recoded_from": {"name": source_name, "version": int(folder.name), "code_layer": args.code_layer},
        },
        metrics=source_card.metrics,
        latent_prior=prior,
    )
    print(f"wrote {version} from {folder}: latent {recoded.latent_dim}-d, prior {json.dumps(prior)}")
    return 0
