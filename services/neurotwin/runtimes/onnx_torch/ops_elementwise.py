"""Elementwise ops: activations, arithmetic, comparisons and logic (broadcasting as ONNX does)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import OPS, Node, align, is_float, optional, present, register_check, register_op


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        return fn(xs[0])  # type: ignore[arg-type]

    return run


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX specifies
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}.items():
    OPS[_name] = _unary(_fn)


@register_op("Softplus")
def _softplus(node: Node, xs: list[Tensor | None]) -> Tensor:
    # torch's default threshold (20) switches to the identity where log1p(exp(x)) == x in float32 anyway.
    return F.softplus(xs[0])  # type: ignore[arg-type]


@register_op("LeakyRelu")
def _leaky_relu(node: Node, xs: list[Tensor | None]) -> Tensor:
    return F.leaky_relu(xs[0], float(node.attr("alpha", 0.01)))  # type: ignore[arg-type]


@register_op("Elu")
def _elu(node: Node, xs: list[Tensor | None]) -> Tensor:
    return F.elu(xs[0], float(node.attr("alpha", 1.0)))  # type: ignore[arg-type]


@register_op("Celu")
def _celu(node: Node, xs: list[Tensor | None]) -> Tensor:
    return F.celu(xs[0], float(node.attr("alpha", 1.0)))  # type: ignore[arg-type]


@register_op("Selu")
def _selu(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register_op("ThresholdedRelu")
def _thresholded_relu(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return torch.where(x > float(node.attr("alpha", 1.0)), x, torch.zeros_like(x))


@register_op("HardSigmoid")
def _hard_sigmoid(node: Node, xs: list[Tensor | None]) -> Tensor:
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return torch.clamp(alpha * xs[0] + beta, 0.0, 1.0)  # type: ignore[operator]


@register_op("HardSwish")
def _hard_swish(node: Node, xs: list[Tensor | None]) -> Tensor:
    return F.hardswish(xs[0])  # type: ignore[arg-type]


@register_op("Gelu")
def _gelu(node: Node, xs: list[Tensor | None]) -> Tensor:
    return F.gelu(xs[0], approximate=str(node.attr("approximate", "none")))  # type: ignore[arg-type]


@register_op("PRelu")
def _prelu(node: Node, xs: list[Tensor | None]) -> Tensor:
    x, slope = align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.where(x >= 0, x, x * slope)


@register_op("Clip", meta=(1, 2))
def _clip(node: Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    lo, hi = optional(xs, 1), optional(xs, 2)
    low = float(lo.item()) if present(lo) else node.attr("min")  # type: ignore[union-attr]
    high = float(hi.item()) if present(hi) else node.attr("max")  # type: ignore[union-attr]
    if not is_float(x):
        low = None if low is None else int(low)
        high = None if high is None else int(high)
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        a, b = align(xs[0], xs[1])  # type: ignore[arg-type]
        return fn(a, b)

    return run


def _div(a: Tensor, b: Tensor) -> Tensor:
    # Integer division truncates in ONNX (C semantics); torch's true division would produce floats.
    if not is_float(a) and not is_float(b):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: Tensor, b: Tensor) -> Tensor:
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


for _name, _bfn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": _pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    OPS[_name] = _binary(_bfn)


@register_op("BitShift")
def _bit_shift(node: Node, xs: list[Tensor | None]) -> Tensor:
    a, b = align(xs[0], xs[1])  # type: ignore[arg-type]
    if str(node.attr("direction")) == "RIGHT":
        return torch.bitwise_right_shift(a, b)
    return torch.bitwise_left_shift(a, b)


@register_check("BitShift")
def _check_bit_shift(node: Node) -> str | None:
    direction = str(node.attr("direction", ""))
    return None if direction in ("LEFT", "RIGHT") else f"BitShift direction {direction!r}"


@register_op("Mod")
def _mod(node: Node, xs: list[Tensor | None]) -> Tensor:
    a, b = align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.fmod(a, b) if int(node.attr("fmod", 0)) else torch.remainder(a, b)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, list[Tensor | None]], Tensor]:
    def run(node: Node, xs: list[Tensor | None]) -> Tensor:
        return functools.reduce(fn, align(*[x for x in xs if x is not None]))

    return run


OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)
OPS["Sum"] = _variadic(torch.add)


@register_op("Mean")
def _mean(node: Node, xs: list[Tensor | None]) -> Tensor:
    given = [x for x in xs if x is not None]
    return _variadic(torch.add)(node, xs) / len(given)


@register_op("Where")
def _where(node: Node, xs: list[Tensor | None]) -> Tensor:
    cond, a, b = align(xs[0], xs[1], xs[2])  # type: ignore[arg-type]
    return torch.where(cond.bool(), a, b)
