"""Output pruning: twins cut down to the neurons an objective reads give exactly the full twin's columns
(ONNX Runtime on the unpruned model is the reference), in the order asked, with gradients, and really are
smaller: a per-neuron twin keeps only the kept neurons' sub-networks, a shared core keeps its core but
slices its readout."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from neurotwin.errors import InvalidInput, ModelStoreError
from neurotwin.runtimes.onnx_torch import (
    check_parity,
    convert_onnx,
    load_differentiable_twin,
    prune_outputs,
)
from neurotwin.store import ModelVersion
from onnx import TensorProto, helper
from torch import nn

from tests._models import make_card, write_predictor
from tests._onnx_graphs import export_nhwc, graph_model, normalize

SIZE = 24


class PerNeuronTwin(nn.Module):
    """One small conv net per neuron, results concatenated, as registered third-party twins are built."""

    def __init__(self, neurons: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3, 4, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(4, 4, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 1),
            )
            for _ in range(neurons)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images)
        return F.softplus(torch.cat([net(x) for net in self.nets], dim=1))


class FactorizedReadoutTwin(nn.Module):
    """A shared conv core and a factorized readout (spatial mask x feature weights per neuron), as in the
    bundled twin."""

    def __init__(self, neurons: int) -> None:
        super().__init__()
        self.core = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ELU(), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        )
        self.spatial = nn.Parameter(torch.rand(36, neurons) / 36)
        self.features = nn.Parameter(torch.randn(1, 8, neurons) * 0.5)
        self.bias = nn.Parameter(torch.randn(neurons) * 0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.core(normalize(images)).flatten(2)  # [N, 8, 36]
        x = (torch.matmul(x, self.spatial) * self.features).sum(dim=1)  # [N, K]
        return F.elu(x + self.bias) + 1


class GaussianReadoutTwin(nn.Module):
    """A shared core read at one learned position per neuron (grid_sample), per-neuron feature weights:
    the graph ``training.twin.GaussianReadout`` exports (positions expanded to a run-time batch size)."""

    def __init__(self, neurons: int) -> None:
        super().__init__()
        self.core = nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU())
        self.mu = nn.Parameter(torch.rand(neurons, 2) * 1.6 - 0.8)
        self.weight = nn.Parameter(torch.randn(neurons, 8) * 0.3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.core(normalize(images))
        grid = self.mu.unsqueeze(0).expand(x.shape[0], -1, -1).clamp(-1.0, 1.0).unsqueeze(2)  # [N, K, 1, 2]
        sampled = F.grid_sample(x, grid, align_corners=False).squeeze(3)  # [N, C, K]
        return F.softplus((sampled * self.weight.t().unsqueeze(0)).sum(dim=1))


TWINS = {
    "per_neuron": (PerNeuronTwin, 9),
    "factorized": (FactorizedReadoutTwin, 10),
    "gaussian": (GaussianReadoutTwin, 9),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ModelVersion, onnx.ModelProto]]:
    store = tmp_path_factory.mktemp("store")
    out = {}
    for i, (name, (cls, neurons)) in enumerate(TWINS.items()):
        torch.manual_seed(i)
        path = export_nhwc(cls(neurons), SIZE, store / f"{name}.onnx")
        card = make_card(name, neurons, SIZE, None, seed=i)
        out[name] = (write_predictor(store, name, path.read_bytes(), card), onnx.load(str(path)))
    return out


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, SIZE, SIZE, 3), dtype=np.uint8)


def _onnx_runtime(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


SUBSETS = [[3], [8, 0, 4], [1, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0]]


@pytest.mark.parametrize("name", list(TWINS))
@pytest.mark.parametrize("outputs", SUBSETS, ids=str)
def test_pruned_twin_equals_the_full_twin_on_the_kept_columns(
    stored: dict, name: str, outputs: list[int]
) -> None:
    version, model = stored[name]
    module, card = load_differentiable_twin(version, "cpu", outputs=outputs, atol=1e-5, rtol=1e-5)
    assert module.kept_outputs == tuple(outputs) and card.neuron_count >= 9  # the full card
    images = _images(5, seed=len(outputs))
    expected = _onnx_runtime(model, images)[:, outputs]  # the unpruned model, its columns in our order
    with torch.no_grad():
        got = module(torch.from_numpy(images).float()).numpy()
    assert got.shape == (5, len(outputs))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The pruned ONNX model itself is valid and agrees too (ONNX Runtime on both sides).
    pruned = prune_outputs(model, outputs)
    onnx.checker.check_model(pruned.model)
    np.testing.assert_allclose(_onnx_runtime(pruned.model, images), expected, atol=1e-5, rtol=1e-5)


def test_per_neuron_twin_keeps_only_the_kept_sub_networks(stored: dict) -> None:
    _, model = stored["per_neuron"]
    full = prune_outputs(model, list(range(9)))
    one = prune_outputs(model, [4])
    three = prune_outputs(model, [0, 4, 8])
    assert not one.fallbacks and not three.fallbacks
    assert full.parameters_after == full.parameters_before
    # 9 sub-networks of equal size: one neuron drops 8 of them, three drop 6.
    per_net = sum(p.numel() for p in PerNeuronTwin(1).parameters())
    assert one.parameters_before - one.parameters_after == 8 * per_net
    assert three.parameters_before - three.parameters_after == 6 * per_net
    assert one.nodes_after < one.nodes_before / 4
    assert three.nodes_after < one.nodes_after * 3 + 2
    kept_convs = [n for n in one.model.graph.node if n.op_type == "Conv"]
    assert len(kept_convs) == 2
    module_full, module_one = convert_onnx(model), convert_onnx(one.model)
    assert sum(b.numel() for b in module_one.buffers()) < sum(b.numel() for b in module_full.buffers()) / 4


def test_shared_core_keeps_its_core_and_slices_the_readout(stored: dict) -> None:
    _, model = stored["factorized"]
    pruned = prune_outputs(model, [6, 1])
    assert not pruned.fallbacks
    full_shapes = {tuple(t.dims) for t in model.graph.initializer}
    kept_shapes = {tuple(t.dims) for t in pruned.model.graph.initializer}
    assert {(36, 10), (1, 8, 10), (10,)} <= full_shapes  # spatial mask, feature weights, bias
    assert {(36, 2), (1, 8, 2), (2,)} <= kept_shapes
    assert not {(36, 10), (1, 8, 10), (10,)} & kept_shapes
    assert pruned.parameters_after == pruned.parameters_before - (36 + 8 + 1) * 8
    # The core is the same: its convolutions all stay.
    convs = [[n for n in m.graph.node if n.op_type == "Conv"] for m in (model, pruned.model)]
    assert len(convs[0]) == len(convs[1]) == 2


def test_gaussian_readout_samples_only_the_kept_positions(stored: dict) -> None:
    _, model = stored["gaussian"]
    pruned = prune_outputs(model, [5, 2])
    assert not pruned.fallbacks
    shapes = {tuple(t.dims) for t in pruned.model.graph.initializer}
    assert {(1, 2, 2), (1, 8, 2)} <= shapes  # positions and feature weights of the kept neurons
    assert not {(1, 9, 2), (1, 8, 9)} & shapes
    grid_samples = [n for n in pruned.model.graph.node if n.op_type == "GridSample"]
    assert len(grid_samples) == 1
    inferred = onnx.shape_inference.infer_shapes(pruned.model, data_prop=True)
    shapes_of = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    assert [d.dim_value for d in shapes_of[grid_samples[0].input[1]]][1:] == [2, 1, 2]


@pytest.mark.parametrize("name", list(TWINS))
def test_gradients_through_a_pruned_twin_equal_the_full_twins(stored: dict, name: str) -> None:
    version, model = stored[name]
    outputs = [5, 1]
    pruned, _ = load_differentiable_twin(version, "cpu", outputs=outputs, parity_images=0)
    full = convert_onnx(model)
    start = torch.rand(2, 3, SIZE, SIZE)
    grads = []
    for module, column in ((pruned, 0), (full, 5)):
        images = start.clone().requires_grad_(True)
        module.forward_chw01(images)[:, column].sum().backward()
        grads.append(images.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", list(TWINS))
def test_pruned_twins_on_the_gpu(stored: dict, name: str) -> None:
    version, model = stored[name]
    module, _ = load_differentiable_twin(version, "cuda", outputs=[4, 0])
    images = torch.from_numpy(_images(3))
    with torch.no_grad():
        got = module(images.float().cuda()).cpu().numpy()
    # TF32 convolutions on the GPU: a looser bound than on the CPU.
    np.testing.assert_allclose(got, _onnx_runtime(model, images.numpy())[:, [4, 0]], atol=2e-2, rtol=2e-2)
    chw = torch.rand(2, 3, SIZE, SIZE, device="cuda", requires_grad=True)
    module.forward_chw01(chw)[:, 0].sum().backward()
    assert chw.grad is not None and torch.isfinite(chw.grad).all()


@pytest.mark.parametrize(
    ("outputs", "message"),
    [([], "at least one"), ([2, 2, 3], "more than once"), ([9], "out of range"), ([-1], "out of range")],
)
def test_bad_output_lists_are_refused(stored: dict, outputs: list[int], message: str) -> None:
    version, model = stored["per_neuron"]
    with pytest.raises(InvalidInput, match=message):
        load_differentiable_twin(version, "cpu", outputs=outputs)
    with pytest.raises(InvalidInput, match=message):
        prune_outputs(model, outputs)


def test_pruning_leaves_the_given_model_alone(stored: dict) -> None:
    _, model = stored["factorized"]
    before = model.SerializeToString()
    prune_outputs(model, [3])
    assert model.SerializeToString() == before


def test_parity_compares_the_kept_columns(stored: dict) -> None:
    version, model = stored["per_neuron"]
    module = convert_onnx(prune_outputs(model, [2]).model)
    check_parity(version.model_path, module, n=3, outputs=[2])
    with pytest.raises(ModelStoreError, match="disagrees with ONNX Runtime"):
        check_parity(version.model_path, module, n=3, outputs=[3])


# ------------------------------------------------------------------------------------------------
# Rules one at a time, on hand-made graphs: exact where they prove a cut, whole nodes kept where not
# ------------------------------------------------------------------------------------------------

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(3)


def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


GRAPHS: dict[str, tuple[list, dict[str, np.ndarray], bool]] = {
    # name: (nodes from "x" [2, 3, 4] to "y" [2, K], initializers, whether every node can be cut)
    "gemm_transposed_weights_bias": (
        [
            helper.make_node("Flatten", ["x"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "b"], ["g"], transB=1),
            helper.make_node("Sigmoid", ["g"], ["y"]),
        ],
        {"w": _f(6, 12), "b": _f(6)},
        True,
    ),
    "transpose_unsqueeze_squeeze_reduce_mean": (
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),  # [2, 4, 3]
            helper.make_node("Unsqueeze", ["t", "ax0"], ["u"]),  # [1, 2, 4, 3]
            helper.make_node("Squeeze", ["u", "ax0"], ["s"]),
            helper.make_node("ReduceMean", ["s", "ax2"], ["y"], keepdims=0),  # [2, 4]
        ],
        {"ax0": np.array([0], np.int64), "ax2": np.array([2], np.int64)},
        True,
    ),
    "einsum_and_expand": (
        [
            helper.make_node("Einsum", ["x", "w"], ["e"], equation="bcs,sk->bk"),  # [2, 5]
            helper.make_node("Expand", ["bias", "shape"], ["bb"]),  # [1, 5] -> [2, 5]
            helper.make_node("Add", ["e", "bb"], ["y"]),
        ],
        {"w": _f(4, 5), "bias": _f(1, 5), "shape": np.array([2, 5], np.int64)},
        True,
    ),
    "slice_of_another_axis_then_concat": (
        [
            helper.make_node("Slice", ["x", "st", "en", "ax"], ["s"]),  # [2, 2, 4]
            helper.make_node("ReduceSum", ["s", "ax"], ["r"], keepdims=0),  # [2, 4]
            helper.make_node("Concat", ["r", "r"], ["y"], axis=1),  # [2, 8], one input twice
        ],
        {"st": np.array([1], np.int64), "en": np.array([3], np.int64), "ax": np.array([1], np.int64)},
        True,
    ),
    "expand_to_a_computed_shape": (
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"]),
            helper.make_node("Concat", ["n", "five"], ["target"], axis=0),  # [2, 5] at run time
            helper.make_node("Expand", ["bias", "target"], ["bb"]),  # [1, 5] -> [2, 5]
            helper.make_node("Expand", ["row", "target"], ["rr"]),  # [2, 1] -> [2, 5]
            helper.make_node("ReduceSum", ["x", "ax"], ["r"], keepdims=0),  # [2, 4]
            helper.make_node("Concat", ["r", "r"], ["r8"], axis=1),
            helper.make_node("Slice", ["r8", "zero", "five", "one"], ["r5"]),  # cuts the kept axis
            helper.make_node("Sum", ["bb", "rr", "r5"], ["y"]),
        ],
        {
            "bias": _f(1, 5),
            "row": _f(2, 1),
            "zero": np.array([0], np.int64),
            "one": np.array([1], np.int64),
            "five": np.array([5], np.int64),
            "ax": np.array([1], np.int64),
        },
        False,  # the Slice along the kept axis stays whole
    ),
    "values_read_only_inside_if_branches_stay": (
        [
            helper.make_node("ReduceMax", ["x", "ax"], ["m"], keepdims=0),  # [2, 4]
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=helper.make_graph(
                    [helper.make_node("Relu", ["m"], ["t"])],
                    "then",
                    [],
                    [helper.make_tensor_value_info("t", F32, [2, 4])],
                ),
                else_branch=helper.make_graph(
                    [helper.make_node("Neg", ["m"], ["e"])],
                    "else",
                    [],
                    [helper.make_tensor_value_info("e", F32, [2, 4])],
                ),
            ),
        ],
        {"ax": np.array([1], np.int64), "cond": np.array(True)},
        False,
    ),
    "softmax_over_neurons_is_kept_whole": (
        [
            helper.make_node("ReduceMax", ["x", "ax"], ["m"], keepdims=0),  # [2, 4]
            helper.make_node("Softmax", ["m"], ["y"], axis=1),
        ],
        {"ax": np.array([1], np.int64)},
        False,
    ),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_rules_on_small_graphs(name: str) -> None:
    nodes, inits, cut_everything = GRAPHS[name]
    x = _f(2, 3, 4)
    model = graph_model(nodes, {"x": x}, {"y": F32}, inits, opset=18)
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = full.run(None, {"x": x})[0]
    for outputs in ([1], [3, 0], list(range(expected.shape[1]))[::-1]):
        pruned = prune_outputs(model, outputs)
        if len(outputs) < expected.shape[1]:  # (all columns, reordered, cut nothing)
            assert (not pruned.fallbacks) == cut_everything, pruned.fallbacks
        with torch.no_grad():
            got = convert_onnx(pruned.model)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected[:, outputs], atol=1e-5, rtol=1e-5, err_msg=name)


def test_several_outputs_are_cut_together_when_their_neurons_agree() -> None:
    model = graph_model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        {"x": _f(2, 3)},
        {"y": F32, "z": F32},
    )
    pruned = prune_outputs(model, [2, 0])
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    y, z = ort.InferenceSession(pruned.model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(y, np.maximum(x, 0)[:, [2, 0]])
    np.testing.assert_allclose(z, -x[:, [2, 0]])
    wider = graph_model(
        [
            helper.make_node("Relu", ["x"], ["y"]),
            helper.make_node("Concat", ["x", "x"], ["z"], axis=1),
        ],
        {"x": _f(2, 3)},
        {"y": F32, "z": F32},
    )
    with pytest.raises(ModelStoreError, match="disagree on the neuron count"):
        prune_outputs(wider, [0])


def test_unpruned_loading_is_unchanged(stored: dict) -> None:
    version, _ = stored["per_neuron"]
    module, _ = load_differentiable_twin(version, "cpu")
    assert module.kept_outputs is None and module.pruning is None
    assert module(torch.from_numpy(_images(2)).float()).shape == (2, 9)
