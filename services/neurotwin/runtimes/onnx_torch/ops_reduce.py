"""Reductions, arg-reductions, softmax, cumulative sums and top-k."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .registry import META_INPUTS, OPS, Node, axis_index, ints, optional, present, register_op


def _reduce_axes(node: Node, xs: list[Tensor | None], rank: int) -> list[int] | None:
    """Axes from the input (opset 18, ReduceSum 13) or the attribute; None means reduce nothing."""
    axes_t = optional(xs, 1)
    axes = ints(axes_t) if present(axes_t) else list(node.attr("axes", []))
    if not axes:
        return None if int(node.attr("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(axis_index(a, rank) for a in axes)


def _reducer(kind: str) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        x = xs[0]
        assert x is not None
        axes = _reduce_axes(node, xs, x.dim())
        if axes is None:
            return x
        keep = bool(int(node.attr("keepdims", 1)))
        dims = tuple(axes)
        if kind == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if kind == "max":
            return x.amax(dim=dims, keepdim=keep)
        if kind == "min":
            return x.amin(dim=dims, keepdim=keep)
        if kind == "l1":
            return x.abs().sum(dim=dims, keepdim=keep)
        if kind == "l2":
            return (x * x).sum(dim=dims, keepdim=keep).sqrt()
        if kind == "sumsquare":
            return (x * x).sum(dim=dims, keepdim=keep)
        if kind == "logsum":
            return x.sum(dim=dims, keepdim=keep).log()
        if kind == "logsumexp":
            return torch.logsumexp(x, dim=dims, keepdim=keep)
        # prod: torch reduces one dim at a time; go from the last so earlier indices stay valid.
        for d in reversed(dims):
            x = x.prod(dim=d, keepdim=keep)
        return x

    return run


for _name, _kind in {
    "ReduceMean": "mean",
    "ReduceSum": "sum",
    "ReduceMax": "max",
    "ReduceMin": "min",
    "ReduceProd": "prod",
    "ReduceL1": "l1",
    "ReduceL2": "l2",
    "ReduceSumSquare": "sumsquare",
    "ReduceLogSum": "logsum",
    "ReduceLogSumExp": "logsumexp",
}.items():
    OPS[_name] = _reducer(_kind)
    META_INPUTS[_name] = frozenset({1})


def _arg_reduce(largest: bool) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        x = xs[0]
        assert x is not None
        axis = axis_index(int(node.attr("axis", 0)), x.dim())
        keep = bool(int(node.attr("keepdims", 1)))
        if int(node.attr("select_last_index", 0)):
            flipped = x.flip(axis)
            idx = flipped.argmax(axis, keepdim=keep) if largest else flipped.argmin(axis, keepdim=keep)
            return x.shape[axis] - 1 - idx
        return x.argmax(axis, keepdim=keep) if largest else x.argmin(axis, keepdim=keep)

    return run


OPS["ArgMax"] = _arg_reduce(True)
OPS["ArgMin"] = _arg_reduce(False)


def _softmax_like(fn: Callable[..., Tensor]) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        x = xs[0]
        assert x is not None
        if node.opset >= 13:
            return fn(x, dim=int(node.attr("axis", -1)))
        # Before opset 13 the input was coerced to 2-d at ``axis`` and normalized over the flattened tail.
        axis = axis_index(int(node.attr("axis", 1)), x.dim())
        lead = math.prod(x.shape[:axis])
        return fn(x.reshape(lead, -1), dim=1).reshape(x.shape)

    return run


OPS["Softmax"] = _softmax_like(torch.softmax)
OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


@register_op("CumSum", meta=(1,))
def _cumsum(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axis = axis_index(ints(xs[1])[0], x.dim())
    if int(node.attr("reverse", 0)):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if int(node.attr("exclusive", 0)):
        y = y - x
    return y.flip(axis) if int(node.attr("reverse", 0)) else y


@register_op("TopK", meta=(1,))
def _topk(node: Node, xs: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    x = xs[0]
    assert x is not None
    k = ints(xs[1])[0]
    axis = axis_index(int(node.attr("axis", -1)), x.dim())
    values, indices = torch.topk(x, k, dim=axis, largest=bool(int(node.attr("largest", 1))), sorted=True)
    return values, indices
