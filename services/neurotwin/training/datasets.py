"""Recordings in: one interface (:class:`Recording`), three on-disk formats.

``load_recording(path)`` detects the format from the path and returns images as uint8 [N, H, W, 3] RGB
and responses as float32 [neurons, N]. Every problem with the data raises
:class:`neurotwin.errors.DataError` naming the file and the field, never a numpy or h5py traceback.

Formats
-------
a. **Images plus a responses .npy** (the layout of ``../shared/data/cowley_v4``).

   - ``load_recording(images.zip, responses=r.npy)`` or ``load_recording(folder, responses=r.npy)``:
     a zip or folder of image files (png, jpg, bmp, gif, tif, webp; other files are ignored) and a
     .npy of shape (neurons, images) or (neurons, images, repeats). A folder may instead hold the
     matrix as ``responses.npy``.
   - ``load_recording(root, session="201025")``: ``root`` holds ``images/images_<session>.zip`` (or a
     folder ``images/images_<session>/``) and ``responses/responses_<session>.npy``; ``session`` may be
     left out when there is only one. Neuron ids are ``<session>_<k>``.
   - Column order: when every image name contains a number and the numbers are distinct, images are
     ordered by that number (the last run of digits in the name, so ``image0007.jpg`` is 7) and column
     k of the matrix is the k-th image in that order (cowley's ``imageNNNN.jpg`` is column NNNN-1);
     otherwise images are ordered by name. Image ids are the file names without extension.
   - Grayscale, palette and RGBA image files are converted to RGB; images of different sizes are an
     error. The sha256 covers the zip (or each image file, in column order) and then the .npy.

b. **HDF5** (``.h5``, ``.hdf5``; detected by content): datasets ``images`` (N, H, W, 3) uint8 (a
   grayscale (N, H, W) or (N, H, W, 1) array is repeated to RGB) and ``responses`` (neurons, N), or
   (neurons, N, repeats) with NaN padding the repeats an image did not get. Optional ``neuron_ids``
   (neurons,) and ``image_ids`` (N,), strings or integers.

c. **NWB** (``.nwb``, or an HDF5 file whose root carries ``nwb_version``), read with pynwb:

   - Spikes: the ``units`` table's ``spike_times``; neuron ids are the unit ids.
   - Presentations, first match wins: a TimeIntervals table in ``intervals`` named ``presentations``
     (or else the only one with an ``image_index`` column) whose ``start_time`` is the onset and
     ``image_index`` the 0-based image; otherwise an ``IndexSeries`` in ``stimulus`` whose data are
     image indices and whose ``timestamps`` (or ``starting_time`` + ``rate``) are the onsets.
   - Images: the IndexSeries' ``indexed_images`` (an ``Images`` container) or ``indexed_timeseries``
     (an ``ImageSeries``) when presentations come from one; otherwise an ``Images`` container or an
     ``ImageSeries`` with in-file data in ``stimulus_template`` (or else in ``stimulus``): the one
     named ``images``, or the only one. An ``Images`` container is ordered by its ``order_of_images``
     when present (write it: HDF5 does not keep insertion order), otherwise by the rule of format a;
     image ids are the image names (ImageSeries: ``"0"``, ``"1"``, ...).
   - Counting: a spike at time t counts for a presentation with onset s when
     ``s + window[0] <= t < s + window[1]`` (seconds; default 50-150 ms). The r-th presentation (in
     time) of an image is repeat r; ``repeats`` is NaN-padded to the largest repeat count and
     ``responses`` is its nanmean. Every image must be presented at least once.

Validation (all formats): responses must be real numbers, finite, non-negative and (outside the
repeat padding) not NaN, with one column per image; every (neuron, image) needs at least one valid
repeat. ``Recording.sha256`` is the sha256 of the source bytes, the provenance a model card records.

Splits
------
:func:`split_indices` gives the train/val/test image indices that training records in the card and the
benchmark applies identically to every model.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.errors import DataError, InvalidInput
from neurotwin.imagecodec import decode_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf", ".he5"})
DEFAULT_WINDOW = (0.05, 0.15)
SPLIT_SCHEMES = ("random", "kfold", "first-half")
RANDOM_TEST_FRACTION = 0.2
_HASH_CHUNK = 1 << 20
_DIGITS = re.compile(r"(\d+)")


@dataclass(eq=False)
class Recording:
    """Images and the responses of a set of neurons to them."""

    images: np.ndarray  # uint8 [N, H, W, 3] RGB
    responses: np.ndarray  # float32 [neurons, N]; nanmean over repeats when per-repeat data exists
    repeats: np.ndarray | None  # float32 [neurons, N, R], NaN-padded
    neuron_ids: list[str]
    image_ids: list[str]
    source: str
    sha256: str

    def __post_init__(self) -> None:
        # Cheap consistency checks so a Recording built by hand (tests, other tools) fails early.
        images, responses = self.images, self.responses
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise InvalidInput(
                f"Recording.images: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
            )
        if responses.ndim != 2 or responses.shape[1] != images.shape[0]:
            raise InvalidInput(
                f"Recording.responses: expected [neurons, {images.shape[0]}], got {list(responses.shape)}"
            )
        if self.repeats is not None and self.repeats.shape[:2] != responses.shape:
            raise InvalidInput(
                f"Recording.repeats: expected [{responses.shape[0]}, {responses.shape[1]}, R], "
                f"got {list(self.repeats.shape)}"
            )
        if len(self.neuron_ids) != responses.shape[0] or len(self.image_ids) != images.shape[0]:
            raise InvalidInput(
                f"Recording: {len(self.neuron_ids)} neuron ids and {len(self.image_ids)} "
                f"image ids for responses of shape {list(responses.shape)}"
            )

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.responses.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, image_indices: Sequence[int] | np.ndarray) -> Recording:
        """The same neurons on the chosen images (in the given order); source and sha256 are kept,
        since they name the data the subset was drawn from."""
        idx = np.asarray(image_indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_images,):
                raise InvalidInput(
                    f"subset: boolean mask of shape {list(idx.shape)} for {self.n_images} images"
                )
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.intp)
        elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
            raise InvalidInput(
                f"subset: expected a 1-D list of image indices, got {idx.dtype} {list(idx.shape)}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
            raise InvalidInput(
                f"subset: image indices must be in [0, {self.n_images}), got "
                f"{int(idx.min())}..{int(idx.max())}"
            )
        return Recording(
            images=self.images[idx],
            responses=self.responses[:, idx],
            repeats=None if self.repeats is None else self.repeats[:, idx],
            neuron_ids=list(self.neuron_ids),
            image_ids=[self.image_ids[i] for i in idx.tolist()],
            source=self.source,
            sha256=self.sha256,
        )

    def __repr__(self) -> str:
        rep = "" if self.repeats is None else f", repeats={self.repeats.shape[2]}"
        return (
            f"Recording({self.source!r}, images={self.n_images}x{self.image_size[0]}x{self.image_size[1]}, "
            f"neurons={self.n_neurons}{rep}, sha256={self.sha256[:12]})"
        )


# ----------------------------------------------------------------------------------------------------------
# Entry point


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
            return _load_session_layout(p, source, session)
        _refuse(source, session=session)
        if responses is None:
            if not (p / "responses.npy").is_file():
                raise DataError(
                    source,
                    "responses",
                    "a folder of images needs responses=FILE.npy (or a responses.npy inside it)",
                )
            responses = p / "responses.npy"
        return _load_images_and_npy(p, Path(responses), source)
    kind = _sniff(p, source)
    if kind == "zip":
        _refuse(source, session=session)
        if responses is None:
            raise DataError(source, "responses", "a zip of images needs responses=FILE.npy")
        return _load_images_and_npy(p, Path(responses), source)
    _refuse(source, responses=responses, session=session)
    if kind == "nwb":
        return _load_nwb(p, source, window)
    return _load_hdf5(p, source)


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
            raise DataError(source, None, f"not a readable HDF5 file ({_why(exc)})") from exc
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


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------------------
# Format a: images (zip or folder) + responses .npy


def _load_session_layout(root: Path, source: str, session: str | None) -> Recording:
    sessions = list_sessions(root)
    if session is None:
        if len(sessions) != 1:
            raise DataError(source, "session", f"pass session=; this folder holds {_names(sessions)}")
        session = sessions[0]
    if session not in sessions:
        raise DataError(
            source,
            "session",
            f"no session {session!r} (with both images and responses); available: {_names(sessions)}",
        )
    images = root / "images" / f"images_{session}.zip"
    if not images.is_file():
        images = root / "images" / f"images_{session}"
    rec = _load_images_and_npy(images, root / "responses" / f"responses_{session}.npy", source)
    rec.neuron_ids = [f"{session}_{k}" for k in range(rec.n_neurons)]
    return rec


def _names(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "none"


def _load_images_and_npy(images_path: Path, npy_path: Path, source: str) -> Recording:
    digest = hashlib.sha256()
    images, image_ids = _read_image_files(images_path, digest)
    responses = _read_npy(npy_path, digest)
    mean, repeats = _check_responses(
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
        names = _order_names([f.name for f in files], where)
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
            names = _order_names([m.filename for m in members], where)
            blobs = [(name, archive.read(name)) for name in names]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(where, None, f"not a readable zip archive ({_why(exc)})") from exc
    if not blobs:
        raise DataError(where, "images", "no image files (png, jpg, bmp, gif, tif, webp) found")
    decoded = []
    for name, data in blobs:
        try:
            decoded.append(decode_image(data, what="image"))
        except InvalidInput as exc:
            raise DataError(where, name, str(exc).removeprefix("image: ")) from exc
    return _stack_same_size(decoded, [n for n, _ in blobs], where), [_stem(n) for n, _ in blobs]


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    # Skip macOS resource forks and hidden files that zip tools add beside the real images.
    if not base or base.startswith(".") or name.startswith("__MACOSX/"):
        return False
    return Path(base).suffix.lower() in IMAGE_SUFFIXES


def _stem(name: str) -> str:
    return Path(name.rsplit("/", 1)[-1]).stem


def _order_names(names: list[str], where: str) -> list[str]:
    """Column order: by the last number in each name when all have distinct numbers, else by name."""
    stems = [_stem(n) for n in names]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})[0]
        raise DataError(where, dup, "two images share this name (ids must be unique)")
    numbers = []
    for stem in stems:
        found = _DIGITS.findall(stem)
        if not found:
            break
        numbers.append(int(found[-1]))
    if len(numbers) == len(names) and len(set(numbers)) == len(numbers):
        return [n for _, n in sorted(zip(numbers, names, strict=True))]
    return sorted(names)


def _stack_same_size(images: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
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
        raise DataError(where, "responses", f"not a readable .npy array ({_why(exc)})") from exc
    if not isinstance(arr, np.ndarray):
        raise DataError(where, "responses", "expected a .npy array, got an .npz archive")
    return arr


# ----------------------------------------------------------------------------------------------------------
# Shared validation


def _check_responses(
    arr: np.ndarray, where: str, field: str, n_images: int, images_from: str = "images"
) -> tuple[np.ndarray, np.ndarray | None]:
    """(neurons, N) or (neurons, N, R) numbers -> (float32 mean [neurons, N], repeats or None)."""
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise DataError(where, field, f"dtype {arr.dtype}: expected real numbers (float or integer)")
    if arr.ndim not in (2, 3):
        raise DataError(
            where, field, f"shape {list(arr.shape)}: expected (neurons, images) or (neurons, images, repeats)"
        )
    if arr.size == 0:
        raise DataError(where, field, f"shape {list(arr.shape)}: no data")
    if arr.shape[1] != n_images:
        hint = " (is the matrix transposed?)" if arr.shape[0] == n_images else ""
        raise DataError(
            where, field, f"has {arr.shape[1]} image columns but {images_from} holds {n_images} images{hint}"
        )
    with np.errstate(over="ignore"):
        values = arr.astype(np.float32)
    # Check after the cast: a float64 beyond float32's range turns into Inf here.
    bad = np.isinf(values)
    if bad.any():
        raise DataError(where, field, f"{int(bad.sum())} infinite values, first at {_first(bad)}")
    nan = np.isnan(values)
    if values.ndim == 2:
        if nan.any():
            raise DataError(
                where,
                field,
                f"{int(nan.sum())} NaN values, first at (neuron, image) {_first(nan)}; "
                "NaN is only allowed as padding in per-repeat (neurons, images, repeats) data",
            )
        mean, repeats = values, None
    else:
        empty = nan.all(axis=2)
        if empty.any():
            raise DataError(
                where,
                field,
                f"{int(empty.sum())} (neuron, image) pairs have no valid repeat "
                f"(all NaN), first at {_first(empty)}",
            )
        mean, repeats = _nanmean_last(values, nan), values
    negative = np.nan_to_num(values, nan=0.0) < 0
    if negative.any():
        raise DataError(
            where,
            field,
            f"{int(negative.sum())} negative values, first at {_first(negative)}: "
            "responses are spike counts or rates",
        )
    return np.ascontiguousarray(mean, dtype=np.float32), repeats


def _nanmean_last(values: np.ndarray, nan: np.ndarray) -> np.ndarray:
    # Written out rather than np.nanmean, which warns on all-NaN slices (already rejected) and is slower.
    valid = ~nan
    total = np.where(valid, values, 0.0).sum(axis=2, dtype=np.float64)
    return (total / valid.sum(axis=2)).astype(np.float32)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_images_array(arr: np.ndarray, where: str, field: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(where, field, f"dtype {arr.dtype}: expected uint8 (0-255) pixels")
    if arr.ndim == 3 or (arr.ndim == 4 and arr.shape[3] == 1):
        # Grayscale stacks are common in vision datasets; repeating the channel loses nothing.
        arr = np.repeat(arr.reshape(arr.shape[:3])[..., None], 3, axis=3)
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise DataError(where, field, f"shape {list(arr.shape)}: expected (N, H, W, 3) RGB")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise DataError(where, field, f"shape {list(arr.shape)}: no images")
    return np.ascontiguousarray(arr)


def _check_ids(values: Sequence[object], count: int, where: str, field: str, what: str) -> list[str]:
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if len(ids) != count:
        raise DataError(where, field, f"{len(ids)} ids for {count} {what}")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(where, field, f"id {dup!r} appears more than once")
    return ids


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Format b: HDF5


def _load_hdf5(path: Path, source: str) -> Recording:
    import h5py

    where = str(path)
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise DataError(where, None, f"not a readable HDF5 file ({_why(exc)})") from exc
    with fh:
        images = _check_images_array(_h5_array(fh, "images", where), where, "images")
        raw = _h5_array(fh, "responses", where)
        mean, repeats = _check_responses(raw, where, "responses", images.shape[0])
        neuron_ids = [str(k) for k in range(mean.shape[0])]
        image_ids = [str(i) for i in range(images.shape[0])]
        if "neuron_ids" in fh:
            neuron_ids = _check_ids(
                _h5_array(fh, "neuron_ids", where, ids=True), mean.shape[0], where, "neuron_ids", "neurons"
            )
        if "image_ids" in fh:
            image_ids = _check_ids(
                _h5_array(fh, "image_ids", where, ids=True), images.shape[0], where, "image_ids", "images"
            )
    return Recording(
        images=images,
        responses=mean,
        repeats=repeats,
        neuron_ids=neuron_ids,
        image_ids=image_ids,
        source=source,
        sha256=_hash_file(path),
    )


def _h5_array(fh: Any, name: str, where: str, ids: bool = False) -> Any:
    import h5py

    if name not in fh:
        raise DataError(where, name, "missing dataset")
    obj = fh[name]
    if not isinstance(obj, h5py.Dataset):
        raise DataError(where, name, f"expected a dataset, found a {type(obj).__name__}")
    try:
        if ids and obj.dtype.kind in "SOU":
            return list(obj.asstr()[()]) if obj.ndim else [obj.asstr()[()]]
        arr = np.asarray(obj[()])
    except Exception as exc:
        raise DataError(where, name, f"cannot read ({_why(exc)})") from exc
    if ids:
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(
                where, name, f"expected a 1-D list of strings or integers, got {arr.dtype} {list(arr.shape)}"
            )
        return arr.tolist()
    return arr


# ----------------------------------------------------------------------------------------------------------
# Format c: NWB


def _load_nwb(path: Path, source: str, window: tuple[float, float]) -> Recording:
    where = str(path)
    w0, w1 = _check_window(window, where)
    from pynwb import NWBHDF5IO

    try:
        io_ = NWBHDF5IO(str(path), "r")
    except Exception as exc:
        raise DataError(where, None, f"not a readable NWB file ({_why(exc)})") from exc
    with io_:
        try:
            nwb = io_.read()
        except Exception as exc:
            raise DataError(where, None, f"not a readable NWB file ({_why(exc)})") from exc
        onsets, indices, field, container = _nwb_presentations(nwb, where)
        images, image_ids, images_field = _nwb_images(nwb, container, where)
        unit_ids, spikes = _nwb_units(nwb, where)
    n_images = images.shape[0]
    if indices.size and (indices.min() < 0 or indices.max() >= n_images):
        bad = int(indices[(indices < 0) | (indices >= n_images)][0])
        raise DataError(where, field, f"image index {bad} is outside the {n_images} images of {images_field}")
    shown = np.bincount(indices, minlength=n_images)
    if (shown == 0).any():
        missing = np.flatnonzero(shown == 0)
        raise DataError(
            where,
            field,
            f"{missing.size} of the {n_images} images of {images_field} are never "
            f"presented, first {image_ids[missing[0]]!r}",
        )
    # Repeat r of an image is its r-th presentation in time.
    order = np.lexsort((onsets, indices))
    sorted_idx = indices[order]
    group_start = np.searchsorted(sorted_idx, sorted_idx, side="left")
    rank = np.empty_like(indices)
    rank[order] = np.arange(order.size) - group_start
    repeats = np.full((len(unit_ids), n_images, int(shown.max())), np.nan, dtype=np.float32)
    lo_t, hi_t = onsets + w0, onsets + w1
    for k, times in enumerate(spikes):
        counts = np.searchsorted(times, hi_t, side="left") - np.searchsorted(times, lo_t, side="left")
        repeats[k, indices, rank] = counts
    mean, repeats_checked = _check_responses(repeats, where, "units/spike_times", n_images)
    return Recording(
        images=images,
        responses=mean,
        repeats=repeats_checked,
        neuron_ids=unit_ids,
        image_ids=image_ids,
        source=source,
        sha256=_hash_file(path),
    )


def _check_window(window: tuple[float, float], where: str) -> tuple[float, float]:
    try:
        w0, w1 = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise DataError(
            where, "window", f"expected (start, end) seconds after onset, got {window!r}"
        ) from exc
    if not (np.isfinite(w0) and np.isfinite(w1) and w1 > w0):
        raise DataError(where, "window", f"expected finite start < end seconds after onset, got {window!r}")
    return w0, w1


def _nwb_read(get: Callable[[], Any], where: str, field: str) -> np.ndarray:
    try:
        return np.asarray(get())
    except DataError:
        raise
    except Exception as exc:
        raise DataError(where, field, f"cannot read ({_why(exc)})") from exc


def _nwb_presentations(nwb: Any, where: str) -> tuple[np.ndarray, np.ndarray, str, Any]:
    """Onsets (s), image indices, the field name for messages, and the IndexSeries' image container."""
    from pynwb.image import IndexSeries

    tables = dict(nwb.intervals) if nwb.intervals is not None else {}
    table = tables.get("presentations")
    if table is None or "image_index" not in table.colnames:
        with_index = [t for t in tables.values() if "image_index" in t.colnames]
        table = with_index[0] if len(with_index) == 1 else None
        if len(with_index) > 1:
            raise DataError(
                where,
                "intervals",
                "several tables have an image_index column: name the one "
                f"to use 'presentations' ({_names([t.name for t in with_index])})",
            )
    if table is not None:
        field = f"intervals/{table.name}"
        onsets = _nwb_read(lambda: table["start_time"].data[:], where, f"{field}/start_time")
        raw = _nwb_read(lambda: table["image_index"].data[:], where, f"{field}/image_index")
        container = None
        field_index = f"{field}/image_index"
        field_onset = f"{field}/start_time"
    else:
        series = [s for s in nwb.stimulus.values() if isinstance(s, IndexSeries)]
        if not series:
            raise DataError(
                where,
                "intervals",
                "no presentations: expected a TimeIntervals table "
                "'presentations' with start_time and image_index, or an IndexSeries in stimulus",
            )
        if len(series) > 1:
            named = [s for s in series if s.name == "presentations"]
            if len(named) != 1:
                raise DataError(
                    where,
                    "stimulus",
                    "several IndexSeries: name the one to use 'presentations' "
                    f"({_names([s.name for s in series])})",
                )
            series = named
        s = series[0]
        field = f"stimulus/{s.name}"
        field_index, field_onset = f"{field}/data", f"{field}/timestamps"
        raw = _nwb_read(lambda: s.data[:], where, field_index)
        if s.timestamps is not None:
            onsets = _nwb_read(lambda: s.timestamps[:], where, field_onset)
        elif s.rate:
            onsets = (s.starting_time or 0.0) + np.arange(raw.shape[0]) / float(s.rate)
        else:
            raise DataError(where, field_onset, "the IndexSeries has neither timestamps nor a rate")
        container = s.indexed_images if s.indexed_images is not None else s.indexed_timeseries
    if raw.ndim != 1 or onsets.ndim != 1 or raw.shape != onsets.shape:
        raise DataError(where, field_index, f"{raw.shape} image indices for {onsets.shape} onsets")
    if raw.size == 0:
        raise DataError(where, field_index, "no presentations")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)):
        raise DataError(where, field_index, f"dtype {raw.dtype}: expected integer image indices")
    if np.issubdtype(raw.dtype, np.floating) and not (
        np.isfinite(raw).all() and (raw == np.round(raw)).all()
    ):
        raise DataError(where, field_index, "image indices must be whole numbers")
    onsets = onsets.astype(np.float64)
    if not np.isfinite(onsets).all():
        raise DataError(where, field_onset, "onset times must be finite (found NaN or Inf)")
    return onsets, raw.astype(np.int64), field_index, container


