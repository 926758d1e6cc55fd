"""Checks every format's reader applies: responses, image arrays, ids, file hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neurotwin.errors import DataError
from neurotwin.training.datasets.recording import (
    HASH_CHUNK,
)


def check_responses(
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


def check_images_array(arr: np.ndarray, where: str, field: str) -> np.ndarray:
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


def check_ids(values: Sequence[object], count: int, where: str, field: str, what: str) -> list[str]:
    ids = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if len(ids) != count:
        raise DataError(where, field, f"{len(ids)} ids for {count} {what}")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(where, field, f"id {dup!r} appears more than once")
    return ids


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
