"""Format a: images (a zip or a folder) plus a responses .npy, and the session layout of cowley_v4."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.errors import DataError, InvalidInput
from neurotwin.imagecodec import decode_image
from neurotwin.training.datasets.checks import (
    check_responses,
    why,
)
from neurotwin.training.datasets.recording import (
    DIGITS,
    IMAGE_SUFFIXES,
    Recording,
)


def list_sessions(root: str | Path) -> list[str]:
    """Sessions of a cowley-style folder: those with both ``images/images_<s>.zip`` (or folder) and
    ``responses/responses_<s>.npy``, sorted."""
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "responses").is_dir():
        raise DataError(root, None, "expected a folder with images/ and responses/ inside")
    images = set()
    for entry in (root / "images").iterdir():
        name = entry.name
        if name.startswith("images_"):
            stem = name[len("images_") :]
            if entry.is_dir():
                images.add(stem)
            elif name.endswith(".zip"):
                images.add(stem[: -len(".zip")])
    responses = {
        e.name[len("responses_") : -len(".npy")]
        for e in (root / "responses").iterdir()
        if e.name.startswith("responses_") and e.name.endswith(".npy")
    }
    return sorted(images & responses)


def load_session_layout(root: Path, source: str, session: str | None) -> Recording:
    sessions = list_sessions(root)
    if session is None:
        if len(sessions) != 1:
            raise DataError(source, "session", f"pass session=; this folder holds {names(sessions)}")
        session = sessions[0]
    if session not in sessions:
        raise DataError(
            source,
            "session",
            f"no session {session!r} (with both images and responses); available: {names(sessions)}",
        )
    images = root / "images" / f"images_{session}.zip"
    if not images.is_file():
        images = root / "images" / f"images_{session}"
    rec = load_images_and_npy(images, root / "responses" / f"responses_{session}.npy", source)
    rec.neuron_ids = [f"{session}_{k}" for k in range(rec.n_neurons)]
    return rec


def names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def load_images_and_npy(images_path: Path, npy_path: Path, source: str) -> Recording:
    digest = hashlib.sha256()
    images, image_ids = _read_image_files(images_path, digest)
    responses = _read_npy(npy_path, digest)
    mean, repeats = check_responses(
        responses, str(npy_path), "responses", images.shape[0], images_from=f"{images_path.name}"
    )
    return Recording(
        images=images,
        responses=mean,
        repeats=repeats,
        neuron_ids=[str(k) for k in range(mean.shape[0])],
        image_ids=image_ids,
        source=source,
        sha256=digest.hexdigest(),
    )


def _read_image_files(path: Path, digest: Any) -> tuple[np.ndarray, list[str]]:
    """Decode every image of a zip or folder in column order, feeding the source bytes to ``digest``."""
    where = str(path)
    if path.is_dir():
        files = [f for f in path.iterdir() if f.is_file() and _is_image_name(f.name)]
        names = order_names([f.name for f in files], where)
        by_name = {f.name: f for f in files}
        blobs: list[tuple[str, bytes]] = []
        for name in names:
            try:
                data = by_name[name].read_bytes()
            except OSError as exc:
                raise DataError(where, name, f"cannot read ({exc.strerror or exc})") from exc
            digest.update(data)
            blobs.append((name, data))
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(where, None, f"cannot read ({exc.strerror or exc})") from exc
        digest.update(raw)
        try:
            archive = zipfile.ZipFile(io.BytesIO(raw))
            members = [m for m in archive.infolist() if not m.is_dir() and _is_image_name(m.filename)]
            names = order_names([m.filename for m in members], where)
            blobs = [(name, archive.read(name)) for name in names]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(where, None, f"not a readable zip archive ({why(exc)})") from exc
    if not blobs:
        raise DataError(where, "images", "no image files (png, jpg, bmp, gif, tif, webp) found")
    decoded = []
    for name, data in blobs:
        try:
            decoded.append(decode_image(data, what="image"))
        except InvalidInput as exc:
            raise DataError(where, name, str(exc).removeprefix("image: ")) from exc
    return stack_same_size(decoded, [n for n, _ in blobs], where), [_stem(n) for n, _ in blobs]


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # Skip macOS resource forks and hidden files that zip tools add beside the real images.
    if not base or base.startswith(".") or name.startswith("__MACOSX/"):
        return False
    return Path(base).suffix.lower() in IMAGE_SUFFIXES


def _stem(name: str) -> str:
    return Path(name.rsplit("/", 1)[-1]).stem


def order_names(names: list[str], where: str) -> list[str]:
    """Column order: by the last number in each name when all have distinct numbers, else by name."""
    stems = [_stem(n) for n in names]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise DataError(where, dup, "two images share this name (ids must be unique)")
    numbers = []
    for stem in stems:
        found = DIGITS.findall(stem)
        if not found:
            break
        numbers.append(int(found[-1]))
    if len(numbers) == len(names) and len(set(numbers)) == len(numbers):
        return [n for _, n in sorted(zip(numbers, names, strict=True))]
    return sorted(names)


def stack_same_size(images: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
    h, w = images[0].shape[:2]
    for img, name in zip(images, names, strict=True):
        if img.shape[:2] != (h, w):
            raise DataError(
                where,
                name,
                f"image is {img.shape[0]}x{img.shape[1]} but {names[0]} is {h}x{w}; "
                "all images must have one size",
            )
    return np.stack(images).astype(np.uint8, copy=False)


def _read_npy(path: Path, digest: Any) -> np.ndarray:
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(where, "responses", f"cannot read ({exc.strerror or exc})") from exc
    digest.update(raw)
    try:
        # allow_pickle=False: a responses file must never be able to run code.
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:
        raise DataError(where, "responses", f"not a readable .npy array ({why(exc)})") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(where, "responses", "expected a .npy array, got an .npz archive")
    return arr
