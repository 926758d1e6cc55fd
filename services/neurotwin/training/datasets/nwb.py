"""Format c: NWB read with pynwb (spikes, presentations and images counted into rates)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.errors import DataError
from neurotwin.training.datasets.checks import (
    check_ids,
    check_images_array,
    check_responses,
    hash_file,
    why,
)
from neurotwin.training.datasets.files import (
    names,
    order_names,
    stack_same_size,
)
from neurotwin.training.datasets.recording import (
    Recording,
)


def load_nwb(path: Path, source: str, window: tuple[float, float]) -> Recording:
    where = str(path)
    w0, w1 = _check_window(window, where)
    from pynwb import NWBHDF5IO

    try:
        io_ = NWBHDF5IO(str(path), "r")
    except Exception as exc:
        raise DataError(where, None, f"not a readable NWB file ({why(exc)})") from exc
    with io_:
        try:
            nwb = io_.read()
        except Exception as exc:
            raise DataError(where, None, f"not a readable NWB file ({why(exc)})") from exc
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
    mean, repeats_checked = check_responses(repeats, where, "units/spike_times", n_images)
    return Recording(
        images=images,
        responses=mean,
        repeats=repeats_checked,
        neuron_ids=unit_ids,
        image_ids=image_ids,
        source=source,
        sha256=hash_file(path),
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
        raise DataError(where, field, f"cannot read ({why(exc)})") from exc


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
                f"to use 'presentations' ({names([t.name for t in with_index])})",
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
                    f"({names([s.name for s in series])})",
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
                    f"several image containers: name the one to use 'images' ({names(sorted(candidates))})",
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
                raise DataError(where, f"{field}/order_of_images", f"cannot read ({why(exc)})") from exc
        else:
            by_name = dict(container.images)
            entries = [(name, by_name[name]) for name in order_names(list(by_name), where)]
        if not entries:
            raise DataError(where, field, "no images")
        arrays = []
        for name, img in entries:
            arr = _nwb_read(lambda img=img: img.data[()], where, f"{field}/{name}")
            arrays.append(_one_image(arr, where, f"{field}/{name}"))
        ids = [name for name, _ in entries]
        return stack_same_size(arrays, [f"{field}/{n}" for n in ids], where), ids, field
    if getattr(container, "external_file", None) is not None:
        raise DataError(
            where, field, "images in external files are not supported; store them in the NWB file"
        )
    data = _nwb_read(lambda: container.data[()], where, f"{field}/data")
    if data.ndim == 4 and data.shape[3] == 4:
        data = data[..., :3]
    images = check_images_array(data, where, f"{field}/data")
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
    ids = check_ids(
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
