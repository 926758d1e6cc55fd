"""The ONNX -> torch converter on whole nets: parity with ONNX Runtime on exported nets, gradients,
devices, trainable initializers, unsupported ops refused at conversion time, loading a twin from the
store. Single ops are tested in ``test_onnx_torch_ops_*.py``."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from neurotwin.errors import ModelStoreError
from neurotwin.runtimes.onnx_torch import (
    UnsupportedOperator,
    check_parity,
    convert_onnx,
    load_differentiable_twin,
)
from onnx import TensorProto, helper
from torch import nn

from tests._models import make_predictor
from tests._onnx_graphs import export_nhwc, graph_model, normalize

# ------------------------------------------------------------------------------------------------
# Small predictors exported from torch (uint8 NHWC in, rates out), as a trainer would write them
# ------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """conv + batch norm (kept unfused: it follows a pool) + relu + pools + gemm."""

    def __init__(self, neurons: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, neurons)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(normalize(images)))
        x = self.bn(F.max_pool2d(x, 2))
        x = F.elu(self.conv2(F.leaky_relu(x, 0.1)))
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x.flatten(1)
        return F.softplus(self.fc(x))


class GaussianReadoutNet(nn.Module):
    """A core plus a Gaussian-style readout: one learned position per neuron, read with grid_sample."""

    def __init__(self, neurons: int = 5) -> None:
        super().__init__()
        self.core = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        )
        self.position = nn.Parameter(torch.rand(neurons, 2) * 1.6 - 0.8)
        self.features = nn.Parameter(torch.randn(neurons, 8) * 0.3)
        self.bias = nn.Parameter(torch.rand(neurons))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.core(normalize(images))
        n = x.shape[0]
        grid = self.position.view(1, -1, 1, 2).expand(n, -1, -1, -1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        sampled = sampled.squeeze(-1)  # [N, C, K]
        return F.elu(torch.einsum("nck,kc->nk", sampled, self.features) + self.bias) + 1


class ResizeNet(nn.Module):
    """Resizes inside the graph in the modes torch exports: bilinear (both corner modes), bicubic, nearest."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images)
        a = F.interpolate(x, size=(30, 30), mode="bilinear", align_corners=False)
        b = F.interpolate(x, size=(30, 30), mode="bilinear", align_corners=True)
        c = F.interpolate(x, size=(30, 30), mode="bicubic", align_corners=False)
        d = F.interpolate(x[:, :, :15, :15], scale_factor=2.0, mode="nearest")
        x = self.conv(a + b + c + d)
        x = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)  # downsample too
        return torch.sigmoid(self.fc(x.mean(dim=1).flatten(1)))


