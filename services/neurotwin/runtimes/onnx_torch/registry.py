"""What every op converter shares: the node record, the op registry, and small tensor helpers.

Op families (``ops_*.py``) register converters here with :func:`register_op`; a converter takes the node
and its input tensors (``None`` for an absent optional input) and returns a tensor or a tuple of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neurotwin.errors import ModelStoreError

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}


def torch_dtype(onnx_type: int, where: str) -> torch.dtype:
    try:
        return ONNX_TO_TORCH[int(onnx_type)]
    except KeyError:
        raise ModelStoreError(f"{where}: ONNX element type {onnx_type} has no torch equivalent") from None


def tensor_from_proto(proto: Any) -> Tensor:
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    # Copy: ONNX hands back read-only views of the protobuf bytes, which torch refuses to wrap.
    return torch.from_numpy(np.array(array, copy=True))


def ints(t: Tensor | None) -> list[int]:
    if t is None:
        return []
    return [int(v) for v in t.detach().reshape(-1).cpu().tolist()]


def floats(t: Tensor | None) -> list[float]:
    if t is None:
        return []
    return [float(v) for v in t.detach().reshape(-1).cpu().tolist()]


def present(t: Tensor | None) -> bool:
    """Optional ONNX inputs can be absent (empty name) or an empty tensor; both mean 'not given'."""
    return t is not None and t.numel() > 0


def optional(xs: Sequence[Tensor | None], i: int) -> Tensor | None:
    return xs[i] if len(xs) > i else None


def align(*xs: Tensor) -> list[Tensor]:
    """Bring operands to one device: the first non-CPU one wins (small CPU shape values move up)."""
    device = next((x.device for x in xs if x.device.type != "cpu"), None)
    if device is None:
        return list(xs)
    return [x if x.device == device or x.dim() == 0 else x.to(device) for x in xs]


def axis_index(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> F.pad's (bn, en, ..., b1, e1) (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: Callable[[Node, list[Tensor | None]], Any] = field(repr=False)
    cache: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


OPS: dict[str, Callable[[Node, list[Tensor | None]], Any]] = {}
# Per-op conversion-time checks of attribute settings we do not implement.
CHECKS: dict[str, Callable[[Node], str | None]] = {}
# Input positions that carry shapes/axes/scales rather than data: constants used only there stay on CPU.
META_INPUTS: dict[str, frozenset[int]] = {}


def register_op(*names: str, meta: Sequence[int] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            OPS[name] = fn
            if meta:
                META_INPUTS[name] = frozenset(meta)
        return fn

    return register


def register_check(*names: str) -> Callable[[Callable[[Node], str | None]], Callable[[Node], str | None]]:
    def register(fn: Callable[[Node], str | None]) -> Callable[[Node], str | None]:
        for name in names:
            CHECKS[name] = fn
        return fn

    return register
