"""A sweep's folder on a volume that every slice (every pod of an Indexed Job) mounts.

Layout::

    sweep.json                      what the sweep is (versions, method, budget, images, seed, the
                                    twin's neuron ids); the first process writes it, later ones must
                                    agree with it, so every slice works on the same neuron list
    neurons/<k>-<id>/               one finished neuron: image_00.png ..., latents.npy, result.json
    neurons/.partial-<k>-<random>/  a neuron being written, or what a killed process left behind
    contact_sheet.png, index.*      the report over all neurons (neuron_report.py)

A neuron's folder appears by one rename of a complete staging folder, so a killed process never
leaves a half-written result; a slice run again removes its own leftover staging folders. Files are
fsynced before the rename so that a result survives a node crash too.
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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.engines.synthesis import METHODS
from neurotwin.errors import InvalidInput

__all__ = [
    "PIXELS",
    "RESULT_FORMAT",
    "SweepFolder",
    "SweepSpec",
    "write_atomic",
]

# The generator-free prior (Fourier pixels at the twin's input size), as the service names it.
PIXELS = "pixels"
SPEC_FILE = "sweep.json"
RESULT_FILE = "result.json"
NEURONS_DIR = "neurons"
PARTIAL_PREFIX = ".partial-"
SPEC_FORMAT = "neurotwin.sweep/1"
RESULT_FORMAT = "neurotwin.sweep-neuron/1"


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


def _temporary(folder: Path, name: str) -> Path:
    # A random name, not the pid: pods on different nodes share the volume, and each one's process
    # may well have the same pid.
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(path)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a private temporary name and rename it into place."""
    tmp = _temporary(path.parent, path.name)
    try:
        _write_file(tmp, data)
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        tmp = _temporary(self.root, SPEC_FILE)
        try:
            _write_file(tmp, (json.dumps(spec.to_dict(), indent=1) + "\n").encode())
            tmp.chmod(0o644)
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
