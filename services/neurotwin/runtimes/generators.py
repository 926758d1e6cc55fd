"""Natural-image priors: a latent code in, RGB images in [0, 1] out.

Every prior is an ``ImagePrior`` (an ``nn.Module``) mapping latents ``[B, latent_dim]`` to images
``[B, 3, R, R]`` with values in [0, 1], and knows its own natural latent distribution
(``sample_latents``). Three kinds live here:

- ``DCGANGenerator``: the project's own GAN (trained by ``neurotwin train-generator``);
- ``DeePSimFC6Generator``: the fc6 generator of Dosovitskiy & Brox (2016) used by DGN-AM and XDream,
  built here and filled from a user-supplied weight file (``load_deepsim_fc6``);
- ``FourierPixels``: no generator at all; the latent is a decorrelated Fourier spectrum of the image.

Stored versions (``model_store/generators/<name>/<v>/``) hold ``card.json`` naming the class and its
constructor arguments, and ``weights.pt``, a plain state_dict read with ``weights_only=True``, so
loading a model never runs pickled code. This module is on the serving path: torch, numpy and the
neurotwin core only.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from neurotwin.card import GeneratorCard
from neurotwin.errors import InvalidInput, ModelStoreError
from neurotwin.store import CARD_FILE, MODEL_FILES, ModelVersion

WEIGHTS_FILE = MODEL_FILES["generators"]


class ImagePrior(nn.Module):
    """Common interface of all priors. Subclasses set ``latent_dim`` and ``resolution``."""

    latent_dim: int
    resolution: int
    # Set by load_generator: the card the prior was loaded from (latent statistics, metrics).
    card: GeneratorCard | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this module (stored in the card)."""
        raise NotImplementedError

    def latent_prior(self) -> dict[str, Any]:
        """The natural latent distribution, as recorded in the card (used for sampling and clipping)."""
        return {"distribution": "normal", "mean": 0.0, "std": 1.0}

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the natural latent distribution, on this module's device."""
        return _randn((n, self.latent_dim), generator).to(self.device)

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's own device so a seeded CPU generator gives the same numbers whatever
    # device the prior lives on.
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device)


def upsampling_plan(resolution: int) -> tuple[int, int]:
    """``(base, doublings)`` with ``base * 2**doublings == resolution`` and base in 3..7.

    Lets one generator design cover 16, 32, 48, 64, 96, 112 and 128 px.
    """
    base, doublings = resolution, 0
    while base > 7 and base % 2 == 0:
        base //= 2
        doublings += 1
    if base < 3 or base > 7 or doublings < 1:
        raise InvalidInput(
            f"resolution {resolution}: must be b * 2**k with b in 3..7 and k >= 1 (e.g. 32, 48, 64, 112)"
        )
    return base, doublings


