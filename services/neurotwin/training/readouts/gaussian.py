"""Readout ``gaussian``: each neuron reads the core output at one learned position (grid_sample)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neurotwin.training.parts import ReadoutKind, register_readout
from neurotwin.training.readouts._bias import bias_init


class GaussianReadout(nn.Module):
    """Each neuron reads the feature vector at one learned position (bilinear ``grid_sample``).

    During training the position is drawn from N(mu, sigma) so gradients reach mu from a neighbourhood;
    at test (and in the exported graph) the mean position is used.
    """

    def __init__(self, channels: int, neurons: int, mean_rates: torch.Tensor | None = None) -> None:
        super().__init__()
        self.mu = nn.Parameter(0.1 * torch.randn(neurons, 2))
        self.log_sigma = nn.Parameter(torch.full((neurons, 2), float(torch.log(torch.tensor(0.5)))))
        self.weight = nn.Parameter(0.01 * torch.randn(neurons, channels))
        self.bias = nn.Parameter(bias_init(neurons, mean_rates))

    def positions(self, batch: int) -> torch.Tensor:
        mu = self.mu.unsqueeze(0).expand(batch, -1, -1)
        if self.training:
            mu = mu + self.log_sigma.exp().unsqueeze(0) * torch.randn_like(mu)
        return mu.clamp(-1.0, 1.0).unsqueeze(2)  # [N, K, 1, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sampled = F.grid_sample(x, self.positions(x.shape[0]), mode="bilinear", align_corners=False)
        return (sampled.squeeze(3) * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias  # [N, K]

    def regularizer(self) -> torch.Tensor:
        return self.weight.abs().mean()


register_readout(
    ReadoutKind(
        "gaussian",
        lambda channels, grid, neurons, mean_rates: GaussianReadout(channels, neurons, mean_rates),
    )
)
