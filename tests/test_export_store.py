"""Export to ONNX with parity, the card in the graph's metadata, the store round trip and its refusals,
and registering a foreign ONNX predictor."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from neurotwin.card import ONNX_CARD_KEY, PredictorCard
from neurotwin.errors import InvalidInput, ModelStoreError, NotFound
from neurotwin.imagecodec import encode_png
from neurotwin.store import PREDICTORS, ModelStore, embedded_card, validate_predictor
from neurotwin.training.export import (
    OPSET,
    ParityError,
    build_card,
    export_onnx,
    export_twin,
    neuron_stats,
    parity_check,
    write_predictor,
)
from neurotwin.training.register import register_onnx
from neurotwin.training.twin import SessionSpec, TwinConfig, TwinModel, build_twins
from torch import nn

SIZE = 32


def tiny_twin(readout: str = "factorized", neurons: int = 4, seed: int = 0, ensemble: int = 1) -> TwinModel:
    """An untrained but complete twin (pretrained trunk to block 1); readout weights made non-trivial."""
    config = TwinConfig(stages=(1,), input_size=SIZE, hidden=8, readout=readout, ensemble=ensemble)
    twin = build_twins(config, [SessionSpec("s", neurons)], seed=seed)["s"]
    with torch.no_grad():
        for head in twin.heads:
            head.readout.weight.normal_(0, 0.5)
            if readout == "gaussian":
                head.readout.mu.uniform_(-0.8, 0.8)
    return twin.eval()


def images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def card_for(twin: TwinModel, name: str = "t", neurons: int = 4) -> PredictorCard:
    return build_card(
        name=name,
        neuron_ids=[f"n{k}" for k in range(neurons)],
        image_size=(SIZE, SIZE),
        training={"seed": 0},
        metrics={"test": {"median_r": 0.5}},
        stats=None,
    )


@pytest.fixture(scope="module")
def factorized() -> tuple[TwinModel, bytes]:
    twin = tiny_twin("factorized")
    return twin, export_onnx(twin)


# ------------------------------------------------------------------------------------------------
# Export and parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("readout", ["factorized", "gaussian"])
def test_export_matches_torch_for_any_batch_and_image_size(readout: str) -> None:
    twin = tiny_twin(readout, ensemble=2)
    model_bytes = export_onnx(twin)
    model = onnx.load_from_string(model_bytes)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    ops = {node.op_type for node in model.graph.node}
    assert "Resize" in ops and "Cast" in ops, "resize and cast live inside the graph"
    if readout == "gaussian":
        assert "GridSample" in ops
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for shape in [(1, SIZE, SIZE, 3), (7, SIZE, SIZE, 3), (3, 45, 60, 3)]:
        batch = images(shape[0], seed=shape[0])
        if shape[1] != SIZE:
            batch = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
        got = session.run(None, {"images": batch})[0]
        expected = twin.predict(batch)
        assert got.shape == (shape[0], 4) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    report = parity_check(twin, model_bytes, images(9))
    assert report["max_abs_diff"] <= report["tolerance"]


def test_parity_check_fails_loudly_on_a_different_graph(factorized: tuple[TwinModel, bytes]) -> None:
    twin, _ = factorized
    other_bytes = export_onnx(tiny_twin("factorized", seed=1))
    with pytest.raises(ParityError, match="differs from torch"):
        parity_check(twin, other_bytes, images(4))


def test_neuron_stats() -> None:
    predicted = np.arange(200, dtype=np.float32).reshape(100, 2)
    stats = neuron_stats(predicted, measured=predicted * 2)
    assert stats.image_count == 100
    assert stats.predicted_max == [198.0, 199.0]
    assert stats.measured_max == [396.0, 398.0]
    assert stats.predicted_p99[0] == pytest.approx(np.percentile(predicted[:, 0], 99), abs=1e-4)


def test_export_twin_writes_a_valid_version_with_the_card_embedded(
    tmp_path: Path, factorized: tuple[TwinModel, bytes]
) -> None:
    twin, _ = factorized
    store = ModelStore(tmp_path)
    train = images(20, seed=3)
    measured = np.abs(np.random.default_rng(0).normal(size=(20, 4))).astype(np.float32)
    version, card = export_twin(
        twin,
        store=store,
        name="twin",
        neuron_ids=["a", "b", "c", "d"],
        image_size=(SIZE, SIZE),
        parity_images=images(5, seed=4),
        stats_images=train,
        stats_measured=measured,
        training={"sha256": "f" * 64, "split": {"train": list(range(20))}, "seed": 0},
        metrics={"test": {"median_r": 0.4}},
    )
    assert version.path == tmp_path / PREDICTORS / "twin" / "1"
    assert sorted(p.name for p in version.path.iterdir()) == [
        "card.json",
        "integrity.json",
        "model.onnx",
        "reference.npz",
    ]
    loaded = validate_predictor(version)
    assert loaded.neuron_ids == ["a", "b", "c", "d"] and loaded.opset == OPSET
    assert loaded.training["parity"]["max_abs_diff"] <= loaded.training["parity"]["tolerance"]
    assert loaded.neuron_stats is not None and loaded.neuron_stats.image_count == 20
    assert loaded.neuron_stats.measured_max == [round(float(v), 5) for v in measured.max(0)]
    # The predicted statistics are what ONNX Runtime computes on the training images.
    rates = ort.InferenceSession(str(version.model_path)).run(None, {"images": train})[0]
    np.testing.assert_allclose(loaded.neuron_stats.predicted_max, rates.max(0), atol=1e-4)
    embedded = embedded_card(onnx.load(str(version.model_path)))
    assert embedded is not None and json.loads(embedded) == card.to_dict() == loaded.to_dict()


# ------------------------------------------------------------------------------------------------
# Store round trip and refusals
# ------------------------------------------------------------------------------------------------


def test_store_versions_resolve_latest_and_pinned(
    tmp_path: Path, factorized: tuple[TwinModel, bytes]
) -> None:
    twin, model_bytes = factorized
    store = ModelStore(tmp_path)
    for _ in range(3):
        write_predictor(store, "twin", model_bytes, card_for(twin))
    assert store.names(PREDICTORS) == ["twin"]
    assert store.versions(PREDICTORS, "twin") == [1, 2, 3]
    assert store.resolve(PREDICTORS, "twin").version == 3
    assert store.resolve(PREDICTORS, "twin", 2).path == tmp_path / PREDICTORS / "twin" / "2"
    with pytest.raises(NotFound, match="no version 7"):
        store.resolve(PREDICTORS, "twin", 7)
    with pytest.raises(NotFound):
        store.resolve(PREDICTORS, "absent")
    assert not [p for p in (tmp_path / PREDICTORS / "twin").iterdir() if p.name.startswith(".")], (
        "no staging left"
    )


def _version_with(tmp_path: Path, model_bytes: bytes, card: PredictorCard) -> object:
    store = ModelStore(tmp_path)
    with store.new_version(PREDICTORS, "broken") as folder:
        (folder / "model.onnx").write_bytes(model_bytes)
        card.save(folder / "card.json")
    return store.resolve(PREDICTORS, "broken")


def test_validate_missing_model_file(tmp_path: Path, factorized: tuple[TwinModel, bytes]) -> None:
    twin, model_bytes = factorized
    version = _version_with(tmp_path, model_bytes, card_for(twin))
    version.model_path.unlink()
    with pytest.raises(ModelStoreError, match=r"missing model\.onnx"):
        validate_predictor(version)


def test_validate_missing_card(tmp_path: Path, factorized: tuple[TwinModel, bytes]) -> None:
    twin, model_bytes = factorized
    version = _version_with(tmp_path, model_bytes, card_for(twin))
    version.card_path.unlink()
    with pytest.raises(ModelStoreError, match=r"card\.json: missing"):
        validate_predictor(version)


def test_validate_corrupt_onnx(tmp_path: Path, factorized: tuple[TwinModel, bytes]) -> None:
    twin, model_bytes = factorized
    version = _version_with(tmp_path, model_bytes[: len(model_bytes) // 3], card_for(twin))
    with pytest.raises(ModelStoreError, match="not a valid ONNX model"):
        validate_predictor(version)


def test_validate_neuron_count_mismatch(tmp_path: Path, factorized: tuple[TwinModel, bytes]) -> None:
    twin, model_bytes = factorized
    card = card_for(twin, neurons=6)
    version = _version_with(tmp_path, model_bytes, card)
    with pytest.raises(ModelStoreError, match="returns 4 neurons, card lists 6"):
        validate_predictor(version)
    # And the writer refuses to create such a version at all.
    with pytest.raises(ModelStoreError, match="card lists 6"):
        write_predictor(ModelStore(tmp_path / "other"), "x", model_bytes, card)
    assert ModelStore(tmp_path / "other").versions(PREDICTORS, "x") == []


# ------------------------------------------------------------------------------------------------
# Foreign ONNX
# ------------------------------------------------------------------------------------------------


class ForeignNet(nn.Module):
    """What another lab might export: its own preprocessing, 5 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 5, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return torch.exp(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))))


