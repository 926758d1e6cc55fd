"""The images a session shows: natural images from a folder or zip, and how stimuli are encoded.

Synthetic stimuli are rendered by ``neurotwin.engines.render.render_stimuli``.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neurotwin.engines.journal import NaturalImage
from neurotwin.engines.natural_images import IMAGE_SUFFIXES, MAX_NATURAL_FILE_BYTES
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import DEFAULT_MAX_PIXELS, decode_image, encode_jpeg, encode_png_fast, resize_batch


def encode_stimulus(image: np.ndarray, fmt: str) -> bytes:
    return encode_png_fast(image) if fmt == "png" else encode_jpeg(image, quality=95)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def natural_entries(source: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in a local folder (recursively) or a .zip, sorted by name: what a
    client uploads. The server reads ``natural_source`` only through ``engines.natural_images``."""
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


def natural_image_bytes(source: str | Path) -> list[bytes]:
    """The encoded bytes of every image in a folder or a .zip, in name order (what a rig would upload)."""
    return [data for _, data in natural_entries(Path(source))]


def prepare_natural_images(
    entries: Sequence[tuple[str, bytes]],
    image_size: int,
    image_format: str,
    limit: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[NaturalImage]:
    """Decode (each refused above ``max_pixels`` before decoding), resize to the session's image size
    and encode in its format, once, at creation."""
    if len(entries) > limit:
        raise InvalidInput(f"{len(entries)} natural images; this server accepts at most {limit} per session")
    prepared: list[NaturalImage] = []
    for index, (name, data) in enumerate(entries):
        pixels = decode_image(data, max_pixels=max_pixels, what=f"natural image {name}")
        pixels = resize_batch(pixels[None], image_size, image_size)[0]
        encoded = encode_stimulus(pixels, image_format)
        prepared.append(NaturalImage(index, name, sha256_hex(encoded), encoded))
    return prepared
