"""What a model version must still be when it is served: file checksums and reference outputs.

Every store version may carry two files beside its model:

- ``reference.npz``: reference inputs (images for a predictor, latents for a generator) and the
  outputs the model gave on them when it was made (exported, registered, trained), or on its first
  successful load for versions made before this existed;
- ``integrity.json``: the SHA-256 of the model file, the card and ``reference.npz``, and the
  tolerance within which a reload must reproduce the reference outputs.

A checksum catches bytes changed on disk (a bad copy, a flipped block); the reference outputs catch a
model that loads but computes something else (a different graph or weights behind a matching card);
the finiteness check catches a model that computes NaN or infinity. This module only reads, writes and
compares; running the model is the caller's (``engines/model_validation.py``, the exporters).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.card import read_json, write_json_atomic
from neurotwin.errors import ModelStoreError

INTEGRITY_FILE = "integrity.json"
REFERENCE_FILE = "reference.npz"
INTEGRITY_FORMAT = "neurotwin.integrity/1"
# Reference images per predictor version and latents per generator version: enough to exercise
# every output, few enough that validating a version costs milliseconds.
REFERENCE_COUNT = 4
# Outputs may differ between machines (CPU vs CUDA kernels, TF32) but not by more than this: a model
# with changed weights or graph differs by orders of magnitude more. ``atol`` is relative to the
# largest reference output, so it holds for rates in any units and for images.
DEFAULT_RTOL = 1e-2
DEFAULT_ATOL = 1e-2


@dataclass
class IntegrityRecord:
    """The contents of ``integrity.json``."""

    # file name (inside the version folder) -> SHA-256 hex digest
    files: dict[str, str]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    # Who recorded it: export, register, train-generator, first-load, ...
    recorded_by: str = ""
    recorded: str = ""
    format: str = INTEGRITY_FORMAT

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: object) -> IntegrityRecord:
        if data.get("format") != INTEGRITY_FORMAT:
            raise ModelStoreError(f"{source}: not an integrity record (format {data.get('format')!r})")
        files = data.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise ModelStoreError(f"{source}: 'files' must map file names to SHA-256 digests")
        try:
            return cls(
                files=dict(files),
                rtol=float(data.get("rtol", DEFAULT_RTOL)),
                atol=float(data.get("atol", DEFAULT_ATOL)),
                recorded_by=str(data.get("recorded_by", "")),
                recorded=str(data.get("recorded", "")),
            )
        except (TypeError, ValueError) as exc:
            raise ModelStoreError(f"{source}: malformed integrity record ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reference:
    """Reference inputs and the outputs recorded for them."""

    inputs: np.ndarray
    outputs: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_record(folder: str | os.PathLike[str]) -> IntegrityRecord | None:
    """The version's integrity record, or None when it has none (made before records existed)."""
    path = Path(folder) / INTEGRITY_FILE
    if not path.exists():
        return None
    return IntegrityRecord.from_dict(read_json(path), source=path)


def verify_checksums(
    folder: str | os.PathLike[str], record: IntegrityRecord, required: Iterable[str]
) -> None:
    """Every recorded file hashes to its digest, and every ``required`` file is recorded."""
    folder = Path(folder)
    missing = sorted(set(required) - set(record.files))
    if missing:
        raise ModelStoreError(f"{folder / INTEGRITY_FILE}: records no checksum for {missing}")
    for name, expected in sorted(record.files.items()):
        path = folder / name
        if "/" in name or "\\" in name or name.startswith("."):
            raise ModelStoreError(f"{folder / INTEGRITY_FILE}: file name {name!r} is not inside the version")
        try:
            actual = file_sha256(path)
        except FileNotFoundError as exc:
            raise ModelStoreError(f"{path}: missing (its checksum is recorded in {INTEGRITY_FILE})") from exc
        if actual != expected.lower():
            raise ModelStoreError(
                f"{path}: checksum mismatch (SHA-256 {actual[:16]}..., recorded {expected[:16]}...): "
                "the file changed after the version was made"
            )