def foreign_onnx(
    path: Path, *, opset: int = 17, dynamic_size: bool = False, float_input: bool = False
) -> Path:
    net = ForeignNet().eval()
    example = torch.zeros(1, 24, 24, 3, dtype=torch.float32 if float_input else torch.uint8)
    axes = {0: "n", 1: "h", 2: "w"} if dynamic_size else {0: "n"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buffer,
            input_names=["pixels"],
            output_names=["out"],
            dynamic_axes={"pixels": axes, "out": {0: "n"}},
            opset_version=opset,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())
    return path


def write_images(folder: Path, count: int, size: int) -> Path:
    folder.mkdir()
    for i, img in enumerate(images(count, size=size, seed=10)):
        (folder / f"im{i:02d}.png").write_bytes(encode_png(img))
    return folder


def test_register_foreign_onnx_with_reference_images(tmp_path: Path) -> None:
    model = foreign_onnx(tmp_path / "foreign.onnx")
    refs = write_images(tmp_path / "refs", 6, size=40)  # other size: resized to the graph's 24 x 24
    store = ModelStore(tmp_path / "store")
    version, card = register_onnx(model, name="foreign", store=store, images=refs)
    assert str(version) == "predictors/foreign/1"
    loaded = validate_predictor(version)
    assert loaded.neuron_ids == [f"foreign_{k}" for k in range(5)]
    assert (loaded.input.height, loaded.input.width) == (24, 24)
    assert loaded.neuron_stats is not None and loaded.neuron_stats.image_count == 6
    assert loaded.training["reference_images"]["count"] == 6
    assert embedded_card(onnx.load(str(version.model_path))) == card.to_json()
    # The graph itself is untouched: same outputs as the file we were given.
    batch = images(2, size=24)
    before = ort.InferenceSession(str(model)).run(None, {"pixels": batch})[0]
    after = ort.InferenceSession(str(version.model_path)).run(None, {"pixels": batch})[0]
    np.testing.assert_array_equal(before, after)
    again, _ = register_onnx(model, name="foreign", store=store, neuron_ids=list("abcde"))
    assert again.version == 2 and validate_predictor(again).neuron_ids == list("abcde")


