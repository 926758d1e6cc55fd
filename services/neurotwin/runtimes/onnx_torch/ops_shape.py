"""Shapes and data movement: reshaping, slicing, gathering, padding, casting, constants."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neurotwin.errors import ModelStoreError

from .registry import (
    Node,
    align,
    axis_index,
    ints,
    optional,
    present,
    register_check,
    register_op,
    torch_dtype,
    torch_pad_order,
)


@register_op("Identity", "Dropout")
def _identity(node: Node, xs: list[Tensor | None]) -> Any:
    x = xs[0]
    assert x is not None
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@register_op("Reshape", meta=(1,))
def _reshape(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    shape = ints(xs[1])
    if not int(node.attr("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register_op("Flatten")
def _flatten(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axis = axis_index(int(node.attr("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register_op("Transpose")
def _transpose(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@register_op("Squeeze", meta=(1,))
def _squeeze(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axes_t = optional(xs, 1)
    axes = ints(axes_t) if axes_t is not None else list(node.attr("axes", []))
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(axis_index(a, x.dim()) for a in axes))


@register_op("Unsqueeze", meta=(1,))
def _unsqueeze(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axes_t = optional(xs, 1)
    axes = ints(axes_t) if axes_t is not None else list(node.attr("axes", []))
    rank = x.dim() + len(axes)
    for a in sorted(axis_index(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@register_op("Concat")
def _concat(node: Node, xs: list[Tensor | None]) -> Tensor:
    parts = align(*[x for x in xs if x is not None])
    return torch.cat(parts, dim=int(node.attr("axis")))


@register_op("Split", meta=(1,))
def _split(node: Node, xs: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = xs[0]
    assert x is not None
    axis = axis_index(int(node.attr("axis", 0)), x.dim())
    split_t = optional(xs, 1)
    sizes = ints(split_t) if present(split_t) else list(node.attr("split", []))
    if not sizes:
        parts = int(node.attr("num_outputs", len(node.outputs)))
        # Opset 18: equal chunks of ceil(n / parts), the last one smaller.
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


@register_op("Slice", meta=(1, 2, 3, 4))
def _slice(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = ints(xs[1]), ints(xs[2])
        axes_t, steps_t = optional(xs, 3), optional(xs, 4)
        axes = ints(axes_t) if present(axes_t) else list(range(len(starts)))
        steps = ints(steps_t) if present(steps_t) else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[tuple[int, Any]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis_index(axis, x.dim())
        # Python's slice clamping matches ONNX's (INT64 sentinels included).
        lo, hi, st = slice(start, end, step).indices(x.shape[axis])
        if step > 0:
            index[axis] = slice(lo, hi, st)
        else:
            flips.append((axis, torch.arange(lo, hi, st, dtype=torch.long)))
    y = x[tuple(index)]
    for axis, idx in flips:
        y = y.index_select(axis, idx.to(y.device))
    return y


@register_op("Gather")
def _gather(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, idx = xs[0], xs[1]
    assert x is not None and idx is not None
    axis = axis_index(int(node.attr("axis", 0)), x.dim())
    idx = idx.to(x.device).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@register_op("GatherElements")
def _gather_elements(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, idx = xs[0], xs[1]
    assert x is not None and idx is not None
    axis = axis_index(int(node.attr("axis", 0)), x.dim())
    idx = idx.to(x.device).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


@register_op("Shape")
def _shape(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


@register_op("Size")
def _size(node: Node, xs: list[Tensor | None]) -> Tensor:
    return torch.tensor(xs[0].numel(), dtype=torch.int64)  # type: ignore[union-attr]


@register_op("Constant")
def _constant(node: Node, xs: list[Tensor | None]) -> Tensor:
    for key in ("value", "sparse_value"):
        if key in node.attrs:
            return node.attrs[key]
    if "value_float" in node.attrs:
        return torch.tensor(float(node.attrs["value_float"]), dtype=torch.float32)
    if "value_floats" in node.attrs:
        return torch.tensor(list(node.attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in node.attrs:
        return torch.tensor(int(node.attrs["value_int"]), dtype=torch.int64)
    if "value_ints" in node.attrs:
        return torch.tensor(list(node.attrs["value_ints"]), dtype=torch.int64)
    raise ModelStoreError(f"Constant node {node.name!r} has no value attribute it can use")


@register_op("ConstantOfShape", meta=(0,))
def _constant_of_shape(node: Node, xs: list[Tensor | None]) -> Tensor:
    shape = ints(xs[0])
    value = node.attr("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


@register_op("Cast")
def _cast(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    dtype = torch_dtype(int(node.attr("to")), node.name)
    return x if x.dtype == dtype else x.to(dtype)


@register_op("CastLike")
def _cast_like(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, like = xs[0], xs[1]
    assert x is not None and like is not None
    return x.to(like.dtype)


@register_op("Expand", meta=(1,))
def _expand(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    # ONNX Expand broadcasts both ways (a target dim of 1 keeps the input's size).
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(ints(xs[1])))
    return x.expand(shape)


@register_op("Tile", meta=(1,))
def _tile(node: Node, xs: list[Tensor | None]) -> Tensor:
    return xs[0].repeat(*ints(xs[1]))  # type: ignore[union-attr]


@register_op("Range", meta=(0, 1, 2))
def _range(node: Node, xs: list[Tensor | None]) -> Tensor:
    start, limit, delta = xs[0], xs[1], xs[2]
    assert start is not None and limit is not None and delta is not None
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@register_op("NonZero")
def _nonzero(node: Node, xs: list[Tensor | None]) -> Tensor:
    return torch.nonzero(xs[0]).t().contiguous()  # type: ignore[arg-type]


@register_op("Pad", meta=(1, 2, 3))
def _pad(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    rank = x.dim()
    pads_t = optional(xs, 1)
    raw = ints(pads_t) if pads_t is not None else list(node.attr("pads", []))
    value_t = optional(xs, 2)
    value = float(value_t.item()) if present(value_t) else float(node.attr("value", 0.0))  # type: ignore[union-attr]
    axes_t = optional(xs, 3)
    axes = [axis_index(a, rank) for a in ints(axes_t)] if present(axes_t) else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = raw[i], raw[i + len(axes)]
    first = next((d for d in range(rank) if begins[d] or ends[d]), rank)
    if first == rank:
        return x
    order = torch_pad_order(begins[first:] + ends[first:])
    mode = str(node.attr("mode", "constant"))
    if mode == "constant":
        return F.pad(x, order, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, order, mode=torch_mode)


@register_check("Pad")
def _check_pad(node: Node) -> str | None:
    mode = str(node.attr("mode", "constant"))
    return None if mode in ("constant", "reflect", "edge", "wrap") else f"Pad mode {mode!r}"


@register_op("DepthToSpace")
def _depth_to_space(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    b = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    if str(node.attr("mode", "DCR")) == "CRD":
        return F.pixel_shuffle(x, b)
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register_op("SpaceToDepth")
def _space_to_depth(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    b = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)
