"""Ingestion: every format round-trips from small generated data; every bad input is a DataError."""

from __future__ import annotations

import datetime
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from neurotwin.errors import DataError, InvalidInput
from neurotwin.training.datasets import Recording, list_sessions, load_recording, split_indices
from PIL import Image

from tests._recordings import (
    nwb_schedule,
    synthetic_data,
    write_folder_recording,
    write_hdf5_recording,
    write_nwb_recording,
    write_session_layout,
    write_zip_recording,
)

N_IMAGES, N_NEURONS, SIZE = 12, 5, 16


def expect_data_error(call: Callable[[], object], path: Path | str, field: str | None) -> DataError:
    """The call fails with a DataError whose message names the file and (when given) the field."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message, message
    if field is not None:
        assert f"[{field}]" in message, message
    # Chained causes are fine, but the message itself must not be a bare numpy/h5py repr.
    assert "Traceback" not in message
    return info.value


def png(image: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Format a: images + .npy


def test_folder_round_trip(tmp_path: Path) -> None:
    folder = write_folder_recording(tmp_path, N_IMAGES, N_NEURONS, SIZE)
    rec = load_recording(folder)
    images, responses = synthetic_data(N_IMAGES, N_NEURONS, SIZE)
    assert rec.images.dtype == np.uint8 and rec.images.shape == (N_IMAGES, SIZE, SIZE, 3)
    np.testing.assert_array_equal(rec.images, images)
    assert rec.responses.dtype == np.float32
    np.testing.assert_array_equal(rec.responses, responses)
    assert rec.repeats is None
    assert rec.image_ids == [f"image{i + 1:04d}" for i in range(N_IMAGES)]
    assert rec.neuron_ids == [str(k) for k in range(N_NEURONS)]
    assert (rec.n_images, rec.n_neurons) == (N_IMAGES, N_NEURONS)
    assert rec.source == str(folder)
    assert re.fullmatch(r"[0-9a-f]{64}", rec.sha256)
    assert load_recording(str(folder)).sha256 == rec.sha256
    # Any byte of the data changes the hash.
    np.save(folder / "responses.npy", (responses * 2).astype(np.float64))
    assert load_recording(folder).sha256 != rec.sha256


def test_zip_round_trip_orders_by_number(tmp_path: Path) -> None:
    zip_path, npy_path = write_zip_recording(tmp_path, N_IMAGES, N_NEURONS, SIZE)
    rec = load_recording(zip_path, responses=npy_path)
    images, responses = synthetic_data(N_IMAGES, N_NEURONS, SIZE)
    np.testing.assert_array_equal(rec.images, images)
    np.testing.assert_array_equal(rec.responses, responses)
    assert rec.image_ids[0] == "image0001" and rec.image_ids[-1] == f"image{N_IMAGES:04d}"


def test_numbers_not_zero_padded_still_ordered_numerically(tmp_path: Path) -> None:
    images, responses = synthetic_data(11, 2, 8)
    folder = tmp_path / "f"
    folder.mkdir()
    for i, img in enumerate(images):
        (folder / f"img_{i + 1}.png").write_bytes(png(img))
    (folder / "notes.txt").write_text("ignored")
    rec = load_recording(folder, responses=_save(tmp_path / "r.npy", responses))
    np.testing.assert_array_equal(rec.images, images)  # img_10 after img_9, not after img_1
    assert rec.image_ids[9] == "img_10"


def test_sorted_name_fallback(tmp_path: Path) -> None:
    images, responses = synthetic_data(3, 2, 8)
    folder = tmp_path / "f"
    folder.mkdir()
    for name, img in zip(("cat", "apple", "bird"), images, strict=True):
        (folder / f"{name}.png").write_bytes(png(img))
    rec = load_recording(folder, responses=_save(tmp_path / "r.npy", responses))
    assert rec.image_ids == ["apple", "bird", "cat"]
    np.testing.assert_array_equal(rec.images, images[[1, 2, 0]])


def test_session_layout(tmp_path: Path) -> None:
    root = write_session_layout(tmp_path, ("201025", "201026"), N_IMAGES, N_NEURONS, SIZE)
    assert list_sessions(root) == ["201025", "201026"]
    rec = load_recording(root, session="201026")
    images, responses = synthetic_data(N_IMAGES, N_NEURONS, SIZE, seed=1)
    np.testing.assert_array_equal(rec.images, images)
    np.testing.assert_array_equal(rec.responses, responses)
    assert rec.neuron_ids[0] == "201026_0"
    assert rec.source == str(root)
    expect_data_error(lambda: load_recording(root), root, "session")
    err = expect_data_error(lambda: load_recording(root, session="999"), root, "session")
    assert "201025" in str(err)
    single = write_session_layout(tmp_path / "one", ("s9",), 4, 2, 8)
    assert load_recording(single).n_images == 4


def test_jpeg_grayscale_and_rgba_files_become_rgb(tmp_path: Path) -> None:
    folder = write_folder_recording(tmp_path, 4, 2, SIZE, fmt="jpg")
    rec = load_recording(folder)
    assert rec.images.shape == (4, SIZE, SIZE, 3)
    images, _ = synthetic_data(4, 2, SIZE)
    # Lossy, but each decoded image is nearest to its own source, so the order is right.
    dist = np.abs(rec.images[:, None].astype(int) - images[None].astype(int)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(dist.argmin(axis=1), np.arange(4))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "image1.png").write_bytes(png(images[0], "L"))
    (mixed / "image2.png").write_bytes(png(images[1], "RGBA"))
    (mixed / "image3.png").write_bytes(png(images[2], "P"))
    rec = load_recording(mixed, responses=_save(tmp_path / "r.npy", np.ones((2, 3))))
    assert rec.images.shape == (3, SIZE, SIZE, 3) and rec.images.dtype == np.uint8
    gray = rec.images[0]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(rec.images[1], images[1])


def test_subset_keeps_neurons_and_provenance(tmp_path: Path) -> None:
    rec = load_recording(write_hdf5_recording(tmp_path, N_IMAGES, N_NEURONS, SIZE, repeats=3))
    sub = rec.subset([5, 0, 7])
    assert sub.n_images == 3 and sub.n_neurons == N_NEURONS
    np.testing.assert_array_equal(sub.images, rec.images[[5, 0, 7]])
    np.testing.assert_array_equal(sub.responses, rec.responses[:, [5, 0, 7]])
    assert sub.repeats is not None and sub.repeats.shape == (N_NEURONS, 3, 3)
    assert sub.image_ids == ["img5", "img0", "img7"]
    assert (sub.sha256, sub.source, sub.neuron_ids) == (rec.sha256, rec.source, rec.neuron_ids)
    mask = np.zeros(N_IMAGES, dtype=bool)
    mask[[1, 2]] = True
    assert rec.subset(mask).image_ids == ["img1", "img2"]
    assert rec.subset(np.array([], dtype=np.int64)).n_images == 0
    with pytest.raises(InvalidInput):
        rec.subset([N_IMAGES])


# ---------------------------------------------------------------------------------------------------------
# Format b: HDF5


def test_hdf5_round_trip(tmp_path: Path) -> None:
    path = write_hdf5_recording(tmp_path, N_IMAGES, N_NEURONS, SIZE)
    rec = load_recording(path)
    images, responses = synthetic_data(N_IMAGES, N_NEURONS, SIZE)
    np.testing.assert_array_equal(rec.images, images)
    np.testing.assert_array_equal(rec.responses, responses)
    assert rec.repeats is None
    assert rec.neuron_ids == [f"unit{k}" for k in range(N_NEURONS)]
    assert rec.image_ids == [f"img{i}" for i in range(N_IMAGES)]
    bare = load_recording(write_hdf5_recording(tmp_path, 3, 2, 8, ids=False, name="bare.hdf5"))
    assert bare.neuron_ids == ["0", "1"] and bare.image_ids == ["0", "1", "2"]


def test_hdf5_per_repeat_gives_repeats_and_nanmean(tmp_path: Path) -> None:
    path = write_hdf5_recording(tmp_path, N_IMAGES, N_NEURONS, SIZE, repeats=4)
    rec = load_recording(path)
    _, counts = synthetic_data(N_IMAGES, N_NEURONS, SIZE, repeats=4)
    assert rec.repeats is not None and rec.repeats.dtype == np.float32
    np.testing.assert_array_equal(rec.repeats, counts)  # NaN padding in the same places
    assert np.isnan(rec.repeats[:, 0, 3]).all()
    np.testing.assert_allclose(rec.responses, np.nanmean(counts, axis=2), rtol=1e-6)
    np.testing.assert_allclose(rec.responses[:, 0], counts[:, 0, :3].mean(axis=1), rtol=1e-6)


def test_hdf5_grayscale_stack_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.h5"
    gray = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    with h5py.File(path, "w") as fh:
        fh["images"] = gray
        fh["responses"] = np.ones((2, 3), dtype=np.int32)
        fh["neuron_ids"] = np.array([7, 9])
    rec = load_recording(path)
    assert rec.images.shape == (3, 8, 8, 3)
    assert rec.neuron_ids == ["7", "9"]
    np.testing.assert_array_equal(rec.images[..., 2], gray)


# ---------------------------------------------------------------------------------------------------------
# Format c: NWB


@pytest.mark.parametrize(
    ("presentations", "images_as"), [("intervals", "imageseries"), ("indexseries", "images")]
)
def test_nwb_counts_spikes_in_window(tmp_path: Path, presentations: str, images_as: str) -> None:
    path = write_nwb_recording(
        tmp_path, N_IMAGES, N_NEURONS, SIZE, repeats=3, presentations=presentations, images_as=images_as
    )
    rec = load_recording(path)
    images, counts = synthetic_data(N_IMAGES, N_NEURONS, SIZE, repeats=3)
    np.testing.assert_array_equal(rec.images, images)
    assert rec.repeats is not None and rec.repeats.shape == (N_NEURONS, N_IMAGES, 3)
    np.testing.assert_array_equal(rec.repeats, counts)  # exact planted counts, padding included
    np.testing.assert_allclose(rec.responses, np.nanmean(counts, axis=2), rtol=1e-6)
    assert rec.neuron_ids == [str(k) for k in range(N_NEURONS)]
    if images_as == "images":
        assert rec.image_ids == [f"stim{N_IMAGES - i:03d}" for i in range(N_IMAGES)]
    else:
        assert rec.image_ids == [str(i) for i in range(N_IMAGES)]

    # Four distractor spikes sit at 10, 49, 151 and 300 ms after each onset.
    wide = load_recording(path, window=(0.0, 0.2))
    np.testing.assert_array_equal(wide.repeats, counts + 3)
    early = load_recording(path, window=(0.0, 0.05))
    np.testing.assert_array_equal(early.repeats, np.where(np.isnan(counts), np.nan, 2))


def test_nwb_images_without_order_gray_and_rgba(tmp_path: Path) -> None:
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.base import Images
    from pynwb.epoch import TimeIntervals
    from pynwb.image import GrayscaleImage, RGBAImage, RGBImage

    rgb = np.full((8, 8, 3), 10, np.uint8)
    gray = np.full((8, 8), 20, np.uint8)
    rgba = np.full((8, 8, 4), 30, np.uint8)
    nwb = NWBFile(
        session_description="unordered images",
        identifier="unordered",
        session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    )
    items = [
        RGBImage(name="img10", data=rgb),
        GrayscaleImage(name="img2", data=gray),
        RGBAImage(name="img1", data=rgba),
    ]
    nwb.add_stimulus_template(Images(name="stimuli", images=items, description="no order_of_images"))
    table = TimeIntervals(name="trials_with_images", description="onsets")
    table.add_column("image_index", "index")
    for i, onset in enumerate([1.0, 2.0, 3.0, 4.0]):
        table.add_row(start_time=onset, stop_time=onset + 0.2, image_index=i % 3)
    nwb.add_time_intervals(table)
    nwb.add_unit(spike_times=[1.1, 2.1, 2.12, 4.1])  # image 0: 1 then 1; image 1: 2
    path = tmp_path / "unordered.nwb"
    with NWBHDF5IO(str(path), "w") as io_:
        io_.write(nwb)
    rec = load_recording(path)
    assert rec.image_ids == ["img1", "img2", "img10"]
    assert [int(rec.images[i, 0, 0, c]) for i in range(3) for c in range(3)] == [30] * 3 + [20] * 3 + [10] * 3
    assert rec.repeats is not None and rec.repeats.shape == (1, 3, 2)
    np.testing.assert_array_equal(rec.repeats[0], [[1, 1], [2, np.nan], [0, np.nan]])
    np.testing.assert_array_equal(rec.responses, [[1, 2, 0]])


def test_nwb_schedule_has_uneven_repeats() -> None:
    _, indices = nwb_schedule(N_IMAGES, 3)
    assert np.bincount(indices)[0] == 2 and np.bincount(indices)[1:].min() == 3


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _folder(tmp_path: Path, n: int = 4) -> Path:
    return write_folder_recording(tmp_path, n, 3, 8, name=f"bad{len(list(tmp_path.iterdir()))}")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda r: np.where(np.arange(r.size).reshape(r.shape) == 5, np.nan, r), "NaN"),
        (lambda r: np.where(np.arange(r.size).reshape(r.shape) == 5, np.inf, r), "infinite"),
        (lambda r: np.where(np.arange(r.size).reshape(r.shape) == 5, -1.0, r), "negative"),
        (lambda r: r.astype(np.float64) * 1e300, "infinite"),  # overflows float32
        (lambda r: r[:, :-1], "image columns"),
        (lambda r: r.T, "transposed"),
        (lambda r: r[:0], "no data"),
        (lambda r: r[0], "shape"),
        (lambda r: r.astype(str), "dtype"),
        (lambda r: r > 1, "dtype"),
        (lambda r: np.full((*r.shape, 2), np.nan), "no valid repeat"),
    ],
)
def test_bad_responses_npy(tmp_path: Path, make: Callable[[np.ndarray], np.ndarray], problem: str) -> None:
    folder = _folder(tmp_path)
    good = np.load(folder / "responses.npy")
    bad = _save(tmp_path / "bad.npy", make(good))
    err = expect_data_error(lambda: load_recording(folder, responses=bad), bad, "responses")
    assert problem in str(err)


def test_unreadable_npy_and_missing_responses(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    expect_data_error(lambda: load_recording(folder, responses=junk), junk, "responses")
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    expect_data_error(lambda: load_recording(folder, responses=pickled), pickled, "responses")
    missing = tmp_path / "nope.npy"
    expect_data_error(lambda: load_recording(folder, responses=missing), missing, "responses")
    (folder / "responses.npy").unlink()
    expect_data_error(lambda: load_recording(folder), folder, "responses")
    zip_path, _ = write_zip_recording(tmp_path, 3, 2, 8, name="z")
    expect_data_error(lambda: load_recording(zip_path), zip_path, "responses")


def test_corrupt_image_in_zip_is_named(tmp_path: Path) -> None:
    zip_path, npy_path = write_zip_recording(tmp_path, 4, 2, 8)
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:20] if item.filename == "image0003.png" else data)
    err = expect_data_error(lambda: load_recording(broken, responses=npy_path), broken, "image0003.png")
    assert "not a decodable image" in str(err)


def test_inconsistent_image_sizes(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / "image0002.png").write_bytes(png(np.zeros((8, 9, 3), dtype=np.uint8)))
    err = expect_data_error(lambda: load_recording(folder), folder, "image0002.png")
    assert "8x9" in str(err)


def test_empty_and_broken_containers(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    npy = _save(tmp_path / "r.npy", np.ones((2, 3)))
    expect_data_error(lambda: load_recording(empty, responses=npy), empty, "images")
    empty_zip = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("README.txt", "no images here")
    expect_data_error(lambda: load_recording(empty_zip, responses=npy), empty_zip, "images")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    expect_data_error(lambda: load_recording(bad_zip, responses=npy), bad_zip, None)
    expect_data_error(lambda: load_recording(tmp_path / "absent.h5"), tmp_path / "absent.h5", None)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    expect_data_error(lambda: load_recording(text), text, None)
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"\x00" * 64)
    expect_data_error(lambda: load_recording(fake), fake, None)
    fake_nwb = tmp_path / "fake.nwb"
    fake_nwb.write_bytes(b"\x00" * 64)
    expect_data_error(lambda: load_recording(fake_nwb), fake_nwb, None)


def _h5(tmp_path: Path, name: str, **datasets: object) -> Path:
    path = tmp_path / name
    with h5py.File(path, "w") as fh:
        for key, value in datasets.items():
            if value is not None:
                fh[key] = value
    return path


IMAGES = np.zeros((3, 8, 8, 3), dtype=np.uint8)
RESP = np.ones((2, 3), dtype=np.float32)


@pytest.mark.parametrize(
    ("datasets", "field", "problem"),
    [
        ({"images": IMAGES.astype(np.float32), "responses": RESP}, "images", "uint8"),
        ({"images": np.zeros((3, 8, 8, 4), np.uint8), "responses": RESP}, "images", "(N, H, W, 3)"),
        ({"images": IMAGES[:0], "responses": RESP[:, :0]}, "images", "no images"),
        ({"images": IMAGES}, "responses", "missing dataset"),
        ({"responses": RESP}, "images", "missing dataset"),
        ({"images": IMAGES, "responses": np.ones((2, 4))}, "responses", "4 image columns"),
        ({"images": IMAGES, "responses": np.array([[1, 2, np.nan], [1, 2, 3]])}, "responses", "NaN"),
        ({"images": IMAGES, "responses": np.array([[1, 2, np.inf], [1, 2, 3]])}, "responses", "infinite"),
        ({"images": IMAGES, "responses": -RESP}, "responses", "negative"),
        ({"images": IMAGES, "responses": np.ones((2, 3, 2, 1))}, "responses", "shape"),
        ({"images": IMAGES, "responses": RESP, "neuron_ids": ["a", "b", "c"]}, "neuron_ids", "3 ids"),
        ({"images": IMAGES, "responses": RESP, "image_ids": ["a", "a", "b"]}, "image_ids", "more than once"),
        ({"images": IMAGES, "responses": RESP, "image_ids": np.ones((3, 2))}, "image_ids", "1-D"),
    ],
)
def test_bad_hdf5(tmp_path: Path, datasets: dict[str, object], field: str, problem: str | None) -> None:
    path = _h5(tmp_path, "bad.h5", **datasets)
    err = expect_data_error(lambda: load_recording(path), path, field)
    if problem is not None:
        assert problem in str(err)


def test_hdf5_all_nan_repeats_and_group_instead_of_dataset(tmp_path: Path) -> None:
    per_repeat = np.ones((2, 3, 2), dtype=np.float32)
    per_repeat[1, 2, :] = np.nan
    path = _h5(tmp_path, "nanrep.h5", images=IMAGES, responses=per_repeat)
    err = expect_data_error(lambda: load_recording(path), path, "responses")
    assert "(1, 2)" in str(err)
    grouped = tmp_path / "group.h5"
    with h5py.File(grouped, "w") as fh:
        fh["images"] = IMAGES
        fh.create_group("responses")
    expect_data_error(lambda: load_recording(grouped), grouped, "responses")


def test_arguments_that_do_not_apply(tmp_path: Path) -> None:
    path = write_hdf5_recording(tmp_path, 3, 2, 8)
    npy = _save(tmp_path / "r.npy", np.ones((2, 3)))
    expect_data_error(lambda: load_recording(path, responses=npy), path, "responses")
    expect_data_error(lambda: load_recording(path, session="x"), path, "session")


def test_bad_nwb(tmp_path: Path) -> None:
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.image import ImageSeries

    path = write_nwb_recording(tmp_path, 4, 2, 8, repeats=2)
    expect_data_error(lambda: load_recording(path, window=(0.1, 0.1)), path, "window")
    expect_data_error(lambda: load_recording(path, window=(0.0, float("nan"))), path, "window")

    # An index past the image set, and an image that is never shown.
    for name, new_index, problem in (("far.nwb", 7, "outside"), ("unseen.nwb", 1, "never presented")):
        target = tmp_path / name
        target.write_bytes(path.read_bytes())
        with h5py.File(target, "r+") as fh:
            column = fh["intervals/presentations/image_index"]
            values = column[()]
            values[values == 0] = new_index
            column[...] = values
        err = expect_data_error(
            lambda t=target: load_recording(t), target, "intervals/presentations/image_index"
        )
        assert problem in str(err)

    # No presentations at all: images and units only.
    bare = tmp_path / "bare.nwb"
    nwb = NWBFile(
        session_description="no presentations",
        identifier="bare",
        session_start_time=datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    )
    nwb.add_stimulus_template(ImageSeries(name="images", data=IMAGES, unit="n.a.", rate=1.0))
    nwb.add_unit(spike_times=[0.1, 0.2])
    with NWBHDF5IO(str(bare), "w") as io_:
        io_.write(nwb)
    expect_data_error(lambda: load_recording(bare), bare, "intervals")

    # Non-finite spike times.
    nan_spikes = tmp_path / "nanspikes.nwb"
    nan_spikes.write_bytes(path.read_bytes())
    with h5py.File(nan_spikes, "r+") as fh:
        data = fh["units/spike_times"]
        values = data[()]
        values[0] = np.nan
        data[...] = values
    expect_data_error(lambda: load_recording(nan_spikes), nan_spikes, "units/spike_times")


# ---------------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("scheme", ["random", "kfold", "first-half"])
def test_split_deterministic_disjoint_covering(scheme: str) -> None:
    n = 101
    a = split_indices(n, scheme=scheme, seed=3)
    b = split_indices(n, scheme=scheme, seed=3)
    assert set(a) == {"train", "val", "test"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].dtype == np.int64 and (np.diff(a[name]) > 0).all()
    joined = np.concatenate([a["train"], a["val"], a["test"]])
    assert joined.size == n and set(joined.tolist()) == set(range(n))
    non_test = n - a["test"].size
    assert a["val"].size == round(0.1 * non_test)
    other = split_indices(n, scheme=scheme, seed=4)
    assert not np.array_equal(other["val"], a["val"])
    if scheme == "random":
        assert a["test"].size == round(0.2 * n)
        assert not np.array_equal(other["test"], a["test"])
    if scheme == "first-half":
        np.testing.assert_array_equal(a["test"], np.arange(50, n))
        np.testing.assert_array_equal(other["test"], a["test"])


def test_kfold_tests_partition_the_images() -> None:
    n, k = 53, 5
    folds = [split_indices(n, scheme="kfold", seed=0, fold=f, n_folds=k) for f in range(k)]
    tests = np.concatenate([f["test"] for f in folds])
    assert sorted(tests.tolist()) == list(range(n))
    assert {f["test"].size for f in folds} <= {n // k, n // k + 1}
    assert not np.array_equal(folds[0]["val"], folds[1]["val"])
    no_val = split_indices(n, scheme="kfold", seed=0, val_fraction=0.0)
    assert no_val["val"].size == 0 and no_val["train"].size + no_val["test"].size == n


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_images": 10, "scheme": "nope", "seed": 0},
        {"n_images": 1, "scheme": "random", "seed": 0},
        {"n_images": 10, "scheme": "kfold", "seed": 0, "fold": 5},
        {"n_images": 10, "scheme": "kfold", "seed": 0, "n_folds": 1},
        {"n_images": 10, "scheme": "random", "seed": 0, "val_fraction": 1.0},
        {"n_images": 10, "scheme": "random", "seed": -1},
        {"n_images": 10.0, "scheme": "random", "seed": 0},
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        split_indices(**kwargs)  # type: ignore[arg-type]


def test_recording_checks_its_shapes() -> None:
    with pytest.raises(InvalidInput):
        Recording(
            images=IMAGES,
            responses=np.ones((2, 4), np.float32),
            repeats=None,
            neuron_ids=["a", "b"],
            image_ids=["0", "1", "2"],
            source="x",
            sha256="0",
        )
