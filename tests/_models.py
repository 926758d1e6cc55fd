"""Tiny real ONNX predictors written into a model store, for tests across the project.

``make_predictor`` exports a small convolutional net with torch (uint8 NHWC in, float32 rates out,
dynamic batch, opset 17), writes it with a valid card into the store and returns its version. The
exported bytes are cached per process, so only the first call per shape and seed pays for torch.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
from neurotwin.card import ONNX_CARD_KEY, InputSpec, NeuronStats, PredictorCard
from neurotwin.store import PREDICTORS, ModelStore, ModelVersion

OPSET = 17


def neuron_ids(neurons: int) -> list[str]:
    return [f"n{i:03d}" for i in range(neurons)]


def _tiny_net(neurons: int, seed: int) -> object:
    import torch
    from torch import nn

    class TinyTwin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.readout = nn.Linear(16, neurons)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # Normalization lives in the graph, as in real twins: the server sends raw uint8 pixels.
            x = images.permute(0, 3, 1, 2).float() / 255.0
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return nn.functional.softplus(self.readout(x.mean(dim=(2, 3))))

    torch.manual_seed(seed)
    return TinyTwin().eval()


def export_onnx(net: object, size: int) -> bytes:
    """torch module taking uint8 [N, size, size, 3] -> ONNX bytes with a dynamic batch dimension."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but handles these plain graphs fast and exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
            buffer,
            input_names=["images"],
            output_names=["rates"],
            dynamic_axes={"images": {0: "batch"}, "rates": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def neuron_stats_for(model_bytes: bytes, size: int, images: int = 32, seed: int = 0) -> NeuronStats:
    """Predicted max and 99th percentile per neuron over random images (stand-ins for natural ones)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(seed).integers(0, 256, size=(images, size, size, 3), dtype=np.uint8)
    rates = session.run(None, {"images": batch})[0]
    return NeuronStats(
        image_count=images,
        predicted_max=[float(v) for v in rates.max(axis=0)],
        predicted_p99=[float(v) for v in np.percentile(rates, 99, axis=0)],
    )


@functools.lru_cache(maxsize=32)
def tiny_predictor_bytes(neurons: int, size: int, seed: int) -> tuple[bytes, NeuronStats]:
    model_bytes = export_onnx(_tiny_net(neurons, seed), size)
    return model_bytes, neuron_stats_for(model_bytes, size, seed=seed)


def write_predictor(
    store_root: str | Path,
    name: str,
    model_bytes: bytes,
    card: PredictorCard,
    version: int | None = None,
) -> ModelVersion:
    """Write model + card as a new store version (atomically, as a trainer would); card also embedded."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_CARD_KEY, card.to_json()
    store = ModelStore(store_root)
    with store.new_version(PREDICTORS, name, version) as folder:
        (folder / "model.onnx").write_bytes(model.SerializeToString())
        card.save(folder / "card.json")
    return store.resolve(PREDICTORS, name, version)


def make_card(name: str, neurons: int, size: int, stats: NeuronStats | None, seed: int) -> PredictorCard:
    return PredictorCard(
        name=name,
        neuron_ids=neuron_ids(neurons),
        input=InputSpec(height=size, width=size),
        opset=OPSET,
        description="tiny test predictor (random weights)",
        created="2026-01-01T00:00:00+00:00",
        training={"source": "tests/_models.py", "seed": seed},
        metrics={},
        neuron_stats=stats,
    )


def make_predictor(
    store_root: str | Path,
    name: str = "tiny",
    neurons: int = 5,
    size: int = 32,
    version: int | None = None,
    seed: int = 0,
) -> ModelVersion:
    """A tiny real predictor as the next (or the given) version of ``name`` in the store."""
    model_bytes, stats = tiny_predictor_bytes(neurons, size, seed)
    return write_predictor(
        store_root, name, model_bytes, make_card(name, neurons, size, stats, seed), version
    )


def make_broken_predictor(
    store_root: str | Path, name: str = "tiny", version: int | None = None, problem: str = "corrupt"
) -> ModelVersion:
    """A version that must be refused: ``corrupt`` (not ONNX) or ``neurons`` (card disagrees with graph)."""
    store = ModelStore(store_root)
    with store.new_version(PREDICTORS, name, version) as folder:
        if problem == "corrupt":
            (folder / "model.onnx").write_bytes(b"this is not an onnx model")
            make_card(name, 5, 32, None, 0).save(folder / "card.json")
        elif problem == "neurons":
            model_bytes, _ = tiny_predictor_bytes(5, 32, 0)
            (folder / "model.onnx").write_bytes(model_bytes)
            make_card(name, 7, 32, None, 0).save(folder / "card.json")
        else:
            raise ValueError(f"unknown problem {problem!r}")
    return store.resolve(PREDICTORS, name, version)


def reference_rates(version: ModelVersion, images: np.ndarray) -> np.ndarray:
    """The predictor's output computed directly with ONNX Runtime (what the server must return)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]


def random_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
