"""Exact serialization of arrays, random generators and configs for optimizer state dicts."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from neurotwin.errors import InvalidInput

STATE_VERSION = 1


def encode_array(array: np.ndarray | None) -> dict[str, Any] | None:
    """An array as JSON-compatible data that decodes to the identical bits (little-endian bytes)."""
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return {
        "dtype": dtype.str,
        "shape": list(array.shape),
        "data": base64.b64encode(array.astype(dtype, copy=False).tobytes()).decode("ascii"),
    }


def decode_array(data: Mapping[str, Any] | None) -> np.ndarray | None:
    if data is None:
        return None
    raw = base64.b64decode(data["data"])
    return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    # PCG64's state is a dict of Python ints (128-bit values included); JSON carries them exactly.
    return dict(rng.bit_generator.state)


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    name = state["bit_generator"]
    if name != "PCG64":
        raise InvalidInput(f"optimizer state: unsupported bit generator {name!r}")
    bit_generator = np.random.PCG64()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def check_scores(scores: np.ndarray | Any, expected: int) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.shape[0] != expected:
        raise InvalidInput(f"tell: expected {expected} scores, got {values.shape[0]}")
    if not np.all(np.isfinite(values)):
        raise InvalidInput("tell: scores must be finite (NaN or Inf given)")
    return values


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
    return cls(**values)
