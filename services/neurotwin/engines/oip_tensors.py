"""Open Inference Protocol tensors <-> numpy, shared by the gRPC and HTTP front ends.

A tensor arrives either as raw little-endian row-major bytes (gRPC ``raw_input_contents``, the HTTP
binary-tensor extension) or as typed values (gRPC ``contents``, the JSON ``data`` field, flat or
nested). BYTES tensors hold one byte string per element; in raw form each element is prefixed by
its length as a 4-byte little-endian integer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurotwin.errors import InvalidInput

# OIP datatype -> numpy dtype (little-endian); BYTES elements are Python bytes objects.
NUMPY_TYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_TYPES, "BF16", "BYTES")


@dataclass
class InputTensor:
    """One input tensor of an inference request, as it came off the wire (not yet checked)."""

    name: str
    datatype: str
    shape: list[int]
    # Raw little-endian bytes, or None when the tensor carries typed values instead.
    raw: bytes | None = None
    # Typed values (a flat or nested sequence), or None.
    values: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def what(self) -> str:
        return f"input {self.name!r}"

    def element_count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class OutputTensor:
    """One output tensor: its data as a contiguous little-endian array."""

    name: str
    datatype: str
    array: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        return self.array.tobytes()

    def values(self) -> list[Any]:
        """Row-major flat values, as the JSON ``data`` field carries them."""
        return self.array.ravel().tolist()


def check_shape(shape: Sequence[Any], what: str) -> list[int]:
    """A shape as a list of non-negative ints, or InvalidInput."""
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise InvalidInput(f"{what}: shape must be a list of integers, got {shape!r}")
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 0:
            raise InvalidInput(f"{what}: shape {list(shape)} must hold non-negative integers")
        dims.append(int(dim))
    return dims


def split_bytes_tensor(raw: bytes, what: str) -> list[bytes]:
    """A raw BYTES tensor: each element is a 4-byte little-endian length followed by its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{what}: truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"{what}: BYTES element of {length} bytes overruns the tensor")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


def uint8_array(tensor: InputTensor) -> np.ndarray:
    """A UINT8 tensor as a uint8 array of its shape, from raw bytes or integer values 0..255."""
    size = tensor.element_count()
    if tensor.raw is not None:
        data = np.frombuffer(tensor.raw, dtype=np.uint8)
        if data.size != size:
            raise InvalidInput(
                f"{tensor.what}: {data.size} bytes of data for shape {tensor.shape} ({size} needed)"
            )
        return data.reshape(tensor.shape)
    try:
        values = np.asarray(tensor.values if tensor.values is not None else [])
    except ValueError as exc:  # ragged nested lists
        raise InvalidInput(f"{tensor.what}: data is not a regular array ({exc})") from None
    if values.size and values.dtype.kind not in "iu":
        raise InvalidInput(f"{tensor.what}: UINT8 data must be integers 0..255, got {values.dtype} values")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput(f"{tensor.what}: UINT8 values outside 0..255")
    if values.size != size:
        raise InvalidInput(
            f"{tensor.what}: {values.size} values of data for shape {tensor.shape} ({size} needed)"
        )
    return values.astype(np.uint8).reshape(tensor.shape)


def bytes_elements(tensor: InputTensor) -> list[bytes]:
    """A BYTES tensor's elements, from raw length-prefixed bytes or a list of bytes/str values."""
    if tensor.raw is not None:
        elements = split_bytes_tensor(tensor.raw, tensor.what)
    else:
        values = tensor.values if tensor.values is not None else []
        if not isinstance(values, Sequence) or isinstance(values, str | bytes):
            raise InvalidInput(f"{tensor.what}: BYTES data must be a list of strings")
        elements = []
        for value in values:
            if isinstance(value, str):
                elements.append(value.encode())
            elif isinstance(value, bytes):
                elements.append(value)
            else:
                raise InvalidInput(
                    f"{tensor.what}: BYTES data must be a flat list of strings, got {type(value).__name__}"
                )
    if tensor.element_count() != len(elements):
        raise InvalidInput(f"{tensor.what}: BYTES shape {tensor.shape} for {len(elements)} elements")
    return elements
