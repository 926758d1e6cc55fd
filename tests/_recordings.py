"""Small synthetic recordings in every format ``neurotwin.training.datasets`` reads, for tests.

Each writer returns what ``load_recording`` needs; :func:`synthetic_data` returns the ground truth the
writer stored for the same arguments, so a test can compare exactly:

    path = write_hdf5_recording(tmp_path, n_images=12, n_neurons=5, size=16)
    images, responses = synthetic_data(12, 5, 16)
    rec = load_recording(path)          # rec.images == images, rec.responses == responses

Images are PNG (lossless) unless ``fmt="jpg"`` is asked for.
"""

from __future__ import annotations

import datetime
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Spikes are planted strictly inside this window after onset, distractors strictly outside it, so
# counts in the default (0.05, 0.15) s window are exact.
_INSIDE = (0.06, 0.14)
_OUTSIDE_OFFSETS = (0.01, 0.049, 0.151, 0.3)
_PRESENTATION_PERIOD = 0.5


def synthetic_images(n_images: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, size, size, 3]: a smooth gradient plus noise, distinct per image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2
    noise = rng.integers(0, 64, size=(n_images, size, size, 3))
    shift = rng.integers(0, 128, size=(n_images, 1, 1, 3))
    return ((base + noise + shift) % 256).astype(np.uint8)


def synthetic_data(
    n_images: int = 12, n_neurons: int = 5, size: int = 16, seed: int = 0, repeats: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, s, s, 3], responses) as written by the writers below.

    Responses are float32 [neurons, N] rates, or with ``repeats`` float32 integer counts
    [neurons, N, repeats] where image 0 has one repeat fewer (NaN-padded) so padding is exercised.
    """
    images = synthetic_images(n_images, size, seed)
    rng = np.random.default_rng(seed + 1)
    if repeats is None:
        return images, rng.gamma(2.0, 2.0, size=(n_neurons, n_images)).astype(np.float32)
    counts = rng.poisson(3.0, size=(n_neurons, n_images, repeats)).astype(np.float32)
    if repeats > 1:
        counts[:, 0, -1] = np.nan
    return images, counts


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "PNG")
    return buf.getvalue()


def write_folder_recording(
    tmp_path: Path,
    n_images: int = 12,
    n_neurons: int = 5,
    size: int = 16,
    *,
    seed: int = 0,
    fmt: str = "png",
    name: str = "folder",
) -> Path:
    """A folder of ``imageNNNN.<fmt>`` (1-based, as cowley_v4) plus ``responses.npy``; load it alone."""
    images, responses = synthetic_data(n_images, n_neurons, size, seed)
    folder = Path(tmp_path) / name
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        (folder / f"image{i + 1:04d}.{fmt}").write_bytes(_encode(img, fmt))
    np.save(folder / "responses.npy", responses.astype(np.float64))
    return folder


def write_zip_recording(
    tmp_path: Path,
    n_images: int = 12,
    n_neurons: int = 5,
    size: int = 16,
    *,
    seed: int = 0,
    fmt: str = "png",
    name: str = "images",
) -> tuple[Path, Path]:
    """(``<name>.zip`` of ``imageNNNN.<fmt>``, ``<name>_responses.npy``): pass the npy as responses=."""
    images, responses = synthetic_data(n_images, n_neurons, size, seed)
    zip_path = Path(tmp_path) / f"{name}.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        # Written in reverse so the loader must order by number, not by archive order.
        for i in reversed(range(n_images)):
            archive.writestr(f"image{i + 1:04d}.{fmt}", _encode(images[i], fmt))
    npy_path = Path(tmp_path) / f"{name}_responses.npy"
    np.save(npy_path, responses.astype(np.float64))
    return zip_path, npy_path


def write_session_layout(
    tmp_path: Path,
    sessions: tuple[str, ...] = ("s1",),
    n_images: int = 12,
    n_neurons: int = 5,
    size: int = 16,
    *,
    seed: int = 0,
) -> Path:
    """A cowley_v4-style root: ``images/images_<s>.zip`` + ``responses/responses_<s>.npy``.

    Session i is written with seed ``seed + i`` (see :func:`synthetic_data`).
    """
    root = Path(tmp_path) / "sessions"
    (root / "images").mkdir(parents=True)
    (root / "responses").mkdir()
    for i, session in enumerate(sessions):
        zip_path, npy_path = write_zip_recording(
            tmp_path, n_images, n_neurons, size, seed=seed + i, name=f"tmp_{session}"
        )
        zip_path.rename(root / "images" / f"images_{session}.zip")
        npy_path.rename(root / "responses" / f"responses_{session}.npy")
    return root


def write_hdf5_recording(
    tmp_path: Path,
    n_images: int = 12,
    n_neurons: int = 5,
    size: int = 16,
    *,
    seed: int = 0,
    repeats: int | None = None,
    ids: bool = True,
    name: str = "recording.h5",
) -> Path:
    """``images`` + ``responses`` (per-repeat when ``repeats``), with string ``neuron_ids`` ("unit<k>")
    and ``image_ids`` ("img<i>") unless ``ids=False``."""
    import h5py

    images, responses = synthetic_data(n_images, n_neurons, size, seed, repeats)
    path = Path(tmp_path) / name
    with h5py.File(path, "w") as fh:
        fh.create_dataset("images", data=images)
        fh.create_dataset("responses", data=responses)
        if ids:
            fh.create_dataset(
                "neuron_ids", data=[f"unit{k}" for k in range(n_neurons)], dtype=h5py.string_dtype()
            )
            fh.create_dataset(
                "image_ids", data=[f"img{i}" for i in range(n_images)], dtype=h5py.string_dtype()
            )
    return path


def nwb_schedule(n_images: int, repeats: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(onsets s, image indices) of the presentations :func:`write_nwb_recording` writes: each repeat
    shows every image once in a shuffled order, except that image 0 skips the last repeat."""
    rng = np.random.default_rng(seed + 2)
    order = []
    for r in range(repeats):
        block = rng.permutation(n_images)
        if repeats > 1 and r == repeats - 1:
            block = block[block != 0]
        order.append(block)
    indices = np.concatenate(order).astype(np.int64)
    onsets = 1.0 + _PRESENTATION_PERIOD * np.arange(indices.size)
    return onsets, indices


