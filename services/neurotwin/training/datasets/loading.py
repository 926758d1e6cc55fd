"""The entry point: detect a recording's format from its path and read it."""

from __future__ import annotations

from pathlib import Path

from neurotwin.errors import DataError
from neurotwin.training.datasets.checks import (
    why,
)
from neurotwin.training.datasets.files import (
    load_images_and_npy,
    load_session_layout,
)
from neurotwin.training.datasets.hdf5 import (
    load_hdf5,
)
from neurotwin.training.datasets.nwb import (
    load_nwb,
)
from neurotwin.training.datasets.recording import (
    DEFAULT_WINDOW,
    HDF5_SUFFIXES,
    Recording,
)


def load_recording(
    path: str | Path,
    *,
    responses: str | Path | None = None,
    session: str | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
) -> Recording:
    """Load a recording in any supported format (see the module docstring)."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise DataError(source, None, "no such file or directory")
    if p.is_dir():
        if (p / "images").is_dir() and (p / "responses").is_dir():
            _refuse(source, responses=responses)
            return load_session_layout(p, source, session)
        _refuse(source, session=session)
        if responses is None:
            if not (p / "responses.npy").is_file():
                raise DataError(
                    source,
                    "responses",
                    "a folder of images needs responses=FILE.npy (or a responses.npy inside it)",
                )
            responses = p / "responses.npy"
        return load_images_and_npy(p, Path(responses), source)
    kind = _sniff(p, source)
    if kind == "zip":
        _refuse(source, session=session)
        if responses is None:
            raise DataError(source, "responses", "a zip of images needs responses=FILE.npy")
        return load_images_and_npy(p, Path(responses), source)
    _refuse(source, responses=responses, session=session)
    if kind == "nwb":
        return load_nwb(p, source, window)
    return load_hdf5(p, source)


def _refuse(source: str, **given: object) -> None:
    # An argument the format ignores is almost always a mistake about which file was passed.
    for name, value in given.items():
        if value is not None:
            raise DataError(source, name, f"{name}= does not apply to this format")


def _sniff(p: Path, source: str) -> str:
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(source, None, f"cannot read ({exc.strerror or exc})") from exc
    suffix = p.suffix.lower()
    if head.startswith(b"PK") or suffix == ".zip":
        return "zip"
    import h5py

    if head == b"\x89HDF\r\n\x1a\n" or h5py.is_hdf5(p):
        if suffix == ".nwb":
            return "nwb"
        try:
            with h5py.File(p, "r") as fh:
                return "nwb" if "nwb_version" in fh.attrs else "hdf5"
        except Exception as exc:
            raise DataError(source, None, f"not a readable HDF5 file ({why(exc)})") from exc
    if suffix == ".nwb":
        raise DataError(source, None, "not an NWB (HDF5) file")
    if suffix in HDF5_SUFFIXES:
        raise DataError(source, None, "not an HDF5 file")
    raise DataError(
        source,
        None,
        "unrecognized format: expected a zip or folder of images with a responses "
        ".npy, an HDF5 file or an NWB file",
    )
