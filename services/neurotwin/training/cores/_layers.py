"""Layers several cores share: the input preprocessing, feature resampling and fixed standardization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess(nn.Module):
    """uint8 [N, H, W, 3] -> float [N, 3, size, size] with values 0..255.

    The resize is always applied (a same-size bilinear resize is the identity), so a traced graph takes
    any input size and computes exactly what training computed at the training size.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


def resample(x: torch.Tensor, grid: int) -> torch.Tensor:
    size = x.shape[-1]
    if size == grid:
        return x
    if size > grid and size % grid == 0:
        # Average pooling keeps every location's evidence; bilinear would drop 3 of 4 pixels.
        return F.avg_pool2d(x, size // grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


class Standardize(nn.Module):
    """Fixed per-channel (x - mean) / std, with statistics set once from the training features.

    Unlike batch norm it behaves the same in training and evaluation, so validation r is meaningful
    from the first epoch even when a session has only a few batches.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("inv_std", torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel mean and std [C] of the training features (over images and positions)."""
        self.mean.copy_(mean.reshape(self.mean.shape))
        std = std.reshape(self.inv_std.shape)
        # Dead channels (std 0) stay 0 rather than exploding.
        self.inv_std.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.zeros_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std
