"""Training the project's natural-image GAN (``DCGANGenerator``) on folders or zips of photos.

Recipe: hinge loss, spectral norm in every discriminator layer, Adam 2e-4 with betas (0, 0.9) for
both networks, random horizontal flips, an exponential moving average of the generator's weights
(the EMA copy is the one saved), and batch-norm statistics recomputed for the EMA copy at the end.
Training stops after ``epochs`` or when ``time_budget_s`` is spent, whichever comes first, so the
same command trains on a GPU in minutes or on a CPU within a set wall time.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from neurotwin.errors import DataError, InvalidInput
from neurotwin.imagecodec import decode_image, encode_png
from neurotwin.runtimes.devices import select_device
from neurotwin.runtimes.generators import DCGANGenerator, ImagePrior, save_generator, upsampling_plan
from neurotwin.store import GENERATORS, ModelStore, ModelVersion

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _iter_image_bytes(sources: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes) for every image in the given zips, folders (recursive) or files."""
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                yield str(file), file.read_bytes()
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for entry in sorted(archive.namelist()):
                    if Path(entry).suffix.lower() in IMAGE_SUFFIXES and not entry.startswith("__MACOSX"):
                        yield f"{path}:{entry}", archive.read(entry)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield str(path), path.read_bytes()
        else:
            raise DataError(path, None, "not an image folder, zip of images or image file")


def square_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """Center-crop to a square, then resize (Pillow's bicubic filter antialiases when shrinking)."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    if side == resolution:
        return np.ascontiguousarray(crop)
    resized = Image.fromarray(crop, "RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def load_images(sources: Sequence[str | os.PathLike[str]], resolution: int) -> tuple[torch.Tensor, list[str]]:
    """All images of ``sources`` as uint8 [N, 3, R, R] (RGB) plus their names, in a stable order."""
    arrays: list[np.ndarray] = []
    names: list[str] = []
    for name, data in _iter_image_bytes(sources):
        try:
            image = decode_image(data, what=name)
        except InvalidInput as exc:
            raise DataError(name, None, str(exc)) from exc
        arrays.append(square_resize(image, resolution))
        names.append(name)
    if not arrays:
        raise DataError(", ".join(str(s) for s in sources), None, "no images found")
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)), names


def split_holdout(count: int, eval_count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, eval_a, eval_b): two disjoint held-out sets of ``eval_count`` images each.

    Two held-out sets give the Frechet floor (real vs real at the same sample size).
    """
    if eval_count < 0 or count - 2 * eval_count < 1:
        raise InvalidInput(f"cannot hold out 2 x {eval_count} of {count} images and still train")
    order = np.random.default_rng(seed).permutation(count)
    return (
        np.sort(order[2 * eval_count :]),
        np.sort(order[:eval_count]),
        np.sort(order[eval_count : 2 * eval_count]),
    )


class Discriminator(nn.Module):
    """DCGAN discriminator mirrored on the generator: stride-2 4 x 4 convolutions doubling the
    channels down to ``base x base``, then a linear score. Spectral norm on every layer bounds its
    Lipschitz constant, which is what keeps hinge-loss training stable without batch norm here."""

    def __init__(self, resolution: int = 64, width: int = 64) -> None:
        super().__init__()
        base, doublings = upsampling_plan(resolution)
        channels = [3] + [width * 2**i for i in range(doublings)]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)),
                nn.LeakyReLU(0.1, inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.score = spectral_norm(nn.Linear(channels[-1] * base * base, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(images).flatten(1)).squeeze(1)


@dataclass
class GANConfig:
    resolution: int = 64
    width: int = 64
    latent_dim: int = 128
    batch_size: int = 128
    epochs: float = 100.0
    time_budget_s: float | None = None
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.9)
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "cpu"


@dataclass
class GANResult:
    generator: DCGANGenerator  # the EMA copy, batch-norm recalibrated, in eval mode
    iterations: int
    epochs: float
    wall_time_s: float
    stopped_by: str  # "epochs" or "time_budget"
    final_losses: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "epochs": round(self.epochs, 3),
            "wall_time_s": round(self.wall_time_s, 1),
            "stopped_by": self.stopped_by,
            "final_losses": {k: round(v, 4) for k, v in self.final_losses.items()},
        }


@torch.no_grad()
def _ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, 1.0 - decay)


