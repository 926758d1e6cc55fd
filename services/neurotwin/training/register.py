"""Import a predictor trained elsewhere: any ONNX graph with uint8 [N, H, W, 3] in and float [N, K] out.

The card is written from the graph itself (input size, neuron count) and, when reference images are
given, per-neuron predicted max and 99th percentile over them, computed with ONNX Runtime, so a foreign
twin serves and synthesizes like a trained one.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.card import PredictorCard
from neurotwin.errors import DataError, InvalidInput, ModelStoreError
from neurotwin.imagecodec import decode_image, resize_uint8
from neurotwin.store import MIN_OPSET, ModelStore, ModelVersion, embedded_card, onnx_opset
from neurotwin.training.export import (
    build_card,
    neuron_stats,
    onnx_predict,
    ort_session,
    write_predictor,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_images(path: str | Path) -> tuple[list[np.ndarray], list[str], str]:
    """Decode every image of a folder or zip, sorted by name: (images, names, sha256 of their bytes)."""
    source = Path(path)
    digest = hashlib.sha256()
    blobs: list[tuple[str, bytes]] = []
    if source.is_dir():
        for file in sorted(source.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                blobs.append((file.name, file.read_bytes()))
    elif source.is_file():
        try:
            with zipfile.ZipFile(source) as archive:
                for entry in sorted(archive.namelist()):
                    if not entry.endswith("/") and Path(entry).suffix.lower() in IMAGE_SUFFIXES:
                        blobs.append((entry, archive.read(entry)))
        except zipfile.BadZipFile as exc:
            raise DataError(source, None, "not a zip archive or a folder of images") from exc
    else:
        raise DataError(source, None, "no such file or directory")
    if not blobs:
        raise DataError(source, None, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for name, data in blobs:
        digest.update(data)
        try:
            images.append(decode_image(data, what=f"{source}:{name}"))
        except InvalidInput as exc:
            raise DataError(source, name, str(exc)) from exc
    return images, [name for name, _ in blobs], digest.hexdigest()


def _static(dim: Any) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def graph_signature(model: Any, source: object) -> tuple[int | None, int | None, int | None]:
    """(height, width, neurons) of a predictor graph, None where dynamic; raises on a wrong signature."""
    import onnx

    opset = onnx_opset(model)
    if opset < MIN_OPSET:
        raise ModelStoreError(
            f"{source}: opset {opset} is below the minimum {MIN_OPSET}; re-export it with a newer opset"
        )
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelStoreError(
            f"{source}: expected one input and one output, got {len(inputs)} and {len(model.graph.output)}"
        )
    in_type = inputs[0].type.tensor_type
    out_type = model.graph.output[0].type.tensor_type
    if in_type.elem_type != onnx.TensorProto.UINT8 or len(in_type.shape.dim) != 4:
        raise ModelStoreError(f"{source}: input {inputs[0].name!r} must be uint8 [N, H, W, 3]")
    channels = _static(in_type.shape.dim[3])
    if channels not in (None, 3):
        raise ModelStoreError(f"{source}: input has {channels} channels; expected 3 (RGB, NHWC)")
    if (
        out_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        or len(out_type.shape.dim) != 2
    ):
        raise ModelStoreError(f"{source}: output {model.graph.output[0].name!r} must be float [N, neurons]")
    return _static(in_type.shape.dim[1]), _static(in_type.shape.dim[2]), _static(out_type.shape.dim[1])


def register_onnx(
    model_path: str | Path,
    *,
    name: str,
    store: ModelStore,
    images: str | Path | None = None,
    neuron_ids: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    description: str = "",
    units: str | None = None,
) -> tuple[ModelVersion, PredictorCard]:
    """Add ``model_path`` as the next version of predictor ``name`` in ``store``; returns it and its card.

    Input size: the graph's static height and width, else ``size``, else the first reference image's.
    Neuron ids: ``neuron_ids``, else those of a neurotwin card already embedded in the graph, else
    ``<name>_<k>``.
    """
    import onnx

    path = Path(model_path)
    try:
        model_bytes = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a valid ONNX model ({exc})") from exc
    height, width, neurons = graph_signature(model, path)

    reference: list[np.ndarray] = []
    images_info: dict[str, Any] = {}
    if images is not None:
        reference, _, digest = read_images(images)
        images_info = {"path": str(images), "count": len(reference), "sha256": digest}
    if height is None or width is None:
        if size is not None:
            height, width = height or size[0], width or size[1]
        elif reference:
            height, width = height or reference[0].shape[0], width or reference[0].shape[1]
        else:
            raise InvalidInput(
                f"{path}: the graph's image height/width are dynamic; give reference images or a size"
            )
    elif size is not None and tuple(size) != (height, width):
        raise InvalidInput(f"{path}: the graph takes {height} x {width} images, not {size[0]} x {size[1]}")

    try:
        session = ort_session(model_bytes)
        probe = onnx_predict(session, np.zeros((1, height, width, 3), dtype=np.uint8))
    except Exception as exc:
        raise ModelStoreError(
            f"{path}: ONNX Runtime cannot run it on a {height} x {width} image ({exc})"
        ) from exc
    if probe.ndim != 2 or (neurons is not None and probe.shape[1] != neurons):
        raise ModelStoreError(f"{path}: returns {list(probe.shape)} for one image; expected [1, neurons]")
    neurons = int(probe.shape[1])

    ids = _neuron_ids(name, neurons, neuron_ids, model, path)
    stats = None
    if reference:
        batch = np.stack([resize_uint8(img, height, width) for img in reference])
        stats = neuron_stats(onnx_predict(session, batch))
    card = build_card(
        name=name,
        neuron_ids=ids,
        image_size=(height, width),
        training={
            "source": "registered",
            "file": str(path),
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "reference_images": images_info,
        },
        metrics={},
        stats=stats,
        description=description or f"imported from {path.name}",
        units=units,
    )
    version = write_predictor(store, name, model_bytes, card, recorded_by="register")
    return version, card


def _neuron_ids(
    name: str, neurons: int, given: Sequence[str] | None, model: Any, source: object
) -> list[str]:
    if given:
        ids = [str(n) for n in given]
        if len(ids) != neurons:
            raise InvalidInput(f"{source}: {len(ids)} neuron ids given for a model with {neurons} outputs")
        if len(set(ids)) != len(ids):
            raise InvalidInput(f"{source}: neuron ids must be distinct")
        return ids
    text = embedded_card(model)
    if text:
        try:
            card = PredictorCard.from_dict(json.loads(text), source=source)
            if card.neuron_count == neurons:
                return list(card.neuron_ids)
        except (ModelStoreError, ValueError):
            pass
    return [f"{name}_{k}" for k in range(neurons)]
