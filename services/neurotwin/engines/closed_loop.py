"""Closed-loop sessions: evolve images against responses a rig records, durably, optionally twin-guided.

One session = one optimizer (CMA-ES or a GA) over a generator's latent space. The rig asks for the
pending generation, shows its images (synthetic ones interleaved with natural reference images) and
tells the responses. Rules:

- Ask is idempotent: the pending generation is created once, journaled, and returned until told.
- Tell is idempotent per (generation, stimulus): the same values again change nothing; different
  values for a told stimulus, a stale or not-yet-asked generation, or (unless ``partial``) a Tell that
  leaves stimuli of the generation without responses fail with FAILED_PRECONDITION naming what is off.
  Non-finite values and wrong lengths fail with INVALID_ARGUMENT, and nothing is stored.
- Durable: everything is journaled before a call returns (``neurotwin.engines.journal``). A process
  restarted on the same journal reloads each session from it: the optimizer state after the last
  completed generation, the pending generation's stimuli exactly as sent, and its responses so far.
  The optimizer is deterministic given its state, so re-asking it must reproduce the journaled
  latents; this is checked on load.
- With a twin attached, each generation samples ``candidates_per_presentation`` times more latents
  than it shows and presents those the twin ranks highest; with ``refit_readout`` the ranking comes
  from a ridge readout refit on this session's own measurements once it predicts them better than
  the twin alone (judged by leave-one-out correlation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from neurotwin.engines.journal import (
    CLOSED,
    FINISHED,
    NATURAL,
    OPEN,
    SYNTHETIC,
    Completion,
    ConcurrentModification,
    GenerationRecord,
    Journal,
    NaturalImage,
    ResponseRecord,
    SessionRecord,
    StimulusRecord,
)
from neurotwin.engines.session_metadata import RecordingMetadata
from neurotwin.errors import (
    FailedPrecondition,
    InvalidInput,
    ModelStoreError,
    NotFound,
    ResourceExhausted,
)
from neurotwin.imagecodec import decode_image, encode_jpeg
from neurotwin.store import GENERATORS, PREDICTORS, ModelStore

log = logging.getLogger(__name__)

OPTIMIZERS = ("cma-es", "ga")
OBJECTIVES = ("mean", "contrast")
IMAGE_FORMATS = ("png", "jpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_POPULATION = 40
# Guard rails: a request must not make the server render or hold unbounded work.
MAX_POPULATION = 1000
MAX_CANDIDATES = 20000
MAX_NATURAL_PER_GENERATION = 1000
MAX_NEURONS = 100000
MAX_IMAGE_SIZE = 1024
MAX_NATURAL_FILE_BYTES = 64 * 1024 * 1024
RENDER_CHUNK = 64
LOCK_STRIPES = 256
# Ridge penalties tried for the refit readout (features are z-scored, so these are on a fixed scale).
READOUT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 6, 15))
# The readout is only trusted once it has this many measured stimuli to be judged on.
READOUT_MIN_SAMPLES = 20


# ------------------------------------------------------------------------------------------------
# Settings of a session


@dataclass
class SessionConfig:
    """A session's settings with defaults filled in and model versions resolved (journaled as JSON)."""

    session_id: str
    generator: str
    generator_version: int
    latent_dim: int
    generator_resolution: int
    neuron_count: int
    seed: int
    image_size: int
    optimizer: str = "cma-es"
    optimizer_options: dict[str, float] = field(default_factory=dict)
    population_size: int = DEFAULT_POPULATION
    natural_per_generation: int = 0
    natural_source: str = ""
    natural_count: int = 0
    neuron_ids: list[str] = field(default_factory=list)
    target_neurons: list[int] = field(default_factory=lambda: [0])
    objective: str = "mean"
    max_generations: int = 0
    image_format: str = "png"
    twin: str = ""
    twin_version: int = 0
    twin_neurons: list[int] = field(default_factory=list)
    candidates_per_presentation: int = 0
    refit_readout: bool = False
    description: str = ""
    # Subject, device and session metadata for exports (RecordingMetadata.to_dict(): given fields only).
    metadata: dict[str, Any] = field(default_factory=dict)
    # sha256 of the create request (minus the id), so a retried create can be told from a clash.
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def candidates(self) -> int:
        """Latents sampled per generation (the population, times the twin's pre-screening factor)."""
        factor = self.candidates_per_presentation if self.twin else 1
        return self.population_size * max(1, factor)


@dataclass
class SessionRequest:
    """What a caller asks for; ``ClosedLoopEngine.create_session`` validates and resolves it."""

    session_id: str = ""
    generator: str = ""
    generator_version: int = 0
    optimizer: str = ""
    optimizer_options: dict[str, float] = field(default_factory=dict)
    population_size: int = 0
    natural_per_generation: int = 0
    natural_source: str = ""
    natural_images: list[bytes] = field(default_factory=list)
    neuron_count: int = 0
    neuron_ids: list[str] = field(default_factory=list)
    target_neurons: list[int] = field(default_factory=list)
    objective: str = ""
    seed: int | None = None
    max_generations: int = 0
    image_size: int = 0
    image_format: str = ""
    twin: str = ""
    twin_version: int = 0
    twin_neurons: list[int] = field(default_factory=list)
    candidates_per_presentation: int = 0
    refit_readout: bool = False
    description: str = ""
    # RecordingMetadata fields by name (see engines.session_metadata); checked at creation.
    metadata: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        data = asdict(self)
        data.pop("session_id")
        if not data["metadata"]:
            # Requests without metadata keep the fingerprint they had before the field existed, so a
            # retried create of a session journaled by an older server still matches it.
            data.pop("metadata")
        images = data.pop("natural_images")
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
        for image in images:
            digest.update(hashlib.sha256(image).digest())
        return digest.hexdigest()


@dataclass
class Stimulus:
    stimulus_id: str
    index: int
    kind: str
    image: bytes | None
    sha256: str
    natural_name: str = ""
    predicted_rates: list[float] = field(default_factory=list)
    predicted_score: float | None = None


@dataclass
class Generation:
    session_id: str
    generation: int
    finished: bool
    stimuli: list[Stimulus]
    image_format: str
    created: float = 0.0
    # True when this call proposed (and journaled) the generation; False when it was pending already.
    new: bool = False


@dataclass
class ToldResponse:
    """One stimulus' responses as a caller gives them: ``rates`` (a mean) or ``repeats``, not both."""

    stimulus_id: str
    rates: Sequence[float] | None = None
    repeats: Sequence[Sequence[float]] | None = None
    onset: float | None = None
    duration: float | None = None