class MiscNet(nn.Module):
    """Ops exporters emit less often: transposed conv, split, strided and reversed slices, padding
    modes, clip, softmax, hard activations, layer/group norm, where, reductions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv(normalize(images))  # [N, 8, 8, 8]
        a, b = torch.split(x, 4, dim=1)
        a = self.up(F.hardswish(a))[:, :, ::2, ::2]  # back to 8 x 8
        b = torch.flip(F.pad(b, (1, 1, 1, 1), mode="reflect"), dims=[3])[:, :, 1:-1, 1:-1]
        x = torch.cat([a, F.hardsigmoid(b)], dim=1)
        x = self.gn(x)
        x = torch.where(x > 0, x, 0.5 * x).clamp(-3.0, 3.0)
        x = torch.sqrt(x.abs() + 1e-3) * torch.sign(x) + F.gelu(x) + torch.tanh(x) ** 2
        pooled = x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)) * 0.1 + x.sum(dim=(2, 3)) * 0.01
        y = self.fc(self.ln(pooled))
        return torch.softmax(y, dim=1) * 10.0 + y.pow(2) * 0.1


NETS = {
    "conv_bn_pool_gemm": (ConvNet, 16),
    "grid_sample_readout": (GaussianReadoutNet, 24),
    "resize_in_graph": (ResizeNet, 24),
    "misc_ops": (MiscNet, 16),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module, int]]:
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for i, (name, (cls, size)) in enumerate(NETS.items()):
        torch.manual_seed(i)
        net = cls().eval()
        out[name] = (export_nhwc(net, size, folder / f"{name}.onnx"), net, size)
    return out


@pytest.mark.parametrize("name", list(NETS))
def test_exported_nets_match_onnx_runtime(
    exported: dict[str, tuple[Path, nn.Module, int]], name: str
) -> None:
    path, _, size = exported[name]
    module = convert_onnx(path)
    report = check_parity(path, module, n=6, atol=1e-4, rtol=1e-4, height=size, width=size)
    assert report.images == 6 and report.max_abs_diff < 1e-4


def test_grid_sample_and_resize_ops_are_really_in_the_graphs(exported: dict) -> None:
    ops = {
        name: {n.op_type for n in onnx.load(str(path)).graph.node} for name, (path, _, _) in exported.items()
    }
    assert "GridSample" in ops["grid_sample_readout"]
    assert "Resize" in ops["resize_in_graph"]
    assert {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "Gemm"} <= ops["conv_bn_pool_gemm"]
    assert {"ConvTranspose", "Split", "Slice", "Pad", "Clip", "Softmax"} <= ops["misc_ops"]


def test_gradients_reach_the_pixels_and_chw01_path_agrees(exported: dict) -> None:
    path, net, size = exported["grid_sample_readout"]
    module = convert_onnx(path)
    images = torch.rand(3, 3, size, size, requires_grad=True)
    rates = module.forward_chw01(images)
    rates[:, 2].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # The float NHWC 0..255 path equals the original torch net on the same (integer-valued) pixels.
    pixels = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        ours = module(pixels.float())
        theirs = net(pixels)
        via_chw = module.forward_chw01(pixels.permute(0, 3, 1, 2).float() / 255.0)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_chw, ours, atol=1e-4, rtol=1e-4)


def test_forward_chw01_resizes_other_sizes(exported: dict) -> None:
    path, _, size = exported["conv_bn_pool_gemm"]
    module = convert_onnx(path)
    images = torch.rand(2, 3, size * 2, size * 2, requires_grad=True)
    out = module.forward_chw01(images)
    out.sum().backward()
    assert out.shape == (2, 6) and images.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", list(NETS))
def test_exported_nets_on_the_gpu(exported: dict[str, tuple[Path, nn.Module, int]], name: str) -> None:
    path, _, size = exported[name]
    module = convert_onnx(path).to("cuda")
    # Shape arithmetic stays on the CPU while data runs on the GPU; TF32 convolutions need a looser bound.
    check_parity(path, module, n=4, atol=2e-2, rtol=2e-2, height=size, width=size)
    images = torch.rand(2, 3, size, size, device="cuda", requires_grad=True)
    module.forward_chw01(images).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_trainable_initializers_become_parameters(exported: dict) -> None:
    path, _, size = exported["conv_bn_pool_gemm"]
    frozen = convert_onnx(path)
    trainable = convert_onnx(path, trainable=True)
    assert not list(frozen.parameters())
    params = list(trainable.parameters())
    assert params and all(p.requires_grad for p in params)
    x = torch.randint(0, 256, (2, size, size, 3)).float()
    torch.testing.assert_close(trainable(x), frozen(x))
    trainable(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_parity_check_fails_loudly_on_a_wrong_conversion(exported: dict) -> None:
    path, _, size = exported["conv_bn_pool_gemm"]
    module = convert_onnx(path)
    buffer = next(b for b in module.buffers() if b.dim() == 2)  # the readout weights
    with torch.no_grad():
        buffer.add_(0.5)
    with pytest.raises(ModelStoreError, match="disagrees with ONNX Runtime"):
        check_parity(path, module, height=size, width=size)


def test_load_differentiable_twin_from_the_store(tmp_path: Path) -> None:
    version = make_predictor(tmp_path, name="twin", neurons=4, size=32)
    module, card = load_differentiable_twin(version, "cpu")
    assert card.neuron_count == 4 and card.input.height == 32
    assert module.input_height == 32 and module.input_width == 32
    assert not any(p.requires_grad for p in module.parameters())
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    module.forward_chw01(images).sum().backward()
    assert images.grad is not None


# ------------------------------------------------------------------------------------------------
# Unsupported ops: refused at conversion, every one named
# ------------------------------------------------------------------------------------------------


def test_unsupported_ops_are_named_at_conversion_time() -> None:
    x = np.zeros((1, 4), np.float32)
    model = graph_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Hardmax", ["a"], ["b"]),
            helper.make_node("Det", ["b"], ["c"]),
            helper.make_node("Hardmax", ["c"], ["d"]),
            helper.make_node("FusedThing", ["d"], ["y"], domain="com.example"),
        ],
        {"x": x},
        {"y": TensorProto.FLOAT},
    )
    with pytest.raises(UnsupportedOperator) as info:
        convert_onnx(model)
    assert info.value.ops == {"Hardmax": 2, "Det": 1, "com.example.FusedThing": 1}
    assert "Hardmax (x2)" in str(info.value) and "Det" in str(info.value)
    assert isinstance(info.value, ModelStoreError)


def test_unsupported_settings_are_refused_at_conversion_time() -> None:
    x = np.zeros((1, 1, 4, 4), np.float32)
    model = graph_model(
        [
            helper.make_node(
                "Resize",
                ["x", "", "s"],
                ["y"],
                mode="linear",
                coordinate_transformation_mode="tf_crop_and_resize",
            )
        ],
        {"x": x},
        {"y": TensorProto.FLOAT},
        {"s": np.array([1, 1, 2, 2], np.float32)},
    )
    with pytest.raises(UnsupportedOperator, match="tf_crop_and_resize"):
        convert_onnx(model)


def test_onnx_bytes_in_memory_convert_too() -> None:
    buffer = io.BytesIO()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            nn.Sequential(nn.Flatten(), nn.Linear(12, 2)),
            (torch.zeros(1, 2, 2, 3),),
            buffer,
            opset_version=17,
            dynamo=False,
        )
    module = convert_onnx(onnx.load_from_string(buffer.getvalue()))
    assert module(torch.zeros(1, 2, 2, 3)).shape == (1, 2)