def test_register_dynamic_size_needs_images_or_size(tmp_path: Path) -> None:
    model = foreign_onnx(tmp_path / "dyn.onnx", dynamic_size=True)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(InvalidInput, match="dynamic"):
        register_onnx(model, name="dyn", store=store)
    version, card = register_onnx(model, name="dyn", store=store, size=(48, 48))
    assert (card.input.height, card.input.width) == (48, 48)
    assert validate_predictor(version).neuron_count == 5


def test_register_refuses_wrong_graphs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelStoreError, match="opset 16 is below the minimum 17"):
        register_onnx(foreign_onnx(tmp_path / "old.onnx", opset=16), name="x", store=store)
    with pytest.raises(ModelStoreError, match="must be uint8"):
        register_onnx(foreign_onnx(tmp_path / "float.onnx", float_input=True), name="x", store=store)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelStoreError, match="not a valid ONNX model"):
        register_onnx(tmp_path / "junk.onnx", name="x", store=store)
    with pytest.raises(InvalidInput, match="3 neuron ids given for a model with 5"):
        register_onnx(foreign_onnx(tmp_path / "ok.onnx"), name="x", store=store, neuron_ids=["a", "b", "c"])
    assert store.versions(PREDICTORS, "x") == []


def test_opset_16_version_is_refused_by_validation(tmp_path: Path) -> None:
    model = foreign_onnx(tmp_path / "old.onnx", opset=16)
    card = build_card(
        name="old",
        neuron_ids=[str(k) for k in range(5)],
        image_size=(24, 24),
        training={},
        metrics={},
        stats=None,
    )
    store = ModelStore(tmp_path / "store")
    with store.new_version(PREDICTORS, "old") as folder:
        (folder / "model.onnx").write_bytes(model.read_bytes())
        card.save(folder / "card.json")
    with pytest.raises(ModelStoreError, match="opset 16 is below the minimum 17"):
        validate_predictor(store.resolve(PREDICTORS, "old"))


