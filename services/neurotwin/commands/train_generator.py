"""``neurotwin train-generator IMAGES... --out NAME``: a new generator version in ``--model-store``
(or ``--out <store>/generators/NAME``)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from neurotwin.commands._options import add_model_store, output_folder
from neurotwin.store import GENERATORS

HELP = "train a natural-image GAN prior and add it to the model store"

DEFAULT_CPU_BUDGET_MIN = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="zips or folders of images (or image files)")
    parser.add_argument(
        "--out",
        required=True,
        help="generator NAME (in --model-store), or <store>/generators/NAME: where the new version goes",
    )
    add_model_store(parser, "store root when --out is a bare name", legacy=False)
    parser.add_argument("--resolution", type=int, default=64, help="output size in px (default 64)")
    parser.add_argument(
        "--width", type=int, default=64, help="channels of the last hidden layer (default 64)"
    )
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=100.0)
    parser.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop training after this many minutes "
        f"(default: none on a GPU, {DEFAULT_CPU_BUDGET_MIN:g} on a CPU)",
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        default=800,
        help="size of each of the two held-out real sets (default 800)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--description", default="")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from neurotwin.runtimes.devices import select_device
    from neurotwin.training.frechet import generator_quality
    from neurotwin.training.gan import (
        GANConfig,
        config_dict,
        generator_target,
        load_images,
        split_holdout,
        store_generator,
        train_gan,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = output_folder(args, GENERATORS)
    generator_target(args.out)  # refuse a wrong --out before training, not after
    device = select_device(args.device)
    budget_min = args.time_budget_min
    if budget_min is None and device.type == "cpu":
        budget_min = DEFAULT_CPU_BUDGET_MIN
        print(f"training on the CPU: time budget {budget_min:g} min (set --time-budget-min to change)")

    t0 = time.monotonic()
    images, names = load_images(args.images, args.resolution)
    train_idx, eval_a, eval_b = split_holdout(len(names), args.eval_images, args.seed)
    print(
        f"{len(names)} images at {args.resolution} px from {len(args.images)} source(s) in "
        f"{time.monotonic() - t0:.0f} s: {len(train_idx)} for training, 2 x {args.eval_images} held out"
    )
    config = GANConfig(
        resolution=args.resolution,
        width=args.width,
        latent_dim=args.latent_dim,
        batch_size=args.batch_size,
        epochs=args.epochs,
        time_budget_s=budget_min * 60.0 if budget_min else None,
        lr=args.lr,
        seed=args.seed,
        device=str(device),
    )
    result = train_gan(images[torch.from_numpy(train_idx)], config, progress=not args.no_progress)
    generator = result.generator
    print(
        f"trained {result.iterations} steps ({result.epochs:.2f} epochs) in "
        f"{result.wall_time_s / 60:.1f} min on {device} (stopped by {result.stopped_by})"
    )

    metrics: dict[str, object] = {}
    if args.eval_images >= 2:
        t1 = time.monotonic()
        generator.to(device)
        quality = generator_quality(
            generator, images[torch.from_numpy(eval_a)], images[torch.from_numpy(eval_b)], seed=args.seed
        )
        metrics["frechet"] = quality
        print(
            f"Frechet distance ({quality['feature_space']}, {args.eval_images} images each, "
            f"{time.monotonic() - t1:.0f} s): generated {quality['generated']:.2f}, "
            f"noise ceiling {quality['noise_ceiling']:.2f}, real floor {quality['real_floor']:.2f}"
        )
    generator.cpu()

    params = sum(p.numel() for p in generator.parameters())
    training = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "sources": [str(Path(s).name) for s in args.images],
        "image_count": len(names),
        "train_image_count": len(train_idx),
        "eval_image_count": 2 * args.eval_images,
        "time_budget_min": budget_min,
        "parameters": params,
        "loss": "hinge",
        "discriminator": "spectral norm, LeakyReLU 0.1",
        "augmentation": "horizontal flips",
        "ema_decay": config.ema_decay,
        "config": {k: v for k, v in config_dict(config).items() if k != "device"},
        "torch": torch.__version__,
        **result.info(),
    }
    description = args.description or (
        f"DCGAN prior, {args.resolution} px, width {args.width}, trained on {len(train_idx)} photos"
    )
    version = store_generator(
        args.out,
        generator,
        description=description,
        training=training,
        metrics=metrics,
        sample_seed=args.seed,
    )
    print(f"wrote {version} ({params / 1e6:.2f} M parameters) to {version.path}")
    print(json.dumps({"frechet": metrics.get("frechet"), "training": result.info()}, indent=1))
    return 0
