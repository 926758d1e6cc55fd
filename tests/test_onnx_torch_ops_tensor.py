"""Elementwise, linear algebra, reduction and shape ops, each against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from neurotwin.runtimes.onnx_torch import convert_onnx
from onnx import helper, numpy_helper

from tests._onnx_graphs import F32, I64, Case, graph_model, match_onnx_runtime

RNG = np.random.default_rng(1)


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


CASES: dict[str, Case] = {
    # name: (nodes, inputs, outputs, initializers, opset)
    "slice_negative_steps_and_sentinels": (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        {"x": _f(3, 7, 8)},
        {"y": F32},
        {"st": _i(-1, 6), "en": _i(-(2**63), 0), "ax": _i(2, 1), "sp": _i(-2, -3)},
        17,
    ),
    "gather_negative_2d_indices": (
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
        {"x": _f(2, 5, 3)},
        {"y": F32},
        {"i": np.array([[0, -1], [2, -3]], np.int64)},
        17,
    ),
    "pad_edge_and_reflect": (
        [
            helper.make_node("Pad", ["x", "p"], ["a"], mode="edge"),
            helper.make_node("Pad", ["a", "p2"], ["y"], mode="reflect"),
        ],
        {"x": _f(1, 2, 4, 5)},
        {"y": F32},
        {"p": _i(0, 0, 1, 2, 0, 0, 2, 0), "p2": _i(0, 0, 0, 1, 0, 0, 2, 1)},
        17,
    ),
    "pad_constant_axes_opset18": (
        [helper.make_node("Pad", ["x", "p", "v", "ax"], ["y"])],
        {"x": _f(2, 3, 4)},
        {"y": F32},
        {"p": _i(1, 2, 0, 1), "v": np.array(0.5, np.float32), "ax": _i(0, 2)},
        18,
    ),
    "reduce_axes_input_opset18": (
        [
            helper.make_node("ReduceMean", ["x", "ax"], ["a"], keepdims=0),
            helper.make_node("ReduceMax", ["x", "ax2"], ["b"]),
            helper.make_node("ReduceL2", ["x"], ["c"], keepdims=0),
            helper.make_node("ReduceLogSumExp", ["x", "ax2"], ["d"]),
            helper.make_node("ReduceSum", ["a", "ax3"], ["y"]),
        ],
        {"x": _f(2, 3, 4)},
        {"y": F32, "b": F32, "c": F32, "d": F32},
        {"ax": _i(-1), "ax2": _i(0, 2), "ax3": _i(1)},
        18,
    ),
    "split_num_outputs_opset18": (
        [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)],
        {"x": _f(2, 7)},
        {"a": F32, "b": F32, "c": F32},
        {},
        18,
    ),
    "shape_arithmetic_reshape": (
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Div", ["n", "two"], ["h"]),
            helper.make_node("Unsqueeze", ["h", "zero1"], ["hu"]),
            helper.make_node("Concat", ["hu", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("Range", ["zero", "n", "one"], ["rng"]),
            helper.make_node("Cast", ["rng"], ["rf"], to=F32),
            helper.make_node(
                "ConstantOfShape", ["hu"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))
            ),
            helper.make_node("Expand", ["ones", "shape2"], ["e"]),
            helper.make_node("ReduceSum", ["r", "ax"], ["rs"], keepdims=0),
            helper.make_node("Mul", ["rs", "e"], ["m"]),
            helper.make_node("Einsum", ["m", "rf2"], ["y"], equation="ij,j->i"),
        ],
        {"x": _f(6, 4)},
        {"y": F32, "rf": F32},
        {
            "zero": np.array(0, np.int64),
            "two": np.array(2, np.int64),
            "zero1": _i(0),
            "minus1": _i(-1),
            "one": np.array(1, np.int64),
            "shape2": _i(1, 1),
            "ax": _i(1),
            "rf2": _f(3),
        },
        17,
    ),
    "where_compare_mod_pow": (
        [
            helper.make_node("Greater", ["x", "z"], ["g"]),
            helper.make_node("Mod", ["x", "three"], ["m"], fmod=1),
            helper.make_node("Pow", ["x", "two"], ["p"]),
            helper.make_node("Where", ["g", "m", "p"], ["w"]),
            helper.make_node("Max", ["w", "x", "z"], ["y"]),
            helper.make_node("Min", ["w", "x"], ["y2"]),
            helper.make_node("Softmax", ["x"], ["sm"], axis=1),
            helper.make_node("LogSoftmax", ["x"], ["lsm"], axis=0),
            helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
        ],
        {"x": _f(3, 5)},
        {"y": F32, "y2": F32, "sm": F32, "lsm": F32, "am": I64},
        {
            "z": np.array(0.1, np.float32),
            "three": np.array(0.7, np.float32),
            "two": np.array(2.0, np.float32),
        },
        17,
    ),
    "activations": (
        [
            helper.make_node("Selu", ["x"], ["a"]),
            helper.make_node("Celu", ["x"], ["b"], alpha=0.7),
            helper.make_node("HardSigmoid", ["x"], ["c"], alpha=0.3, beta=0.4),
            helper.make_node("Softsign", ["x"], ["d"]),
            helper.make_node("PRelu", ["x", "slope"], ["e"]),
            helper.make_node("Clip", ["x", "lo"], ["f"]),
            helper.make_node("ThresholdedRelu", ["x"], ["g"], alpha=0.2),
            helper.make_node("Sum", ["a", "b", "c", "d", "e", "f", "g"], ["y"]),
        ],
        {"x": _f(2, 3, 4)},
        {"y": F32},
        {"slope": _f(3, 1), "lo": np.array(-0.3, np.float32)},
        17,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_ops_match_onnx_runtime(case: str) -> None:
    match_onnx_runtime(CASES[case], case)


def test_constant_subgraphs_are_folded_at_conversion() -> None:
    nodes, inputs, outputs, inits, opset = CASES["shape_arithmetic_reshape"]
    module = convert_onnx(graph_model(nodes, inputs, outputs, inits, opset))
    # Range/Cast of constants and the (constant) Einsum operand never run per forward.
    assert "Range" in module.ops  # depends on Shape(x): stays
    assert module.ops.count("Cast") == 1
