"""Preferred stimuli for every neuron of a twin, in slices that separate processes run on their own.

A *sweep* synthesizes images for each neuron of one twin version with one prior, method, budget and
seed. It is cut into ``shards`` slices (:func:`shard_neurons`) so that the pods of a Kubernetes
Indexed Job, one slice each, share the work without talking to each other: they only share the sweep
folder (a volume every pod mounts).

Layout of a sweep folder::

    sweep.json                      what the sweep is (versions, method, budget, images, seed, the
                                    twin's neuron ids); the first process writes it, later ones must
                                    agree with it, so every slice works on the same neuron list
    neurons/<k>-<id>/               one finished neuron: image_00.png ..., latents.npy, result.json
    neurons/.partial-<k>-<random>/  a neuron being written, or what a killed process left behind
    contact_sheet.png, index.*      the report over all neurons (neuron_report.py)

A neuron's folder appears by one rename of a complete staging folder, so a killed process never
leaves a half-written result. A slice run again skips the neurons whose folder is complete, removes
its own leftover staging folders and redoes those neurons: restarts are cheap and safe.

Jobs run on a :class:`SynthesisScheduler` driven from the calling thread, several neurons at a time,
so on a GPU their steps share one batched forward and backward pass.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurotwin.engines.objectives import ObjectiveSpec, build_objective
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.synthesis import (
    METHODS,
    ModelPair,
    SynthesisJob,
    SynthesisRequest,
    SynthesisResult,
    SynthesisScheduler,
)
from neurotwin.errors import InvalidInput, NeurotwinError
from neurotwin.imagecodec import encode_png

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_GENERATOR",
    "DEFAULT_IMAGES",
    "PIXELS",
    "NeuronOutcome",
    "SliceOutcome",
    "SweepFolder",
    "SweepSpec",
    "neuron_request",
    "run_slice",
    "shard_neurons",
]

# The synthesizer service's defaults (neurotwin.server.synthesizer.Settings): a sweep makes the same
# images a client asking the service with no options would get. tests/test_synthesis_job.py keeps
# the two equal.
DEFAULT_GENERATOR = "v4-dcgan-h2"
DEFAULT_BUDGETS = {"gradient": 200, "cmaes": 3000, "genetic": 3000}
DEFAULT_IMAGES = 4
# The generator-free prior (Fourier pixels at the twin's input size), as the service names it.
PIXELS = "pixels"

SPEC_FILE = "sweep.json"
RESULT_FILE = "result.json"
NEURONS_DIR = "neurons"
PARTIAL_PREFIX = ".partial-"
SPEC_FORMAT = "neurotwin.sweep/1"
RESULT_FORMAT = "neurotwin.sweep-neuron/1"


def shard_neurons(count: int, index: int, shards: int) -> range:
    """The neurons of slice ``index`` of ``shards``: every ``shards``-th neuron from ``index``.

    Disjoint and complete for any count (slices differ in size by at most one neuron), and fixed by
    the three numbers alone, so every pod computes the same split without coordination.
    """
    if shards < 1:
        raise InvalidInput(f"shard count must be at least 1, got {shards}")
    if not 0 <= index < shards:
        raise InvalidInput(f"shard index {index} is outside 0..{shards - 1} (shard count {shards})")
    return range(index, count, shards)


@dataclass
class SweepSpec:
    """Everything that decides a sweep's images; two processes writing one folder must agree on it."""

    model: str
    model_version: int
    generator: str
    generator_version: int
    method: str
    budget: int
    num_images: int
    seed: int
    neuron_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"method {self.method!r}: expected one of {METHODS}")
        if self.budget < 1 or (self.method != "gradient" and self.budget < 2):
            raise InvalidInput(f"budget {self.budget} is too small for {self.method}")
        if self.num_images < 1:
            raise InvalidInput(f"num_images must be at least 1, got {self.num_images}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object) -> SweepSpec:
        if data.get("format") != SPEC_FORMAT:
            raise InvalidInput(f"{source}: not a sweep description (format {data.get('format')!r})")
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (KeyError, TypeError) as exc:
            raise InvalidInput(f"{source}: malformed sweep description ({exc})") from exc

    def differences(self, other: SweepSpec) -> list[str]:
        return [
            f"{f.name} {getattr(self, f.name)!r} (asked: {getattr(other, f.name)!r})"
            if f.name != "neuron_ids"
            else "the twin's neuron ids"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        generator = (
            self.generator if self.generator == PIXELS else f"{self.generator}:{self.generator_version}"
        )
        return (
            f"{self.model}:{self.model_version} with {generator}, {self.method} budget {self.budget}, "
            f"{self.num_images} images, seed {self.seed}"
        )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40] or "_"


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable on a node crash; some network file systems refuse, and rename is
    # still atomic there.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a private temporary name and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, data)
    tmp.replace(path)


class SweepFolder:
    """The sweep folder on the shared volume: its description, finished neurons, staging folders."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.neurons = self.root / NEURONS_DIR
        self.spec_path = self.root / SPEC_FILE

    # -- the sweep's description ---------------------------------------------------------------------

    def read_spec(self) -> SweepSpec | None:
        try:
            data = json.loads(self.spec_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{self.spec_path}: unreadable ({exc})") from exc
        return SweepSpec.from_dict(data, self.spec_path)

    def claim(self, spec: SweepSpec) -> SweepSpec:
        """Record ``spec`` as this folder's sweep unless one is recorded already; return the recorded one.

        Creation is exclusive (a hard link of a complete temporary file fails if the name exists), so
        of several pods starting at once exactly one description wins and all of them read it.
        """
        self.neurons.mkdir(parents=True, exist_ok=True)
        existing = self.read_spec()
        if existing is not None:
            return existing
        tmp = self.root / f".{SPEC_FILE}.tmp-{os.getpid()}"
        _write_file(tmp, (json.dumps(spec.to_dict(), indent=1) + "\n").encode())
        try:
            os.link(tmp, self.spec_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)
        recorded = self.read_spec()
        assert recorded is not None
        return recorded

    # -- neurons ---------------------------------------------------------------------------------------

    def neuron_name(self, spec: SweepSpec, neuron: int) -> str:
        width = max(5, len(str(len(spec.neuron_ids) - 1)))
        return f"{neuron:0{width}d}-{_safe(spec.neuron_ids[neuron])}"

    def neuron_dir(self, spec: SweepSpec, neuron: int) -> Path:
        return self.neurons / self.neuron_name(spec, neuron)

    def has_result_file(self, spec: SweepSpec, neuron: int) -> bool:
        """Cheap test (no parsing) whether the neuron's folder is in place."""
        return (self.neuron_dir(spec, neuron) / RESULT_FILE).is_file()

    def read_result(self, spec: SweepSpec, neuron: int) -> dict[str, Any] | None:
        """The neuron's result if its folder is complete and belongs to this sweep, else None."""
        folder = self.neuron_dir(spec, neuron)
        try:
            record = json.loads((folder / RESULT_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format") != RESULT_FORMAT:
            return None
        expected = {k: v for k, v in asdict(spec).items() if k != "neuron_ids"}
        if any(record.get(k) != v for k, v in expected.items()) or record.get("neuron") != neuron:
            return None
        images = record.get("images")
        if not isinstance(images, list) or len(images) != spec.num_images:
            return None
        if not all(isinstance(i, dict) and (folder / str(i.get("file"))).is_file() for i in images):
            return None
        return record

    def clear_partials(self, neurons: Iterable[int]) -> int:
        """Remove staging folders of ``neurons`` (left by a killed process); returns how many.

        Only this slice's neurons: another slice may be writing its own right now. Two pods of one
        index never run at once (the Job replaces a pod only after it has terminated).
        """
        prefixes = {f"{PARTIAL_PREFIX}{n:05d}-" for n in neurons}
        removed = 0
        if not self.neurons.is_dir():
            return 0
        for entry in self.neurons.iterdir():
            name = entry.name
            if name.startswith(PARTIAL_PREFIX) and any(name.startswith(p) for p in prefixes):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def write_neuron(
        self, spec: SweepSpec, neuron: int, record: dict[str, Any], pngs: list[bytes], latents: np.ndarray
    ) -> Path:
        """Write a finished neuron: all files into a staging folder, then one rename into place."""
        final = self.neuron_dir(spec, neuron)
        if final.exists() and self.read_result(spec, neuron) is None:
            # An incomplete or foreign folder under the final name (copied in by hand, say): redo it.
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{neuron:05d}-", dir=self.neurons))
        try:
            staging.chmod(0o755)
            for item, data in zip(record["images"], pngs, strict=True):
                _write_file(staging / item["file"], data)
            buffer = _npy_bytes(latents)
            _write_file(staging / "latents.npy", buffer)
            # The result file goes last: a folder with it is complete even if copied file by file.
            _write_file(staging / RESULT_FILE, (json.dumps(record, indent=1) + "\n").encode())
            _fsync_dir(staging)
            try:
                staging.rename(final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Someone else finished this neuron first; theirs stands.
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(self.neurons)
        return final


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# -- running a slice -------------------------------------------------------------------------------------


def neuron_request(pair: ModelPair, spec: SweepSpec, neuron: int) -> SynthesisRequest:
    """The engine request for one neuron, set up as the synthesizer service sets up a request
    that names only the twin and the neuron (single-neuron objective, no diversity term)."""
    objective = build_objective(ObjectiveSpec("neuron", [neuron]), spec.neuron_ids)
    gradient = None
    if spec.method == "gradient":
        prior = pair.latent_prior()
        low, high = prior.get("min"), prior.get("max")
        gradient = GradientConfig(
            steps=spec.budget,
            latent_std=float(prior.get("std", 1.0)) or 1.0,
            bounds=None if low is None and high is None else (low, high),
            transforms=True,
        )
    return SynthesisRequest(
        objective=objective,
        method=spec.method,
        budget=spec.budget,
        n_images=spec.num_images,
        seed=spec.seed,
        gradient=gradient,
        name=f"{spec.model}:{spec.model_version} neuron {neuron}",
    )


@dataclass
class NeuronOutcome:
    neuron: int
    neuron_id: str
    folder: Path | None
    best_activation: float = float("nan")
    best_ratio: float | None = None
    seconds: float = 0.0
    error: str = ""


@dataclass
class SliceOutcome:
    neurons: list[int]
    skipped: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    partials_removed: int = 0


def _record(
    spec: SweepSpec, neuron: int, pair: ModelPair, result: SynthesisResult, extra: dict[str, Any]
) -> dict[str, Any]:
    reference = pair.predicted_max(neuron)
    activation = result.rates[:, neuron]
    best = int(np.argmax(activation))
    images = [
        {
            "file": f"image_{i:02d}.png",
            "activation": float(activation[i]),
            "activation_ratio": float(activation[i] / reference) if reference else None,
            "objective": float(result.score[i]),
            "rates": [round(float(v), 6) for v in result.rates[i]],
        }
        for i in range(len(activation))
    ]
    return {
        "format": RESULT_FORMAT,
        **{k: v for k, v in asdict(spec).items() if k != "neuron_ids"},
        "neuron": neuron,
        "neuron_id": spec.neuron_ids[neuron],
        "natural_max": reference,
        "best_image": best,
        "best_activation": float(activation[best]),
        "best_ratio": float(activation[best] / reference) if reference else None,
        "steps": int(result.steps),
        "evaluations": int(result.evaluations),
        "elapsed_seconds": round(float(result.elapsed), 3),
        "finished": datetime.now(UTC).isoformat(timespec="milliseconds"),
        **extra,
        "images": images,
    }


def run_slice(
    pair: ModelPair,
    spec: SweepSpec,
    folder: SweepFolder,
    neurons: Iterable[int],
    *,
    device: torch.device,
    concurrency: int = 8,
    max_batch_images: int = 256,
    extra: dict[str, Any] | None = None,
    on_neuron: Callable[[NeuronOutcome], None] | None = None,
) -> SliceOutcome:
    """Synthesize every neuron of ``neurons`` that has no complete result in ``folder`` yet.

    Up to ``concurrency`` neurons run at once on one scheduler (their steps batched together). A
    neuron whose job fails is reported and left without a result; the others go on. ``extra`` is
    added to each result file (shard, device, software version).
    """
    if concurrency < 1:
        raise InvalidInput(f"concurrency must be at least 1, got {concurrency}")
    outcome = SliceOutcome(neurons=list(neurons))
    outcome.partials_removed = folder.clear_partials(outcome.neurons)
    todo = []
    for neuron in outcome.neurons:
        if folder.read_result(spec, neuron) is not None:
            outcome.skipped.append(neuron)
        else:
            todo.append(neuron)
    scheduler = SynthesisScheduler(device=device, max_jobs=concurrency, max_batch_images=max_batch_images)
    running: dict[SynthesisJob, int] = {}
    queue = list(reversed(todo))
    while queue or running:
        while queue and len(running) < concurrency:
            neuron = queue.pop()
            running[scheduler.submit(pair, neuron_request(pair, spec, neuron))] = neuron
        scheduler.run_once()
        for job in [j for j in running if j.done]:
            neuron = running.pop(job)
            report = _finish(job, neuron, pair, spec, folder, extra or {})
            if report.error:
                outcome.failed[neuron] = report.error
            else:
                outcome.done.append(neuron)
            if on_neuron is not None:
                on_neuron(report)
    return outcome


def _finish(
    job: SynthesisJob,
    neuron: int,
    pair: ModelPair,
    spec: SweepSpec,
    folder: SweepFolder,
    extra: dict[str, Any],
) -> NeuronOutcome:
    neuron_id = spec.neuron_ids[neuron]
    try:
        result = job.result(timeout=0)
    except NeurotwinError as exc:
        return NeuronOutcome(neuron, neuron_id, None, error=str(exc))
    record = _record(spec, neuron, pair, result, extra)
    pngs = [encode_png(image) for image in result.images]
    path = folder.write_neuron(spec, neuron, record, pngs, result.latents)
    return NeuronOutcome(
        neuron, neuron_id, path, record["best_activation"], record["best_ratio"], float(result.elapsed)
    )