class DCGANGenerator(ImagePrior):
    """DCGAN-style generator: linear projection to a ``base x base`` map, then stride-2
    transposed convolutions (batch norm + ReLU) that halve the channels while doubling the size.

    ``width`` is the channel count of the last hidden layer; the first has ``width * 2**(k-1)``.
    With the defaults (128-d latent, 64 px, width 64) it has 3.8 M parameters.

    ``code_layer`` chooses the code that synthesis optimizes. 0: the GAN's input noise
    (``latent_dim``-d). k >= 1: the activations after hidden layer k (1 = the projection, 2 = the first
    transposed convolution, ...), as DGN-AM and XDream optimize DeePSim's 4096-d fc6 code rather than
    an input noise: the layers above the code still shape the image into a natural one, while a
    deeper code can express more than the noise space of a small GAN. Such codes follow a ReLU, so they
    are non-negative; their natural distribution is what the layers below produce from noise
    (``sample_latents`` draws exactly that). The weights are the same for every code layer.
    """

    # Draws behind the measured code statistics (latent_prior); fixed so that they are reproducible.
    CODE_STAT_SAMPLES = 2048

    def __init__(
        self, latent_dim: int = 128, resolution: int = 64, width: int = 64, code_layer: int = 0
    ) -> None:
        super().__init__()
        if latent_dim < 1 or width < 1:
            raise InvalidInput(f"latent_dim and width must be positive, got {latent_dim}, {width}")
        base, doublings = upsampling_plan(resolution)
        if not 0 <= code_layer <= doublings:
            raise InvalidInput(f"code_layer must be in 0..{doublings} for {resolution} px, got {code_layer}")
        self.noise_dim, self.resolution, self.width = latent_dim, resolution, width
        self.code_layer = code_layer
        self.base = base
        channels = [width * 2 ** (doublings - 1 - i) for i in range(doublings)]
        self.project = nn.Linear(latent_dim, channels[0] * base * base, bias=False)
        self.project_norm = nn.BatchNorm2d(channels[0])
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.ConvTranspose2d(channels[-1], 3, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)
        self.channels = channels
        if code_layer == 0:
            self.code_shape: tuple[int, ...] = (latent_dim,)
        else:
            side = base * 2 ** (code_layer - 1)
            self.code_shape = (channels[code_layer - 1], side, side)
        self.latent_dim = math.prod(self.code_shape)
        self._code_stats: dict[str, Any] | None = None

    # Modules of ``body`` per hidden layer (transposed convolution, batch norm, ReLU).
    _PER_LAYER = 3

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "latent_dim": self.noise_dim,
            "resolution": self.resolution,
            "width": self.width,
            "code_layer": self.code_layer,
        }

    def encode_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The code (at ``code_layer``) that input noise ``[B, latent_dim]`` produces, flattened."""
        if self.code_layer == 0:
            return noise
        x = self.project(noise).view(-1, self.channels[0], self.base, self.base)
        x = F.relu(self.project_norm(x))
        x = self.body[: self._PER_LAYER * (self.code_layer - 1)](x)
        return x.flatten(1)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = _randn((n, self.noise_dim), generator).to(self.device)
        if self.code_layer == 0:
            return noise
        with torch.no_grad():
            return self.encode_noise(noise)

    def latent_prior(self) -> dict[str, Any]:
        if self.code_layer == 0:
            return super().latent_prior()
        if self._code_stats is None:
            codes = self.sample_latents(self.CODE_STAT_SAMPLES, torch.Generator().manual_seed(0))
            self._code_stats = {
                "distribution": "rectified",
                "mean": float(codes.mean()),
                "std": float(codes.std()),
                "min": 0.0,
                "zero_fraction": float((codes == 0).float().mean()),
            }
        return dict(self._code_stats)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.code_layer == 0:
            x = self.project(latents).view(-1, self.channels[0], self.base, self.base)
            x = self.body(F.relu(self.project_norm(x)))
        else:
            # Codes from a client or an optimizer may stray below zero, where no natural code lies.
            x = latents.reshape(-1, *self.code_shape).clamp_min(0)
            x = self.body[self._PER_LAYER * (self.code_layer - 1) :](x)
        # tanh then affine (rather than sigmoid) keeps DCGAN's well-behaved output gradients.
        return torch.tanh(x) * 0.5 + 0.5

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._code_stats = None  # measured from the old weights
        return super().load_state_dict(*args, **kwargs)


# DeePSim fc6 layer list (Dosovitskiy & Brox 2016, as used by DGN-AM and XDream), named as in the
# original Caffe model: (name, kind, in, out, kernel). Every layer but the last is followed by a leaky
# ReLU (slope 0.3); after defc5 the 4096 units are reshaped to 256 x 4 x 4.
DEEPSIM_FC6_LAYERS: tuple[tuple[str, str, int, int, int], ...] = (
    ("defc7", "fc", 4096, 4096, 0),
    ("defc6", "fc", 4096, 4096, 0),
    ("defc5", "fc", 4096, 4096, 0),
    ("deconv5", "up", 256, 256, 4),
    ("conv5_1", "same", 256, 512, 3),
    ("deconv4", "up", 512, 256, 4),
    ("conv4_1", "same", 256, 256, 3),
    ("deconv3", "up", 256, 128, 4),
    ("conv3_1", "same", 128, 128, 3),
    ("deconv2", "up", 128, 64, 4),
    ("deconv1", "up", 64, 32, 4),
    ("deconv0", "up", 32, 3, 4),
)
# Other names seen for the same layers in ports of the Caffe model -> the names used here.
DEEPSIM_ALIASES: dict[str, str] = {
    "deconv5_0": "deconv5",
    "deconv5_1": "conv5_1",
    "deconv4_0": "deconv4",
    "deconv4_1": "conv4_1",
    "deconv3_0": "deconv3",
    "deconv3_1": "conv3_1",
}
# Wrappers that training code or ports put in front of the layer names.
DEEPSIM_PREFIXES = ("module.", "generator.", "G.", "netG.", "model.")
# Caffe's ImageNet mean in BGR order, which DeePSim's output is centred on.
CAFFE_BGR_MEAN = (104.0, 117.0, 123.0)


class DeePSimFC6Generator(ImagePrior):
    """The DeePSim fc6 generator: a 4096-d CaffeNet fc6 code -> 256 x 256 RGB image in [0, 1].

    Three fully connected layers (4096 each), reshape to 256 x 4 x 4, then five stride-2 transposed
    convolutions (4 x 4) to 256 px, with three 3 x 3 stride-1 layers in between; leaky ReLU (0.3)
    after every layer but the last. The 3 x 3 layers are transposed convolutions too, because the
    Caffe model stores them as Deconvolution layers and their weights are laid out [in, out, k, k].

    The network emits BGR centred on the Caffe ImageNet mean on a 0..255 scale; ``forward`` adds the
    mean, flips to RGB, divides by 255 and clamps, so callers see the same convention as every prior.

    Natural fc6 codes are non-negative (they come after a ReLU); ``sample_latents`` draws a rectified
    normal with ``code_std``. Put measured statistics of real codes in the card's ``latent_prior``
    when you have them.
    """

    def __init__(self, code_std: float = 1.0, bgr_mean: tuple[float, float, float] = CAFFE_BGR_MEAN) -> None:
        super().__init__()
        self.latent_dim, self.resolution = 4096, 256
        self.code_std = float(code_std)
        self.bgr_mean = tuple(float(v) for v in bgr_mean)
        for name, kind, c_in, c_out, kernel in DEEPSIM_FC6_LAYERS:
            if kind == "fc":
                layer: nn.Module = nn.Linear(c_in, c_out)
            elif kind == "up":
                layer = nn.ConvTranspose2d(c_in, c_out, kernel, stride=2, padding=1)
            else:
                layer = nn.ConvTranspose2d(c_in, c_out, kernel, stride=1, padding=1)
            self.add_module(name, layer)
        rgb_mean = torch.tensor(self.bgr_mean[::-1]).view(1, 3, 1, 1)
        self.register_buffer("rgb_mean", rgb_mean, persistent=False)

    def hyperparameters(self) -> dict[str, Any]:
        return {"code_std": self.code_std, "bgr_mean": list(self.bgr_mean)}

    def latent_prior(self) -> dict[str, Any]:
        return {"distribution": "rectified_normal", "std": self.code_std, "min": 0.0}

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return (_randn((n, self.latent_dim), generator) * self.code_std).clamp_min(0).to(self.device)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents
        for name, _, _, _, _ in DEEPSIM_FC6_LAYERS:
            x = getattr(self, name)(x)
            if name == "defc5":
                x = x.view(-1, 256, 4, 4)
            if name != "deconv0":
                x = F.leaky_relu(x, 0.3)
        rgb = x.flip(1) + self.rgb_mean
        return (rgb / 255.0).clamp(0.0, 1.0)


def deepsim_expected_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape that ``load_deepsim_fc6`` accepts (after renaming)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, kind, c_in, c_out, kernel in DEEPSIM_FC6_LAYERS:
        shapes[f"{name}.weight"] = (c_out, c_in) if kind == "fc" else (c_in, c_out, kernel, kernel)
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


def _canonical_deepsim_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in DEEPSIM_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    layer, dot, param = key.partition(".")
    return DEEPSIM_ALIASES.get(layer, layer) + dot + param


def load_deepsim_fc6(
    weight_file: str | os.PathLike[str], device: str | torch.device = "cpu", code_std: float = 1.0
) -> DeePSimFC6Generator:
    """Build a ``DeePSimFC6Generator`` from a user-supplied torch state_dict file.

    The file is read with ``torch.load(weights_only=True)``: a dict of tensors, optionally wrapped as
    ``{"state_dict": {...}}``. Keys are ``<layer>.weight`` / ``<layer>.bias`` for the layers of
    ``DEEPSIM_FC6_LAYERS`` (the Caffe names defc7, defc6, defc5, deconv5, conv5_1, deconv4, conv4_1,
    deconv3, conv3_1, deconv2, deconv1, deconv0); prefixes such as ``module.`` or ``G.`` are dropped
    and the port names deconv5_0/deconv5_1 (etc.) are accepted. Shapes: fully connected weights
    [4096, 4096] (out, in, as Caffe InnerProduct and ``nn.Linear``); all convolution weights in the
    transposed-convolution layout [in, out, k, k] (Caffe Deconvolution): deconv5 [256, 256, 4, 4],
    conv5_1 [256, 512, 3, 3], deconv4 [512, 256, 4, 4], conv4_1 [256, 256, 3, 3], deconv3
    [256, 128, 4, 4], conv3_1 [128, 128, 3, 3], deconv2 [128, 64, 4, 4], deconv1 [64, 32, 4, 4],
    deconv0 [32, 3, 4, 4]; biases [out]. See ``deepsim_expected_shapes()``.
    """
    path = Path(weight_file)
    raw = _read_state_dict(path)
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = dict(raw["state_dict"])
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise ModelStoreError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        canonical = _canonical_deepsim_key(str(key))
        if canonical in state:
            raise ModelStoreError(f"{path}: two entries map to DeePSim key {canonical!r}")
        state[canonical] = value
    expected = deepsim_expected_shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelStoreError(
            f"{path}: not a DeePSim fc6 state_dict; missing keys {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''} (expected {sorted(expected)[:4]} ...; "
            "see neurotwin.runtimes.generators.deepsim_expected_shapes())"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ModelStoreError(
                f"{path}: DeePSim key {key!r} has shape {list(state[key].shape)}, expected {list(shape)}"
            )
    # Built on the meta device: random init of 56 M parameters would be thrown away at once.
    with torch.device("meta"):
        module = DeePSimFC6Generator(code_std=code_std)
    module.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    module.rgb_mean = torch.tensor(module.bgr_mean[::-1]).view(1, 3, 1, 1)
    return _ready(module, device)


class FourierPixels(ImagePrior):
    """No generator: the latent is the image's Fourier spectrum in a decorrelated color space.

    Latent layout: ``[3, R, R // 2 + 1, 2]`` (channel, row frequency, column frequency, real/imag)
    flattened. Each coefficient is scaled by ``1 / f**decay_power`` so that white latents give
    natural-looking 1/f images and gradient steps act on all spatial scales evenly; the inverse FFT is
    mixed through the square root of natural-image color covariance and squashed by a sigmoid.
    The scaling is normalized so a standard-normal latent gives unit pre-sigmoid pixel deviation.
    """

    # Square root of the RGB pixel covariance of the 9,600 photos of the shared V4 image set,
    # columns rescaled to a largest norm of 1; measured once for this project.
    COLOR_SQRT: ClassVar[tuple[tuple[float, float, float], ...]] = (
        (0.794, 0.433, 0.321),
        (0.433, 0.709, 0.459),
        (0.321, 0.459, 0.828),
    )

    def __init__(self, resolution: int = 112, decay_power: float = 1.0, latent_std: float = 1.0) -> None:
        super().__init__()
        if resolution < 4:
            raise InvalidInput(f"resolution {resolution}: at least 4 px")
        self.resolution, self.decay_power, self.latent_std = resolution, float(decay_power), float(latent_std)
        self.latent_dim = 3 * resolution * (resolution // 2 + 1) * 2
        fy = torch.fft.fftfreq(resolution).view(-1, 1)
        fx = torch.fft.rfftfreq(resolution).view(1, -1)
        freq = torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / resolution)
        scale = freq.pow(-self.decay_power)
        # Pixel variance of an orthonormal inverse rFFT of coefficients with variance scale**2 per
        # real/imag part: interior columns stand for two conjugate entries of the full spectrum.
        multiplicity = torch.full_like(scale, 2.0)
        multiplicity[:, 0] = 1.0
        if resolution % 2 == 0:
            multiplicity[:, -1] = 1.0
        variance = (multiplicity * 2 * scale**2).sum() / resolution**2
        self.register_buffer("spectrum_scale", scale / variance.sqrt(), persistent=False)
        self.register_buffer("color_sqrt", torch.tensor(self.COLOR_SQRT), persistent=False)

    def hyperparameters(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "decay_power": self.decay_power, "latent_std": self.latent_std}

    def latent_prior(self) -> dict[str, Any]:
        return {"distribution": "normal", "mean": 0.0, "std": self.latent_std}

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return (_randn((n, self.latent_dim), generator) * self.latent_std).to(self.device)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        r = self.resolution
        coeffs = latents.view(-1, 3, r, r // 2 + 1, 2)
        spectrum = torch.complex(coeffs[..., 0], coeffs[..., 1]) * self.spectrum_scale
        pixels = torch.fft.irfft2(spectrum, s=(r, r), norm="ortho")
        mixed = torch.einsum("ij,bjhw->bihw", self.color_sqrt, pixels)
        return torch.sigmoid(mixed)


ARCHITECTURES: dict[str, type[ImagePrior]] = {
    "DCGANGenerator": DCGANGenerator,
    "DeePSimFC6Generator": DeePSimFC6Generator,
    "FourierPixels": FourierPixels,
}


def build_generator(
    architecture: str, hyperparameters: Mapping[str, Any], source: object = "card"
) -> ImagePrior:
    """Construct an (untrained) prior from a card's architecture name and hyperparameters."""
    cls = ARCHITECTURES.get(architecture)
    if cls is None:
        raise ModelStoreError(
            f"{source}: unknown generator architecture {architecture!r}; known: {sorted(ARCHITECTURES)}"
        )
    try:
        return cls(**dict(hyperparameters))
    except (TypeError, ValueError) as exc:
        raise ModelStoreError(
            f"{source}: cannot build {architecture} from {dict(hyperparameters)} ({exc})"
        ) from exc


def _read_state_dict(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelStoreError(f"{path}: missing weight file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        # weights_only refuses anything but tensors and plain containers, so this also catches
        # checkpoints that would need arbitrary code to load.
        raise ModelStoreError(f"{path}: not a plain torch state_dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, Mapping):
        raise ModelStoreError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return dict(data)


def _ready(module: ImagePrior, device: str | torch.device) -> ImagePrior:
    # Serving never trains a prior: eval mode (batch norm uses its stored statistics) and no
    # parameter gradients, so optimizers only differentiate with respect to the latents.
    module.to(device).eval()
    module.requires_grad_(False)
    return module


def load_generator(
    version: ModelVersion | str | os.PathLike[str], device: str | torch.device = "cpu"
) -> ImagePrior:
    """Load a stored generator version (a ``ModelVersion`` or the path of a version folder).

    Returns the prior in eval mode on ``device`` with ``.card`` set to its ``GeneratorCard``.
    Raises ``ModelStoreError`` for a missing or malformed card, an unknown architecture, a weight
    file that is not a plain state_dict, or keys and shapes that do not fit the architecture.
    """
    folder = version.path if isinstance(version, ModelVersion) else Path(version)
    card = GeneratorCard.load(folder / CARD_FILE)
    module = build_generator(card.architecture, card.hyperparameters, source=folder / CARD_FILE)
    if module.latent_dim != card.latent_dim or module.resolution != card.resolution:
        raise ModelStoreError(
            f"{folder}: card says latent_dim {card.latent_dim}, resolution {card.resolution}, but "
            f"{card.architecture}{card.hyperparameters} has {module.latent_dim}, {module.resolution}"
        )
    state = _read_state_dict(folder / WEIGHTS_FILE)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelStoreError(
            f"{folder / WEIGHTS_FILE}: weights do not fit {card.architecture}: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ModelStoreError(
                f"{folder / WEIGHTS_FILE}: {key!r} has shape {got}, "
                f"{card.architecture} expects {list(tensor.shape)}"
            )
    module.load_state_dict(state)
    module = _ready(module, device)
    module.card = card
    return module


def save_generator(
    module: ImagePrior,
    folder: str | os.PathLike[str],
    name: str,
    *,
    description: str = "",
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    latent_prior: Mapping[str, Any] | None = None,
    created: str = "",
) -> GeneratorCard:
    """Write ``weights.pt`` (tensors only) and ``card.json`` into ``folder`` (a staging folder from
    ``ModelStore.new_version``)."""
    architecture = type(module).__name__
    if ARCHITECTURES.get(architecture) is not type(module):
        raise InvalidInput(f"{architecture} is not a registered generator architecture")
    folder = Path(folder)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    card = GeneratorCard(
        name=name,
        architecture=architecture,
        latent_dim=module.latent_dim,
        resolution=module.resolution,
        hyperparameters=module.hyperparameters(),
        description=description,
        created=created,
        training=dict(training or {}),
        metrics=dict(metrics or {}),
        latent_prior=dict(latent_prior or module.latent_prior()),
    )
    card.save(folder / CARD_FILE)
    # Reference outputs from the weights as written and loaded back (eval mode, CPU), which is what a
    # server loads; checksums of the files, so that a server refuses them changed.
    from neurotwin.integrity import record_integrity
    from neurotwin.runtimes.generator_reference import generator_reference

    record_integrity(folder, [WEIGHTS_FILE], generator_reference(load_generator(folder)), recorded_by="save")
    return card


def robustness_transforms(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    jitter: float = 0.06,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate_degrees: float = 5.0,
    blur: float = 0.0,
) -> torch.Tensor:
    """Random per-image shift, scale, rotation and (``blur`` > 0) Gaussian blur of ``[B, 3, H, W]``
    images (differentiable).

    Optimizing an objective averaged over small random transformations keeps synthesis from
    exploiting pixel-exact patterns the model would not respond to under a slight change of view.
    ``jitter`` is the largest shift as a fraction of the image size; ``blur`` the largest blur sigma as
    a fraction of it (each image draws its sigma uniformly below that). Borders are reflected, so no
    black frame appears. Output has the input's shape.
    """
    if images.dim() != 4:
        raise InvalidInput(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    batch = images.shape[0]
    draws = _rand((batch, 4), generator).to(device=images.device, dtype=images.dtype)
    low, high = scale
    zoom = low + (high - low) * draws[:, 0]
    angle = math.radians(rotate_degrees) * (2 * draws[:, 1] - 1)
    # affine_grid works in [-1, 1] coordinates, where the full image width is 2.
    shift = 2 * jitter * (2 * draws[:, 2:] - 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if blur <= 0:
        return moved
    sigmas = blur * images.shape[-1] * _rand((batch,), generator).to(device=images.device, dtype=images.dtype)
    return _gaussian_blur(moved, sigmas)


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (pixels; 0 leaves it unchanged), separably, borders reflected."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    radius = min(radius, (min(height, width) - 1) // 2)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigmas.clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [B, 2r + 1]; sigma ~0 gives a delta
    # Grouped convolution: one group per (image, channel), each image's kernel repeated over channels.
    weights = kernel.repeat_interleave(channels, dim=0)
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, weights[:, None, None, :], groups=batch * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, weights[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)
