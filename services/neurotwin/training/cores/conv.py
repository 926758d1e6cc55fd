"""Core ``conv``: a small stacked conv net trained from scratch on the resized image (the usual baseline).

``hidden`` channels, ``conv_layers`` layers, the first of ``conv_first_kernel`` with stride 2.
"""

from __future__ import annotations

import torch
from torch import nn

from neurotwin.training.cores._layers import Preprocess
from neurotwin.training.parts import CoreKind, register_core


class PixelFeatures(nn.Module):
    """The from-scratch core's frozen part: just the resized image, scaled to about unit range."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.preprocess = Preprocess(input_size)
        self.channels = 3
        self.grid = int(input_size)

    def train(self, mode: bool = True) -> PixelFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.preprocess(images) - 127.5) / 64.0


class ConvCore(nn.Module):
    """A small stacked conv net trained from scratch (the field's usual baseline core)."""

    def __init__(self, hidden: int, layers: int, first_kernel: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            # Stride 2 first: halves the cost of every later layer on a CPU.
            nn.Conv2d(3, hidden, first_kernel, stride=2, padding=first_kernel // 2, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ELU(),
        ]
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ELU()]
        self.net = nn.Sequential(*blocks)
        self.out_channels = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register_core(
    CoreKind(
        name="conv",
        features=lambda config, pretrained: PixelFeatures(config.input_size),
        channels=lambda config: 3,
        core=lambda config: ConvCore(config.hidden, config.conv_layers, config.conv_first_kernel),
    )
)
