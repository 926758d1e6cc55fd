"""The render pipeline every image goes through: prior -> transforms -> resize -> twin.

Synthesis (gradient steps, evolution, final results, previews) and the closed loop (stimuli for the
rig) both draw images here, so what the twin scores and what a client or rig is shown are made the
same way. Images in flight are float [N, 3, H, W] in [0, 1]; what leaves is uint8 [N, H, W, 3].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurotwin.imagecodec import resize_batch

# A transform maps (images [N, 3, H, W] in [0, 1], generator) to transformed images (robustness jitter).
Transform = Callable[[Tensor, torch.Generator], Tensor]
# Latents rendered per generator call when rendering stimuli for a rig.
STIMULUS_CHUNK = 64


def prior_images(prior: Callable[[Tensor], Tensor], latents: Tensor) -> Tensor:
    """Latents -> float images [N, 3, H, W] in [0, 1] at the prior's resolution."""
    return prior(latents).float().clamp(0, 1)


def resize_chw(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize to ``size`` (H, W), antialiased when shrinking; a no-op at that size already."""
    if tuple(images.shape[-2:]) == size:
        return images
    shrink = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def twin_view(
    images01: Tensor,
    size: tuple[int, int],
    transform: Transform | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """What the twin sees of prior images: the transforms (if any), then its input size."""
    if transform is not None:
        assert generator is not None, "a transform draws from the job's generator"
        images01 = transform(images01, generator)
    return resize_chw(images01, size)


def twin_rates(twin: nn.Module, images01: Tensor) -> Tensor:
    """Rates for [N, 3, H, W] images in [0, 1] already at the twin's input size: [N, K], or member
    rates [N, M, K] from a twin ensemble (objectives read them; everything reported is their mean)."""
    forward = getattr(twin, "forward_chw01", None)
    if forward is not None:
        return forward(images01, resize=False)
    return twin(images01.permute(0, 2, 3, 1) * 255.0)


def ensemble_mean(rates: Tensor) -> Tensor:
    """[N, K] rates as reported: an ensemble's member rates [N, M, K] averaged over members."""
    return rates.mean(dim=1) if rates.dim() == 3 else rates


def to_uint8(images01: Tensor) -> np.ndarray:
    """Float images [N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3] (rounded, on the CPU)."""
    pixels = (images01.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def from_uint8(pixels: np.ndarray, device: torch.device) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]: exactly the pixels a client receives."""
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255.0


def prior_and_rates(
    prior: Callable[[Tensor], Tensor], twin: nn.Module, latents: Tensor, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """(prior images [N, 3, H, W], twin rates) of latents, no transforms: the whole pipeline once."""
    images = prior_images(prior, latents)
    return images, twin_rates(twin, resize_chw(images, size)).float()


def render_stimuli(generator: Any, latents: np.ndarray, size: int) -> np.ndarray:
    """Latents [n, D] -> uint8 [n, size, size, 3] stimuli for a rig, in chunks.

    Quantized at the generator's resolution, then resampled with Pillow: cheaper than resampling
    floats, and the closed loop's journaled stimuli are defined this way.
    """
    out = np.empty((len(latents), size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, len(latents), STIMULUS_CHUNK):
            z = torch.as_tensor(
                latents[start : start + STIMULUS_CHUNK], dtype=torch.float32, device=generator.device
            )
            images = generator(z).float().clamp_(0, 1).mul_(255).round_()
            pixels = images.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
            out[start : start + len(z)] = resize_batch(pixels, size, size)
    return out
