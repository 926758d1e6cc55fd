"""``neurotwin recode-generator SOURCE --code-layer K --out model_store/generators/NAME``.

Stores a trained DCGAN prior again with synthesis working on a deeper code (see
``DCGANGenerator``'s ``code_layer``): same weights and images, a different latent space, so it is a new
model name rather than a new version of the source (clients that send latents must not be surprised).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
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


def _source_version(source: str) -> Path:
    from neurotwin.errors import NotFound

    path = Path(source)
    if path.name.isdigit() and path.is_dir():
        return path
    versions = sorted((int(p.name) for p in path.glob("*") if p.name.isdigit() and p.is_dir()), reverse=True)
    if not versions:
        raise NotFound(f"{source}: no generator versions there")
    return path / str(versions[0])


def run(args: argparse.Namespace) -> int:
    from neurotwin.commands.train_generator import _store_target
    from neurotwin.errors import InvalidInput
    from neurotwin.imagecodec import encode_png
    from neurotwin.runtimes.generators import DCGANGenerator, load_generator, save_generator
    from neurotwin.store import GENERATORS, ModelStore
    from neurotwin.training.gan import sample_grid

    folder = _source_version(args.source)
    source = load_generator(folder)
    if not isinstance(source, DCGANGenerator):
        raise InvalidInput(f"{folder}: {type(source).__name__} has no code layers (DCGANGenerator only)")
    hyper = {**source.hyperparameters(), "code_layer": args.code_layer}
    recoded = DCGANGenerator(**hyper)
    recoded.load_state_dict(source.state_dict())
    recoded.eval().requires_grad_(False)
    source_card = source.card
    assert source_card is not None
    root, name = _store_target(args.out)
    if (root / GENERATORS / name).resolve() == folder.parent.resolve():
        raise InvalidInput("--out must name a new model: a different latent space is not a new version")
    prior = recoded.latent_prior()
    description = args.description or (
        f"{source_card.description}; synthesis on the {recoded.latent_dim}-d code after hidden layer "
        f"{args.code_layer}"
        if args.code_layer
        else source_card.description
    )
    training = {
        **source_card.training,
        "recoded_from": {
            "name": source_card.name,
            "version": int(folder.name),
            "code_layer": args.code_layer,
        },
    }
    store = ModelStore(root)
    with store.new_version(GENERATORS, name) as staging:
        card = save_generator(
            recoded,
            staging,
            name,
            description=description,
            training=training,
            metrics=source_card.metrics,
            latent_prior=prior,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / "samples.png").write_bytes(encode_png(sample_grid(recoded, 64, seed=0)))
    version = store.resolve(GENERATORS, name)
    print(f"wrote {version} from {folder}: latent {card.latent_dim}-d, prior {json.dumps(prior)}")
    return 0
