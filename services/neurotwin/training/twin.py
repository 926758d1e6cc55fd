"""The twin model: a feature core shared by all neurons and one small readout per neuron.

Structure (one ``nn.Module`` end to end, so the same graph is trained, evaluated and exported)::

    uint8 images [N, H, W, 3]
      -> Preprocess        cast to float, NHWC -> NCHW, bilinear resize to the training resolution
      -> frozen features   EfficientNet-Lite0 stage outputs resampled to one grid and concatenated
                           (or the plain image for the from-scratch core)
      -> head(s)           trainable core (adapter convs on the frozen features, or a stacked conv net
                           from scratch) + per-neuron readout (factorized or Gaussian)
      -> rates [N, K]      ELU + 1, so rates are positive as a Poisson mean must be

Cores and readouts are swappable kinds named by ``TwinConfig.core`` and ``.readout``, one file each
in ``training/cores/`` and ``training/readouts/`` (see ``neurotwin.training.parts``).

The frozen part holds no trainable weights, so training computes its output once per image and fits
only the heads on the cached features (see ``neurotwin.training.fit``). Several heads average into an
ensemble; heads of different sessions may share one core (multi-session training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neurotwin.errors import InvalidInput
from neurotwin.training.cores._layers import Standardize
from neurotwin.training.parts import core_kind, readout_kind

__all__ = [
    "FrozenCore",
    "SessionSpec",
    "Standardize",
    "TwinConfig",
    "TwinHead",
    "TwinModel",
    "build_core",
    "build_features",
    "build_readout",
    "build_twins",
    "core_grid",
    "feature_channels",
]


@dataclass
class TwinConfig:
    """Architecture of a twin; stored in the model card so the model can be rebuilt and compared."""

    core: str = "efficientnet"
    # EfficientNet-Lite0 blocks whose outputs feed the readout (0..15).
    stages: tuple[int, ...] = (4, 7, 10)
    # Square resolution the graph resizes every input to (the resolution the core was trained at).
    input_size: int = 112
    # Spatial grid every stage output is resampled to; 0 means the deepest stage's own size.
    grid: int = 0
    # Channels of the learned core (adapter on the frozen features, or the from-scratch conv net).
    hidden: int = 128
    readout: str = "factorized"
    # Learned core on frozen features (efficientnet): a 1 x 1 projection, then ``core_layers - 1``
    # layers of ``core_kernel`` x ``core_kernel``. From-scratch core (conv): ``conv_layers`` layers, the
    # first of ``conv_first_kernel`` with stride 2.
    core_layers: int = 2
    core_kernel: int = 3
    conv_layers: int = 3
    conv_first_kernel: int = 7
    # Heads averaged into one prediction (an ensemble over seeds sharing the frozen features).
    ensemble: int = 1

    def __post_init__(self) -> None:
        self.stages = tuple(int(s) for s in self.stages)
        core = core_kind(self.core)
        readout_kind(self.readout)
        core.check(self)
        for name in ("input_size", "hidden", "core_layers", "core_kernel", "conv_layers", "ensemble"):
            if int(getattr(self, name)) < 1:
                raise InvalidInput(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.input_size < 16:
            raise InvalidInput(f"input_size must be at least 16 px, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------------
# Heads and the whole model


class TwinHead(nn.Module):
    """A trainable core and one readout: frozen features -> positive rates for one set of neurons."""

    def __init__(self, core: nn.Module, readout: nn.Module) -> None:
        super().__init__()
        self.core = core
        self.readout = readout

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.elu(self.readout(self.core(features))) + 1.0


class TwinModel(nn.Module):
    """uint8 images [N, H, W, 3] -> rates [N, K]: frozen features, then the mean of one or more heads."""

    def __init__(self, config: TwinConfig, features: nn.Module, heads: Sequence[TwinHead]) -> None:
        super().__init__()
        if not heads:
            raise InvalidInput("a twin needs at least one head")
        self.config = config
        self.features = features
        self.heads = nn.ModuleList(heads)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def members(self) -> int:
        return len(self.heads)

    def member_rates_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Every head's rates, [N, members, K]."""
        return torch.stack([head(features) for head in self.heads], dim=1)

    def rates_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if len(self.heads) == 1:
            return self.heads[0](features)
        # The exported graph computes the same mean of the same stack (see training.export).
        return self.member_rates_from_features(features).mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.rates_from_features(self.features(images))

    def member_rates(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, H, W, 3] -> every member's rates [N, members, K]."""
        return self.member_rates_from_features(self.features(images))

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 128, *, members: bool = False) -> Any:
        """numpy uint8 [N, H, W, 3] -> numpy float32 [N, K] (with ``members``: [N, members, K]), in eval
        mode on the model's device."""
        import numpy as np

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        run = self.member_rates if members else self
        out = []
        try:
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                out.append(run(batch.to(device)).float().cpu().numpy())
        finally:
            self.train(was_training)
        if not out:
            shape = (0, self.members, self.neuron_count) if members else (0, self.neuron_count)
            return np.zeros(shape, dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    @property
    def neuron_count(self) -> int:
        readout = self.heads[0].readout
        return int(readout.bias.shape[0])  # type: ignore[union-attr]


def build_features(config: TwinConfig, pretrained: bool = True) -> nn.Module:
    """The frozen part of ``config``'s core kind."""
    return core_kind(config.core).features(config, pretrained)


def feature_channels(config: TwinConfig) -> int:
    """Channels of the frozen features for ``config`` (without loading the trunk)."""
    return core_kind(config.core).channels(config)


def build_core(config: TwinConfig, features: nn.Module | None = None) -> nn.Module:
    """A fresh trainable core of ``config``'s kind."""
    return core_kind(config.core).core(config)


def core_grid(config: TwinConfig, features: nn.Module) -> int:
    """Spatial size of the core's output (the factorized readout's mask size)."""
    with torch.no_grad():
        probe = torch.zeros(1, int(features.channels), int(features.grid), int(features.grid))
        core = build_core(config, features).eval()
        return int(core(probe).shape[-1])


class FrozenCore(nn.Module):
    """A pretrained core reused as is: no gradients, and batch norm stays in evaluation mode."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.core = core.requires_grad_(False).eval()
        self.out_channels = int(core.out_channels)

    def train(self, mode: bool = True) -> FrozenCore:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(x)


def build_readout(
    config: TwinConfig, channels: int, grid: int, neurons: int, mean_rates: torch.Tensor | None = None
) -> nn.Module:
    return readout_kind(config.readout).build(channels, grid, neurons, mean_rates)


@dataclass
class SessionSpec:
    """What a head needs to know about one session's neurons."""

    name: str
    neurons: int
    mean_rates: torch.Tensor | None = field(default=None, repr=False)


def build_twins(
    config: TwinConfig,
    sessions: Sequence[SessionSpec],
    *,
    seed: int = 0,
    pretrained: bool = True,
    features: nn.Module | None = None,
    cores: Sequence[nn.Module] | None = None,
) -> dict[str, TwinModel]:
    """One twin per session; all share the frozen features, and member ``e`` of every session's
    ensemble shares one core (so several sessions train one core). ``cores``, when given, are the
    members' cores (pretrained ones, e.g. wrapped in :class:`FrozenCore`); ``config.ensemble`` is then
    their number."""
    if not sessions:
        raise InvalidInput("build_twins: no sessions")
    if cores is not None and len(cores) != config.ensemble:
        raise InvalidInput(f"build_twins: {len(cores)} cores for an ensemble of {config.ensemble}")
    features = features if features is not None else build_features(config, pretrained)
    heads: dict[str, list[TwinHead]] = {s.name: [] for s in sessions}
    grid = core_grid(config, features)
    for member in range(config.ensemble):
        torch.manual_seed(seed * 1000 + member)
        core = cores[member] if cores is not None else build_core(config, features)
        for spec in sessions:
            readout = build_readout(config, core.out_channels, grid, spec.neurons, spec.mean_rates)
            heads[spec.name].append(TwinHead(core, readout))
    return {s.name: TwinModel(config, features, heads[s.name]) for s in sessions}
