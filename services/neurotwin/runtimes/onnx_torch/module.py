"""The compiled graph: :class:`OnnxTorchModule` and :func:`convert_onnx`.

Conversion checks every node against the registry, folds constant subgraphs and places initializers
(buffers, parameters, or CPU-resident shape constants); ``forward`` walks the nodes in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurotwin.errors import ModelStoreError, UnsupportedOperator

# The op families register their converters on import.
from . import ops_conv, ops_elementwise, ops_linalg, ops_reduce, ops_resample, ops_shape  # noqa: F401
from .registry import (
    CHECKS,
    META_INPUTS,
    ONNX_TO_TORCH,
    OPS,
    Node,
    is_float,
    register_op,
    tensor_from_proto,
)


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
            value = tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def _static_dims(value_info: Any) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


@register_op("If")
def _if(node: Node, xs: list[Tensor | None]) -> Any:
    raise AssertionError("If nodes are run by OnnxTorchModule._run")  # pragma: no cover


SUPPORTED_OPS: frozenset[str] = frozenset(OPS)
# Ops never folded at conversion: their branches may hold values that are not constants.
_NO_FOLD = frozenset({"If"})
# Initializer positions that must stay frozen even when the module is trainable.
_STATISTIC_INPUTS = {"BatchNormalization": frozenset({3, 4})}


@dataclass
class _Program:
    """One compiled graph (the main graph or an If branch)."""

    nodes: list[Node]
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
            i.name: ONNX_TO_TORCH.get(i.type.tensor_type.elem_type, torch.float32) for i in graph_inputs
        }
        self.output_dims = {o.name: _static_dims(o) for o in graph.output}
        self._trainable = trainable
        # Set by load_differentiable_twin(outputs=...): original output column of each output column, and
        # the pruning figures (a pruning.PrunedGraph without its model).
        self.kept_outputs: tuple[int, ...] | None = None
        self.pruning: Any = None
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
        constants = {t.name: tensor_from_proto(t) for t in graph.initializer}
        inputs = {i.name for i in graph.input if i.name not in constants}
        visible = outer | inputs | set(constants)
        nodes: list[Node] = []
        for i, proto in enumerate(graph.node):
            domain = proto.domain or "ai.onnx"
            op = proto.op_type
            if domain != "ai.onnx" or op not in OPS:
                label = op if domain == "ai.onnx" else f"{domain}.{op}"
                unsupported[label] = unsupported.get(label, 0) + 1
                continue
            node = Node(
                op=op,
                name=proto.name or f"{op}_{i}",
                inputs=list(proto.input),
                outputs=list(proto.output),
                attrs=_parse_attrs(proto),
                opset=self.opset,
                fn=OPS[op],
            )
            check = CHECKS.get(op)
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
            frozen = {n for n, t in constants.items() if is_float(t)}
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

    def _topological(self, nodes: list[Node], available: set[str]) -> list[Node]:
        """Kahn's order; ONNX requires sorted graphs, but exporters are not all careful."""
        ready = set(available) | {""}
        pending = list(nodes)
        ordered: list[Node] = []
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
        self, nodes: list[Node], constants: dict[str, Tensor], frozen: set[str]
    ) -> list[Node]:
        """Evaluate nodes whose inputs are all constants once, here, instead of every forward."""
        kept: list[Node] = []
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
        uses: dict[str, list[tuple[Node, int]]] = {}
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
                    pos in META_INPUTS.get(user.op, frozenset()) or user.outputs[0] in shape_like
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
