"""TorchServe handler for a neurotwin predictor: image bytes in, firing rates out.

This file ships inside the ``.mar`` that ``neurotwin export torchserve`` writes, next to
``model.onnx`` and ``card.json``. TorchServe imports it by file name in its own worker process, where
neurotwin is usually not installed, so it may import only numpy, Pillow and onnxruntime.

Request: one image per request, under the input key ``data`` (gRPC ``input`` map or REST form field),
or as the raw REST body. The bytes are PNG/JPEG (anything Pillow reads), or raw uint8 RGB pixels
in HWC order; raw pixels take their size from an optional ``shape`` input ("H,W" or "H,W,3") and
otherwise from the card's input size. Images must have the card's input size, as for neurotwin's own
service (no resizing).
Response: JSON ``{"model", "version", "neuron_ids", "rates"}``, the same rates as
``neurotwin serve predictor`` returns for the same image.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

log = logging.getLogger(__name__)

# The same decoded-pixel limit as neurotwin.imagecodec, so both servers refuse the same bombs.
MAX_PIXELS = 4096 * 4096
IMAGE_KEYS = ("data", "body", "image")
# Lets an operator cap ONNX Runtime's threads when TorchServe runs several workers per host.
THREADS_ENV = "NEUROTWIN_TS_ORT_THREADS"


class RequestError(ValueError):
    """A request this handler cannot use; reported per request as HTTP 400."""


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        # JSON clients cannot send bytes, so a string is taken as base64.
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"{what}: a string must be base64-encoded image bytes") from exc
    raise RequestError(f"{what}: expected image bytes, got {type(value).__name__}")


def _parse_shape(value: Any) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes | bytearray) else str(value)
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError as exc:
        raise RequestError(f"shape {text!r}: expected 'H,W' or 'H,W,3'") from exc
    if len(dims) not in (2, 3) or (len(dims) == 3 and dims[2] != 3) or min(dims) <= 0:
        raise RequestError(f"shape {text!r}: expected 'H,W' or 'H,W,3' with positive sizes")
    return dims[0], dims[1]


def decode(data: bytes, raw_shape: tuple[int, int] | None) -> np.ndarray:
    """Image bytes -> uint8 [H, W, 3]; encoded images first, raw pixels when no decoder knows them."""
    if not data:
        raise RequestError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise RequestError(f"{width} x {height} pixels exceeds the limit of {MAX_PIXELS}")
            img.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(f"refused as a decompression bomb ({exc})") from exc
    except Exception as exc:
        if raw_shape is None:
            raise RequestError(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
        height, width = raw_shape
        if len(data) != height * width * 3:
            raise RequestError(
                f"not a decodable image, and {len(data)} bytes are not raw {height} x {width} x 3 pixels"
            ) from exc
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


class TwinHandler:
    """One ONNX Runtime session per TorchServe worker."""

    def __init__(self) -> None:
        self.session: ort.InferenceSession | None = None
        self.card: dict[str, Any] = {}
        self.version = ""
        self.input_name = ""
        self.output_name = "rates"

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        model = (context.manifest or {}).get("model", {})
        self.card = json.loads((model_dir / "card.json").read_text())
        self.version = str(model.get("modelVersion", ""))
        options = ort.SessionOptions()
        threads = os.environ.get(THREADS_ENV)
        if threads:
            options.intra_op_num_threads = int(threads)
        providers: list[Any] = ["CPUExecutionProvider"]
        gpu_id = props.get("gpu_id")
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_id)}))
        self.session = ort.InferenceSession(
            str(model_dir / model.get("serializedFile", "model.onnx")), options, providers=providers
        )
        self.input_name = self.session.get_inputs()[0].name
        # The card's output, by name: an ensemble twin's graph also returns its members' rates.
        self.output_name = str((self.card.get("output") or {}).get("name", "rates"))
        log.info("neurotwin twin %s v%s on %s", self.card.get("name"), self.version, providers[0])

    def _image(self, request: Any) -> np.ndarray:
        if not isinstance(request, dict):
            return decode(_as_bytes(request, "request"), self._default_shape())
        key = next((k for k in IMAGE_KEYS if request.get(k) is not None), None)
        if key is None:
            # A client that names its single input differently still means the image.
            others = [k for k, v in request.items() if k != "shape" and v is not None]
            if len(others) != 1:
                raise RequestError(f"no image: send it under one of {list(IMAGE_KEYS)}")
            key = others[0]
        shape = _parse_shape(request["shape"]) if request.get("shape") is not None else None
        return decode(_as_bytes(request[key], key), shape or self._default_shape())

    def _default_shape(self) -> tuple[int, int] | None:
        spec = self.card.get("input") or {}
        if "height" in spec and "width" in spec:
            return int(spec["height"]), int(spec["width"])
        return None

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        assert self.session is not None, "initialize() runs before the first request"
        results: list[Any] = [None] * len(data)
        expected = self._default_shape()
        good: list[tuple[int, np.ndarray]] = []
        for index, request in enumerate(data):
            try:
                image = self._image(request)
                # Like neurotwin's own service, refuse other sizes rather than resize: a twin's
                # rates depend on where each pixel falls in the receptive fields.
                if expected is not None and image.shape[:2] != expected:
                    raise RequestError(
                        f"image is {image.shape[0]} x {image.shape[1]}; this twin takes "
                        f"{expected[0]} x {expected[1]}"
                    )
            except RequestError as exc:
                results[index] = {"error": str(exc)}
                context.set_response_status(code=400, phrase=str(exc)[:200], idx=index)
                continue
            good.append((index, image))
        if good:
            batch = np.stack([image for _, image in good])
            (rates,) = self.session.run([self.output_name], {self.input_name: batch})
            for (index, _), row in zip(good, np.asarray(rates, dtype=np.float32), strict=True):
                results[index] = {
                    "model": self.card.get("name", ""),
                    "version": self.version,
                    "neuron_ids": self.card.get("neuron_ids", []),
                    "rates": row.tolist(),
                }
        return results


_handler = TwinHandler()


def handle(data: list[Any] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; it calls ``handle(None, context)`` once to initialize."""
    if _handler.session is None:
        _handler.initialize(context)
    if data is None:
        return None
    return _handler.handle(data, context)
