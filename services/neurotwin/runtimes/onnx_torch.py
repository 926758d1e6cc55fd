"""The differentiable twin: an ONNX predictor graph evaluated with torch ops, so gradients reach the image.

Any predictor in the store (trained anywhere, exported by anything) is synthesized for through this
module. The graph is converted once: every node is checked against the supported op set (an unknown op
fails here, naming it, never at the first forward), constant subgraphs are folded, and initializers
become buffers (or parameters, for callers that fine-tune a readout). ``forward`` then walks the nodes in
topological order.

Devices: float data lives where the module lives. Shape arithmetic (Shape -> Gather -> Concat -> Reshape
chains that exporters emit for dynamic batch sizes) stays on the CPU, so reading a target shape never
waits on the GPU.

The predictor contract takes uint8 [N, H, W, 3]; this module takes the same layout as float 0..255 so that
gradients flow (the graph's Cast from uint8 becomes a float-to-float no-op). ``forward_chw01`` takes the
[N, 3, H, W] images in [0, 1] that generators produce.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurotwin.errors import ModelStoreError

__all__ = [
    "SUPPORTED_OPS",
    "OnnxTorchModule",
    "ParityReport",
    "UnsupportedOperator",
    "check_parity",
    "convert_onnx",
    "load_differentiable_twin",
]


class UnsupportedOperator(ModelStoreError):
    """The graph uses ops (or op settings) this converter cannot evaluate; ``ops`` names them."""

    def __init__(self, source: object, ops: dict[str, int] | list[str], detail: str = "") -> None:
        self.ops = dict(ops) if isinstance(ops, dict) else {o: 1 for o in ops}
        listed = ", ".join(f"{op} (x{n})" if n > 1 else op for op, n in sorted(self.ops.items()))
        msg = f"{source}: cannot convert to torch, unsupported ONNX ops: {listed}"
        super().__init__(msg + (f"; {detail}" if detail else ""))


# ---------------------------------------------------------------------------------------------------
# Types and small helpers
# ---------------------------------------------------------------------------------------------------

_ONNX_TO_TORCH: dict[int, torch.dtype] = {
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
_INT64_MAX = 2**63 - 1


def _torch_dtype(onnx_type: int, where: str) -> torch.dtype:
    try:
        return _ONNX_TO_TORCH[int(onnx_type)]
    except KeyError:
        raise ModelStoreError(f"{where}: ONNX element type {onnx_type} has no torch equivalent") from None


def _tensor_from_proto(proto: Any) -> Tensor:
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    # Copy: ONNX hands back read-only views of the protobuf bytes, which torch refuses to wrap.
    return torch.from_numpy(np.array(array, copy=True))


def _ints(t: Tensor | None) -> list[int]:
    if t is None:
        return []
    return [int(v) for v in t.detach().reshape(-1).cpu().tolist()]


def _floats(t: Tensor | None) -> list[float]:
    if t is None:
        return []
    return [float(v) for v in t.detach().reshape(-1).cpu().tolist()]


def _present(t: Tensor | None) -> bool:
    """Optional ONNX inputs can be absent (empty name) or an empty tensor; both mean 'not given'."""
    return t is not None and t.numel() > 0


def _opt(xs: Sequence[Tensor | None], i: int) -> Tensor | None:
    return xs[i] if len(xs) > i else None


def _align(*xs: Tensor) -> list[Tensor]:
    """Bring operands to one device: the first non-CPU one wins (small CPU shape values move up)."""
    device = next((x.device for x in xs if x.device.type != "cpu"), None)
    if device is None:
        return list(xs)
    return [x if x.device == device or x.dim() == 0 else x.to(device) for x in xs]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


@dataclass
class _Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    fn: Callable[[_Node, list[Tensor | None]], Any] = field(repr=False)
    cache: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


_OPS: dict[str, Callable[[_Node, list[Tensor | None]], Any]] = {}
# Per-op conversion-time checks of attribute settings we do not implement.
_CHECKS: dict[str, Callable[[_Node], str | None]] = {}
# Input positions that carry shapes/axes/scales rather than data: constants used only there stay on CPU.
_META_INPUTS: dict[str, frozenset[int]] = {}


def _op(*names: str, meta: Sequence[int] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            _OPS[name] = fn
            if meta:
                _META_INPUTS[name] = frozenset(meta)
        return fn

    return register


def _check(*names: str) -> Callable[[Callable[[_Node], str | None]], Callable[[_Node], str | None]]:
    def register(fn: Callable[[_Node], str | None]) -> Callable[[_Node], str | None]:
        for name in names:
            _CHECKS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------------
# Elementwise ops
# ---------------------------------------------------------------------------------------------------


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
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
    _OPS[_name] = _unary(_fn)


@_op("Softplus")
def _softplus(node: _Node, xs: list[Tensor | None]) -> Tensor:
    # torch's default threshold (20) switches to the identity where log1p(exp(x)) == x in float32 anyway.
    return F.softplus(xs[0])  # type: ignore[arg-type]


@_op("LeakyRelu")
def _leaky_relu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return F.leaky_relu(xs[0], float(node.attr("alpha", 0.01)))  # type: ignore[arg-type]


@_op("Elu")
def _elu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return F.elu(xs[0], float(node.attr("alpha", 1.0)))  # type: ignore[arg-type]


@_op("Celu")
def _celu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return F.celu(xs[0], float(node.attr("alpha", 1.0)))  # type: ignore[arg-type]


@_op("Selu")
def _selu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@_op("ThresholdedRelu")
def _thresholded_relu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return torch.where(x > float(node.attr("alpha", 1.0)), x, torch.zeros_like(x))


@_op("HardSigmoid")
def _hard_sigmoid(node: _Node, xs: list[Tensor | None]) -> Tensor:
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return torch.clamp(alpha * xs[0] + beta, 0.0, 1.0)  # type: ignore[operator]


@_op("HardSwish")
def _hard_swish(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return F.hardswish(xs[0])  # type: ignore[arg-type]


@_op("Gelu")
def _gelu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return F.gelu(xs[0], approximate=str(node.attr("approximate", "none")))  # type: ignore[arg-type]


@_op("PRelu")
def _prelu(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, slope = _align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.where(x >= 0, x, x * slope)


@_op("Clip", meta=(1, 2))
def _clip(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    lo, hi = _opt(xs, 1), _opt(xs, 2)
    low = float(lo.item()) if _present(lo) else node.attr("min")  # type: ignore[union-attr]
    high = float(hi.item()) if _present(hi) else node.attr("max")  # type: ignore[union-attr]
    if not _is_float(x):
        low = None if low is None else int(low)
        high = None if high is None else int(high)
    if low is None and high is None:
        return x
    return torch.clamp(x, min=low, max=high)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
        a, b = _align(xs[0], xs[1])  # type: ignore[arg-type]
        return fn(a, b)

    return run


def _div(a: Tensor, b: Tensor) -> Tensor:
    # Integer division truncates in ONNX (C semantics); torch's true division would produce floats.
    if not _is_float(a) and not _is_float(b):
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
    "BitShift": torch.bitwise_left_shift,
}.items():
    _OPS[_name] = _binary(_bfn)


@_op("Mod")
def _mod(node: _Node, xs: list[Tensor | None]) -> Tensor:
    a, b = _align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.fmod(a, b) if int(node.attr("fmod", 0)) else torch.remainder(a, b)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
        return functools.reduce(fn, _align(*[x for x in xs if x is not None]))

    return run


_OPS["Max"] = _variadic(torch.maximum)
_OPS["Min"] = _variadic(torch.minimum)
_OPS["Sum"] = _variadic(torch.add)


@_op("Mean")
def _mean(node: _Node, xs: list[Tensor | None]) -> Tensor:
    present = [x for x in xs if x is not None]
    return _variadic(torch.add)(node, xs) / len(present)


@_op("Where")
def _where(node: _Node, xs: list[Tensor | None]) -> Tensor:
    cond, a, b = _align(xs[0], xs[1], xs[2])  # type: ignore[arg-type]
    return torch.where(cond.bool(), a, b)


# ---------------------------------------------------------------------------------------------------
# Linear algebra
# ---------------------------------------------------------------------------------------------------


@_op("MatMul")
def _matmul(node: _Node, xs: list[Tensor | None]) -> Tensor:
    a, b = _align(xs[0], xs[1])  # type: ignore[arg-type]
    return torch.matmul(a, b)


@_op("Gemm")
def _gemm(node: _Node, xs: list[Tensor | None]) -> Tensor:
    a, b = _align(xs[0], xs[1])  # type: ignore[arg-type]
    if int(node.attr("transA", 0)):
        a = a.t()
    if int(node.attr("transB", 0)):
        b = b.t()
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    c = _opt(xs, 2)
    if c is None or c.numel() == 0:
        out = a @ b
        return out if alpha == 1.0 else alpha * out
    c = c.to(a.device)
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


@_op("Einsum")
def _einsum(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return torch.einsum(str(node.attr("equation")), *_align(*[x for x in xs if x is not None]))


# ---------------------------------------------------------------------------------------------------
# Convolution, normalization, pooling
# ---------------------------------------------------------------------------------------------------


def _spatial_pads(
    node: _Node,
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


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] -> F.pad's (bn, en, ..., b1, e1) (last dim first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def _symmetric(pads: Sequence[int]) -> bool:
    n = len(pads) // 2
    return list(pads[:n]) == list(pads[n:])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv")
def _conv(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, w, b = xs[0], xs[1], _opt(xs, 2)
    assert x is not None and w is not None
    nd = w.dim() - 2
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    pads = _spatial_pads(node, x.shape[2:], w.shape[2:], strides, dilations)
    if _symmetric(pads):
        padding: list[int] | int = pads[:nd]
    else:
        x, padding = F.pad(x, _torch_pad_order(pads)), 0
    bias = b if _present(b) else None
    return _CONV[nd](x, w, bias, strides, padding, dilations, int(node.attr("group", 1)))


@_check("Conv", "ConvTranspose")
def _check_conv(node: _Node) -> str | None:
    kernel = node.attr("kernel_shape")
    if kernel is not None and not 1 <= len(kernel) <= 3:
        return f"{len(kernel)}-d convolution"
    return None


@_op("ConvTranspose")
def _conv_transpose(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, w, b = xs[0], xs[1], _opt(xs, 2)
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
    bias = b if _present(b) else None
    if _symmetric(pads) and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations, strict=True)):
        return _CONV_T[nd](x, w, bias, strides, pads[:nd], out_pad, groups, dilations)
    # General case: the uncropped transposed convolution, then the output padding and crops ONNX asks for.
    y = _CONV_T[nd](x, w, None, strides, 0, 0, groups, dilations)
    y = F.pad(
        y,
        _torch_pad_order(
            [-p for p in pads[:nd]] + [op - p for op, p in zip(out_pad, pads[nd:], strict=True)]
        ),
    )
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * nd))
    return y


@_op("BatchNormalization")
def _batch_norm(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias, mean, var = xs[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(node.attr("epsilon", 1e-5)))  # type: ignore[arg-type]


@_check("BatchNormalization")
def _check_batch_norm(node: _Node) -> str | None:
    if int(node.attr("training_mode", 0)) or len([o for o in node.outputs if o]) > 1:
        return "BatchNormalization in training mode"
    return None


@_op("InstanceNormalization")
def _instance_norm(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias = xs[:3]
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))  # type: ignore[arg-type]


@_op("LayerNormalization")
def _layer_norm(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, scale, bias = xs[0], xs[1], _opt(xs, 2)
    assert x is not None and scale is not None
    axis = _axis(int(node.attr("axis", -1)), x.dim())
    shape = tuple(x.shape[axis:])
    weight = scale.expand(shape) if tuple(scale.shape) != shape else scale
    b = bias.expand(shape) if _present(bias) and tuple(bias.shape) != shape else bias  # type: ignore[union-attr]
    return F.layer_norm(x, shape, weight, b if _present(b) else None, float(node.attr("epsilon", 1e-5)))


@_check("LayerNormalization")
def _check_layer_norm(node: _Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return "LayerNormalization with Mean/InvStdDev outputs"
    return None


@_op("GroupNormalization")
def _group_norm(node: _Node, xs: list[Tensor | None]) -> Tensor:
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


@_op("LRN")
def _lrn(node: _Node, xs: list[Tensor | None]) -> Tensor:
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


def _pool_args(node: _Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    strides = list(node.attr("strides", [1] * nd)) or [1] * nd
    dilations = list(node.attr("dilations", [1] * nd)) or [1] * nd
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("MaxPool")
def _max_pool(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    kernel, strides, dilations, pads = _pool_args(node, x)
    nd = len(kernel)
    ceil_mode = bool(int(node.attr("ceil_mode", 0)))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
        return _MAX_POOL[nd](x, kernel, strides, pads[:nd], dilations, ceil_mode)
    x = F.pad(x, _torch_pad_order(pads), value=-math.inf)
    return _MAX_POOL[nd](x, kernel, strides, 0, dilations, ceil_mode)


@_check("MaxPool", "AveragePool")
def _check_pool(node: _Node) -> str | None:
    if len([o for o in node.outputs if o]) > 1:
        return f"{node.op} with an Indices output"
    if not 1 <= len(node.attr("kernel_shape", [])) <= 3:
        return f"{node.op} over {len(node.attr('kernel_shape', []))} dims"
    if node.op == "AveragePool" and any(d != 1 for d in node.attr("dilations", [])):
        return "dilated AveragePool"
    return None


@_op("AveragePool")
def _avg_pool(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    kernel, strides, _, pads = _pool_args(node, x)
    nd = len(kernel)
    ceil_mode = bool(int(node.attr("ceil_mode", 0)))
    include_pad = bool(int(node.attr("count_include_pad", 0)))
    if _symmetric(pads) and all(2 * p <= k for p, k in zip(pads[:nd], kernel, strict=True)):
        return _AVG_POOL[nd](x, kernel, strides, pads[:nd], ceil_mode, include_pad)
    # Asymmetric padding: pool the zero-padded input, then divide by the count of real pixels if asked.
    order = _torch_pad_order(pads)
    summed = _AVG_POOL[nd](F.pad(x, order), kernel, strides, 0, ceil_mode, True)
    if include_pad:
        return summed
    ones = F.pad(torch.ones_like(x[:1, :1]), order)
    return summed / _AVG_POOL[nd](ones, kernel, strides, 0, ceil_mode, True)


@_op("GlobalAveragePool")
def _global_avg_pool(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ---------------------------------------------------------------------------------------------------
# Reductions, softmax
# ---------------------------------------------------------------------------------------------------


def _reduce_axes(node: _Node, xs: list[Tensor | None], rank: int) -> list[int] | None:
    """Axes from the input (opset 18, ReduceSum 13) or the attribute; None means reduce nothing."""
    axes_t = _opt(xs, 1)
    axes = _ints(axes_t) if _present(axes_t) else list(node.attr("axes", []))
    if not axes:
        return None if int(node.attr("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(_axis(a, rank) for a in axes)


def _reducer(kind: str) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
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
    _OPS[_name] = _reducer(_kind)
    _META_INPUTS[_name] = frozenset({1})


def _arg_reduce(largest: bool) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
        x = xs[0]
        assert x is not None
        axis = _axis(int(node.attr("axis", 0)), x.dim())
        keep = bool(int(node.attr("keepdims", 1)))
        if int(node.attr("select_last_index", 0)):
            flipped = x.flip(axis)
            idx = flipped.argmax(axis, keepdim=keep) if largest else flipped.argmin(axis, keepdim=keep)
            return x.shape[axis] - 1 - idx
        return x.argmax(axis, keepdim=keep) if largest else x.argmin(axis, keepdim=keep)

    return run


_OPS["ArgMax"] = _arg_reduce(True)
_OPS["ArgMin"] = _arg_reduce(False)


def _softmax_like(fn: Callable[..., Tensor]) -> Callable[[_Node, list[Tensor | None]], Tensor]:
    def run(node: _Node, xs: list[Tensor | None]) -> Tensor:
        x = xs[0]
        assert x is not None
        if node.opset >= 13:
            return fn(x, dim=int(node.attr("axis", -1)))
        # Before opset 13 the input was coerced to 2-d at ``axis`` and normalized over the flattened tail.
        axis = _axis(int(node.attr("axis", 1)), x.dim())
        lead = math.prod(x.shape[:axis])
        return fn(x.reshape(lead, -1), dim=1).reshape(x.shape)

    return run


_OPS["Softmax"] = _softmax_like(torch.softmax)
_OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


@_op("CumSum", meta=(1,))
def _cumsum(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axis = _axis(_ints(xs[1])[0], x.dim())
    if int(node.attr("reverse", 0)):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if int(node.attr("exclusive", 0)):
        y = y - x
    return y.flip(axis) if int(node.attr("reverse", 0)) else y


@_op("TopK", meta=(1,))
def _topk(node: _Node, xs: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    x = xs[0]
    assert x is not None
    k = _ints(xs[1])[0]
    axis = _axis(int(node.attr("axis", -1)), x.dim())
    values, indices = torch.topk(x, k, dim=axis, largest=bool(int(node.attr("largest", 1))), sorted=True)
    return values, indices


# ---------------------------------------------------------------------------------------------------
# Shapes and data movement
# ---------------------------------------------------------------------------------------------------


@_op("Identity", "Dropout")
def _identity(node: _Node, xs: list[Tensor | None]) -> Any:
    x = xs[0]
    assert x is not None
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1]:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@_op("Reshape", meta=(1,))
def _reshape(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    shape = _ints(xs[1])
    if not int(node.attr("allowzero", 0)):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Flatten")
def _flatten(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axis = _axis(int(node.attr("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@_op("Squeeze", meta=(1,))
def _squeeze(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axes_t = _opt(xs, 1)
    axes = _ints(axes_t) if axes_t is not None else list(node.attr("axes", []))
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


@_op("Unsqueeze", meta=(1,))
def _unsqueeze(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    axes_t = _opt(xs, 1)
    axes = _ints(axes_t) if axes_t is not None else list(node.attr("axes", []))
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@_op("Concat")
def _concat(node: _Node, xs: list[Tensor | None]) -> Tensor:
    parts = _align(*[x for x in xs if x is not None])
    return torch.cat(parts, dim=int(node.attr("axis")))


@_op("Split", meta=(1,))
def _split(node: _Node, xs: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = xs[0]
    assert x is not None
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    split_t = _opt(xs, 1)
    sizes = _ints(split_t) if _present(split_t) else list(node.attr("split", []))
    if not sizes:
        parts = int(node.attr("num_outputs", len(node.outputs)))
        # Opset 18: equal chunks of ceil(n / parts), the last one smaller.
        chunk = -(-x.shape[axis] // parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Slice", meta=(1, 2, 3, 4))
def _slice(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = list(node.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes_t, steps_t = _opt(xs, 3), _opt(xs, 4)
        axes = _ints(axes_t) if _present(axes_t) else list(range(len(starts)))
        steps = _ints(steps_t) if _present(steps_t) else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[tuple[int, Any]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
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


@_op("Gather")
def _gather(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, idx = xs[0], xs[1]
    assert x is not None and idx is not None
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    idx = idx.to(x.device).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@_op("GatherElements")
def _gather_elements(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, idx = xs[0], xs[1]
    assert x is not None and idx is not None
    axis = _axis(int(node.attr("axis", 0)), x.dim())
    idx = idx.to(x.device).long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


@_op("Shape")
def _shape(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


@_op("Size")
def _size(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return torch.tensor(xs[0].numel(), dtype=torch.int64)  # type: ignore[union-attr]


@_op("Constant")
def _constant(node: _Node, xs: list[Tensor | None]) -> Tensor:
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


@_op("ConstantOfShape", meta=(0,))
def _constant_of_shape(node: _Node, xs: list[Tensor | None]) -> Tensor:
    shape = _ints(xs[0])
    value = node.attr("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


@_op("Cast")
def _cast(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    dtype = _torch_dtype(int(node.attr("to")), node.name)
    return x if x.dtype == dtype else x.to(dtype)


@_op("CastLike")
def _cast_like(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, like = xs[0], xs[1]
    assert x is not None and like is not None
    return x.to(like.dtype)


@_op("Expand", meta=(1,))
def _expand(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    # ONNX Expand broadcasts both ways (a target dim of 1 keeps the input's size).
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(xs[1])))
    return x.expand(shape)


@_op("Tile", meta=(1,))
def _tile(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return xs[0].repeat(*_ints(xs[1]))  # type: ignore[union-attr]


@_op("Range", meta=(0, 1, 2))
def _range(node: _Node, xs: list[Tensor | None]) -> Tensor:
    start, limit, delta = xs[0], xs[1], xs[2]
    assert start is not None and limit is not None and delta is not None
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@_op("NonZero")
def _nonzero(node: _Node, xs: list[Tensor | None]) -> Tensor:
    return torch.nonzero(xs[0]).t().contiguous()  # type: ignore[arg-type]


@_op("Pad", meta=(1, 2, 3))
def _pad(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    rank = x.dim()
    pads_t = _opt(xs, 1)
    raw = _ints(pads_t) if pads_t is not None else list(node.attr("pads", []))
    value_t = _opt(xs, 2)
    value = float(value_t.item()) if _present(value_t) else float(node.attr("value", 0.0))  # type: ignore[union-attr]
    axes_t = _opt(xs, 3)
    axes = [_axis(a, rank) for a in _ints(axes_t)] if _present(axes_t) else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = raw[i], raw[i + len(axes)]
    first = next((d for d in range(rank) if begins[d] or ends[d]), rank)
    if first == rank:
        return x
    order = _torch_pad_order(begins[first:] + ends[first:])
    mode = str(node.attr("mode", "constant"))
    if mode == "constant":
        return F.pad(x, order, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    return F.pad(x, order, mode=torch_mode)


@_check("Pad")
def _check_pad(node: _Node) -> str | None:
    mode = str(node.attr("mode", "constant"))
    return None if mode in ("constant", "reflect", "edge", "wrap") else f"Pad mode {mode!r}"


@_op("DepthToSpace")
def _depth_to_space(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    b = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    if str(node.attr("mode", "DCR")) == "CRD":
        return F.pixel_shuffle(x, b)
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@_op("SpaceToDepth")
def _space_to_depth(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    b = int(node.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# ---------------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------------


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


def _resize_weights(node: _Node, in_size: int, out_size: int, scale: float) -> np.ndarray:
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


@_op("Resize", meta=(1, 2, 3))
def _resize(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x = xs[0]
    assert x is not None
    rank = x.dim()
    if node.opset < 11:
        scales_t, sizes_t = _opt(xs, 1), None
    else:
        scales_t, sizes_t = _opt(xs, 2), _opt(xs, 3)
    axes = [_axis(a, rank) for a in node.attr("axes", [])] or list(range(rank))
    in_sizes = [x.shape[a] for a in axes]
    if _present(sizes_t):
        out_sizes = _ints(sizes_t)
        policy = str(node.attr("keep_aspect_ratio_policy", "stretch"))
        if policy == "stretch":
            scales = [o / i for o, i in zip(out_sizes, in_sizes, strict=True)]
        else:
            ratios = [o / i for o, i in zip(out_sizes, in_sizes, strict=True)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            scales = [s] * len(axes)
            out_sizes = [math.floor(s * i + 0.5) for i in in_sizes]
    else:
        scales = _floats(scales_t)
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


@_check("Resize")
def _check_resize(node: _Node) -> str | None:
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


@_op("GridSample")
def _grid_sample(node: _Node, xs: list[Tensor | None]) -> Tensor:
    x, grid = _align(xs[0], xs[1])  # type: ignore[arg-type]
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


@_check("GridSample")
def _check_grid_sample(node: _Node) -> str | None:
    if str(node.attr("mode", "bilinear")) not in ("bilinear", "linear", "nearest", "bicubic", "cubic"):
        return f"GridSample mode {node.attr('mode')!r}"
    if str(node.attr("padding_mode", "zeros")) not in ("zeros", "border", "reflection"):
        return f"GridSample padding_mode {node.attr('padding_mode')!r}"
    return None


# ---------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------


def _parse_attrs(proto: Any) -> dict[str, Any]:
    from onnx import helper

    attrs: dict[str, Any] = {}
    for attr in proto.attribute:
        if attr.type == attr.GRAPH:
            attrs[attr.name] = attr.g  # compiled by the module (If branches)
            continue
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif hasattr(value, "data_type") and hasattr(value, "dims"):
            value = _tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def _static_dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


@_op("If")
def _if(node: _Node, xs: list[Tensor | None]) -> Any:
    raise AssertionError("If nodes are run by OnnxTorchModule._run")  # pragma: no cover


SUPPORTED_OPS: frozenset[str] = frozenset(_OPS)
# Ops never folded at conversion: their branches may hold values that are not constants.
_NO_FOLD = frozenset({"If"})
# Initializer positions that must stay frozen even when the module is trainable.
_STATISTIC_INPUTS = {"BatchNormalization": frozenset({3, 4})}


@dataclass
class _Program:
    """One compiled graph (the main graph or an If branch)."""

    nodes: list[_Node]
    frees: list[list[str]]
    outputs: list[str]
    constants: dict[str, Tensor]  # stay on the CPU
    buffers: dict[str, str]  # value name -> module attribute (moves with the module)
    free_variables: list[str]  # outer-scope values a branch reads


class OnnxTorchModule(nn.Module):
    """An ONNX graph as a torch module. Build it with :func:`convert_onnx`."""

    def __init__(self, model: Any, *, trainable: bool = False, source: object = "model") -> None:
        super().__init__()
        self.source = str(source)
        graph = model.graph
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        self.opset = int(opsets.get("ai.onnx", 0))
        initializer_names = {t.name for t in graph.initializer}
        graph_inputs = [i for i in graph.input if i.name not in initializer_names]
        self.input_names = [i.name for i in graph_inputs]
        self.output_names = [o.name for o in graph.output]
        self.input_dims = {i.name: _static_dims(i) for i in graph_inputs}
        self.input_dtypes = {
            i.name: _ONNX_TO_TORCH.get(i.type.tensor_type.elem_type, torch.float32) for i in graph_inputs
        }
        self.output_dims = {o.name: _static_dims(o) for o in graph.output}
        self._trainable = trainable
        self._constant_count = 0
        unsupported: dict[str, int] = {}
        problems: list[str] = []
        self._main = self._compile(graph, set(), unsupported, problems)
        if unsupported:
            raise UnsupportedOperator(self.source, unsupported, "; ".join(problems))

    # -- conversion ---------------------------------------------------------------------------------

    def _compile(
        self, graph: Any, outer: set[str], unsupported: dict[str, int], problems: list[str]
    ) -> _Program:
        constants = {t.name: _tensor_from_proto(t) for t in graph.initializer}
        inputs = {i.name for i in graph.input if i.name not in constants}
        visible = outer | inputs | set(constants)
        nodes: list[_Node] = []
        for i, proto in enumerate(graph.node):
            domain = proto.domain or "ai.onnx"
            op = proto.op_type
            if domain != "ai.onnx" or op not in _OPS:
                label = op if domain == "ai.onnx" else f"{domain}.{op}"
                unsupported[label] = unsupported.get(label, 0) + 1
                continue
            node = _Node(
                op=op,
                name=proto.name or f"{op}_{i}",
                inputs=list(proto.input),
                outputs=list(proto.output),
                attrs=_parse_attrs(proto),
                opset=self.opset,
                fn=_OPS[op],
            )
            check = _CHECKS.get(op)
            problem = check(node) if check else None
            if problem:
                problems.append(f"{node.name}: {problem}")
                unsupported[op] = unsupported.get(op, 0) + 1
                continue
            if op == "If":
                # Branches see everything defined so far; what they read from outside becomes a hidden
                # input of the If node, so ordering, freeing and device handling treat it like any input.
                scope = visible | {o for n in graph.node for o in n.output}
                branches = [
                    self._compile(node.attrs[key], scope, unsupported, problems)
                    for key in ("then_branch", "else_branch")
                ]
                node.attrs["then_branch"], node.attrs["else_branch"] = branches
                hidden = sorted({v for b in branches for v in b.free_variables})
                node.inputs = node.inputs[:1] + hidden
            nodes.append(node)
        if unsupported:
            return _Program([], [], [], {}, {}, [])
        nodes = self._topological(nodes, visible)
        frozen: set[str] = set()
        if self._trainable:
            frozen = {n for n, t in constants.items() if _is_float(t)}
        statistics = {
            node.inputs[p]
            for node in nodes
            for p in _STATISTIC_INPUTS.get(node.op, ())
            if p < len(node.inputs)
        }
        nodes = self._fold_constants(nodes, constants, frozen)
        defined = inputs | set(constants) | {o for n in nodes for o in n.outputs}
        outputs = [o.name for o in graph.output]
        read = {i for n in nodes for i in n.inputs if i} | set(outputs)
        program = _Program(nodes, [], outputs, {}, {}, sorted(read - defined))
        self._store_constants(program, constants, frozen - statistics)
        self._plan_frees(program)
        return program

    def _topological(self, nodes: list[_Node], available: set[str]) -> list[_Node]:
        """Kahn's order; ONNX requires sorted graphs, but exporters are not all careful."""
        ready = set(available) | {""}
        pending = list(nodes)
        ordered: list[_Node] = []
        while pending:
            progressed = []
            rest = []
            for node in pending:
                (progressed if all(i in ready for i in node.inputs) else rest).append(node)
            if not progressed:
                missing = sorted({i for n in rest for i in n.inputs if i not in ready})
                raise ModelStoreError(f"{self.source}: graph has a cycle or undefined values {missing[:5]}")
            for node in progressed:
                ready.update(node.outputs)
            ordered += progressed
            pending = rest
        return ordered

    def _fold_constants(
        self, nodes: list[_Node], constants: dict[str, Tensor], frozen: set[str]
    ) -> list[_Node]:
        """Evaluate nodes whose inputs are all constants once, here, instead of every forward."""
        kept: list[_Node] = []
        for node in nodes:
            foldable = node.op not in _NO_FOLD and all(
                i == "" or (i in constants and i not in frozen) for i in node.inputs
            )
            if not foldable:
                kept.append(node)
                continue
            try:
                with torch.no_grad():
                    out = node.fn(node, [constants[i] if i else None for i in node.inputs])
            except Exception as exc:
                raise ModelStoreError(
                    f"{self.source}: node {node.name} ({node.op}) fails on constants: {exc}"
                ) from exc
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    constants[name] = value
        return kept

    def _store_constants(self, program: _Program, constants: dict[str, Tensor], trainable: set[str]) -> None:
        # Values computed only from shapes (and constants) are "shape-like": they stay on the CPU.
        shape_like: set[str] = set()
        for node in program.nodes:
            live = [i for i in node.inputs if i and i not in constants]
            if node.op in ("Shape", "Size") or (live and all(i in shape_like for i in live)):
                shape_like.update(o for o in node.outputs if o)
        uses: dict[str, list[tuple[_Node, int]]] = {}
        for node in program.nodes:
            for pos, name in enumerate(node.inputs):
                if name in constants:
                    uses.setdefault(name, []).append((node, pos))
        needed = set(uses) | {o for o in program.outputs if o in constants}
        for name in sorted(needed):
            value = constants[name]
            on_cpu = (
                name not in trainable
                and name in uses
                and all(
                    pos in _META_INPUTS.get(user.op, frozenset()) or user.outputs[0] in shape_like
                    for user, pos in uses[name]
                )
            )
            if on_cpu:
                program.constants[name] = value
                continue
            attr = f"c{self._constant_count}"
            self._constant_count += 1
            program.buffers[name] = attr
            if name in trainable:
                self.register_parameter(attr, nn.Parameter(value))
            else:
                self.register_buffer(attr, value)

    @staticmethod
    def _plan_frees(program: _Program) -> None:
        """For each node, the intermediate values it is the last reader of (freed right after it)."""
        last: dict[str, int] = {}
        for i, node in enumerate(program.nodes):
            for name in node.inputs:
                if name:
                    last[name] = i
        keep = set(program.outputs) | set(program.constants) | set(program.buffers)
        program.frees = [[] for _ in program.nodes]
        for name, i in last.items():
            if name not in keep:
                program.frees[i].append(name)

    # -- running ------------------------------------------------------------------------------------

    @property
    def ops(self) -> list[str]:
        return [n.op for n in self._main.nodes]

    @property
    def input_height(self) -> int | None:
        dims = self.input_dims[self.input_names[0]]
        return dims[1] if len(dims) == 4 else None

    @property
    def input_width(self) -> int | None:
        dims = self.input_dims[self.input_names[0]]
        return dims[2] if len(dims) == 4 else None

    def _lookup(self, program: _Program, name: str, env: dict[str, Tensor]) -> Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        attr = program.buffers.get(name)
        if attr is not None:
            return getattr(self, attr)
        return program.constants[name]

    def _run(self, program: _Program, env: dict[str, Tensor]) -> list[Tensor | None]:
        for node, frees in zip(program.nodes, program.frees, strict=True):
            args = [self._lookup(program, i, env) for i in node.inputs]
            if node.op == "If":
                cond = args[0]
                assert cond is not None
                branch = node.attrs["then_branch"] if bool(cond.reshape(-1)[0]) else node.attrs["else_branch"]
                out: Any = self._run(branch, dict(zip(node.inputs[1:], args[1:], strict=True)))
            else:
                out = node.fn(node, args)
            if isinstance(out, (tuple, list)):
                for name, value in zip(node.outputs, out, strict=False):
                    if name:
                        env[name] = value
            else:
                env[node.outputs[0]] = out
            for name in frees:
                env.pop(name, None)
        return [self._lookup(program, o, env) for o in program.outputs]

    def forward(self, *inputs: Tensor) -> Any:
        """Run the graph. The image input is float [N, H, W, 3] in 0..255 (uint8 is accepted too)."""
        if len(inputs) != len(self.input_names):
            raise TypeError(f"{self.source}: expected {len(self.input_names)} inputs, got {len(inputs)}")
        env = {
            name: value.float() if value.dtype == torch.uint8 else value
            for name, value in zip(self.input_names, inputs, strict=True)
        }
        results = self._run(self._main, env)
        return results[0] if len(results) == 1 else tuple(results)

    def forward_chw01(self, images: Tensor, resize: bool = True) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] (what generators make) -> the graph's output.

        With ``resize``, images of another size are resampled (bilinear, antialiased when shrinking)
        to the graph's fixed input size, differentiably.
        """
        height, width = self.input_height, self.input_width
        if resize and height and width and tuple(images.shape[-2:]) != (height, width):
            shrink = images.shape[-2] > height or images.shape[-1] > width
            images = F.interpolate(
                images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink
            )
        # A contiguous NHWC tensor, as the real uint8 input is: the graph's leading Transpose then
        # yields a channels-last view, which CPU (oneDNN) and cuDNN convolutions run fastest.
        return self.forward(images.permute(0, 2, 3, 1).contiguous() * 255.0)


def convert_onnx(model: Any, *, trainable: bool = False, source: object | None = None) -> OnnxTorchModule:
    """An ONNX ModelProto (or a path to one) -> :class:`OnnxTorchModule` in eval mode.

    Raises :class:`UnsupportedOperator` naming every op it cannot evaluate, before anything runs.
    """
    import onnx

    if isinstance(model, (str, Path)):
        source = source or model
        try:
            model = onnx.load(str(model))
        except Exception as exc:
            raise ModelStoreError(f"{model}: not a readable ONNX model ({exc})") from exc
    module = OnnxTorchModule(model, trainable=trainable, source=source or "model")
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# Parity and loading
# ---------------------------------------------------------------------------------------------------


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    max_rel_diff: float
    output_scale: float


def check_parity(
    onnx_path: str | Path,
    module: OnnxTorchModule,
    n: int = 8,
    atol: float = 1e-3,
    rtol: float = 1e-3,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> ParityReport:
    """Compare the module with ONNX Runtime on ``n`` random uint8 images; raise ModelStoreError on mismatch.

    Runs on the module's current device; callers that want float32-exact semantics check on the CPU
    (GPU convolutions may use TF32).
    """
    import onnxruntime as ort

    height = height or module.input_height
    width = width or module.input_width
    if not height or not width:
        raise ModelStoreError(f"{onnx_path}: input size is not fixed in the graph; pass height and width")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
    batch_dim = module.input_dims[module.input_names[0]][0]
    step = batch_dim if batch_dim else n
    expected = np.concatenate(
        [session.run(None, {module.input_names[0]: images[i : i + step]})[0] for i in range(0, n, step)]
    )
    device = next(
        (t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu")
    )
    with torch.no_grad():
        got = (
            torch.cat(
                [module(torch.from_numpy(images[i : i + step]).to(device).float()) for i in range(0, n, step)]
            )
            .float()
            .cpu()
            .numpy()
        )
    if got.shape != expected.shape:
        raise ModelStoreError(
            f"{onnx_path}: converted twin returns {got.shape}, ONNX Runtime {expected.shape}"
        )
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    report = ParityReport(n, float(diff.max(initial=0.0)), float(rel.max(initial=0.0)), scale)
    bad = ~np.isfinite(got) | (diff > atol + rtol * np.abs(expected))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ModelStoreError(
            f"{onnx_path}: torch conversion disagrees with ONNX Runtime: max |diff| "
            f"{report.max_abs_diff:.3g} (output scale {scale:.3g}, atol {atol}, rtol {rtol}), "
            f"{int(bad.sum())} of {bad.size} values off, first at {where}"
        )
    return report


def load_differentiable_twin(
    version: Any,
    device: str | torch.device | None = None,
    *,
    trainable: bool = False,
    parity_images: int = 8,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> tuple[OnnxTorchModule, Any]:
    """A predictor version from the store -> (differentiable module on ``device``, its PredictorCard).

    The store's checks run first, then the conversion, then a parity check against ONNX Runtime on the
    CPU (float32, so a mismatch means a conversion bug, not TF32 rounding). Every failure is a
    ModelStoreError naming the version.
    """
    from neurotwin.store import validate_predictor

    card = validate_predictor(version)
    module = convert_onnx(version.model_path, trainable=trainable, source=str(version))
    if parity_images > 0:
        check_parity(
            version.model_path,
            module,
            n=parity_images,
            atol=atol,
            rtol=rtol,
            height=module.input_height or card.input.height,
            width=module.input_width or card.input.width,
        )
    if device is not None:
        module = module.to(device)
    module.requires_grad_(trainable)
    return module, card
