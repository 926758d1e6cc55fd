"""Output pruning: a predictor graph cut down to the output columns an objective reads.

Store twins return ``rates`` float [N, K]. A job that reads a few neurons needs only the part of the
graph those columns depend on. :func:`prune_outputs` walks back from the output, asking each node for
only the kept indices along the neuron axis (rules in ``pruning_rules``):

- a Concat drops the inputs that feed columns nobody reads (a twin with a sub-network per neuron keeps
  only the kept neurons' sub-networks);
- column-wise ops (elementwise, MatMul/Gemm columns, reductions over other axes, Einsum, GridSample,
  transposes and squeezes) pass the request on to their inputs, and constant inputs (readout weights
  and biases with a neuron axis) are sliced;
- anything a rule cannot prove exact is kept whole, and the kept indices are gathered from its output.

Nodes no longer reachable from the output are then removed. The pruned graph's output columns are the
kept neurons in the order asked (``outputs[j]`` is column ``j``); callers remap objective indices. An
ensemble twin's second output, the members' rates [N, members, K], is cut along its last axis the same
way (the two share the work: the mean reads the members). :func:`select_outputs` keeps only some of a
graph's outputs by name (e.g. just ``rates``), dropping what only the others need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neurotwin.errors import InvalidInput, ModelStoreError

from .pruning_rules import RULES, Keep, Unproven

NEURON_AXIS = 1


@dataclass(frozen=True)
class PrunedGraph:
    """A pruned ONNX model and what pruning did to it."""

    model: Any  # onnx.ModelProto
    outputs: tuple[int, ...]  # original column of each output column, in order
    nodes_before: int  # compute nodes (Constant nodes not counted)
    nodes_after: int
    parameters_before: int  # elements of float constants (initializers and Constant nodes)
    parameters_after: int
    fallbacks: tuple[str, ...]  # nodes kept whole, with the reason (diagnostics)


def _dims_of(value_info: Any) -> list[int | None] | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def _constant_value(node: Any) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
    return None  # sparse or string constants: treated as opaque values


def _subgraph_reads(node: Any) -> set[str]:
    """Names read anywhere inside a node's subgraphs (If/Loop branches see the outer scope)."""
    reads: set[str] = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in graph.node:
                reads.update(i for i in inner.input if i)
                reads |= _subgraph_reads(inner)
            reads.update(o.name for o in graph.output)
    return reads


def _parameter_count(initializers: Sequence[Any], nodes: Sequence[Any]) -> int:
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    count = sum(int(np.prod(t.dims)) for t in initializers if t.data_type in floats)
    for node in nodes:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None and value.dtype.kind == "f":
                count += int(value.size)
    return count


def _rename_value(nodes: Sequence[Any], old: str, new: str) -> None:
    for node in nodes:
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name == old:
                    field[i] = new


