"""``neurotwin recode-generator SOURCE --code-layer K --out model_store/generators/NAME``.

Stores a trained DCGAN prior again with synthesis working on a deeper code (see
``DCGANGenerator``'s ``code_layer``): same weights and images, a different latent space, so it is a new
model name rather than a new version of the source (clients that send latents must not be surprised).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "store a trained DCGAN prior with synthesis on a deeper code layer"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model_store/generators/NAME (latest version) or .../NAME/VERSION")
    parser.add_argument(
        "--code-layer",
        type=int,
        required=True,
        help="0: the input noise; k >= 1: the activations after hidden layer k (1 = the projection)",
    )
    parser.add_argument("--out", required=True, help="model_store/generators/NAME for the new model")
    parser.add_argument("--description", default="", help="card description (default: derived)")


def run(args: argparse.Namespace) -> int:
    from neurotwin.errors import InvalidInput
    from neurotwin.runtimes.generators import DCGANGenerator, load_generator
    from neurotwin.store import GENERATORS
    from neurotwin.training.gan import generator_target, store_generator

    # SOURCE is <store>/generators/NAME or <store>/generators/NAME/VERSION.
    path = Path(args.source)
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