def test_card_key_constant_is_used(factorized: tuple[TwinModel, bytes], tmp_path: Path) -> None:
    twin, model_bytes = factorized
    version = write_predictor(ModelStore(tmp_path), "k", model_bytes, card_for(twin))
    keys = [p.key for p in onnx.load(str(version.model_path)).metadata_props]
    assert keys.count(ONNX_CARD_KEY) == 1


@pytest.mark.parametrize("readout", ["factorized", "gaussian"])
def test_exported_twin_loads_as_a_differentiable_module(tmp_path: Path, readout: str) -> None:
    """The synthesizer optimizes images through the stored graph: every op we export must convert."""
    from neurotwin.runtimes.onnx_torch import load_differentiable_twin

    twin = tiny_twin(readout)
    version = write_predictor(ModelStore(tmp_path), "d", export_onnx(twin), card_for(twin))
    module, card = load_differentiable_twin(version, "cpu", parity_images=2)
    assert card.neuron_count == 4
    x = torch.from_numpy(images(2)).float().requires_grad_(True)
    module(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


REPO = Path(__file__).resolve().parent.parent
COWLEY = REPO.parent / "shared" / "data" / "cowley_v4"


def test_bundled_twin_validates_and_predicts() -> None:
    version = ModelStore(REPO / "model_store").resolve(PREDICTORS, "v4-201025")
    card = validate_predictor(version)
    assert card.neuron_count == 89 and card.training["session"] == "201025"
    assert version.model_path.stat().st_size < 10e6  # small enough to live in git
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    rates = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert rates.shape == (3, 89) and np.isfinite(rates).all() and (rates >= 0).all()


@pytest.mark.skipif(not COWLEY.is_dir(), reason="needs ../shared/data/cowley_v4 (not on a fresh machine)")
def test_bundled_twin_reproduces_its_recorded_test_accuracy() -> None:
    from neurotwin.training.datasets import load_recording
    from neurotwin.training.evaluate import pearson_per_neuron

    version = ModelStore(REPO / "model_store").resolve(PREDICTORS, "v4-201025")
    card = validate_predictor(version)
    rec = load_recording(COWLEY, session="201025")
    assert rec.sha256 == card.training["sha256"]
    test = np.asarray(card.training["split"]["test"])
    session = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {session.get_inputs()[0].name: rec.images[test]})[0]
    r = pearson_per_neuron(predicted, rec.responses[:, test].T)
    assert np.median(r) == pytest.approx(card.metrics["test"]["median_r"], abs=1e-3)