@torch.no_grad()
def recalibrate_batchnorm(
    generator: ImagePrior, batches: int = 40, batch_size: int = 128, seed: int = 0
) -> None:
    """Recompute batch-norm running statistics as exact averages over fresh latent batches.

    The EMA generator's weights never ran in train mode, so its running statistics belong to other
    weights; serving runs in eval mode (single latents), where wrong statistics wash out the images.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    was_training = generator.training
    generator.train()
    rng = torch.Generator(device="cpu").manual_seed(seed)
    device = generator.device
    for _ in range(batches):
        generator(torch.randn(batch_size, generator.noise_dim, generator=rng).to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    generator.train(was_training)


def train_gan(
    images: torch.Tensor,
    config: GANConfig,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> GANResult:
    """Train on uint8 [N, 3, R, R] images (R = config.resolution). Returns the EMA generator."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise InvalidInput(f"images must be uint8 [N, 3, R, R], got {images.dtype} {list(images.shape)}")
    if images.shape[-1] != config.resolution or images.shape[-2] != config.resolution:
        raise InvalidInput(f"images are {list(images.shape[-2:])} px, config says {config.resolution}")
    device = select_device(config.device)
    torch.manual_seed(config.seed)
    rng = torch.Generator(device="cpu").manual_seed(config.seed)

    gen = DCGANGenerator(config.latent_dim, config.resolution, config.width).to(device)
    disc = Discriminator(config.resolution, config.width).to(device)
    ema = copy.deepcopy(gen).eval()
    ema.requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=config.betas)

    count = images.shape[0]
    batch = min(config.batch_size, count)
    per_epoch = max(1, count // batch)
    total = max(1, math.ceil(config.epochs * per_epoch))
    data = images.to(device)
    budget = config.time_budget_s

    bar = _progress_bar(total, progress)
    history: list[dict[str, float]] = []
    losses: dict[str, float] = {}
    start = time.monotonic()
    stopped_by = "epochs"
    step = 0
    order = torch.randperm(count, generator=rng)
    while step < total:
        if budget is not None and time.monotonic() - start >= budget:
            stopped_by = "time_budget"
            break
        position = (step % per_epoch) * batch
        if position == 0 and step:
            order = torch.randperm(count, generator=rng)
        index = order[position : position + batch].to(device)
        real = data[index].float() / 127.5 - 1.0
        flip = (torch.rand(batch, generator=rng) < 0.5).to(device).view(-1, 1, 1, 1)
        real = torch.where(flip, real.flip(-1), real)
        latents = torch.randn(batch, config.latent_dim, generator=rng).to(device)
        # One generated batch serves both updates: the discriminator sees it detached, then the
        # generator is scored by the updated discriminator (halves generator work per step on CPU).
        fake = gen(latents) * 2.0 - 1.0

        loss_d = F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake.detach())).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        disc.requires_grad_(False)  # no discriminator weight gradients needed for this update
        loss_g = -disc(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        disc.requires_grad_(True)

        # A short warm-up of the EMA horizon, so early weights do not dominate short CPU runs.
        _ema_update(ema, gen, min(config.ema_decay, (1.0 + step) / (10.0 + step)))
        step += 1
        losses = {"d": loss_d.detach().item(), "g": loss_g.detach().item()}
        if step % 10 == 0 or step == total:
            history.append({"step": step, "elapsed_s": time.monotonic() - start, **losses})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                d=f"{losses['d']:.3f}", g=f"{losses['g']:.3f}", epoch=f"{step / per_epoch:.2f}", refresh=False
            )
        if on_step is not None:
            on_step(step, losses)
    if bar is not None:
        bar.close()
    wall = time.monotonic() - start
    # Buffers (batch-norm statistics) are not averaged; recalibration replaces them.
    recalibrate_batchnorm(ema, batch_size=min(128, max(batch, 16)), seed=config.seed + 1)
    ema.eval()
    return GANResult(
        generator=ema,
        iterations=step,
        epochs=step / per_epoch,
        wall_time_s=wall,
        stopped_by=stopped_by,
        final_losses=losses,
        history=history,
    )


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="train-generator", unit="step", mininterval=2.0, dynamic_ncols=True)


@torch.no_grad()
def sample_grid(generator: ImagePrior, count: int = 64, seed: int = 0, columns: int = 8) -> np.ndarray:
    """uint8 [H, W, 3] contact sheet of ``count`` samples from the prior's latent distribution."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    images = generator(generator.sample_latents(count, rng)).clamp(0, 1).cpu()
    rows = math.ceil(count / columns)
    r = generator.resolution
    sheet = torch.ones(3, rows * r, columns * r)
    for i, image in enumerate(images):
        y, x = divmod(i, columns)
        sheet[:, y * r : (y + 1) * r, x * r : (x + 1) * r] = image
    return (sheet.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def generator_target(out: str | os.PathLike[str]) -> tuple[ModelStore, str]:
    """``<store>/generators/<name>`` -> (the store, the name); anything else is refused."""
    path = Path(out)
    if path.parent.name != GENERATORS:
        raise InvalidInput(f"--out {out}: expected <store>/{GENERATORS}/<name>")
    return ModelStore(path.parent.parent), path.name


def store_generator(
    out: str | os.PathLike[str],
    generator: ImagePrior,
    *,
    description: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    latent_prior: dict[str, Any] | None = None,
    sample_seed: int = 0,
) -> ModelVersion:
    """Add ``generator`` as the next version of ``out`` (``<store>/generators/<name>``): weights, card
    and ``samples.png``, a contact sheet to judge the prior by eye."""
    store, name = generator_target(out)
    with store.new_version(GENERATORS, name) as staging:
        save_generator(
            generator,
            staging,
            name,
            description=description,
            training=training,
            metrics=metrics,
            latent_prior=latent_prior,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / "samples.png").write_bytes(encode_png(sample_grid(generator, 64, seed=sample_seed)))
    return store.resolve(GENERATORS, name)


def config_dict(config: GANConfig) -> dict[str, Any]:
    data = asdict(config)
    data["betas"] = list(config.betas)
    return data