def write_nwb_recording(
    tmp_path: Path,
    n_images: int = 12,
    n_neurons: int = 5,
    size: int = 16,
    *,
    seed: int = 0,
    repeats: int = 3,
    presentations: str = "intervals",
    images_as: str = "images",
    name: str = "recording.nwb",
) -> Path:
    """An NWB file following the convention of ``neurotwin.training.datasets``.

    The planted per-repeat counts are ``synthetic_data(n_images, n_neurons, size, seed, repeats)[1]``
    (exact in the default 50-150 ms window; distractor spikes sit just outside it). ``presentations``:
    ``"intervals"`` (a TimeIntervals ``presentations`` table) or ``"indexseries"`` (an IndexSeries in
    stimulus; needs ``images_as="images"``). ``images_as``: ``"images"`` (an Images container with
    order_of_images) or ``"imageseries"`` (an ImageSeries).
    """
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.base import ImageReferences, Images
    from pynwb.epoch import TimeIntervals
    from pynwb.image import ImageSeries, IndexSeries, RGBImage

    images, counts = synthetic_data(n_images, n_neurons, size, seed, repeats)
    onsets, indices = nwb_schedule(n_images, repeats, seed)
    nwb = NWBFile(
        session_description="synthetic recording for tests",
        identifier=f"synthetic-{seed}",
        session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    )
    if images_as == "images":
        # Stored under names in reverse, so only order_of_images gives the right order.
        items = [RGBImage(name=f"stim{n_images - i:03d}", data=img) for i, img in enumerate(images)]
        container: Images | ImageSeries = Images(
            name="images",
            images=items,
            description="stimuli",
            order_of_images=ImageReferences(name="order_of_images", data=items),
        )
    elif images_as == "imageseries":
        container = ImageSeries(name="images", data=images, unit="n.a.", rate=1.0)
    else:
        raise ValueError(images_as)
    nwb.add_stimulus_template(container)
    if presentations == "intervals":
        table = TimeIntervals(name="presentations", description="image onsets")
        table.add_column("image_index", "index into stimulus_template/images")
        for onset, idx in zip(onsets, indices, strict=True):
            table.add_row(start_time=float(onset), stop_time=float(onset) + 0.2, image_index=int(idx))
        nwb.add_time_intervals(table)
    elif presentations == "indexseries":
        if not isinstance(container, Images):
            raise ValueError("pynwb only links an IndexSeries to an Images container (images_as='images')")
        nwb.add_stimulus(
            IndexSeries(
                name="presentations",
                data=indices.astype(np.uint32),
                unit="N/A",
                timestamps=onsets,
                indexed_images=container,
            )
        )
    else:
        raise ValueError(presentations)
    rng = np.random.default_rng(seed + 3)
    seen = np.zeros(n_images, dtype=np.int64)
    per_unit: list[list[float]] = [[] for _ in range(n_neurons)]
    for onset, idx in zip(onsets, indices, strict=True):
        r = seen[idx]
        seen[idx] += 1
        for k in range(n_neurons):
            c = int(counts[k, idx, r])
            per_unit[k].extend((onset + rng.uniform(*_INSIDE, size=c)).tolist())
            per_unit[k].extend((onset + np.asarray(_OUTSIDE_OFFSETS)).tolist())
    for times in per_unit:
        nwb.add_unit(spike_times=sorted(times))
    path = Path(tmp_path) / name
    with NWBHDF5IO(str(path), "w") as io_:
        io_.write(nwb)
    return path
