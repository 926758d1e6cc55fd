"""Format b: HDF5 with images, responses and optional ids."""

from __future__ import annotations

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
from neurotwin.training.datasets.recording import (
    Recording,
)


def load_hdf5(path: Path, source: str) -> Recording:
    import h5py

    where = str(path)
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise DataError(where, None, f"not a readable HDF5 file ({why(exc)})") from exc
    with fh:
        images = check_images_array(_h5_array(fh, "images", where), where, "images")
        raw = _h5_array(fh, "responses", where)
        mean, repeats = check_responses(raw, where, "responses", images.shape[0])
        neuron_ids = [str(k) for k in range(mean.shape[0])]
        image_ids = [str(i) for i in range(images.shape[0])]
        if "neuron_ids" in fh:
            neuron_ids = check_ids(
                _h5_array(fh, "neuron_ids", where, ids=True), mean.shape[0], where, "neuron_ids", "neurons"
            )
        if "image_ids" in fh:
            image_ids = check_ids(
                _h5_array(fh, "image_ids", where, ids=True), images.shape[0], where, "image_ids", "images"
            )
    return Recording(
        images=images,
        responses=mean,
        repeats=repeats,
        neuron_ids=neuron_ids,
        image_ids=image_ids,
        source=source,
        sha256=hash_file(path),
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
        raise DataError(where, name, f"cannot read ({why(exc)})") from exc
    if ids:
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(
                where, name, f"expected a 1-D list of strings or integers, got {arr.dtype} {list(arr.shape)}"
            )
        return arr.tolist()
    return arr