class _Pruner:
    """Rewrites one graph; implements the ``pruning_rules.Pruner`` protocol."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper, shape_inference

        graph = model.graph
        self._opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producers: dict[str, tuple[Any, int]] = {}
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name:
                    self.producers[name] = (node, index)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        try:
            inferred = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # shape inference is a help, never a requirement: rules then prove less
            inferred = model
        self.shapes: dict[str, list[int | None] | None] = {}
        for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            self.shapes[info.name] = _dims_of(info)
        for name, value in self.constants.items():
            self.shapes[name] = list(value.shape)
        self.new_nodes: list[Any] = []
        self.new_initializers: list[Any] = []
        self.fallbacks: list[str] = []
        self._memo: dict[tuple[str, int, Keep], str] = {}
        self._count = 0

    # -- the Pruner protocol -------------------------------------------------------------------------

    def opset(self) -> int:
        return self._opset

    def rank(self, name: str) -> int:
        dims = self.shapes.get(name)
        if dims is None:
            raise Unproven(f"rank of {name!r} unknown")
        return len(dims)

    def dim(self, name: str, axis: int) -> int | None:
        dims = self.shapes.get(name)
        return dims[axis] if dims is not None and 0 <= axis < len(dims) else None

    def constant_ints(self, name: str) -> list[int]:
        if name not in self.constants:
            raise Unproven(f"{name!r} is not a constant")
        return [int(v) for v in self.constants[name].reshape(-1)]

    def require(self, name: str, axis: int, keep: Keep) -> str:
        size = self.dim(name, axis)
        if size is not None and keep == tuple(range(size)):
            return name  # every index kept: the value as it is
        if size is not None and keep[-1] >= size:  # a rule's reasoning does not fit this graph
            raise Unproven(f"{name!r} has {size} indices along axis {axis}, not {keep[-1] + 1}")
        key = (name, axis, keep)
        if key not in self._memo:
            self._memo[key] = self._cut(name, axis, keep)
        return self._memo[key]

    def emit(self, node: Any, inputs: list[str]) -> str:
        from onnx import helper

        out = self._fresh(node.output[0])
        new = helper.make_node(node.op_type, inputs, [out], name=self._fresh(node.name or node.op_type))
        new.domain = node.domain
        new.attribute.extend(node.attribute)
        self.new_nodes.append(new)
        return out

    def make(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self._fresh(op)
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=self._fresh(op), **attrs))
        return out

    def constant_input(self, values: list[int], like: str) -> str:
        dtype = self.constants[like].dtype if like in self.constants else np.int64
        return self._add_constant(np.asarray(values, dtype=dtype), like)

    # -- internals -----------------------------------------------------------------------------------

    def _fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}/pruned_{self._count}"

    def _add_constant(self, value: np.ndarray, base: str) -> str:
        from onnx import numpy_helper

        name = self._fresh(base)
        self.new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.constants[name] = value
        self.shapes[name] = list(value.shape)
        return name

    def _cut(self, name: str, axis: int, keep: Keep) -> str:
        if name in self.constants:
            return self._add_constant(np.take(self.constants[name], keep, axis=axis), name)
        producer = self.producers.get(name)
        if producer is None:  # a graph input: gathering from it is the cut
            return self.gather(name, axis, keep)
        node, index = producer
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        reason = f"no pruning rule for {node.op_type}"
        if rule is not None:
            try:
                return rule(self, node, index, axis, keep)
            except Unproven as why:
                reason = str(why)
        self.fallbacks.append(f"{node.name or node.op_type} ({node.op_type}) kept whole: {reason}")
        return self.gather(name, axis, keep)

    def gather(self, name: str, axis: int, keep: Keep | list[int], out: str | None = None) -> str:
        from onnx import helper

        indices = self._add_constant(np.asarray(keep, dtype=np.int64), f"{name}/keep")
        out = out or self._fresh(name)
        self.new_nodes.append(helper.make_node("Gather", [name, indices], [out], axis=axis))
        return out


def validate_outputs(outputs: Sequence[int], columns: int | None) -> tuple[int, ...]:
    """The kept columns as a tuple; InvalidInput if empty, repeated, or outside ``range(columns)``."""
    kept = tuple(int(o) for o in outputs)
    if not kept:
        raise InvalidInput("outputs: name at least one output column to keep")
    repeated = sorted({o for o in kept if kept.count(o) > 1})
    if repeated:
        raise InvalidInput(f"outputs: columns {repeated} are listed more than once")
    bad = [o for o in kept if o < 0 or (columns is not None and o >= columns)]
    if bad:
        raise InvalidInput(f"outputs: columns {bad} out of range (the model has {columns} outputs)")
    return kept


def prune_outputs(model: Any, outputs: Sequence[int]) -> PrunedGraph:
    """``model`` (an onnx.ModelProto whose outputs carry neurons on their last axis: rates [N, K], and an
    ensemble's member rates [N, members, K]) cut to the neurons ``outputs``, in that order.

    The result computes only what those neurons depend on; every output keeps its name with
    ``len(outputs)`` neurons, neuron ``j`` being original neuron ``outputs[j]``. The given model is not
    changed. Raises InvalidInput for an empty list, repeated or out-of-range columns.
    """
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    names = [o.name for o in graph.output]
    if not names:
        raise ModelStoreError("output pruning needs a graph output, the model has none")
    # Each pruned value takes its output's name; the original becomes an ordinary intermediate.
    for name in names:
        _rename_value(graph.node, name, f"{name}/unpruned")
    for info in graph.output:
        info.name = f"{info.name}/unpruned"
    pruner = _Pruner(work)
    axes: dict[str, int] = {}
    columns: set[int | None] = set()
    for name in names:
        dims = pruner.shapes.get(f"{name}/unpruned")
        rank = len(dims) if dims is not None else 2
        if rank not in (2, 3) or (rank == 3 and len(names) == 1):
            raise ModelStoreError(
                f"output pruning needs outputs [N, K] (and an ensemble's [N, members, K]); "
                f"{name!r} has rank {rank}"
            )
        axes[name] = rank - 1
        columns.add(pruner.dim(f"{name}/unpruned", rank - 1))
    known = {c for c in columns if c is not None}
    if len(known) > 1:
        raise ModelStoreError(
            f"output pruning: the outputs {names} disagree on the neuron count {sorted(known)}"
        )
    kept = validate_outputs(outputs, known.pop() if known else None)
    ordered = tuple(sorted(kept))
    for name in names:
        axis = axes[name]
        pruned = pruner.require(f"{name}/unpruned", axis, ordered)
        if kept != ordered:  # back to the order asked
            pruner.gather(pruned, axis, [ordered.index(k) for k in kept], out=name)
        else:
            pruner.new_nodes.append(onnx.helper.make_node("Identity", [pruned], [name]))
    for info, name in zip(graph.output, names, strict=True):
        info.name = name

    before_nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    kept_nodes, initializers = _live_part(
        [*graph.node, *pruner.new_nodes], [*graph.initializer, *pruner.new_initializers], names
    )
    _replace_body(graph, kept_nodes, initializers)
    for info, name in zip(graph.output, names, strict=True):
        dims = info.type.tensor_type.shape.dim
        if len(dims) == axes[name] + 1:
            dims[axes[name]].Clear()
            dims[axes[name]].dim_value = len(kept)
    return PrunedGraph(
        model=work,
        outputs=kept,
        nodes_before=len(before_nodes),
        nodes_after=sum(1 for n in kept_nodes if n.op_type != "Constant"),
        parameters_before=_parameter_count(model.graph.initializer, model.graph.node),
        parameters_after=_parameter_count(initializers, kept_nodes),
        fallbacks=tuple(pruner.fallbacks),
    )


def select_outputs(model: Any, names: Sequence[str]) -> Any:
    """``model`` (an onnx.ModelProto) returning only the graph outputs ``names``, in that order, with
    the nodes and weights no kept output needs removed. The given model is not changed. Raises
    InvalidInput for an unknown, repeated or empty list of names."""
    import onnx

    available = [o.name for o in model.graph.output]
    wanted = [str(n) for n in names]
    if not wanted:
        raise InvalidInput("output names: name at least one output")
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise InvalidInput(f"output names {unknown}: the model's outputs are {available}")
    if len(set(wanted)) != len(wanted):
        raise InvalidInput(f"output names {wanted}: each may be asked for once")
    if wanted == available:
        return model
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    infos = {o.name: o for o in graph.output}
    chosen = [onnx.ValueInfoProto() for _ in wanted]
    for copy, name in zip(chosen, wanted, strict=True):
        copy.CopyFrom(infos[name])
    del graph.output[:]
    graph.output.extend(chosen)
    nodes, initializers = _live_part(list(graph.node), list(graph.initializer), wanted)
    _replace_body(graph, nodes, initializers)
    return work


def _live_part(
    nodes: list[Any], initializers: list[Any], outputs: Sequence[str]
) -> tuple[list[Any], list[Any]]:
    """Dead-code elimination: the nodes (in their order) and initializers the ``outputs`` depend on."""
    producer = {o: n for n in nodes for o in n.output if o}
    live_values = set(outputs)
    live_nodes: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in live_nodes:
            continue
        live_nodes.add(id(node))
        for name in [*node.input, *_subgraph_reads(node)]:
            if name and name not in live_values:
                live_values.add(name)
                stack.append(name)
    return [n for n in nodes if id(n) in live_nodes], [t for t in initializers if t.name in live_values]


def _replace_body(graph: Any, nodes: list[Any], initializers: list[Any]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.value_info[:]  # shapes may have changed along the neuron axis; consumers re-infer
