"""The parity check: a converted module against ONNX Runtime on random uint8 images."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    # Largest |diff| of each output the module returns, by name.
    per_output: dict[str, float] = field(default_factory=dict)


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

    Every output the module returns is compared with the output of the same name of the model at
    ``onnx_path`` (which may have more outputs: an ensemble's ``rates`` and ``member_rates``), value by
    value, so each member of an ensemble is checked. Runs on the module's current device; callers that
    want float32-exact semantics check on the CPU (GPU convolutions may use TF32). With ``outputs``, the
    module is a pruned one: its neuron ``j`` (last axis) is compared with neuron ``outputs[j]`` of the
    full model.
    """
    import onnxruntime as ort

    height = height or module.input_height
    width = width or module.input_width
    if not height or not width:
        raise ModelStoreError(f"{onnx_path}: input size is not fixed in the graph; pass height and width")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    available = [o.name for o in session.get_outputs()]
    missing = [name for name in module.output_names if name not in available]
    if missing:
        raise ModelStoreError(f"{onnx_path}: ONNX Runtime has no output {missing} (it has {available})")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)
    batch_dim = module.input_dims[module.input_names[0]][0]
    step = batch_dim if batch_dim else n
    starts = range(0, n, step)
    runs = [session.run(module.output_names, {module.input_names[0]: images[i : i + step]}) for i in starts]
    device = next(
        (t.device for t in itertools.chain(module.parameters(), module.buffers())), torch.device("cpu")
    )
    with torch.no_grad():
        results = [module(torch.from_numpy(images[i : i + step]).to(device).float()) for i in starts]
    results = [r if isinstance(r, tuple) else (r,) for r in results]
    report = ParityReport(n, 0.0, 0.0, 0.0)
    for k, name in enumerate(module.output_names):
        expected = np.concatenate([run[k] for run in runs])
        if outputs is not None:
            expected = np.take(expected, list(outputs), axis=-1)
        got = torch.cat([r[k] for r in results]).float().cpu().numpy()
        _compare(onnx_path, name, got, expected, atol, rtol, report)
    return report


def _compare(
    onnx_path: str | Path,
    name: str,
    got: np.ndarray,
    expected: np.ndarray,
    atol: float,
    rtol: float,
    report: ParityReport,
) -> None:
    if got.shape != expected.shape:
        raise ModelStoreError(
            f"{onnx_path}: converted twin returns {got.shape} for {name!r}, ONNX Runtime {expected.shape}"
        )
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    rel = diff / np.maximum(np.abs(expected), 1e-12)
    report.per_output[name] = float(diff.max(initial=0.0))
    report.max_abs_diff = max(report.max_abs_diff, report.per_output[name])
    report.max_rel_diff = max(report.max_rel_diff, float(rel.max(initial=0.0)))
    report.output_scale = max(report.output_scale, scale)
    bad = ~np.isfinite(got) | (diff > atol + rtol * np.abs(expected))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ModelStoreError(
            f"{onnx_path}: torch conversion disagrees with ONNX Runtime on {name!r}: max |diff| "
            f"{report.per_output[name]:.3g} (output scale {scale:.3g}, atol {atol}, rtol {rtol}), "
            f"{int(bad.sum())} of {bad.size} values off, first at {where}"
        )
