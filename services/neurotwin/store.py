"""The model store: ``<root>/<kind>/<name>/<version>/`` with integer versions, as in Triton.

Kinds: ``predictors`` (``model.onnx`` + ``card.json``) and ``generators`` (``weights.pt`` +
``card.json``). New versions are written into a hidden staging folder and renamed into place, so a
server watching the store never sees a half-written version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from neurotwin.card import ONNX_CARD_KEY, GeneratorCard, PredictorCard
from neurotwin.errors import InvalidInput, ModelStoreError, NotFound

PREDICTORS = "predictors"
GENERATORS = "generators"
KINDS = (PREDICTORS, GENERATORS)
MODEL_FILES = {PREDICTORS: "model.onnx", GENERATORS: "weights.pt"}
CARD_FILE = "card.json"
MIN_OPSET = 17
STORE_ENV = "NEUROTWIN_MODEL_STORE"
DEFAULT_STORE_ROOT = "model_store"


def default_store_root() -> str:
    """``$NEUROTWIN_MODEL_STORE``, else ``./model_store``: the one default of every command and service."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_ROOT


@dataclass(frozen=True)
class ModelVersion:
    kind: str
    name: str
    version: int
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILES[self.kind]

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}/{self.version}"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the latest ``latest`` ones, or exactly ``pinned``."""

    latest: int = 1
    pinned: tuple[int, ...] = ()

    def select(self, versions: list[int]) -> list[int]:
        if self.pinned:
            return sorted(v for v in versions if v in self.pinned)
        return sorted(versions)[-self.latest :] if self.latest > 0 else []

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest:N`` or ``pinned:1,3``; an empty string means latest:1."""
        text = text.strip()
        if not text:
            return cls()
        kind, _, arg = text.partition(":")
        try:
            if kind == "latest":
                return cls(latest=int(arg or 1))
            if kind == "pinned":
                return cls(pinned=tuple(int(v) for v in arg.split(",") if v))
        except ValueError:
            pass
        raise InvalidInput(f"version policy {text!r}: expected 'latest:N' or 'pinned:V1,V2'")


def _check_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise InvalidInput(f"model name {name!r}: use letters, digits, '-', '_' or '.', no slashes")
    return name


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _kind_dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise InvalidInput(f"unknown model kind {kind!r}; expected one of {KINDS}")
        return self.root / kind

    def names(self, kind: str) -> list[str]:
        base = self._kind_dir(kind)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, kind: str, name: str) -> list[int]:
        folder = self._kind_dir(kind) / _check_name(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def resolve(self, kind: str, name: str, version: int | None = None) -> ModelVersion:
        """The pinned ``version``, or the latest when it is None or 0."""
        versions = self.versions(kind, name)
        if not versions:
            raise NotFound(f"no {kind[:-1]} named {name!r} in {self.root}")
        if not version:
            version = versions[-1]
        elif version not in versions:
            raise NotFound(f"{kind[:-1]} {name!r} has no version {version} (has {versions})")
        return ModelVersion(kind, name, version, self._kind_dir(kind) / name / str(version))

    @contextlib.contextmanager
    def new_version(self, kind: str, name: str, version: int | None = None) -> Iterator[Path]:
        """Yield an empty staging folder; on a clean exit it becomes the next version.

        The caller writes the model and card into the folder. The rename is atomic on one file
        system, so watchers see either no new version or a complete one.
        """
        parent = self._kind_dir(kind) / _check_name(name)
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        # mkdtemp makes the folder private; servers may run as another user than the trainer.
        staging.chmod(0o755)
        try:
            yield staging
            target_version = version or (max(self.versions(kind, name), default=0) + 1)
            target = parent / str(target_version)
            if target.exists():
                raise ModelStoreError(f"{target} already exists")
            staging.rename(target)
            staging = target
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def latest_version_path(self, kind: str, name: str) -> Path:
        return self.resolve(kind, name).path


def validate_predictor(version: ModelVersion) -> PredictorCard:
    """Check that a predictor version is servable: files present, graph sane, card consistent."""
    import onnx

    if not version.model_path.is_file():
        raise ModelStoreError(f"{version}: missing {version.model_path.name}")
    card = PredictorCard.load(version.card_path)
    try:
        model = onnx.load(str(version.model_path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelStoreError(f"{version.model_path}: not a valid ONNX model ({exc})") from exc
    check_predictor_graph(model, card, source=version.model_path)
    return card


def onnx_opset(model: object) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def check_predictor_graph(model: object, card: PredictorCard, source: object) -> None:
    """The graph must take uint8 [N, H, W, 3] and return float [N, K] with K = card neurons, under the
    card's output name; an ensemble also returns its members' rates float [N, members, K]."""
    import onnx

    opset = onnx_opset(model)
    if opset < MIN_OPSET:
        raise ModelStoreError(f"{source}: opset {opset} is below the minimum {MIN_OPSET}")
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = {o.name: o for o in model.graph.output}
    if len(graph_inputs) != 1:
        raise ModelStoreError(f"{source}: expected one input, the graph has {len(graph_inputs)}")
    if card.output.member_output is None:
        # One output, whatever the graph calls it (registered models name theirs freely).
        if len(outputs) != 1:
            raise ModelStoreError(
                f"{source}: graph outputs {sorted(outputs)}; the card describes one "
                "(an ensemble's card also names its members' output)"
            )
        outputs = {card.output.name: model.graph.output[0]}
    elif sorted(outputs) != sorted(card.output.graph_outputs):
        raise ModelStoreError(
            f"{source}: graph outputs {sorted(outputs)}, the card names {card.output.graph_outputs}"
        )
    (inp,) = graph_inputs
    in_type = inp.type.tensor_type
    if in_type.elem_type != onnx.TensorProto.UINT8 or len(in_type.shape.dim) != 4:
        raise ModelStoreError(f"{source}: input {inp.name!r} must be uint8 [N, H, W, 3]")
    channels = in_type.shape.dim[3]
    if channels.HasField("dim_value") and channels.dim_value != card.input.channels:
        raise ModelStoreError(
            f"{source}: input has {channels.dim_value} channels, card says {card.input.channels}"
        )
    _check_float_output(outputs[card.output.name], [card.neuron_count], "[N, neurons]", source)
    if card.output.member_output is not None:
        _check_float_output(
            outputs[card.output.member_output],
            [card.output.members, card.neuron_count],
            "[N, members, neurons]",
            source,
        )


def _check_float_output(out: object, sizes: list[int], layout: str, source: object) -> None:
    """A float output of rank 1 + len(sizes) whose static dims (after the batch) match ``sizes``."""
    import onnx

    out_type = out.type.tensor_type
    dims = list(out_type.shape.dim)
    if out_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) or len(dims) != 1 + len(
        sizes
    ):
        raise ModelStoreError(f"{source}: output {out.name!r} must be float {layout}")
    actual = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if actual[-1] is not None and actual[-1] != sizes[-1]:
        raise ModelStoreError(f"{source}: model returns {actual[-1]} neurons, card lists {sizes[-1]}")
    if len(sizes) == 2 and actual[0] is not None and actual[0] != sizes[0]:
        raise ModelStoreError(
            f"{source}: output {out.name!r} holds {actual[0]} members, the card says {sizes[0]}"
        )


def embedded_card(model: object) -> str | None:
    """The card JSON stored in an ONNX model's metadata, if any."""
    for prop in model.metadata_props:
        if prop.key == ONNX_CARD_KEY:
            return prop.value
    return None


def validate_generator(version: ModelVersion) -> GeneratorCard:
    if not version.model_path.is_file():
        raise ModelStoreError(f"{version}: missing {version.model_path.name}")
    return GeneratorCard.load(version.card_path)