def read_reference(folder: str | os.PathLike[str]) -> Reference:
    path = Path(folder) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except FileNotFoundError as exc:
        raise ModelStoreError(f"{path}: missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{path}: unreadable reference outputs ({exc})") from exc
    if "inputs" not in arrays or "outputs" not in arrays:
        raise ModelStoreError(f"{path}: needs arrays 'inputs' and 'outputs', has {sorted(arrays)}")
    inputs, outputs = arrays.pop("inputs"), arrays.pop("outputs")
    if len(inputs) != len(outputs) or len(inputs) == 0:
        raise ModelStoreError(f"{path}: {len(inputs)} inputs but {len(outputs)} outputs")
    return Reference(inputs, outputs, arrays)


def check_finite(outputs: np.ndarray, what: str) -> None:
    finite = np.isfinite(outputs)
    if not finite.all():
        bad = int(finite.size - finite.sum())
        raise ModelStoreError(
            f"{what}: {bad} of {finite.size} outputs are NaN or infinite on the reference inputs"
        )


def compare_outputs(got: np.ndarray, expected: np.ndarray, record: IntegrityRecord, what: str) -> float:
    """The largest deviation from the reference outputs; ModelStoreError beyond the tolerance."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        raise ModelStoreError(f"{what}: outputs of shape {list(got.shape)}, reference {list(expected.shape)}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    allowed = record.atol * max(scale, 1e-6) + record.rtol * np.abs(expected)
    deviation = np.abs(got - expected)
    if not (deviation <= allowed).all():
        worst = float(np.max(deviation))
        raise ModelStoreError(
            f"{what}: outputs differ from the reference outputs recorded for this version by up to "
            f"{worst:.4g} (allowed: rtol {record.rtol:g}, atol {record.atol:g} x {scale:.4g})"
        )
    return float(np.max(deviation)) if deviation.size else 0.0


def reference_images(count: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, C]: gratings of several orientations and frequencies over smooth colour
    noise, so every kind of filter responds, and deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    images = np.empty((count, height, width, channels), dtype=np.uint8)
    for i in range(count):
        angle = np.pi * i / max(count, 1) + rng.uniform(0, np.pi / 8)
        cycles = 2.0 + 3.0 * i
        phase = rng.uniform(0, 2 * np.pi)
        along = (x * np.cos(angle) + y * np.sin(angle)) / max(height, width)
        grating = np.sin(2 * np.pi * cycles * along + phase)
        coarse = rng.normal(size=(4, 4, channels))
        noise = np.stack(
            [
                np.kron(coarse[:, :, c], np.ones((-(-height // 4), -(-width // 4))))[:height, :width]
                for c in range(channels)
            ],
            axis=-1,
        )
        image = 127.5 + 80.0 * grating[:, :, None] + 25.0 * noise
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record_integrity(
    folder: str | os.PathLike[str],
    model_files: Iterable[str],
    reference: Reference,
    recorded_by: str,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> IntegrityRecord:
    """Write ``reference.npz`` and then ``integrity.json`` (checksums of the model files, the card and
    the reference) into a version folder. Outputs must be finite: a model that is not is not recorded."""
    folder = Path(folder)
    check_finite(reference.outputs, str(folder))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, inputs=reference.inputs, outputs=reference.outputs, **reference.extra)
    _write_atomic(folder / REFERENCE_FILE, buffer.getvalue())
    names = [*model_files, "card.json", REFERENCE_FILE]
    record = IntegrityRecord(
        files={name: file_sha256(folder / name) for name in names if (folder / name).exists()},
        rtol=rtol,
        atol=atol,
        recorded_by=recorded_by,
        recorded=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_json_atomic(folder / INTEGRITY_FILE, record.to_dict())
    return record
