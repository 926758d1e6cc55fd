"""Convolution, normalization and pooling, with ONNX's padding rules (auto_pad, asymmetric pads)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Node, axis_index, optional, present, register_check, register_op, torch_pad_order


def _spatial_pads(
    node: Node,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for the spatial dims, resolving auto_pad."""
    nd = len(kernel)
    auto_pad = str(node.attr("auto_pad", "NOTSET"))
    if auto_pad in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * (2 * nd)))
        return pads if pads else [0] * (2 * nd)
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register_op("Conv")
def _conv(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, w, b = xs[0], xs[1], optional(xs, 2)
    assert x is not None and w is not None
    nd = w.dim() - 2
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    pads = _spatial_pads(node, x.shape[2:], w.shape[2:], strides, dilations)
    if _symmetric(pads):
        padding: list[int] | int = pads[:nd]
    else:
        x, padding = F.pad(x, torch_pad_order(pads)), 0
    bias = b if present(b) else None
    return _CONV[nd](x, w, bias, strides, padding, dilations, int(node.attr("group", 1)))


@register_check("Conv", "ConvTranspose")
def _check_conv(node: Node) -> str | None:
    kernel = node.attr("kernel_shape")
    if kernel is not None and not 1 <= len(kernel) <= 3:
        return f"{len(kernel)}-d convolution"
    return None


@register_op("ConvTranspose")
def _conv_transpose(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, w, b = xs[0], xs[1], optional(xs, 2)
    assert x is not None and w is not None
    nd = w.dim() - 2
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    out_pad = list(node.attr("output_padding", [0] * nd))
    groups = int(node.attr("group", 1))
    kernel = list(w.shape[2:])
    full = [
        s * (i - 1) + op + (k - 1) * d + 1
        for s, i, op, k, d in zip(strides, x.shape[2:], out_pad, kernel, dilations, strict=True)
    ]
    output_shape = node.attr("output_shape")
    auto_pad = str(node.attr("auto_pad", "NOTSET"))
    if output_shape:
        totals = [f - o for f, o in zip(full, list(output_shape)[-nd:], strict=True)]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [f - i * s for f, i, s in zip(full, x.shape[2:], strides, strict=True)]
    else:
        totals = []
    if totals:
        upper = auto_pad == "SAME_UPPER"
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - t // 2 if upper else t // 2 for t in totals]
        pads = begins + ends
    else:
        pads = list(node.attr("pads", [0] * (2 * nd))) or [0] * (2 * nd)
    bias = b if present(b) else None
    if _symmetric(pads) and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations, strict=True)):
        return _CONV_T[nd](x, w, bias, strides, pads[:nd], out_pad, groups, dilations)
    # General case: the uncropped transposed convolution, then the output padding and crops ONNX asks for.
    y = _CONV_T[nd](x, w, None, strides, 0, 0, groups, dilations)
    y = F.pad(
        y,
        torch_pad_order([-p for p in pads[:nd]] + [op - p for op, p in zip(out_pad, pads[nd:], strict=True)]),
    )
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * nd))
    return y


@register_op("BatchNormalization")
def _batch_norm(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(node.attr("epsilon", 1e-5)))  # type: ignore[arg-type]


@register_check("BatchNormalization")
def _check_batch_norm(node: Node) -> str | None:
    if int(node.attr("training_mode", 0)) or len([o for o in node.outputs if o]) > 1:
        return "BatchNormalization in training mode"
    return None


@register_op("InstanceNormalization")
def _instance_norm(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias = xs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))  # type: ignore[arg-type]


@register_op("LayerNormalization")
def _layer_norm(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias = xs[0], xs[1], optional(xs, 2)
    assert x is not None and scale is not None
    axis = axis_index(int(node.attr("axis", -1)), x.dim())
    shape = tuple(x.shape[axis:])
    weight = scale.expand(shape) if tuple(scale.shape) != shape else scale
    b = bias.expand(shape) if present(bias) and tuple(bias.shape) != shape else bias  # type: ignore[union-attr]
    return F.layer_norm(x, shape, weight, b if present(b) else None, float(node.attr("epsilon", 1e-5)))


@register_check("LayerNormalization")
def _check_layer_norm(node: Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "LayerNormalization with Mean/InvStdDev outputs"
    return None


@register_op("GroupNormalization")
def _group_norm(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias = xs[:3]
    assert x is not None and scale is not None and bias is not None
    groups = int(node.attr("num_groups"))
    y = F.group_norm(x, groups, eps=float(node.attr("epsilon", 1e-5)))
    channels = x.shape[1]
    # Opset 18 gives one scale per group, opset 21 one per channel.
    if scale.numel() != channels:
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    shape = (1, channels) + (1,) * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@register_op("LRN")
def _lrn(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    size = int(node.attr("size"))
    alpha, beta = float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75))
    bias = float(node.attr("bias", 1.0))
    # ONNX's window is [c - floor((size-1)/2), c + ceil((size-1)/2)]: not torch's for even sizes.
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    sq = F.pad(sq, [0, 0, front, back])
    window_sum = (F.avg_pool2d(sq, (size, 1), stride=1) * size).reshape(x.shape)
    return x / (bias + alpha / size * window_sum) ** beta


def _pool_args(node: Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(node.attr("strides", [1] * nd)) or [1] * nd
    dilations = list(node.attr("dilations", [1] * nd)) or [1] * nd
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_op("MaxPool")
def _max_pool(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    kernel, strides, dilations, pads = _pool_args(node, x)
    nd = len(kernel)
    ceil_mode = bool(int(node.attr("ceil_mode", 0)))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
        return _MAX_POOL[nd](x, kernel, strides, pads[:nd], dilations, ceil_mode)
    x = F.pad(x, torch_pad_order(pads), value=-math.inf)
    return _MAX_POOL[nd](x, kernel, strides, 0, dilations, ceil_mode)


@register_check("MaxPool", "AveragePool")
def _check_pool(node: Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return f"{node.op} with an Indices output"
    if not 1 <= len(node.attr("kernel_shape", [])) <= 3:
        return f"{node.op} over {len(node.attr('kernel_shape', []))} dims"
    if node.op == "AveragePool" and any(d != 1 for d in node.attr("dilations", [])):
        return "dilated AveragePool"
    return None


@register_op("AveragePool")
def _avg_pool(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    kernel, strides, _, pads = _pool_args(node, x)
    nd = len(kernel)
    ceil_mode = bool(int(node.attr("ceil_mode", 0)))
    include_pad = bool(int(node.attr("count_include_pad", 0)))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
        return _AVG_POOL[nd](x, kernel, strides, pads[:nd], ceil_mode, include_pad)
    # Asymmetric padding: pool the zero-padded input, then divide by the count of real pixels if asked.
    order = torch_pad_order(pads)
    summed = _AVG_POOL[nd](F.pad(x, order), kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return summed
    ones = F.pad(torch.ones_like(x[:1, :1]), order)
    return summed / _AVG_POOL[nd](ones, kernel, strides, 0, ceil_mode, True)


@register_op("GlobalAveragePool")
def _global_avg_pool(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register_op("GlobalMaxPool")
def _global_max_pool(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