@dataclass
class TellResult:
    session_id: str
    generation: int
    generation_complete: bool
    missing_stimulus_ids: list[str]
    best: dict[str, Any]
    generations_told: int
    presentations_told: int
    finished: bool
    # Responses newly journaled by this call (0 for a pure retry), and whether it completed the generation.
    stored: int = 0
    completed_now: bool = False


@dataclass
class SessionView:
    session_id: str
    status: str
    config: SessionConfig
    created: float
    updated: float
    generation: int
    pending: bool
    generations_told: int
    presentations_told: int
    best: dict[str, Any]


def empty_best() -> dict[str, Any]:
    return {
        "generation": -1,
        "stimulus_id": "",
        "score": float("nan"),
        "target_rates": [],
        "best_natural_stimulus_id": "",
        "best_natural_score": float("nan"),
        "last_generation_mean": float("nan"),
        "last_generation_max": float("nan"),
    }


# ------------------------------------------------------------------------------------------------
# Objective, images, naturals


def objective_scores(means: np.ndarray, targets: Sequence[int], objective: str) -> np.ndarray:
    """Per-stimulus objective from responses averaged over repeats, ``means`` [n, neurons]."""
    means = np.asarray(means, dtype=np.float64)
    target_mean = means[:, list(targets)].mean(axis=1)
    if objective == "mean":
        return target_mean
    if objective == "contrast":
        others = np.ones(means.shape[1], dtype=bool)
        others[list(targets)] = False
        return target_mean - means[:, others].mean(axis=1)
    raise InvalidInput(f"objective {objective!r}: expected one of {OBJECTIVES}")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def encode_png_fast(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG with the 'sub' filter and run-length-only deflate.

    Pillow's encoder tries harder for little gain; on smooth generator images the 'sub' filter leaves
    mostly runs, which Z_RLE codes about as small as full deflate in half the time. That keeps a
    40-image generation well inside the Ask budget, and any PNG decoder reads the result.
    """
    height, width, _ = image.shape
    flat = np.ascontiguousarray(image, dtype=np.uint8).reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type 1 (sub): each byte minus the byte one pixel to the left
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = deflate.compress(rows.tobytes()) + deflate.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def encode_stimulus(image: np.ndarray, fmt: str) -> bytes:
    return encode_png_fast(image) if fmt == "png" else encode_jpeg(image, quality=95)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resize_batch(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, height, width, 3], bilinear (antialiased when shrinking).

    Pillow resamples uint8 directly, about twice as fast as interpolating floats in torch.
    """
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = Image.fromarray(np.ascontiguousarray(image), "RGB").resize(
            (width, height), Image.Resampling.BILINEAR
        )
        out[i] = np.asarray(resized)
    return out


def _natural_entries(source: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a folder (recursively) or a .zip, sorted by name."""
    entries: list[tuple[str, bytes]] = []
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if path.is_file():
                if path.stat().st_size > MAX_NATURAL_FILE_BYTES:
                    raise InvalidInput(f"natural image {path}: larger than {MAX_NATURAL_FILE_BYTES} bytes")
                entries.append((str(path.relative_to(source)), path.read_bytes()))
        return entries
    if source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                name = info.filename
                if (
                    info.is_dir()
                    or name.startswith("__MACOSX/")
                    or Path(name).suffix.lower() not in IMAGE_SUFFIXES
                ):
                    continue
                # The declared size is checked before inflating, so a zip bomb costs nothing.
                if info.file_size > MAX_NATURAL_FILE_BYTES:
                    raise InvalidInput(
                        f"natural image {source}:{name}: larger than {MAX_NATURAL_FILE_BYTES} bytes"
                    )
                entries.append((name, archive.read(info)))
        return entries
    raise InvalidInput(f"natural_source {source}: not a folder or a .zip of images")


def prepare_natural_images(
    entries: Sequence[tuple[str, bytes]], image_size: int, image_format: str, limit: int
) -> list[NaturalImage]:
    """Decode, resize to the session's image size and encode in its format, once, at creation."""
    if len(entries) > limit:
        raise InvalidInput(f"{len(entries)} natural images; this server accepts at most {limit} per session")
    prepared: list[NaturalImage] = []
    for index, (name, data) in enumerate(entries):
        pixels = decode_image(data, what=f"natural image {name}")
        pixels = resize_batch(pixels[None], image_size, image_size)[0]
        encoded = encode_stimulus(pixels, image_format)
        prepared.append(NaturalImage(index, name, sha256_hex(encoded), encoded))
    return prepared


def resolve_natural_source(source: str, root: str) -> Path:
    """The folder or zip a session's natural images come from, confined to ``root`` when set."""
    if not root:
        return Path(source).expanduser()
    base = Path(root).expanduser().resolve()
    path = (base / source).resolve()
    if path != base and base not in path.parents:
        raise InvalidInput(f"natural_source {source!r} is outside the server's natural-image root")
    return path


# ------------------------------------------------------------------------------------------------
# Optimizer driver: the one place that knows the optimizers module's interface


def encode_state(state: dict[str, Any]) -> bytes:
    """An optimizer's ``state_dict()`` (JSON-compatible by contract) as journal bytes.

    Not compressed: the state is mostly base64 of float arrays, where zlib saves a quarter of the
    bytes but costs more time than the rest of a Tell.
    """
    return json.dumps(state, sort_keys=True).encode()


def decode_state(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def _options_into(cls: type, options: dict[str, float], fixed: set[str]) -> dict[str, Any]:
    """Map the request's name -> number options onto a config dataclass's typed fields."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    allowed = {
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in fixed and hints[f.name] in (int, float, bool, bool | None, float | None)
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidInput(f"unknown optimizer option(s) {unknown}; this optimizer takes {sorted(allowed)}")
    values: dict[str, Any] = {}
    for name, value in options.items():
        kind = hints[name]
        if kind in (bool, bool | None):
            values[name] = bool(value)
        elif kind is int:
            if value != int(value):
                raise InvalidInput(f"optimizer option {name}: expected an integer, got {value}")
            values[name] = int(value)
        else:
            values[name] = float(value)
    return values


def _screening_classes() -> tuple[type, type]:
    """CMA-ES and GA subclasses that can sample more candidates than they are told about."""
    from neurotwin.engines.optimizers import CMAES, GeneticAlgorithm

    class ScreenedCMAES(CMAES):
        # pycma can sample any number of points from its current distribution and learns from any
        # popsize-sized subset of them: the twin picks which ones are measured.
        def propose(self, n: int) -> np.ndarray:
            if n == self.population:
                return self.ask()
            self._pending = None
            return np.asarray(self.es.ask(number=n), dtype=np.float64)

        def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
            self._pending = np.asarray(latents, dtype=np.float64)
            self.tell(scores)
            # pycma remembers every point it handed out (up to 1,000) until it is told about it; the
            # candidates the twin passed over never will be, and would bloat every journaled state.
            archive = getattr(self.es, "sent_solutions", None)
            if archive is not None:
                archive.truncate_to(0)

    class ScreenedGA(GeneticAlgorithm):
        # The GA's next generation is fully determined by the last one, so there is nothing to screen.
        def propose(self, n: int) -> np.ndarray:
            if n != self.population:
                raise InvalidInput("twin pre-screening (candidates_per_presentation > 1) needs cma-es")
            return self.ask()

        def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
            if not np.array_equal(latents, self.ask()):
                raise InvalidInput("GA update: latents are not the pending generation")
            self.tell(scores)

    return ScreenedCMAES, ScreenedGA


class OptimizerDriver:
    """Builds and restores a session's optimizer from ``neurotwin.engines.optimizers``.

    ``propose(n)`` samples ``n`` latents (more than the population when the twin pre-screens);
    ``update(latents, scores)`` tells it the measured objective of the presented ones.
    """

    def __init__(
        self, config: SessionConfig, prior: dict[str, Any], initial: np.ndarray | None = None
    ) -> None:
        from neurotwin.engines.optimizers import CMAESConfig, GeneticConfig

        cmaes_cls, ga_cls = _screening_classes()
        self.config = config
        options = dict(config.optimizer_options)
        std = float(prior.get("std", 1.0))
        if config.optimizer == "cma-es":
            values = _options_into(CMAESConfig, options, {"population"})
            values.setdefault("sigma0", std)
            x0 = np.full(config.latent_dim, float(prior.get("mean", 0.0)))
            self.optimizer = cmaes_cls(
                x0, CMAESConfig(population=config.population_size, **values), seed=config.seed
            )
        else:
            values = _options_into(GeneticConfig, options, {"population"})
            values.setdefault("latent_std", std)
            if initial is None:
                initial = np.zeros((config.population_size, config.latent_dim))
            self.optimizer = ga_cls(
                initial, GeneticConfig(population=config.population_size, **values), seed=config.seed
            )

    def propose(self, n: int) -> np.ndarray:
        latents = self.optimizer.propose(n)
        if latents.shape != (n, self.config.latent_dim):
            raise ModelStoreError(
                f"optimizer returned latents of shape {latents.shape}, expected {(n, self.config.latent_dim)}"
            )
        return latents

    def update(self, latents: np.ndarray, scores: np.ndarray) -> None:
        self.optimizer.update(np.asarray(latents, dtype=np.float64), np.asarray(scores, dtype=np.float64))

    def state(self) -> bytes:
        return encode_state(self.optimizer.state_dict())

    def load(self, data: bytes) -> None:
        self.optimizer.load_state_dict(decode_state(data))

    def trajectory(self) -> dict[str, float]:
        """Scalars describing the optimizer now, for the exported trajectory."""
        sigma = getattr(self.optimizer, "sigma", None)
        return {"sigma": float(sigma)} if isinstance(sigma, int | float) else {}


# ------------------------------------------------------------------------------------------------
# Twin guidance


@dataclass
class Readout:
    """Ridge map from the twin's predicted rates (all outputs) to the measured objective."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float
    loo_r: float
    samples: int

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def fit_readout(features: np.ndarray, targets: np.ndarray) -> Readout | None:
    """Ridge with the penalty chosen by exact leave-one-out error (hat-matrix identity, one SVD)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    n = len(y)
    if n < READOUT_MIN_SAMPLES or not np.isfinite(x).all() or not np.isfinite(y).all():
        return None
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0
    z = (x - mean) / scale
    y_mean = float(y.mean())
    yc = y - y_mean
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ yc
    best: tuple[float, float, np.ndarray] | None = None
    for alpha in READOUT_ALPHAS:
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink * uty)
        # The intercept is fitted too, which adds 1/n to every leverage.
        leverage = (u**2) @ shrink + 1.0 / n
        loo_residual = (yc - fitted) / np.clip(1.0 - leverage, 1e-9, None)
        error = float(np.mean(loo_residual**2))
        if best is None or error < best[0]:
            best = (error, alpha, loo_residual)
    assert best is not None
    _, alpha, loo_residual = best
    coef = vt.T @ ((s / (s**2 + alpha)) * uty)
    return Readout(mean, scale, coef, y_mean, alpha, _pearson(y - loo_residual, y), n)


def _latent_prior(generator: Any) -> dict[str, Any]:
    card = getattr(generator, "card", None)
    if card is not None and card.latent_prior:
        return dict(card.latent_prior)
    return dict(generator.latent_prior())


class Twin:
    """A predictor from the store, run with ONNX Runtime on uint8 images of any size."""

    def __init__(self, store: ModelStore, name: str, version: int, threads: int = 0) -> None:
        from neurotwin.runtimes.onnx_session import PredictorSession, SessionSettings
        from neurotwin.store import validate_predictor

        self.version = store.resolve(PREDICTORS, name, version)
        self.card = validate_predictor(self.version)
        self.session = PredictorSession(
            self.version.model_path, self.card, SessionSettings(device="cpu", intra_op_threads=threads)
        )

    @property
    def neurons(self) -> int:
        return self.card.neuron_count

    def predict(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        images = resize_batch(images, self.card.input.height, self.card.input.width)
        parts = [self.session.run(images[i : i + batch]) for i in range(0, len(images), batch)]
        return np.concatenate(parts, axis=0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Live session state


@dataclass
class _Pending:
    generation: GenerationRecord
    stimuli: list[StimulusRecord]
    responses: dict[int, ResponseRecord]
    # Presentation positions of the synthetic stimuli, in the order the optimizer is told.
    synthetic_positions: list[int]

    def by_id(self) -> dict[str, StimulusRecord]:
        return {s.stimulus_id: s for s in self.stimuli}


class _Live:
    """A session loaded into memory; rebuilt from the journal whenever the journal moved on."""

    def __init__(self, record: SessionRecord, config: SessionConfig) -> None:
        self.record = record
        self.config = config
        self.driver: OptimizerDriver | None = None
        self.generator: Any = None
        self.twin: Twin | None = None
        self.pending: _Pending | None = None
        self.natural_names: list[str] = []
        self.natural_order: np.ndarray = np.zeros(0, dtype=np.int64)
        # Measured objective and twin predictions of every told stimulus (for the refit readout).
        self.features: list[np.ndarray] = []
        self.targets: list[float] = []
        self.readout: Readout | None = None
        self.readout_samples = -1
        self.readout_beats_twin = False
        self.readout_twin_r = float("nan")

    @property
    def finished(self) -> bool:
        limit = self.config.max_generations
        return self.record.status != OPEN or (limit > 0 and self.record.generation >= limit)


# ------------------------------------------------------------------------------------------------
# Engine


class ClosedLoopEngine:
    """All closed-loop sessions of one server (or one replica sharing a PostgreSQL journal)."""

    def __init__(
        self,
        store: ModelStore,
        journal: Journal,
        *,
        max_sessions: int = 64,
        natural_root: str = "",
        max_natural_images: int = 10000,
        default_generator: str = "v4-dcgan",
        device: str = "cpu",
        twin_threads: int = 0,
    ) -> None:
        self.store = store
        self.journal = journal
        self.max_sessions = max_sessions
        self.natural_root = natural_root
        self.max_natural_images = max_natural_images
        self.default_generator = default_generator
        self.device = device
        self.twin_threads = twin_threads
        self._lock = threading.Lock()
        # Striped rather than one lock per id, so ids a client invents cannot grow a dict forever.
        self._session_locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._live: dict[str, _Live] = {}
        self._generators: dict[tuple[str, int], Any] = {}
        self._twins: dict[tuple[str, int], Twin] = {}

    # -- models -------------------------------------------------------------------------------------
    def _generator(self, name: str, version: int) -> Any:
        key = (name, version)
        with self._lock:
            cached = self._generators.get(key)
        if cached is not None:
            return cached
        from neurotwin.runtimes.generators import load_generator

        module = load_generator(self.store.resolve(GENERATORS, name, version), self.device)
        with self._lock:
            return self._generators.setdefault(key, module)

    def _twin(self, name: str, version: int) -> Twin:
        key = (name, version)
        with self._lock:
            cached = self._twins.get(key)
        if cached is not None:
            return cached
        twin = Twin(self.store, name, version, self.twin_threads)
        with self._lock:
            return self._twins.setdefault(key, twin)

    def _session_lock(self, session_id: str) -> threading.Lock:
        digest = hashlib.blake2b(session_id.encode(), digest_size=4).digest()
        return self._session_locks[int.from_bytes(digest, "little") % LOCK_STRIPES]

    # -- creation -----------------------------------------------------------------------------------
    def create_session(self, request: SessionRequest) -> SessionView:
        session_id = request.session_id or secrets.token_hex(8)
        if not SESSION_ID.match(session_id):
            raise InvalidInput(f"session_id {session_id!r}: 1-64 letters, digits, '.', '_' or '-'")
        fingerprint = request.fingerprint()
        with self._session_lock(session_id):
            existing = self._existing(session_id, fingerprint)
            if existing is not None:
                return existing
            open_count = len(self.journal.list_sessions(open_only=True))
            if open_count >= self.max_sessions:
                raise ResourceExhausted(
                    f"{open_count} sessions are open (limit {self.max_sessions}); close one first"
                )
            config, natural = self._resolve(session_id, request, fingerprint)
            driver = self._new_driver(config)
            now = time.time()
            record = SessionRecord(
                session_id=session_id, config=config.to_dict(), created=now, updated=now, best=empty_best()
            )
            if not self.journal.create_session(record, natural, driver.state()):
                # Another replica created it between our check and our insert.
                existing = self._existing(session_id, fingerprint)
                assert existing is not None
                return existing
            log.info(
                "closed-loop session %s created (%s, %s)", session_id, config.generator, config.optimizer
            )
            return self._view(record)

    def _existing(self, session_id: str, fingerprint: str) -> SessionView | None:
        """The session with this id if it exists with the same settings (a retried create)."""
        try:
            existing = self.journal.get_session(session_id)
        except NotFound:
            return None
        if existing.config.get("fingerprint") != fingerprint:
            raise FailedPrecondition(f"session {session_id!r} exists with different settings")
        return self._view(existing)

    def _resolve(
        self, session_id: str, req: SessionRequest, fingerprint: str
    ) -> tuple[SessionConfig, list[NaturalImage]]:
        optimizer = (req.optimizer or "cma-es").lower()
        if optimizer in ("cmaes", "cma"):
            optimizer = "cma-es"
        if optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer {req.optimizer!r}: expected one of {OPTIMIZERS}")
        objective = (req.objective or "mean").lower()
        if objective not in OBJECTIVES:
            raise InvalidInput(f"objective {req.objective!r}: expected one of {OBJECTIVES}")
        image_format = (req.image_format or "png").lower().replace("jpg", "jpeg")
        if image_format not in IMAGE_FORMATS:
            raise InvalidInput(f"image_format {req.image_format!r}: expected one of {IMAGE_FORMATS}")
        population = req.population_size or DEFAULT_POPULATION
        if not 2 <= population <= MAX_POPULATION:
            raise InvalidInput(f"population_size {population}: must be between 2 and {MAX_POPULATION}")
        if not 0 <= req.natural_per_generation <= MAX_NATURAL_PER_GENERATION:
            raise InvalidInput(
                f"natural_per_generation {req.natural_per_generation}: 0..{MAX_NATURAL_PER_GENERATION}"
            )
        if req.max_generations < 0:
            raise InvalidInput(f"max_generations {req.max_generations}: must be >= 0 (0: no limit)")
        if req.image_size < 0 or req.image_size > MAX_IMAGE_SIZE:
            raise InvalidInput(f"image_size {req.image_size}: 0 (generator's) or up to {MAX_IMAGE_SIZE}")
        neuron_count = req.neuron_count or len(req.neuron_ids)
        if not 1 <= neuron_count <= MAX_NEURONS:
            raise InvalidInput(f"neuron_count {req.neuron_count}: must be between 1 and {MAX_NEURONS}")
        if req.neuron_ids and len(req.neuron_ids) != neuron_count:
            raise InvalidInput(f"{len(req.neuron_ids)} neuron_ids for neuron_count {neuron_count}")
        if len(set(req.neuron_ids)) != len(req.neuron_ids):
            raise InvalidInput("neuron_ids must be unique")
        targets = list(req.target_neurons) or [0]
        bad = [t for t in targets if not 0 <= t < neuron_count]
        if bad or len(set(targets)) != len(targets):
            raise InvalidInput(
                f"target_neurons {targets}: must be distinct indices below neuron_count {neuron_count}"
            )
        if objective == "contrast" and len(targets) >= neuron_count:
            raise InvalidInput("objective 'contrast' needs at least one recorded neuron that is not a target")
        seed = secrets.randbits(63) if req.seed is None else int(req.seed)
        if not 0 <= seed < 2**63:
            raise InvalidInput(f"seed {seed}: must be in [0, 2**63)")
        options = {str(k): float(v) for k, v in req.optimizer_options.items()}
        if not all(np.isfinite(v) for v in options.values()):
            raise InvalidInput(f"optimizer_options {options}: values must be finite")

        generator_name = req.generator or self.default_generator
        generator_version = self.store.resolve(GENERATORS, generator_name, req.generator_version)
        generator = self._generator(generator_name, generator_version.version)
        image_size = req.image_size or int(generator.resolution)
        if image_size < 8:
            raise InvalidInput(f"image_size {image_size}: at least 8 pixels")

        twin_name, twin_version, twin_neurons = "", 0, []
        factor = req.candidates_per_presentation
        if req.twin:
            twin = self._twin(req.twin, self.store.resolve(PREDICTORS, req.twin, req.twin_version).version)
            twin_name, twin_version = req.twin, twin.version.version
            twin_neurons = self._map_twin_neurons(req, targets, twin)
            if factor < 0 or population * max(1, factor) > MAX_CANDIDATES:
                raise InvalidInput(
                    f"candidates_per_presentation {factor}: population x candidates must be at most "
                    f"{MAX_CANDIDATES}"
                )
        elif factor > 1 or req.refit_readout or req.twin_neurons:
            raise InvalidInput("candidates_per_presentation, refit_readout and twin_neurons need a twin")

        if req.natural_source and req.natural_images:
            raise InvalidInput("give natural_source or natural_images, not both")
        entries: list[tuple[str, bytes]] = []
        if req.natural_source:
            entries = _natural_entries(resolve_natural_source(req.natural_source, self.natural_root))
        elif req.natural_images:
            entries = [(f"image{i:05d}", data) for i, data in enumerate(req.natural_images)]
        if req.natural_per_generation and not entries:
            raise InvalidInput(
                "natural_per_generation > 0 needs natural images (natural_source or natural_images)"
            )
        natural = prepare_natural_images(entries, image_size, image_format, self.max_natural_images)

        config = SessionConfig(
            session_id=session_id,
            generator=generator_name,
            generator_version=generator_version.version,
            latent_dim=int(generator.latent_dim),
            generator_resolution=int(generator.resolution),
            neuron_count=neuron_count,
            seed=seed,
            image_size=image_size,
            optimizer=optimizer,
            optimizer_options=options,
            population_size=population,
            natural_per_generation=req.natural_per_generation,
            natural_source=req.natural_source,
            natural_count=len(natural),
            neuron_ids=list(req.neuron_ids),
            target_neurons=targets,
            objective=objective,
            max_generations=req.max_generations,
            image_format=image_format,
            twin=twin_name,
            twin_version=twin_version,
            twin_neurons=twin_neurons,
            candidates_per_presentation=max(0, factor) if twin_name else 0,
            refit_readout=bool(req.refit_readout),
            description=req.description,
            metadata=RecordingMetadata.from_dict(req.metadata).to_dict(),
            fingerprint=fingerprint,
        )
        if config.optimizer == "ga" and config.candidates > population:
            raise InvalidInput("twin pre-screening (candidates_per_presentation > 1) needs optimizer cma-es")
        # Building the optimizer now makes bad option names or values fail here, not at the first Ask.
        self._new_driver(config)
        return config, natural

    def _new_driver(self, config: SessionConfig) -> OptimizerDriver:
        generator = self._generator(config.generator, config.generator_version)
        initial = None
        if config.optimizer == "ga":
            import torch

            # The GA starts from draws of the generator's own latent prior, seeded by the session.
            rng = torch.Generator().manual_seed(config.seed)
            initial = generator.sample_latents(config.population_size, rng).double().cpu().numpy()
        try:
            return OptimizerDriver(config, _latent_prior(generator), initial)
        except InvalidInput:
            raise
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f"optimizer {config.optimizer} options {config.optimizer_options}: {exc}"
            ) from exc

    @staticmethod
    def _map_twin_neurons(req: SessionRequest, targets: list[int], twin: Twin) -> list[int]:
        if req.twin_neurons:
            mapped = list(req.twin_neurons)
            if len(mapped) != len(targets):
                raise InvalidInput(f"{len(mapped)} twin_neurons for {len(targets)} target_neurons")
        elif req.neuron_ids and all(req.neuron_ids[t] in twin.card.neuron_ids for t in targets):
            mapped = [twin.card.neuron_ids.index(req.neuron_ids[t]) for t in targets]
        else:
            mapped = list(targets)
        bad = [m for m in mapped if not 0 <= m < twin.neurons]
        if bad:
            raise InvalidInput(
                f"twin neurons {bad} out of range: twin {twin.card.name} has {twin.neurons} outputs "
                "(give twin_neurons to map target neurons to twin outputs)"
            )
        return mapped

    # -- loading ------------------------------------------------------------------------------------
    def _get_live(self, session_id: str) -> _Live:
        """The in-memory session, reloaded if the journal moved on (another replica, or a restart)."""
        revision = self.journal.revision(session_id)
        with self._lock:
            live = self._live.get(session_id)
        if live is not None and live.record.revision == revision:
            return live
        live = self._load(session_id)
        with self._lock:
            self._live[session_id] = live
        return live

    def _evict(self, session_id: str) -> None:
        with self._lock:
            self._live.pop(session_id, None)

    def _load(self, session_id: str) -> _Live:
        record = self.journal.get_session(session_id)
        config = SessionConfig.from_dict(record.config)
        live = _Live(record, config)
        live.generator = self._generator(config.generator, config.generator_version)
        if config.twin:
            live.twin = self._twin(config.twin, config.twin_version)
        live.driver = OptimizerDriver(config, _latent_prior(live.generator))
        live.driver.load(self.journal.optimizer_state(session_id))
        if config.natural_count:
            live.natural_names = [n.name for n in self.journal.natural_images(session_id, with_data=False)]
            live.natural_order = np.random.default_rng([config.seed, 7]).permutation(config.natural_count)
        if config.refit_readout and live.twin is not None:
            self._load_readout_data(live)
        stimuli = self.journal.stimuli(session_id, record.generation)
        if stimuli and record.status == OPEN:
            generation = next(
                g for g in self.journal.generations(session_id) if g.generation == record.generation
            )
            responses = {r.index: r for r in self.journal.responses(session_id, record.generation)}
            synthetic = generation.meta.get("synthetic_positions", [])
            live.pending = _Pending(generation, stimuli, responses, list(synthetic))
            self._replay_ask(live)
        return live

    def _replay_ask(self, live: _Live) -> None:
        """Re-ask the restored optimizer: it must reproduce the journaled candidates bit for bit."""
        assert live.pending is not None and live.driver is not None
        candidates = live.driver.propose(live.config.candidates)
        digest = hashlib.sha256(np.ascontiguousarray(candidates).tobytes()).hexdigest()
        journaled = live.pending.generation.meta.get("candidates_sha256")
        if journaled and digest != journaled:
            raise ModelStoreError(
                f"session {live.record.session_id}: the optimizer restored from the journal proposes "
                f"different latents for generation {live.record.generation} than it did before the restart "
                "(different optimizer library version?)"
            )

    def _load_readout_data(self, live: _Live) -> None:
        cfg = live.config
        stimuli = {
            (s.generation, s.index): s
            for s in self.journal.stimuli(live.record.session_id, with_images=False)
        }
        told = [
            r for r in self.journal.responses(live.record.session_id) if r.generation < live.record.generation
        ]
        if not told:
            return
        means = np.stack([r.mean for r in told])
        scores = objective_scores(means, cfg.target_neurons, cfg.objective)
        for response, score in zip(told, scores, strict=True):
            predicted = stimuli[(response.generation, response.index)].predicted
            if predicted is not None:
                live.features.append(predicted.astype(np.float64))
                live.targets.append(float(score))

    # -- Ask ----------------------------------------------------------------------------------------
    def ask(self, session_id: str, with_images: bool = True) -> Generation:
        with self._session_lock(session_id):
            for attempt in range(3):
                live = self._get_live(session_id)
                try:
                    return self._ask(live, with_images)
                except ConcurrentModification:
                    # Another replica proposed this generation first: reload and return theirs.
                    self._evict(session_id)
                    if attempt == 2:
                        raise
                except (InvalidInput, FailedPrecondition):
                    raise  # refused before anything changed: the loaded state is still right
                except BaseException:
                    # The optimizer may have moved without the journal: rebuild from the journal.
                    self._evict(session_id)
                    raise
        raise AssertionError("unreachable")

    def _ask(self, live: _Live, with_images: bool) -> Generation:
        cfg = live.config
        if live.finished:
            return Generation(cfg.session_id, live.record.generation, True, [], cfg.image_format)
        new = live.pending is None
        if new:
            self._propose(live)
        view = self._generation_view(live, with_images)
        view.new = new
        return view

    def _generation_view(self, live: _Live, with_images: bool) -> Generation:
        assert live.pending is not None
        cfg = live.config
        stimuli = []
        for s in live.pending.stimuli:
            rates: list[float] = []
            if s.predicted is not None:
                rates = [float(s.predicted[m]) for m in cfg.twin_neurons]
            stimuli.append(
                Stimulus(
                    stimulus_id=s.stimulus_id,
                    index=s.index,
                    kind=s.kind,
                    image=s.image if with_images else None,
                    sha256=s.sha256,
                    natural_name=live.natural_names[s.natural_index] if s.natural_index is not None else "",
                    predicted_rates=rates,
                    predicted_score=s.predicted_score,
                )
            )
        generation = live.pending.generation
        return Generation(
            cfg.session_id, generation.generation, False, stimuli, cfg.image_format, generation.created
        )

    def render(self, generator: Any, latents: np.ndarray, size: int) -> np.ndarray:
        """Latents [n, D] -> uint8 [n, size, size, 3] through the generator, in chunks."""
        import torch

        out = np.empty((len(latents), size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, len(latents), RENDER_CHUNK):
                z = torch.as_tensor(
                    latents[start : start + RENDER_CHUNK], dtype=torch.float32, device=generator.device
                )
                images = generator(z).float().clamp_(0, 1).mul_(255).round_()
                pixels = images.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
                # Quantize at the generator's resolution, then resample: cheaper than resampling floats.
                out[start : start + len(z)] = resize_batch(pixels, size, size)
        return out

    def _guide_scores(self, live: _Live, predicted: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Scores to rank candidates by: the objective on the twin's outputs, or the refit readout."""
        cfg = live.config
        twin_scores = self._twin_objective(live, predicted)
        meta: dict[str, Any] = {"ranking": "twin"}
        if cfg.refit_readout and len(live.targets) >= READOUT_MIN_SAMPLES:
            if live.readout_samples != len(live.targets):
                features = np.stack(live.features)
                targets = np.asarray(live.targets)
                live.readout = fit_readout(features, targets)
                live.readout_samples = len(live.targets)
                twin_r = _pearson(self._twin_objective(live, features), targets)
                live.readout_beats_twin = live.readout is not None and live.readout.loo_r > twin_r
                live.readout_twin_r = twin_r
            if live.readout is not None:
                meta.update(
                    readout_loo_r=live.readout.loo_r,
                    twin_r=live.readout_twin_r,
                    readout_alpha=live.readout.alpha,
                    readout_samples=live.readout.samples,
                )
                if live.readout_beats_twin:
                    meta["ranking"] = "readout"
                    return live.readout.predict(predicted), meta
        return twin_scores, meta

    @staticmethod
    def _twin_objective(live: _Live, predicted: np.ndarray) -> np.ndarray:
        cfg = live.config
        objective = cfg.objective
        if objective == "contrast" and predicted.shape[1] <= len(cfg.twin_neurons):
            objective = "mean"
        return objective_scores(predicted, cfg.twin_neurons, objective)

    def _propose(self, live: _Live) -> None:
        cfg = live.config
        assert live.driver is not None
        g = live.record.generation
        population = cfg.population_size
        candidates = live.driver.propose(cfg.candidates)
        meta: dict[str, Any] = {
            "candidates": len(candidates),
            "candidates_sha256": hashlib.sha256(np.ascontiguousarray(candidates).tobytes()).hexdigest(),
        }
        pixels = self.render(live.generator, candidates, cfg.image_size)
        predicted: np.ndarray | None = None
        guide = np.zeros(len(candidates))
        if live.twin is not None:
            predicted = live.twin.predict(pixels)
            guide, ranking = self._guide_scores(live, predicted.astype(np.float64))
            meta.update(ranking)
        if len(candidates) > population:
            # Stable sort: equal scores keep sampling order, so the choice is deterministic.
            chosen = np.sort(np.argsort(-guide, kind="stable")[:population])
            meta["guide_presented_mean"] = float(guide[chosen].mean())
            meta["guide_candidates_mean"] = float(guide.mean())
        else:
            chosen = np.arange(len(candidates))

        k = cfg.natural_per_generation
        natural_indices: list[int] = []
        if k:
            order = live.natural_order
            natural_indices = [int(order[(g * k + j) % len(order)]) for j in range(k)]
        natural = self.journal.natural_images(cfg.session_id, natural_indices) if k else []
        natural_predicted: np.ndarray | None = None
        natural_guide = np.zeros(len(natural))
        if live.twin is not None and natural:
            decoded = np.stack([decode_image(n.data) for n in natural])
            natural_predicted = live.twin.predict(decoded)
            natural_guide = self._guide_scores(live, natural_predicted.astype(np.float64))[0]
        # Natural images take random places among the synthetic ones (the same on every replay).
        placement = np.random.default_rng([cfg.seed, g, 11]).permutation(population + k)
        stimuli: list[StimulusRecord] = []
        synthetic_positions = [0] * population
        for position, item in enumerate(placement.tolist()):
            stimulus_id = f"g{g:04d}-s{position:03d}"
            if item < population:
                c = int(chosen[item])
                image = encode_stimulus(pixels[c], cfg.image_format)
                synthetic_positions[item] = position
                stimuli.append(
                    StimulusRecord(
                        generation=g,
                        index=position,
                        stimulus_id=stimulus_id,
                        kind=SYNTHETIC,
                        sha256=sha256_hex(image),
                        image=image,
                        latent=candidates[c],
                        predicted=None if predicted is None else predicted[c],
                        predicted_score=None if predicted is None else float(guide[c]),
                    )
                )
            else:
                j = item - population
                image_record = natural[j]
                rates = None if natural_predicted is None else natural_predicted[j]
                stimuli.append(
                    StimulusRecord(
                        generation=g,
                        index=position,
                        stimulus_id=stimulus_id,
                        kind=NATURAL,
                        sha256=image_record.sha256,
                        image=image_record.data,
                        natural_index=image_record.index,
                        predicted=rates,
                        predicted_score=None if rates is None else float(natural_guide[j]),
                    )
                )
        meta["synthetic_positions"] = synthetic_positions
        record = GenerationRecord(generation=g, created=time.time(), meta=meta)
        live.record.revision = self.journal.add_generation(
            cfg.session_id, live.record.revision, record, stimuli
        )
        live.pending = _Pending(record, stimuli, {}, synthetic_positions)

    # -- Tell ---------------------------------------------------------------------------------------
    def tell(
        self, session_id: str, generation: int, responses: Sequence[ToldResponse], partial: bool = False
    ) -> TellResult:
        with self._session_lock(session_id):
            for attempt in range(3):
                live = self._get_live(session_id)
                try:
                    return self._tell(live, generation, responses, partial)
                except ConcurrentModification:
                    self._evict(session_id)
                    if attempt == 2:
                        raise
                except (InvalidInput, FailedPrecondition):
                    raise  # refused before anything changed: the loaded state is still right
                except BaseException:
                    # The optimizer may have moved without the journal: rebuild from the journal.
                    self._evict(session_id)
                    raise
        raise AssertionError("unreachable")

    def _validate_responses(
        self,
        live: _Live,
        generation: int,
        responses: Sequence[ToldResponse],
        stimuli: dict[str, StimulusRecord],
    ) -> list[ResponseRecord]:
        """Every check that can fail on the values alone; raises before anything is stored."""
        cfg = live.config
        n = cfg.neuron_count
        seen: set[str] = set()
        now = time.time()
        records = []
        if not responses:
            raise InvalidInput("Tell without responses")
        for r in responses:
            sid = r.stimulus_id
            if sid in seen:
                raise InvalidInput(f"stimulus {sid!r} appears twice in one Tell")
            seen.add(sid)
            stimulus = stimuli.get(sid)
            if stimulus is None:
                raise InvalidInput(f"stimulus {sid!r} is not part of generation {generation}")
            has_rates = r.rates is not None and len(r.rates) > 0
            has_repeats = r.repeats is not None and len(r.repeats) > 0
            if has_rates == has_repeats:
                raise InvalidInput(f"stimulus {sid!r}: give rates or repeats (exactly one of them)")
            rows = [list(r.rates)] if has_rates else [list(rep) for rep in r.repeats or ()]
            for i, row in enumerate(rows):
                if len(row) != n:
                    what = "rates" if has_rates else f"repeat {i}"
                    raise InvalidInput(
                        f"stimulus {sid!r}: {what} has {len(row)} values, expected {n} (neuron_count)"
                    )
            values = np.asarray(rows, dtype=np.float64)
            if not np.isfinite(values).all():
                raise InvalidInput(f"stimulus {sid!r}: responses must be finite (found NaN or Inf)")
            values32 = values.astype(np.float32)
            if not np.isfinite(values32).all():
                raise InvalidInput(f"stimulus {sid!r}: responses overflow float32")
            for name, value in (("onset_time", r.onset), ("duration", r.duration)):
                if value is not None and not np.isfinite(value):
                    raise InvalidInput(f"stimulus {sid!r}: {name} must be finite")
            if r.duration is not None and r.duration < 0:
                raise InvalidInput(f"stimulus {sid!r}: duration {r.duration} must be >= 0")
            records.append(
                ResponseRecord(
                    generation=generation,
                    index=stimulus.index,
                    repeats=values32,
                    received=now,
                    # None is unknown; an onset of 0.0 is the session clock's first instant.
                    onset=r.onset,
                    duration=r.duration or None,
                )
            )
        return records

    def _tell(
        self, live: _Live, generation: int, responses: Sequence[ToldResponse], partial: bool
    ) -> TellResult:
        cfg = live.config
        current = live.record.generation
        if live.record.status == CLOSED:
            raise FailedPrecondition(f"session {cfg.session_id} is closed")
        if generation < current:
            return self._retell_completed(live, generation, responses)
        if live.finished:
            raise FailedPrecondition(
                f"session {cfg.session_id} finished after {current} generations; generation {generation} "
                "was never asked"
            )
        if generation > current or live.pending is None:
            what = "pending" if live.pending is not None else "next to be asked"
            raise FailedPrecondition(
                f"generation {generation} has not been asked; generation {current} is {what} (Ask first)"
            )
        pending = live.pending
        by_id = pending.by_id()
        records = self._validate_responses(live, generation, responses, by_id)
        new: list[ResponseRecord] = []
        for record in records:
            told = pending.responses.get(record.index)
            if told is None:
                new.append(record)
            elif told.digest() != record.digest():
                sid = pending.stimuli[record.index].stimulus_id
                raise FailedPrecondition(
                    f"stimulus {sid} of generation {generation} was already told different responses"
                )
        told_indices = set(pending.responses) | {r.index for r in new}
        missing = [s.stimulus_id for s in pending.stimuli if s.index not in told_indices]
        if missing and not partial:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise FailedPrecondition(
                f"generation {generation} is incomplete: no responses for {len(missing)} of "
                f"{len(pending.stimuli)} stimuli ({shown}); tell them all, or set partial"
            )
        completion = None
        if not missing:
            completion = self._complete(live, [*pending.responses.values(), *new])
        if new or completion is not None:
            live.record.revision = self.journal.add_responses(
                cfg.session_id, live.record.revision, new, completion
            )
            live.record.presentations_told += len(new)
            for record in new:
                pending.responses[record.index] = record
        if completion is not None:
            live.record.generation = completion.generation + 1
            live.record.best = completion.best
            live.record.status = completion.status
            live.pending = None
        return TellResult(
            session_id=cfg.session_id,
            generation=generation,
            generation_complete=completion is not None,
            missing_stimulus_ids=missing,
            best=live.record.best,
            generations_told=live.record.generation,
            presentations_told=live.record.presentations_told,
            finished=live.finished,
            stored=len(new),
            completed_now=completion is not None,
        )

    def _retell_completed(
        self, live: _Live, generation: int, responses: Sequence[ToldResponse]
    ) -> TellResult:
        """A Tell for a completed generation: fine when it repeats what was told, else stale."""
        cfg = live.config
        stimuli = {
            s.stimulus_id: s for s in self.journal.stimuli(cfg.session_id, generation, with_images=False)
        }
        records = self._validate_responses(live, generation, responses, stimuli)
        stored = {r.index: r for r in self.journal.responses(cfg.session_id, generation)}
        for record in records:
            told = stored.get(record.index)
            if told is None or told.digest() != record.digest():
                raise FailedPrecondition(
                    f"generation {generation} is already complete (stale Tell); the pending generation is "
                    f"{live.record.generation}"
                )
        return TellResult(
            session_id=cfg.session_id,
            generation=generation,
            generation_complete=True,
            missing_stimulus_ids=[],
            best=live.record.best,
            generations_told=live.record.generation,
            presentations_told=live.record.presentations_told,
            finished=live.finished,
        )

    def _complete(self, live: _Live, responses: list[ResponseRecord]) -> Completion:
        """Score the finished generation, step the optimizer, and build what to journal."""
        cfg = live.config
        assert live.pending is not None and live.driver is not None
        pending = live.pending
        by_index = {r.index: r for r in responses}
        means = np.stack([by_index[s.index].mean for s in pending.stimuli])
        scores = objective_scores(means, cfg.target_neurons, cfg.objective)
        synthetic = pending.synthetic_positions
        latents = np.stack([pending.stimuli[p].latent for p in synthetic])
        synthetic_scores = scores[synthetic]
        live.driver.update(latents, synthetic_scores)
        state = live.driver.state()

        best = dict(live.record.best)
        i = int(np.argmax(synthetic_scores))
        if best["generation"] < 0 or synthetic_scores[i] > best["score"]:
            p = synthetic[i]
            best.update(
                generation=pending.generation.generation,
                stimulus_id=pending.stimuli[p].stimulus_id,
                score=float(synthetic_scores[i]),
                target_rates=[float(v) for v in means[p, cfg.target_neurons]],
            )
        natural_positions = [s.index for s in pending.stimuli if s.kind == NATURAL]
        if natural_positions:
            j = natural_positions[int(np.argmax(scores[natural_positions]))]
            if not np.isfinite(best["best_natural_score"]) or scores[j] > best["best_natural_score"]:
                best.update(
                    best_natural_stimulus_id=pending.stimuli[j].stimulus_id,
                    best_natural_score=float(scores[j]),
                )
        best.update(
            last_generation_mean=float(synthetic_scores.mean()),
            last_generation_max=float(synthetic_scores.max()),
        )

        summary: dict[str, Any] = {
            "synthetic_mean": float(synthetic_scores.mean()),
            "synthetic_max": float(synthetic_scores.max()),
            "synthetic_median": float(np.median(synthetic_scores)),
            "best_so_far": float(best["score"]),
            "latent_mean": [float(v) for v in latents.mean(axis=0)],
            **{f"optimizer_{k}": v for k, v in live.driver.trajectory().items()},
        }
        if natural_positions:
            summary["natural_mean"] = float(scores[natural_positions].mean())
            summary["natural_max"] = float(scores[natural_positions].max())
        if cfg.refit_readout and live.twin is not None:
            for s, score in zip(pending.stimuli, scores, strict=True):
                if s.predicted is not None:
                    live.features.append(s.predicted.astype(np.float64))
                    live.targets.append(float(score))
        g = pending.generation.generation
        limit = cfg.max_generations
        status = FINISHED if limit > 0 and g + 1 >= limit else OPEN
        return Completion(
            generation=g, told=time.time(), summary=summary, optimizer_state=state, best=best, status=status
        )

    # -- queries and lifecycle ----------------------------------------------------------------------
    def _view(self, record: SessionRecord) -> SessionView:
        config = SessionConfig.from_dict(record.config)
        pending = False
        if record.status == OPEN:
            with self._lock:
                live = self._live.get(record.session_id)
            if live is not None and live.record.revision == record.revision:
                pending = live.pending is not None
            else:
                pending = bool(self.journal.stimuli(record.session_id, record.generation, with_images=False))
        return SessionView(
            session_id=record.session_id,
            status=record.status,
            config=config,
            created=record.created,
            updated=record.updated,
            generation=record.generation,
            pending=pending,
            generations_told=record.generation,
            presentations_told=record.presentations_told,
            best=record.best,
        )

    def get_session(self, session_id: str) -> SessionView:
        return self._view(self.journal.get_session(session_id))

    def list_sessions(self, open_only: bool = False) -> list[SessionView]:
        return [self._view(r) for r in self.journal.list_sessions(open_only)]

    def open_session_count(self) -> int:
        return len(self.journal.list_sessions(open_only=True))

    def close_session(self, session_id: str) -> SessionView:
        with self._session_lock(session_id):
            for _ in range(3):
                record = self.journal.get_session(session_id)
                if record.status == CLOSED:
                    break
                try:
                    self.journal.set_status(session_id, record.revision, CLOSED)
                    break
                except ConcurrentModification:
                    continue
            self._evict(session_id)
        log.info("closed-loop session %s closed", session_id)
        return self.get_session(session_id)

    def export(
        self,
        session_id: str,
        path: str | Path,
        fmt: str = "nwb",
        with_images: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> Path:
        """Write the session to ``path``; ``metadata`` fields replace the session's in this file."""
        from neurotwin.engines.session_export import export_session

        self.journal.get_session(session_id)
        return export_session(
            self.journal, session_id, Path(path), fmt, with_images=with_images, metadata=metadata
        )

    def shutdown(self) -> None:
        with self._lock:
            self._live.clear()
            twins = list(self._twins.values())
            self._twins.clear()
            self._generators.clear()
        for twin in twins:
            twin.session.close()
