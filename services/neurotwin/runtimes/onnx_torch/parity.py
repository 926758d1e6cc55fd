"""The parity check: a converted module against ONNX Runtime on random uint8 images."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neurotwin.errors import ModelStoreError

from .module import OnnxTorchModule


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
    outputs: Sequence[int] | None = None,
) -> ParityReport:
    """Compare the module with ONNX Runtime on ``n`` random uint8 images; raise ModelStoreError on mismatch.

    Runs on the module's current device; callers that want float32-exact semantics check on the CPU
    (GPU convolutions may use TF32). With ``outputs``, the module is a pruned one: its column ``j`` is
    compared with column ``outputs[j]`` of the full model at ``onnx_path``.
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
    if outputs is not None:
        expected = expected[:, list(outputs)]
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