def _nwb_images(nwb: Any, container: Any, where: str) -> tuple[np.ndarray, list[str], str]:
    from pynwb.base import Images
    from pynwb.image import ImageSeries, IndexSeries

    def usable(obj: Any) -> bool:
        return isinstance(obj, Images) or (isinstance(obj, ImageSeries) and not isinstance(obj, IndexSeries))

    if container is None:
        for group_name in ("stimulus_template", "stimulus"):
            group = getattr(nwb, group_name)
            candidates = {name: obj for name, obj in group.items() if usable(obj)}
            if "images" in candidates:
                container = candidates["images"]
            elif len(candidates) == 1:
                container = next(iter(candidates.values()))
            elif len(candidates) > 1:
                raise DataError(
                    where,
                    group_name,
                    f"several image containers: name the one to use 'images' ({_names(sorted(candidates))})",
                )
            if container is not None:
                break
        else:
            raise DataError(
                where,
                "stimulus_template",
                "no images: expected an Images container or an ImageSeries in stimulus_template or stimulus",
            )
    field = (
        f"stimulus_template/{container.name}"
        if container.name in nwb.stimulus_template
        else f"stimulus/{container.name}"
    )
    if isinstance(container, Images):
        if container.order_of_images is not None:
            # Kept as a list: numpy would turn the Image objects into pixel arrays.
            try:
                ordered = list(container.order_of_images.data[:])
                entries = [(img.name, img) for img in ordered]
            except Exception as exc:
                raise DataError(where, f"{field}/order_of_images", f"cannot read ({_why(exc)})") from exc
        else:
            by_name = dict(container.images)
            entries = [(name, by_name[name]) for name in _order_names(list(by_name), where)]
        if not entries:
            raise DataError(where, field, "no images")
        arrays = []
        for name, img in entries:
            arr = _nwb_read(lambda img=img: img.data[()], where, f"{field}/{name}")
            arrays.append(_one_image(arr, where, f"{field}/{name}"))
        ids = [name for name, _ in entries]
        return _stack_same_size(arrays, [f"{field}/{n}" for n in ids], where), ids, field
    if getattr(container, "external_file", None) is not None:
        raise DataError(
            where, field, "images in external files are not supported; store them in the NWB file"
        )
    data = _nwb_read(lambda: container.data[()], where, f"{field}/data")
    if data.ndim == 4 and data.shape[3] == 4:
        data = data[..., :3]
    images = _check_images_array(data, where, f"{field}/data")
    return images, [str(i) for i in range(images.shape[0])], field


