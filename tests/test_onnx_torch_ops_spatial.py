"""Convolution, pooling, normalization and resampling ops, in settings exporters rarely
produce, each against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from tests._onnx_graphs import F32, Case, match_onnx_runtime

RNG = np.random.default_rng(0)


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


CASES: dict[str, Case] = {
    # name: (nodes, inputs, outputs, initializers, opset)
    "conv_same_upper_stride2": (
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        {"x": _f(2, 3, 9, 9)},
        {"y": F32},
        {"w": _f(4, 3, 4, 4)},
        17,
    ),
    "conv_asymmetric_pads_dilated_grouped": (
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 1, 2, 1], dilations=[2, 1], group=2)],
        {"x": _f(1, 4, 8, 7)},
        {"y": F32},
        {"w": _f(6, 2, 3, 3), "b": _f(6)},
        17,
    ),
    "conv_transpose_output_shape": (
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[10, 9])],
        {"x": _f(1, 3, 5, 4)},
        {"y": F32},
        {"w": _f(3, 2, 3, 3)},
        17,
    ),
    "conv_transpose_asymmetric": (
        [
            helper.make_node(
                "ConvTranspose",
                ["x", "w", "b"],
                ["y"],
                strides=[2, 2],
                pads=[1, 0, 0, 1],
                output_padding=[1, 1],
            )
        ],
        {"x": _f(1, 3, 4, 4)},
        {"y": F32},
        {"w": _f(3, 2, 3, 3), "b": _f(2)},
        17,
    ),
    "max_pool_same_upper_ceil": (
        [
            helper.make_node(
                "MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"
            )
        ],
        {"x": _f(1, 2, 7, 8)},
        {"y": F32},
        {},
        17,
    ),
    "avg_pool_asymmetric_exclude_pad": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 2], pads=[0, 1, 2, 0])],
        {"x": _f(1, 2, 6, 5)},
        {"y": F32},
        {},
        17,
    ),
    "avg_pool_asymmetric_include_pad": (
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                pads=[1, 0, 2, 1],
                count_include_pad=1,
                strides=[2, 1],
            )
        ],
        {"x": _f(1, 2, 6, 5)},
        {"y": F32},
        {},
        17,
    ),
    "global_max_pool_lrn": (
        [
            helper.make_node("LRN", ["x"], ["a"], size=3, alpha=0.01, beta=0.7, bias=1.5),
            helper.make_node("GlobalMaxPool", ["a"], ["y"]),
        ],
        {"x": _f(2, 6, 3, 3)},
        {"y": F32},
        {},
        17,
    ),
    "resize_nearest_asymmetric_floor_scales": (
        [
            helper.make_node(
                "Resize",
                ["x", "", "s"],
                ["y"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        ],
        {"x": _f(1, 2, 5, 6)},
        {"y": F32},
        {"s": np.array([1, 1, 1.7, 0.6], np.float32)},
        17,
    ),
    "resize_nearest_half_pixel_round": (
        [helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="nearest")],
        {"x": _f(1, 2, 5, 6)},
        {"y": F32},
        {"sz": _i(1, 2, 9, 4)},
        17,
    ),
    "resize_linear_asymmetric": (
        [
            helper.make_node(
                "Resize", ["x", "", "s"], ["y"], mode="linear", coordinate_transformation_mode="asymmetric"
            )
        ],
        {"x": _f(1, 2, 5, 6)},
        {"y": F32},
        {"s": np.array([1, 1, 2.5, 1.5], np.float32)},
        17,
    ),
    "resize_linear_antialias_down": (
        [helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear", antialias=1)],
        {"x": _f(1, 2, 17, 16)},
        {"y": F32},
        {"sz": _i(1, 2, 5, 7)},
        18,
    ),
    "resize_cubic_exclude_outside": (
        [
            helper.make_node(
                "Resize", ["x", "", "", "sz"], ["y"], mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5
            )
        ],
        {"x": _f(1, 2, 6, 7)},
        {"y": F32},
        {"sz": _i(1, 2, 11, 5)},
        17,
    ),
    "resize_axes_opset18": (
        [
            helper.make_node(
                "Resize",
                ["x", "", "", "sz"],
                ["y"],
                mode="linear",
                axes=[3, 2],
                coordinate_transformation_mode="align_corners",
            )
        ],
        {"x": _f(1, 2, 6, 7)},
        {"y": F32},
        {"sz": _i(9, 4)},
        18,
    ),
    "grid_sample_nearest_reflection_align": (
        [
            helper.make_node(
                "GridSample", ["x", "g"], ["y"], mode="nearest", padding_mode="reflection", align_corners=1
            )
        ],
        {"x": _f(2, 3, 5, 6), "g": (RNG.random((2, 4, 3, 2)) * 2.4 - 1.2).astype(np.float32)},
        {"y": F32},
        {},
        17,
    ),
    "layer_norm_instance_norm_gemm_trans": (
        [
            helper.make_node("InstanceNormalization", ["x", "s", "b"], ["a"], epsilon=1e-3),
            helper.make_node("Flatten", ["a"], ["f"], axis=1),
            helper.make_node("LayerNormalization", ["f", "ls"], ["l"], axis=-1),
            helper.make_node("Gemm", ["l", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0),
        ],
        {"x": _f(2, 3, 2, 2)},
        {"y": F32},
        {"s": _f(3), "b": _f(3), "ls": _f(12), "w": _f(5, 12), "c": _f(5)},
        17,
    ),
    "global_average_pool_3d": (
        [helper.make_node("GlobalAveragePool", ["x"], ["y"])],
        {"x": _f(2, 3, 4, 5, 2)},
        {"y": F32},
        {},
        17,
    ),
    "group_norm_per_group_scale_opset18": (
        [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, epsilon=1e-3)],
        {"x": _f(2, 6, 3, 3)},
        {"y": F32},
        {"s": _f(2), "b": _f(2)},
        18,
    ),
    "group_norm_per_channel_scale_opset21": (
        [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3)],
        {"x": _f(2, 6, 4)},
        {"y": F32},
        {"s": _f(6), "b": _f(6)},
        21,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_ops_match_onnx_runtime(case: str) -> None:
    match_onnx_runtime(CASES[case], case)
