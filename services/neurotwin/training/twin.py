"""The twin model: a feature core shared by all neurons and one small readout per neuron.

Structure (one ``nn.Module`` end to end, so the same graph is trained, evaluated and exported)::

    uint8 images [N, H, W, 3]
      -> Preprocess        cast to float, NHWC -> NCHW, bilinear resize to the training resolution
      -> frozen features   EfficientNet-Lite0 stage outputs resampled to one grid and concatenated
                           (or the plain image for the from-scratch core)
      -> head(s)           trainable core (adapter convs on the frozen features, or a stacked conv net
                           from scratch) + per-neuron readout (factorized or Gaussian)
      -> rates [N, K]      ELU + 1, so rates are positive as a Poisson mean must be

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
from neurotwin.training.backbone import BLOCK_CHANNELS, NUM_BLOCKS, EfficientNetLite0Trunk

CORES = ("efficientnet", "conv")
READOUTS = ("factorized", "gaussian")


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
        if self.core not in CORES:
            raise InvalidInput(f"core {self.core!r}: expected one of {', '.join(CORES)}")
        if self.readout not in READOUTS:
            raise InvalidInput(f"readout {self.readout!r}: expected one of {', '.join(READOUTS)}")
        if self.core == "efficientnet" and (
            not self.stages or min(self.stages) < 0 or max(self.stages) >= NUM_BLOCKS
        ):
            raise InvalidInput(f"stages must lie in 0..{NUM_BLOCKS - 1}, got {list(self.stages)}")
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
# Frozen part


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


def _resample(x: torch.Tensor, grid: int) -> torch.Tensor:
    size = x.shape[-1]
    if size == grid:
        return x
    if size > grid and size % grid == 0:
        # Average pooling keeps every location's evidence; bilinear would drop 3 of 4 pixels.
        return F.avg_pool2d(x, size // grid)
    return F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)


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
        return torch.cat([_resample(o, self.grid) for o in outputs], dim=1)


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


# --------------------------------------------------------------------------------------------------------
# Trainable cores


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


# --------------------------------------------------------------------------------------------------------
# Readouts


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
        self.bias = nn.Parameter(_bias_init(neurons, mean_rates))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.matmul(x.flatten(2), self.mask.t())  # [N, C, K]
        return (pooled * self.weight.t().unsqueeze(0)).sum(dim=1) + self.bias

    def regularizer(self) -> torch.Tensor:
        """L1 on the spatial masks: receptive fields are compact."""
        return self.mask.abs().mean()


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
        self.bias = nn.Parameter(_bias_init(neurons, mean_rates))

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


def _bias_init(neurons: int, mean_rates: torch.Tensor | None) -> torch.Tensor:
    # Start at each neuron's mean rate (ELU(b) + 1 = mean for b = mean - 1 when mean >= 1), so early
    # epochs fit tuning instead of the mean.
    if mean_rates is None:
        return torch.zeros(neurons)
    mean = mean_rates.detach().to(torch.float32).clamp_min(1e-3)
    return torch.where(mean >= 1.0, mean - 1.0, torch.log(mean))


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
    if config.core == "efficientnet":
        return EfficientNetFeatures(config.stages, config.input_size, config.grid, pretrained=pretrained)
    return PixelFeatures(config.input_size)


def feature_channels(config: TwinConfig) -> int:
    """Channels of the frozen features for ``config`` (without loading the trunk)."""
    if config.core == "efficientnet":
        return sum(BLOCK_CHANNELS[s] for s in sorted(set(config.stages)))
    return 3


def build_core(config: TwinConfig, features: nn.Module | None = None) -> nn.Module:
    if config.core == "efficientnet":
        return AdapterCore(feature_channels(config), config.hidden, config.core_layers, config.core_kernel)
    return ConvCore(config.hidden, config.conv_layers, config.conv_first_kernel)


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
    if config.readout == "factorized":
        return FactorizedReadout(channels, grid, neurons, mean_rates)
    return GaussianReadout(channels, neurons, mean_rates)


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
