"""Versions a registry must refuse, made from real tiny predictors: outputs all NaN, flipped weight
bytes, weights that no longer reproduce the recorded reference outputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from neurotwin.integrity import INTEGRITY_FILE, REFERENCE_FILE, file_sha256
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion

from tests._models import make_card, tiny_predictor_bytes, write_predictor


def nan_predictor(
    store_root: str | Path, name: str = "tiny", neurons: int = 5, size: int = 32
) -> ModelVersion:
    """A valid ONNX graph with a valid card whose readout bias is NaN: every output is NaN."""
    import onnx
    from onnx import numpy_helper

    model_bytes, stats = tiny_predictor_bytes(neurons, size, 0)
    model = onnx.load_from_string(model_bytes)
    (bias,) = [t for t in model.graph.initializer if t.name.endswith("readout.bias")]
    bias.CopyFrom(numpy_helper.from_array(np.full(neurons, np.nan, dtype=np.float32), bias.name))
    return write_predictor(
        store_root, name, model.SerializeToString(), make_card(name, neurons, size, stats, 0)
    )


def copy_version(
    store_root: str | Path, source: ModelVersion, change: Callable[[Path], None] | None = None
) -> ModelVersion:
    """``source`` copied, records included, as the next version; ``change(folder)`` alters the copy
    before it is renamed into place (a watching server never sees it unchanged)."""
    store = ModelStore(store_root)
    with store.new_version(PREDICTORS, source.name) as folder:
        for path in source.path.iterdir():
            shutil.copy(path, folder / path.name)
        if change is not None:
            change(folder)
    return store.resolve(PREDICTORS, source.name)


def flip_weight_bytes(folder: Path, count: int = 4096) -> None:
    """Invert ``count`` bytes inside the largest weight tensor of ``folder/model.onnx`` (it still parses)."""
    import onnx

    model_path = folder / "model.onnx"
    data = bytearray(model_path.read_bytes())
    model = onnx.load_from_string(bytes(data))
    largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    start = data.find(largest.raw_data)
    assert start >= 0
    count = min(count, len(largest.raw_data))
    data[start : start + count] = bytes(b ^ 0xFF for b in data[start : start + count])
    model_path.write_bytes(bytes(data))


def reseal_with_reference_of(folder: Path, other: ModelVersion) -> None:
    """Give the version in ``folder`` the reference outputs of ``other`` and checksums that match its
    own files, so only the outputs can tell that it is not the model the reference was recorded for."""
    shutil.copy(other.path / REFERENCE_FILE, folder / REFERENCE_FILE)
    record = json.loads((other.path / INTEGRITY_FILE).read_text())
    record["files"] = {n: file_sha256(folder / n) for n in ("model.onnx", "card.json", REFERENCE_FILE)}
    (folder / INTEGRITY_FILE).write_text(json.dumps(record))
