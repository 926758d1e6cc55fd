"""Per-op rules of output pruning: how a node can produce only some indices along one axis of its output.

A rule gets the node, which of its outputs is asked for, the axis and the kept indices (sorted, distinct,
a strict subset), and returns the name of a value holding exactly ``output[..., keep, ...]`` along that
axis, built from its inputs cut the same way (``pruner.require``) where the op is column-wise. A rule
that cannot prove its rewrite exact (an unknown rank or size, a non-constant axes input, an op that mixes
columns) raises :class:`Unproven`; the pruner then keeps the node whole and gathers the kept indices
from its output, which is always exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Keep = tuple[int, ...]


class Unproven(Exception):
    """A rewrite this rule cannot show to be exact; the message says why (kept in the pruning report)."""


class Pruner(Protocol):
    """What rules need from the pruner (see ``pruning._Pruner``)."""

    def require(self, name: str, axis: int, keep: Keep) -> str: ...

    def emit(self, node: Any, inputs: list[str]) -> str: ...

    def constant_input(self, values: list[int], like: str) -> str: ...

    def make(self, op: str, inputs: list[str], **attrs: Any) -> str: ...

    def rank(self, name: str) -> int: ...

    def dim(self, name: str, axis: int) -> int | None: ...

    def constant_ints(self, name: str) -> list[int]: ...

    def opset(self) -> int: ...


Rule = Callable[[Pruner, Any, int, int, Keep], str]
RULES: dict[str, Rule] = {}


def _rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def _attr(node: Any, key: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == key:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _first_output(index: int) -> None:
    if index != 0:
        raise Unproven(f"output {index} of a multi-output node")


# Ops that act on each element of input 0 alone; any other inputs are scalars (Clip's bounds, Dropout's
# ratio) or carry only a dtype (CastLike).
_PER_ELEMENT = frozenset(
    {
        "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor", "Ceil",
        "Round", "Sign", "Sin", "Cos", "Erf", "Softsign", "Mish", "Not", "IsNaN", "Softplus", "LeakyRelu",
        "Elu", "Celu", "Selu", "ThresholdedRelu", "HardSigmoid", "HardSwish", "Gelu", "Identity", "Cast",
        "CastLike", "Clip", "Dropout",
    }
)  # fmt: skip


@_rule(*_PER_ELEMENT)
def _per_element(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    _first_output(index)
    return p.emit(node, [p.require(node.input[0], axis, keep), *node.input[1:]])


# Elementwise ops whose inputs broadcast (numpy rules) to the output.
_BROADCASTING = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less",
        "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift", "Where", "PRelu",
    }
)  # fmt: skip


def _broadcast_input(p: Pruner, name: str, out_rank: int, axis: int, keep: Keep) -> str:
    """Cut one broadcasting input: inputs without the axis, or with size 1 on it, stay whole."""
    if not name:
        return name
    in_axis = axis - (out_rank - p.rank(name))
    if in_axis < 0:
        return name
    size = p.dim(name, in_axis)
    if size is None:
        raise Unproven(f"size of {name!r} along axis {in_axis} unknown")
    return name if size == 1 else p.require(name, in_axis, keep)


@_rule(*_BROADCASTING)
def _broadcasting(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    out_rank = max(p.rank(name) for name in node.input if name)
    return p.emit(node, [_broadcast_input(p, name, out_rank, axis, keep) for name in node.input])


@_rule("Concat")
def _concat(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    concat_axis = int(_attr(node, "axis")) % rank
    if concat_axis != axis:  # every input carries the whole axis
        return p.emit(node, [p.require(name, axis, keep) for name in node.input])
    # Along the concatenated axis: each input supplies a range of indices; inputs nobody reads go.
    pieces: list[str] = []
    start = 0
    for name in node.input:
        size = p.dim(name, axis)
        if size is None:
            raise Unproven(f"size of Concat input {name!r} unknown")
        local = tuple(k - start for k in keep if start <= k < start + size)
        if local:
            pieces.append(p.require(name, axis, local))
        start += size
    return pieces[0] if len(pieces) == 1 else p.emit(node, pieces)


@_rule("MatMul")
def _matmul(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    a, b = node.input[0], node.input[1]
    rank_a, rank_b = p.rank(a), p.rank(b)
    if rank_a < 2 or rank_b < 2:
        raise Unproven("MatMul with a vector operand")
    out_rank = max(rank_a, rank_b)
    if axis == out_rank - 1:  # output columns are B's columns
        return p.emit(node, [a, p.require(b, rank_b - 1, keep)])
    if axis == out_rank - 2:  # output rows are A's rows
        return p.emit(node, [p.require(a, rank_a - 2, keep), b])
    raise Unproven("MatMul batch axis")


@_rule("Gemm")
def _gemm(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    if axis == 1:
        b = p.require(b, 0 if int(_attr(node, "transB", 0)) else 1, keep)
    else:
        a = p.require(a, 1 if int(_attr(node, "transA", 0)) else 0, keep)
    inputs = [a, b] + ([_broadcast_input(p, c, 2, axis, keep)] if c else [])
    return p.emit(node, inputs)


_REDUCTIONS = frozenset(
    {
        "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp",
    }
)  # fmt: skip


def _through_removed_axes(out_axis: int, removed: set[int], in_rank: int) -> int:
    """The input axis an output axis comes from when ``removed`` input axes were dropped."""
    return [a for a in range(in_rank) if a not in removed][out_axis]


@_rule(*_REDUCTIONS)
def _reduce(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    data = node.input[0]
    rank = p.rank(data)
    if len(node.input) > 1 and node.input[1]:
        axes = p.constant_ints(node.input[1])
    else:
        axes = list(_attr(node, "axes", []))
    if not axes:
        raise Unproven("reduction over every axis")
    reduced = {a % rank for a in axes}
    in_axis = axis if int(_attr(node, "keepdims", 1)) else _through_removed_axes(axis, reduced, rank)
    if in_axis in reduced:
        raise Unproven("the kept axis is reduced")
    return p.emit(node, [p.require(data, in_axis, keep), *node.input[1:]])


@_rule("ArgMax", "ArgMin")
def _arg_reduce(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    reduced = int(_attr(node, "axis", 0)) % rank
    in_axis = axis if int(_attr(node, "keepdims", 1)) else _through_removed_axes(axis, {reduced}, rank)
    if in_axis == reduced:
        raise Unproven("the kept axis is reduced")
    return p.emit(node, [p.require(node.input[0], in_axis, keep)])


@_rule("Softmax", "LogSoftmax")
def _softmax(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    if p.opset() < 13:
        raise Unproven("Softmax before opset 13 normalizes a flattened tail")
    if int(_attr(node, "axis", -1)) % rank == axis:
        raise Unproven("Softmax over the kept axis mixes its indices")
    return p.emit(node, [p.require(node.input[0], axis, keep)])


@_rule("Transpose")
def _transpose(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    perm = list(_attr(node, "perm", [])) or list(reversed(range(rank)))
    return p.emit(node, [p.require(node.input[0], perm[axis], keep)])


def _axes(p: Pruner, node: Any) -> list[int]:
    if len(node.input) > 1 and node.input[1]:
        return p.constant_ints(node.input[1])
    return list(_attr(node, "axes", []))


@_rule("Unsqueeze")
def _unsqueeze(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    out_rank = p.rank(node.input[0]) + len(_axes(p, node))
    inserted = {a % out_rank for a in _axes(p, node)}
    if axis in inserted:
        raise Unproven("the kept axis is an inserted one")
    in_axis = axis - sum(1 for a in inserted if a < axis)
    return p.emit(node, [p.require(node.input[0], in_axis, keep), *node.input[1:]])


@_rule("Squeeze")
def _squeeze(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    axes = _axes(p, node)
    if not axes:  # squeezes every size-1 axis: which those are must be known
        sizes = [p.dim(node.input[0], a) for a in range(rank)]
        if any(s is None for s in sizes):
            raise Unproven("Squeeze without axes on a partly unknown shape")
        axes = [a for a, s in enumerate(sizes) if s == 1]
    in_axis = _through_removed_axes(axis, {a % rank for a in axes}, rank)
    return p.emit(node, [p.require(node.input[0], in_axis, keep), *node.input[1:]])


@_rule("Flatten")
def _flatten(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    rank = p.rank(node.input[0])
    split = int(_attr(node, "axis", 1))
    split = split + rank if split < 0 else split
    if axis == 1 and split == rank - 1:  # the trailing axis alone becomes the columns
        return p.emit(node, [p.require(node.input[0], rank - 1, keep)])
    if axis == 0 and split == 1:  # the leading axis alone becomes the rows
        return p.emit(node, [p.require(node.input[0], 0, keep)])
    raise Unproven("Flatten merges the kept axis with others")


@_rule("Einsum")
def _einsum(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    equation = str(_attr(node, "equation")).replace(" ", "")
    if "..." in equation or "->" not in equation:
        raise Unproven("Einsum with an ellipsis or an implicit output")
    terms, result = equation.split("->")
    letter = result[axis]
    inputs = []
    for name, term in zip(node.input, terms.split(","), strict=True):
        if letter not in term:
            inputs.append(name)
            continue
        if term.count(letter) > 1:
            raise Unproven("Einsum takes a diagonal over the kept axis")
        size = p.dim(name, term.index(letter))
        if size is None:
            raise Unproven(f"size of Einsum input {name!r} unknown")
        inputs.append(name if size == 1 else p.require(name, term.index(letter), keep))
    return p.emit(node, inputs)


@_rule("GridSample")
def _grid_sample(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    # Output [N, C, *positions]: each output position reads only its own grid entry, each channel only
    # its own input channel.
    x, grid = node.input[0], node.input[1]
    if axis == 1:
        return p.emit(node, [p.require(x, 1, keep), grid])
    if axis >= 2:
        return p.emit(node, [x, p.require(grid, axis - 1, keep)])
    raise Unproven("GridSample batch axis")


@_rule("Expand")
def _expand(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    data, shape = node.input[0], node.input[1]
    shape_length = p.dim(shape, 0)
    if shape_length is None:
        raise Unproven("length of the Expand shape unknown")
    out_rank = max(p.rank(data), shape_length)
    cut = _broadcast_input(p, data, out_rank, axis, keep)
    # The target shape's entry for the axis is 1 or K (broadcasting). It becomes 1 when the data now
    # carries the kept indices, else the kept count (the Expand itself makes the axis).
    entry = 1 if cut != data else len(keep)
    position = axis - (out_rank - shape_length)
    if position < 0:
        return p.emit(node, [cut, shape])
    try:
        values = p.constant_ints(shape)
    except Unproven:  # computed at run time (a dynamic batch size): patch the entry there
        head = p.make("Slice", [shape, p.constant_input([0], ""), p.constant_input([position], "")])
        tail = p.make("Slice", [shape, p.constant_input([position + 1], ""), p.constant_input([2**62], "")])
        return p.emit(node, [cut, p.make("Concat", [head, p.constant_input([entry], ""), tail], axis=0)])
    values[position] = entry
    return p.emit(node, [cut, p.constant_input(values, shape)])


@_rule("Slice")
def _slice(p: Pruner, node: Any, index: int, axis: int, keep: Keep) -> str:
    if p.opset() < 10:
        raise Unproven("Slice before opset 10")
    rank = p.rank(node.input[0])
    starts = p.constant_ints(node.input[1])
    axes = p.constant_ints(node.input[3]) if len(node.input) > 3 and node.input[3] else range(len(starts))
    if axis in {a % rank for a in axes}:
        raise Unproven("Slice cuts the kept axis")
    return p.emit(node, [p.require(node.input[0], axis, keep), *node.input[1:]])
