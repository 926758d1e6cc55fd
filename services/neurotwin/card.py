"""Model cards: the JSON that travels beside every model in the store (and inside ONNX metadata).

A predictor card states what the model takes and returns (so a server can validate requests without
running it), where it came from (data hash, split, seed) and how good it is (held-out metrics). The
per-neuron statistics over natural images let the synthesizer say how far a stimulus goes beyond them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neurotwin.errors import ModelStoreError

PREDICTOR_CARD_FORMAT = "neurotwin.predictor-card/1"
GENERATOR_CARD_FORMAT = "neurotwin.generator-card/1"
# Key under which the card JSON is stored in the ONNX model's metadata_props.
ONNX_CARD_KEY = "neurotwin.card"


@dataclass
class InputSpec:
    """Images in: uint8, [N, height, width, channels] (NHWC, RGB)."""

    height: int
    width: int
    channels: int = 3
    dtype: str = "uint8"
    layout: str = "NHWC"
    name: str = "images"


# Name of the optional second output of an ensemble twin: every member's rates.
MEMBER_OUTPUT = "member_rates"


@dataclass
class OutputSpec:
    """Rates out: float32 [N, neurons] under ``name``.

    An ensemble twin (``members`` > 1) returns the members' mean there and, as a second graph output
    named ``member_output``, each member's rates float32 [N, members, neurons], so synthesis can ask
    the members to agree. Servers read ``name`` only.
    """

    name: str = "rates"
    dtype: str = "float32"
    units: str = "spikes per 100 ms window"
    members: int = 1
    member_output: str | None = None

    def __post_init__(self) -> None:
        if int(self.members) < 1:
            raise ModelStoreError(f"output.members must be at least 1, got {self.members}")
        if self.member_output is not None and self.member_output == self.name:
            raise ModelStoreError(f"output.member_output {self.member_output!r} repeats the output name")

    @property
    def graph_outputs(self) -> list[str]:
        """The graph's output names, in order."""
        return [self.name] if self.member_output is None else [self.name, self.member_output]


@dataclass
class NeuronStats:
    """Per-neuron statistics over a reference image set (the training images by default)."""

    image_count: int
    measured_max: list[float] | None = None
    measured_p99: list[float] | None = None
    predicted_max: list[float] = field(default_factory=list)
    predicted_p99: list[float] = field(default_factory=list)


@dataclass
class PredictorCard:
    name: str
    neuron_ids: list[str]
    input: InputSpec
    output: OutputSpec = field(default_factory=OutputSpec)
    opset: int | None = None
    description: str = ""
    created: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    neuron_stats: NeuronStats | None = None
    format: str = PREDICTOR_CARD_FORMAT

    @property
    def neuron_count(self) -> int:
        return len(self.neuron_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object = "card") -> PredictorCard:
        if data.get("format") != PREDICTOR_CARD_FORMAT:
            raise ModelStoreError(f"{source}: not a predictor card (format {data.get('format')!r})")
        try:
            stats = data.get("neuron_stats")
            return cls(
                name=str(data["name"]),
                neuron_ids=[str(n) for n in data["neuron_ids"]],
                input=InputSpec(**data["input"]),
                output=OutputSpec(**data.get("output", {})),
                opset=data.get("opset"),
                description=data.get("description", ""),
                created=data.get("created", ""),
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                neuron_stats=NeuronStats(**stats) if stats else None,
            )
        except (KeyError, TypeError) as exc:
            raise ModelStoreError(f"{source}: malformed predictor card ({exc})") from exc

    @classmethod
    def load(cls, path: Path) -> PredictorCard:
        return cls.from_dict(read_json(path), source=path)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


@dataclass
class GeneratorCard:
    """A natural-image prior: latent code in, RGB image in [0, 1] out.

    ``architecture`` names a class in ``neurotwin.runtimes.generators``; ``hyperparameters`` are its
    constructor arguments, so the weights file holds only tensors (no pickled code is ever loaded).
    """

    name: str
    architecture: str
    latent_dim: int
    resolution: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    created: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Statistics of the latent prior (e.g. per-unit std of natural codes) used for clipping.
    latent_prior: dict[str, Any] = field(default_factory=dict)
    format: str = GENERATOR_CARD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object = "card") -> GeneratorCard:
        if data.get("format") != GENERATOR_CARD_FORMAT:
            raise ModelStoreError(f"{source}: not a generator card (format {data.get('format')!r})")
        try:
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            return cls(**known)
        except TypeError as exc:
            raise ModelStoreError(f"{source}: malformed generator card ({exc})") from exc

    @classmethod
    def load(cls, path: Path) -> GeneratorCard:
        return cls.from_dict(read_json(path), source=path)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ModelStoreError(f"{path}: missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path}: expected a JSON object")
    return data


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a reader never sees half a card."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