def _one_image(arr: np.ndarray, where: str, field: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise DataError(where, field, f"dtype {arr.dtype}: expected uint8 (0-255) pixels")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # RGBAImage: the model sees what was shown, so drop alpha
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(where, field, f"shape {list(arr.shape)}: expected (H, W), (H, W, 3) or (H, W, 4)")
    return arr


def _nwb_units(nwb: Any, where: str) -> tuple[list[str], list[np.ndarray]]:
    units = nwb.units
    if units is None or len(units) == 0:
        raise DataError(where, "units", "no units table (or it is empty)")
    if "spike_times" not in units.colnames:
        raise DataError(where, "units/spike_times", "missing column")
    ids = _check_ids(
        _nwb_read(lambda: units.id[:], where, "units/id").tolist(), len(units), where, "units/id", "units"
    )
    column = units["spike_times"]
    spikes = []
    for k in range(len(units)):
        times = _nwb_read(lambda k=k: column[k], where, "units/spike_times").astype(np.float64).ravel()
        if not np.isfinite(times).all():
            raise DataError(where, "units/spike_times", f"unit {ids[k]} has non-finite spike times")
        spikes.append(np.sort(times))
    return ids, spikes


# ----------------------------------------------------------------------------------------------------------
# Splits


def split_indices(
    n_images: int,
    *,
    scheme: str,
    seed: int,
    fold: int = 0,
    n_folds: int = 5,
    val_fraction: float = 0.1,
) -> dict[str, np.ndarray]:
    """Disjoint, covering ``{"train", "val", "test"}`` image indices (sorted int64), fixed by the arguments.

    - ``random``: a seeded permutation; its first ``round(0.2 * n)`` images are test.
    - ``kfold``: a seeded permutation cut into ``n_folds`` near-equal parts (``np.array_split``); part
      ``fold`` is test. Every image is test in exactly one fold for a given seed.
    - ``first-half``: test is the second half of the images in recording order (indices ``n // 2`` and
      up); train and val come from the first half. No seed affects the test set.

    In every scheme val is ``round(val_fraction * m)`` images drawn (seeded) from the ``m`` non-test
    images, and train is the rest. The same arguments give the same split on every machine (numpy's
    PCG64 generator), so a model card's split can be rebuilt from its recorded arguments.
    """
    n = _check_int(n_images, "n_images")
    if n < 2:
        raise InvalidInput(f"split_indices: need at least 2 images, got {n}")
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidInput(f"split_indices: val_fraction must be in [0, 1), got {val_fraction}")
    seed = _check_int(seed, "seed")
    if seed < 0:
        raise InvalidInput(f"split_indices: seed must be >= 0, got {seed}")
    if scheme == "random":
        perm = np.random.default_rng(seed).permutation(n)
        n_test = max(1, round(RANDOM_TEST_FRACTION * n))
        test, rest = perm[:n_test], perm[n_test:]
    elif scheme == "kfold":
        n_folds, fold = _check_int(n_folds, "n_folds"), _check_int(fold, "fold")
        if not 2 <= n_folds <= n:
            raise InvalidInput(f"split_indices: n_folds must be in [2, {n}], got {n_folds}")
        if not 0 <= fold < n_folds:
            raise InvalidInput(f"split_indices: fold must be in [0, {n_folds}), got {fold}")
        parts = np.array_split(np.random.default_rng(seed).permutation(n), n_folds)
        test = parts[fold]
        rest = np.concatenate([p for i, p in enumerate(parts) if i != fold])
    elif scheme == "first-half":
        test, rest = np.arange(n // 2, n), np.arange(n // 2)
    else:
        raise InvalidInput(
            f"split_indices: unknown scheme {scheme!r}; expected one of {', '.join(SPLIT_SCHEMES)}"
        )
    n_val = round(val_fraction * rest.size)
    if n_val >= rest.size:
        raise InvalidInput(
            f"split_indices: val_fraction {val_fraction} leaves no training images of {rest.size}"
        )
    # A generator of its own for val, keyed by the fold too, so each fold's val set is drawn afresh and
    # the val draw never shifts the test permutation above.
    val_rng = np.random.default_rng([seed, fold if scheme == "kfold" else 0, 1])
    pick = val_rng.permutation(rest.size)[:n_val]
    val = rest[pick]
    train = np.delete(rest, pick)
    return {
        name: np.sort(arr).astype(np.int64) for name, arr in (("train", train), ("val", val), ("test", test))
    }


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInput(f"split_indices: {name} must be an integer, got {value!r}")
    return int(value)


def split_summary(splits: dict[str, np.ndarray]) -> dict[str, int]:
    """Sizes of each part, for logs and cards."""
    return {name: int(arr.size) for name, arr in splits.items()}


__all__ = [
    "DEFAULT_WINDOW",
    "SPLIT_SCHEMES",
    "Recording",
    "list_sessions",
    "load_recording",
    "split_indices",
    "split_summary",
]
