"""Core ``efficientnet``: frozen EfficientNet-Lite0 stage outputs, then a learned adapter (the default).

The trunk's chosen stages are resampled to one grid and concatenated; the adapter standardizes them,
projects them 1 x 1 and optionally adds k x k layers (``hidden``, ``core_layers``, ``core_kernel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from neurotwin.errors import InvalidInput
from neurotwin.training.backbone import BLOCK_CHANNELS, NUM_BLOCKS, EfficientNetLite0Trunk
from neurotwin.training.cores._layers import Preprocess, Standardize, resample
from neurotwin.training.parts import CoreKind, register_core

if TYPE_CHECKING:
    from neurotwin.training.twin import TwinConfig


class EfficientNetFeatures(nn.Module):
    """Pretrained trunk, stage outputs resampled to ``grid`` x ``grid`` and concatenated. Always frozen."""

    def __init__(self, stages: Sequence[int], input_size: int, grid: int, pretrained: bool = True) -> None:
        super().__init__()
        self.preprocess = Preprocess(input_size)
        self.trunk = EfficientNetLite0Trunk(stages, pretrained=pretrained)
        with torch.no_grad():
            shapes = [o.shape for o in self.trunk(torch.zeros(1, 3, input_size, input_size))]
        self.grid = int(grid) if grid else int(shapes[-1][-1])
        self.channels = sum(BLOCK_CHANNELS[s] for s in self.trunk.stages)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        # Batch-norm statistics of the pretrained trunk must never move.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.trunk(self.preprocess(images))
        return torch.cat([resample(o, self.grid) for o in outputs], dim=1)


class AdapterCore(nn.Module):
    """Standardize the frozen channels, a learned 1 x 1 projection, then optional k x k conv layers.

    The adapter is shared by every neuron (and every session), so it learns which mixtures of ImageNet
    features matter for the recorded area from far more data than any one neuron has. One layer is a
    re-weighting plus ELU; further layers (batch norm + ELU each) build nonlinear, spatially pooled
    feature combinations, which pays off once several sessions train the core.
    """

    def __init__(self, in_channels: int, hidden: int, layers: int = 1, kernel: int = 1) -> None:
        super().__init__()
        self.norm = Standardize(in_channels)
        blocks: list[nn.Module] = []
        channels = in_channels
        for index in range(layers):
            size = 1 if index == 0 else kernel
            blocks.append(nn.Conv2d(channels, hidden, size, padding=size // 2, bias=layers == 1))
            if layers > 1:
                blocks.append(nn.BatchNorm2d(hidden))
            blocks.append(nn.ELU())
            channels = hidden
        self.net = nn.Sequential(*blocks)
        self.out_channels = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


def _channels(config: TwinConfig) -> int:
    return sum(BLOCK_CHANNELS[s] for s in sorted(set(config.stages)))


def _check(config: TwinConfig) -> None:
    if not config.stages or min(config.stages) < 0 or max(config.stages) >= NUM_BLOCKS:
        raise InvalidInput(f"stages must lie in 0..{NUM_BLOCKS - 1}, got {list(config.stages)}")


register_core(
    CoreKind(
        name="efficientnet",
        features=lambda config, pretrained: EfficientNetFeatures(
            config.stages, config.input_size, config.grid, pretrained=pretrained
        ),
        channels=_channels,
        core=lambda config: AdapterCore(
            _channels(config), config.hidden, config.core_layers, config.core_kernel
        ),
        check=_check,
    )
)
