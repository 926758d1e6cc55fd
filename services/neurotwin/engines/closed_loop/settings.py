"""A closed-loop session's settings: what a caller asks for, the checks on it, and what is journaled."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from neurotwin.engines.objectives import RESPONSE_OBJECTIVES
from neurotwin.errors import InvalidInput

OPTIMIZERS = ("cma-es", "ga")
OBJECTIVES = RESPONSE_OBJECTIVES
IMAGE_FORMATS = ("png", "jpeg")
SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_POPULATION = 40
# Guard rails: a request must not make the server render or hold unbounded work.
MAX_POPULATION = 1000
MAX_CANDIDATES = 20000
MAX_NATURAL_PER_GENERATION = 1000
MAX_NEURONS = 100000
MAX_IMAGE_SIZE = 1024


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
    # Confirmation re-presentations in the last generation (closed_loop.confirmation); 0: none, which
    # is also what sessions journaled before confirmation existed load with.
    confirm_top: int = 0
    confirm_repeats: int = 0
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

    def is_confirmation(self, generation: int) -> bool:
        """Whether ``generation`` re-presents top candidates instead of proposing new ones."""
        return self.confirm_top > 0 and self.max_generations > 0 and generation == self.max_generations - 1


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
    # Confirmation: ``confirm_requested`` when the caller said anything about it (else the defaults'
    # rule decides), ``confirm_disabled`` to switch it off; 0 top/repeats: the defaults.
    confirm_requested: bool = False
    confirm_disabled: bool = False
    confirm_top: int = 0
    confirm_repeats: int = 0

    def fingerprint(self) -> str:
        data = asdict(self)
        data.pop("session_id")
        if not data["metadata"]:
            # Requests without metadata keep the fingerprint they had before the field existed, so a
            # retried create of a session journaled by an older server still matches it.
            data.pop("metadata")
        confirmation = ("confirm_requested", "confirm_disabled", "confirm_top", "confirm_repeats")
        if not any(data[k] for k in confirmation):
            # Likewise for requests that say nothing about confirmation.
            for key in confirmation:
                data.pop(key)
        images = data.pop("natural_images")
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
        for image in images:
            digest.update(hashlib.sha256(image).digest())
        return digest.hexdigest()


@dataclass
class CheckedRequest:
    """The parts of a request that can be checked without any model, normalized."""

    optimizer: str
    objective: str
    image_format: str
    population: int
    neuron_count: int
    targets: list[int]
    seed: int
    options: dict[str, float]


def session_id_or_new(session_id: str) -> str:
    """The caller's session id (checked), or a fresh random one."""
    session_id = session_id or secrets.token_hex(8)
    if not SESSION_ID.match(session_id):
        raise InvalidInput(f"session_id {session_id!r}: 1-64 letters, digits, '.', '_' or '-'")
    if not session_id.strip("."):
        # "." and ".." name folders in paths and URLs (export files, the dashboard's /ui/sessions/ID).
        raise InvalidInput(f"session_id {session_id!r}: needs a letter, digit, '_' or '-'")
    return session_id


def check_request(req: SessionRequest) -> CheckedRequest:
    """Every check on the request's own values, in a fixed order (the first fault is the one named)."""
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
    return CheckedRequest(
        optimizer, objective, image_format, population, neuron_count, targets, seed, options
    )


def check_guidance(req: SessionRequest, population: int, with_twin: bool) -> None:
    """Twin-guidance fields: pre-screening bounded, and none of them without a twin."""
    factor = req.candidates_per_presentation
    if with_twin:
        if factor < 0 or population * max(1, factor) > MAX_CANDIDATES:
            raise InvalidInput(
                f"candidates_per_presentation {factor}: population x candidates must be at most "
                f"{MAX_CANDIDATES}"
            )
    elif factor > 1 or req.refit_readout or req.twin_neurons:
        raise InvalidInput("candidates_per_presentation, refit_readout and twin_neurons need a twin")


def map_twin_neurons(
    req: SessionRequest, targets: list[int], twin_name: str, twin_neuron_ids: list[str], twin_outputs: int
) -> list[int]:
    """The twin output that stands for each target neuron: given, matched by neuron id, or the same index."""
    if req.twin_neurons:
        mapped = list(req.twin_neurons)
        if len(mapped) != len(targets):
            raise InvalidInput(f"{len(mapped)} twin_neurons for {len(targets)} target_neurons")
    elif req.neuron_ids and all(req.neuron_ids[t] in twin_neuron_ids for t in targets):
        mapped = [twin_neuron_ids.index(req.neuron_ids[t]) for t in targets]
    else:
        mapped = list(targets)
    bad = [m for m in mapped if not 0 <= m < twin_outputs]
    if bad:
        raise InvalidInput(
            f"twin neurons {bad} out of range: twin {twin_name} has {twin_outputs} outputs "
            "(give twin_neurons to map target neurons to twin outputs)"
        )
    return mapped
