"""Building ONNX graphs for converter tests: hand-made single-op graphs and nets exported from torch.

``graph_model`` assembles nodes into a model (inputs typed from example arrays); ``match_onnx_runtime``
runs a model through ONNX Runtime and the torch converter on the same inputs and compares every output.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from neurotwin.runtimes.onnx_torch import convert_onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

F32 = TensorProto.FLOAT
I64 = TensorProto.INT64

# One tuple per case: (nodes, inputs, outputs, initializers, opset).
Case = tuple[list, dict[str, np.ndarray], dict[str, int], dict[str, np.ndarray], int]


def graph_model(
    nodes: list,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, int],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for k, v in inputs.items()
        ],
        [helper.make_tensor_value_info(k, t, None) for k, t in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def match_onnx_runtime(case: Case, name: str, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    """Every output of the converted case equals ONNX Runtime's (shape, dtype family and values)."""
    nodes, inputs, outputs, inits, opset = case
    model = graph_model(nodes, inputs, outputs, inits, opset)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, inputs)
    module = convert_onnx(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in inputs.values()])
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert tuple(g.shape) == e.shape, name
        if e.dtype.kind in "biu":  # masks, indices, integer arithmetic: exactly
            np.testing.assert_array_equal(g.numpy(), e, err_msg=name)
        else:
            np.testing.assert_allclose(g.numpy(), e, atol=atol, rtol=rtol, err_msg=name)


def export_nhwc(net: nn.Module, size: int, path: Path, opset: int = 17) -> Path:
    """A torch net taking uint8 [N, size, size, 3] -> ONNX file with a dynamic batch, as trainers write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.zeros(2, size, size, 3, dtype=torch.uint8),),
            str(path),
            input_names=["images"],
            output_names=["rates"],
            dynamic_axes={"images": {0: "batch"}, "rates": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> ImageNet-normalized float NCHW, as twins do inside their graphs."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
