"""Natural reference images for a closed-loop session, read on the server's side.

``natural_source`` names a folder or a .zip that the *server* reads and whose images go back to the
client as stimuli, so it is a way to read the server's files: only a configured root is readable
(none when no root is set), every path is resolved (symbolic links included) and must stay inside it,
and every image is decoded with a pixel limit before it costs any CPU.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from neurotwin.errors import InvalidInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_NATURAL_FILE_BYTES = 64 * 1024 * 1024
# All the natural images of one session together, as read (before decoding).
MAX_NATURAL_SOURCE_BYTES = 1024 * 1024 * 1024


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def confined_source(source: str, root: str) -> Path:
    """The folder or zip ``source`` names inside ``root``, resolved; refused outside it or without one."""
    if not root:
        raise InvalidInput(
            "natural_source is off on this server (no natural-image root is configured: "
            "--closed-loop-natural-root); send the images inline as natural_images"
        )
    base = Path(root).expanduser().resolve()
    # An absolute source replaces the base in the join: it passes only when it lies inside the root.
    path = (base / source).resolve()
    if not _inside(path, base):
        raise InvalidInput(f"natural_source {source!r} is outside the server's natural-image root")
    return path


def read_natural_source(source: str, root: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the confined folder (recursively) or .zip, sorted by name."""
    path = confined_source(source, root)
    base = Path(root).expanduser().resolve()
    total = 0

    def account(name: str, size: int) -> None:
        nonlocal total
        if size > MAX_NATURAL_FILE_BYTES:
            raise InvalidInput(f"natural image {name}: larger than {MAX_NATURAL_FILE_BYTES} bytes")
        total += size
        if total > MAX_NATURAL_SOURCE_BYTES:
            raise InvalidInput(
                f"natural_source {source!r}: more than {MAX_NATURAL_SOURCE_BYTES} bytes of images"
            )

    entries: list[tuple[str, bytes]] = []
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            # A link inside the root may point anywhere: what it resolves to must stay inside too.
            if not file.is_file() or not _inside(file.resolve(), base):
                continue
            account(str(file.relative_to(path)), file.stat().st_size)
            entries.append((str(file.relative_to(path)), file.read_bytes()))
        return entries
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                name = info.filename
                skipped = info.is_dir() or name.startswith("__MACOSX/")
                if skipped or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                # The declared size is checked before inflating, so a zip bomb costs nothing.
                account(f"{source}:{name}", info.file_size)
                entries.append((name, archive.read(info)))
        return entries
    raise InvalidInput(f"natural_source {source!r}: not a folder or a .zip of images")
