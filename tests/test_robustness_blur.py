"""Gaussian blur in the robustness transforms: off by default (draws unchanged), per-image sigma,
smoothing, reproducible, differentiable."""

from __future__ import annotations

import torch
from neurotwin.runtimes.generators import _gaussian_blur, robustness_transforms


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _roughness(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per image."""
    dx = images[..., 1:] - images[..., :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


def test_blur_zero_keeps_the_transform_and_its_draws() -> None:
    images = torch.rand(4, 3, 32, 32)
    plain = robustness_transforms(images, _seeded(5))
    torch.testing.assert_close(robustness_transforms(images, _seeded(5), blur=0.0), plain)


def test_blur_smooths_reproducibly_and_keeps_shape() -> None:
    images = torch.rand(6, 3, 32, 32)
    a = robustness_transforms(images, _seeded(2), blur=0.05)
    b = robustness_transforms(images, _seeded(2), blur=0.05)
    torch.testing.assert_close(a, b)
    assert a.shape == images.shape
    sharp = robustness_transforms(images, _seeded(2))
    assert (_roughness(a) < _roughness(sharp)).all()
    # Blur keeps the mean brightness (normalized kernel, reflected borders).
    torch.testing.assert_close(a.mean(dim=(1, 2, 3)), sharp.mean(dim=(1, 2, 3)), atol=0.02, rtol=0)


def test_per_image_sigmas() -> None:
    images = torch.rand(3, 3, 24, 24)
    out = _gaussian_blur(images, torch.tensor([0.0, 1.0, 3.0]))
    # Sigma 0 is the identity; larger sigmas smooth more.
    torch.testing.assert_close(out[0], images[0])
    rough = _roughness(out)
    assert rough[2] < rough[1] < _roughness(images[:1])[0]


def test_blur_is_differentiable() -> None:
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    robustness_transforms(images, _seeded(0), blur=0.1).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
