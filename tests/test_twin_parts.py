"""Cores and readouts are swappable kinds found by name: the built-in ones, and a new one in one place."""

from __future__ import annotations

import pytest
import torch
from neurotwin.errors import InvalidInput
from neurotwin.training import parts
from neurotwin.training.readouts._bias import bias_init
from neurotwin.training.twin import SessionSpec, TwinConfig, build_twins
from torch import nn


class MeanPoolReadout(nn.Module):
    """A readout defined outside the package: the spatial mean of the core output, weighted per neuron."""

    def __init__(self, channels: int, neurons: int, mean_rates: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(neurons, channels))
        self.bias = nn.Parameter(bias_init(neurons, mean_rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.weight.t() + self.bias

    def regularizer(self) -> torch.Tensor:
        return self.weight.abs().mean()


def test_builtin_kinds_are_discovered() -> None:
    assert set(parts.core_names()) >= {"efficientnet", "conv"}
    assert set(parts.readout_names()) >= {"factorized", "gaussian"}
    with pytest.raises(InvalidInput, match=r"readout 'nope': expected one of .*factorized.*gaussian"):
        TwinConfig(readout="nope")
    with pytest.raises(InvalidInput, match=r"core 'nope': expected one of"):
        TwinConfig(core="nope")
    # A kind's own checks still run: stages exist only for the EfficientNet trunk.
    with pytest.raises(InvalidInput, match="stages must lie in"):
        TwinConfig(core="efficientnet", stages=(99,))
    TwinConfig(core="conv", stages=(99,))


def test_a_registered_readout_is_usable_by_name() -> None:
    kind = parts.ReadoutKind(
        "mean-pool-test", lambda channels, grid, neurons, rates: MeanPoolReadout(channels, neurons, rates)
    )
    parts.register_readout(kind)
    try:
        assert "mean-pool-test" in parts.readout_names()
        config = TwinConfig(core="conv", readout="mean-pool-test", input_size=32, hidden=4)
        twin = build_twins(config, [SessionSpec("s", 3, torch.tensor([0.5, 2.0, 4.0]))], pretrained=False)[
            "s"
        ]
        assert isinstance(twin.heads[0].readout, MeanPoolReadout)
        rates = twin.eval()(torch.zeros(2, 40, 40, 3, dtype=torch.uint8))
        # Zero weights: every neuron starts at its mean rate (ELU(bias) + 1), whatever the image.
        assert torch.allclose(rates, torch.tensor([[0.5, 2.0, 4.0]] * 2), atol=1e-5)
        with pytest.raises(ValueError, match="registered twice"):
            parts.register_readout(parts.ReadoutKind("mean-pool-test", lambda *args: nn.Identity()))
    finally:
        parts._READOUTS.pop("mean-pool-test", None)
