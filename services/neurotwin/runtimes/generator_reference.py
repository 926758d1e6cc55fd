"""Reference latents and outputs of a generator: what ``integrity.json`` holds a version to."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from neurotwin.integrity import Reference

# Seed of the reference latents a generator version is recorded with.
REFERENCE_SEED = 20251
# Fewer than for predictors: generator latents and images are large, and two already exercise every
# weight. Latents and images are stored as float16 (the latents fed are exactly the stored ones; the
# images' rounding is far inside the tolerance), so a sealed store stays small.
GENERATOR_REFERENCE_COUNT = 2


def reference_latents(
    module: torch.nn.Module, count: int = GENERATOR_REFERENCE_COUNT, seed: int = REFERENCE_SEED
) -> np.ndarray:
    """Seeded draws from the generator's natural latent distribution, float16 [count, latent_dim]."""
    draw = torch.Generator().manual_seed(seed)
    return module.sample_latents(count, draw).cpu().numpy().astype(np.float16)  # type: ignore[operator]


def run_generator(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Latents (numpy) -> images (numpy float32), as the module computes them on its own device."""

    def run(latents: np.ndarray) -> np.ndarray:
        device = getattr(module, "device", torch.device("cpu"))
        with torch.no_grad():
            images = module(torch.as_tensor(latents, dtype=torch.float32, device=device))
        return images.float().cpu().numpy()

    return run


def generator_reference(module: torch.nn.Module) -> Reference:
    """Reference latents and the images ``module`` (an ImagePrior in eval mode) makes of them."""
    latents = reference_latents(module)
    return Reference(latents, run_generator(module)(latents).astype(np.float16))
