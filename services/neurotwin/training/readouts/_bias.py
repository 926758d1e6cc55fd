"""The readouts' shared bias start."""

from __future__ import annotations

import torch


def bias_init(neurons: int, mean_rates: torch.Tensor | None) -> torch.Tensor:
    """Each neuron's starting bias."""
    # Start at each neuron's mean rate (ELU(b) + 1 = mean for b = mean - 1 when mean >= 1), so early
    # epochs fit tuning instead of the mean.
    if mean_rates is None:
        return torch.zeros(neurons)
    mean = mean_rates.detach().to(torch.float32).clamp_min(1e-3)
    return torch.where(mean >= 1.0, mean - 1.0, torch.log(mean))
