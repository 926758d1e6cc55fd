"""Readout ``factorized``: a spatial mask and a feature vector per neuron (the default)."""

from __future__ import annotations

import torch
from torch import nn

from neurotwin.training.parts import ReadoutKind, register_readout
from neurotwin.training.readouts._bias import bias_init


class FactorizedReadout(nn.Module):
    """rate_k = sum_{c, p} mask[k, p] * weight[k, c] * x[c, p] + bias[k]: one spatial map and one feature
    vector per neuron, far fewer parameters than a full linear map of the feature volume."""

    def __init__(
        self, channels: int, grid: int, neurons: int, mean_rates: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        cells = grid * grid
        self.grid = grid
        self.mask = nn.Parameter(
            torch.full((neurons, cells), 1.0 / cells) + 0.01 * torch.randn(neurons, cells)
        )
        self.weight = nn.Parameter(0.01 * torch.randn(neurons, channels))
        self.bias = nn.Parameter(bias_init(neurons, mean_rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.matmul(x.flatten(2), self.mask.t())  # [N, C, K]
        return (pooled * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias

    def regularizer(self) -> torch.Tensor:
        """L1 on the spatial masks: receptive fields are compact."""
        return self.mask.abs().mean()


register_readout(
    ReadoutKind(
        "factorized",
        lambda channels, grid, neurons, mean_rates: FactorizedReadout(channels, grid, neurons, mean_rates),
    )
)
