"""Resampling: Resize (nearest, linear, cubic, antialiased) and GridSample."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Node, align, axis_index, floats, ints, optional, present, register_check, register_op


def _source_coordinate(mode: str, y: int, scale: float, in_size: int, out_size: int) -> float:
    out_float = scale * in_size
    if mode == "align_corners":
        return 0.0 if out_float == 1 else y * (in_size - 1) / (out_float - 1)
    if mode == "asymmetric":
        return y / scale
    if mode == "pytorch_half_pixel":
        return -0.5 if out_float == 1 else (y + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / out_float)
        return offset + (y + 0.5) / scale - 0.5
    return (y + 0.5) / scale - 0.5  # half_pixel


def _resize_weights(node: Node, in_size: int, out_size: int, scale: float) -> np.ndarray:
    """Dense [out, in] interpolation matrix for one axis, following the ONNX Resize definition.

    One matrix per axis covers nearest, linear and cubic, antialiased or not, with edge clamping or
    ``exclude_outside``; applying it is a matmul, so it is differentiable and runs on any device.
    """
    mode = str(node.attr("mode", "nearest"))
    coord = str(node.attr("coordinate_transformation_mode", "half_pixel"))
    antialias = bool(int(node.attr("antialias", 0))) and scale < 1 and mode != "nearest"
    exclude = bool(int(node.attr("exclude_outside", 0)))
    a = float(node.attr("cubic_coeff_a", -0.75))
    nearest_mode = str(node.attr("nearest_mode", "round_prefer_floor"))
    kscale = min(scale, 1.0) if antialias else 1.0

    def cubic(t: np.ndarray) -> np.ndarray:
        t = np.abs(t)
        near = ((a + 2) * t - (a + 3)) * t * t + 1
        far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return np.where(t <= 1, near, np.where(t < 2, far, 0.0))

    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for y in range(out_size):
        x = _source_coordinate(coord, y, scale, in_size, out_size)
        base = math.floor(x)
        ratio = x - base
        if ratio == 0:  # the reference prefers the left neighbour: an integer x sits at ratio 1
            base, ratio = base - 1, 1.0
        if mode == "nearest":
            if ratio == 1.0 or nearest_mode == "ceil":
                pick = base + 1
            elif nearest_mode == "round_prefer_floor":
                pick = base if ratio <= 0.5 else base + 1
            elif nearest_mode == "round_prefer_ceil":
                pick = base if ratio < 0.5 else base + 1
            else:  # floor
                pick = base
            weights[y, min(max(pick, 0), in_size - 1)] = 1.0
            continue
        # Taps around x: 2 for linear, 4 for cubic, widened by 1/scale when antialiasing a downsample.
        start = math.floor(-(1 if mode == "linear" else 2) / kscale) + 1
        offsets = np.arange(start, 2 - start)
        dist = (offsets - ratio) * kscale
        coeffs = np.clip(1 - np.abs(dist), 0, 1) if mode == "linear" else cubic(dist)
        if antialias:
            coeffs = coeffs / coeffs.sum()
        taps = base + offsets
        if exclude:
            inside = (taps >= 0) & (taps < in_size)
            coeffs = np.where(inside, coeffs, 0.0)
            coeffs = coeffs / coeffs.sum()
        for tap, c in zip(np.clip(taps, 0, in_size - 1), coeffs, strict=True):
            weights[y, int(tap)] += c
    return weights


@register_op("Resize", meta=(1, 2, 3))
def _resize(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    rank = x.dim()
    if node.opset < 11:
        scales_t, sizes_t = optional(xs, 1), None
    else:
        scales_t, sizes_t = optional(xs, 2), optional(xs, 3)
    axes = [axis_index(a, rank) for a in node.attr("axes", [])] or list(range(rank))
    in_sizes = [x.shape[a] for a in axes]
    if present(sizes_t):
        out_sizes = ints(sizes_t)
        policy = str(node.attr("keep_aspect_ratio_policy", "stretch"))
        if policy == "stretch":
            scales = [o / i for o, i in zip(out_sizes, in_sizes, strict=True)]
        else:
            ratios = [o / i for o, i in zip(out_sizes, in_sizes, strict=True)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            scales = [s] * len(axes)
            out_sizes = [math.floor(s * i + 0.5) for i in in_sizes]
    else:
        scales = floats(scales_t)
        out_sizes = [math.floor(i * s) for i, s in zip(in_sizes, scales, strict=True)]
    for axis, n_in, n_out, scale in zip(axes, in_sizes, out_sizes, scales, strict=True):
        if n_in == n_out and scale == 1.0:
            continue
        key = (axis, n_in, n_out, scale, x.dtype, x.device)
        w = node.cache.get(key)
        if w is None:
            w = torch.from_numpy(_resize_weights(node, n_in, n_out, scale)).to(x.device, x.dtype)
            node.cache[key] = w
        if str(node.attr("mode", "nearest")) == "nearest":
            x = x.index_select(axis, w.argmax(dim=1))
        else:
            x = torch.matmul(x.movedim(axis, -1), w.t()).movedim(-1, axis)
    return x


@register_check("Resize")
def _check_resize(node: Node) -> str | None:
    mode = str(node.attr("mode", "nearest"))
    coord = str(node.attr("coordinate_transformation_mode", "half_pixel"))
    if mode not in ("nearest", "linear", "cubic"):
        return f"Resize mode {mode!r}"
    if coord not in (
        "half_pixel",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "half_pixel_symmetric",
    ):
        return f"Resize coordinate_transformation_mode {coord!r}"
    if str(node.attr("nearest_mode", "round_prefer_floor")) not in (
        "round_prefer_floor",
        "round_prefer_ceil",
        "floor",
        "ceil",
    ):
        return f"Resize nearest_mode {node.attr('nearest_mode')!r}"
    return None


@register_op("GridSample")
def _grid_sample(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, grid = align(xs[0], xs[1])  # type: ignore[arg-type]
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(
        str(node.attr("mode", "bilinear")), str(node.attr("mode", "bilinear"))
    )
    return F.grid_sample(
        x,
        grid,
        mode=mode,
        padding_mode=str(node.attr("padding_mode", "zeros")),
        align_corners=bool(int(node.attr("align_corners", 0))),
    )


@register_check("GridSample")
def _check_grid_sample(node: Node) -> str | None:
    if str(node.attr("mode", "bilinear")) not in ("bilinear", "linear", "nearest", "bicubic", "cubic"):
        return f"GridSample mode {node.attr('mode')!r}"
    if str(node.attr("padding_mode", "zeros")) not in ("zeros", "border", "reflection"):
        return f"GridSample padding_mode {node.attr('padding_mode')!r}"
    return None
