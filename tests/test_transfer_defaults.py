"""The synthesizer's transfer defaults (engines/transfer_defaults.py) through the real service: screened
starts, code clip, blur, and agreement of an ensemble twin's members (a real exported ensemble ONNX)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from neurotwin.engines.objectives import Agreement, Neuron, diversity, neuron
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.synthesis import SynthesisRequest, synthesize
from neurotwin.engines.transfer_defaults import TransferDefaults
from neurotwin.errors import InvalidInput
from neurotwin.server.synthesizer import Settings, SynthesizerService
from neurotwin.store import ModelStore
from neurotwin.training.export import export_twin
from neurotwin.v1 import synthesizer_pb2 as pb

from tests.test_export_store import SIZE, images, tiny_twin

ROOT = Path(__file__).resolve().parents[1]
NEURONS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a 3-member ensemble twin, a single twin, and the bundled hidden-code GAN."""
    root = tmp_path_factory.mktemp("store")
    for name, members in (("ens", 3), ("single", 1)):
        export_twin(
            tiny_twin("gaussian", neurons=NEURONS, ensemble=members),
            store=ModelStore(root),
            name=name,
            neuron_ids=[f"n{k}" for k in range(NEURONS)],
            image_size=(SIZE, SIZE),
            parity_images=images(6, seed=1),
            stats_images=images(12, seed=2),
            stats_measured=None,
            training={"seed": 0},
            metrics={},
        )
    shutil.copytree(ROOT / "model_store" / "generators" / "v4-dcgan-h2", root / "generators" / "v4-dcgan-h2")
    return root


def _request(model: str, **kw: object) -> pb.SynthesizeRequest:
    return pb.SynthesizeRequest(
        model=model,
        objective=pb.Objective(kind=pb.Objective.SINGLE_NEURON, neurons=[2]),
        num_images=2,
        seed=5,
        **kw,  # type: ignore[arg-type]
    )


def test_ensemble_twin_synthesizes_on_agreeing_members(store: Path) -> None:
    # By default the members' mean is synthesized for (it transferred best); soft-min on request.
    default = SynthesizerService(Settings(model_store=str(store), device="cpu"), start=False)
    try:
        loaded, request = default.build(_request("ens", budget=3))
        assert loaded.pair.twin.member_count == 3 and isinstance(request.objective, Neuron)
    finally:
        default.stop()
    settings = Settings(model_store=str(store), device="cpu", twin_members="softmin")
    service = SynthesizerService(settings, start=False)
    try:
        loaded, request = service.build(_request("ens", budget=3))
        assert loaded.pair.twin.member_count == 3
        objective = request.objective
        assert isinstance(objective, Agreement) and objective.aggregate == "softmin"
        # The temperature is relative to the neuron's predicted natural maximum from the card.
        top = loaded.card.neuron_stats.predicted_max[2]
        assert objective.temperature == pytest.approx(0.1 * top)
        job = service.scheduler.submit(loaded.pair, request)
        service.scheduler.run_until_idle()
        result = job.result(timeout=0)
        pixels = torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            members = loaded.pair.twin.forward_chw01(pixels, resize=False)
        assert members.shape == (2, 3, NEURONS)
        # What the service reports is the members' mean; the score is their agreement.
        np.testing.assert_allclose(result.rates, members.mean(1).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.score, objective(members).numpy(), rtol=1e-4, atol=1e-5)
        # A single twin keeps the plain objective.
        _, plain = service.build(_request("single", budget=3))
        assert isinstance(plain.objective, Neuron)
    finally:
        service.stop()


def test_settings_reach_every_request(store: Path) -> None:
    settings = Settings(
        model_store=str(store),
        device="cpu",
        init_candidates=64,
        gradient_clip_norm=1.5,
        gradient_blur=0.02,
        twin_members="mean",
        member_disagreement=0.5,
    )
    service = SynthesizerService(settings, start=False)
    try:
        _, gradient = service.build(_request("single", budget=3))
        assert gradient.init_candidates == 64 and gradient.gradient is not None
        assert gradient.gradient.clip_norm == 1.5
        assert callable(gradient.transforms) and gradient.transforms.keywords == {"blur": 0.02}
        loaded, cmaes = service.build(_request("ens", budget=40, method=pb.SynthesizeRequest.CMAES))
        assert cmaes.init_candidates == 64 and cmaes.gradient is None
        assert isinstance(cmaes.objective, Agreement)
        assert (cmaes.objective.aggregate, cmaes.objective.disagreement) == ("mean", 0.5)
        job = service.scheduler.submit(loaded.pair, cmaes)
        service.scheduler.run_until_idle()
        assert job.result(timeout=0).images.shape == (2, SIZE, SIZE, 3)
    finally:
        service.stop()
    with pytest.raises(InvalidInput, match="members"):
        SynthesizerService(Settings(model_store=str(store), twin_members="median"), start=False)


def test_defaults_leave_explicit_choices_and_other_objectives_alone(store: Path) -> None:
    service = SynthesizerService(Settings(model_store=str(store), device="cpu"), start=False)
    try:
        loaded, _ = service.build(_request("ens", budget=2))
    finally:
        service.stop()
    defaults = TransferDefaults(init_candidates=32, clip_norm=1.0, blur=0.05, members="softmin")
    mine = SynthesisRequest(
        neuron(1), "gradient", init_candidates=8, transforms=False, gradient=GradientConfig(clip_norm=3.0)
    )
    kept = defaults.apply(loaded.pair, mine, members=3)
    assert kept.init_candidates == 8 and kept.gradient is not None and kept.gradient.clip_norm == 3.0
    assert kept.transforms is False and isinstance(kept.objective, Agreement)
    with_images = neuron(1) + 0.1 * diversity()
    assert defaults.member_objective(loaded.pair, with_images) is with_images
    # A request through the engine with these defaults runs end to end on the ensemble.
    result = synthesize(
        loaded.pair, defaults.apply(loaded.pair, SynthesisRequest(neuron(1), budget=2), 3), "cpu"
    )
    assert np.isfinite(result.score).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"init_candidates": -1}, "init_candidates"),
        ({"clip_norm": -0.5}, "clip_norm"),
        ({"blur": float("nan")}, "blur"),
        ({"members": "max"}, "members"),
        ({"member_temperature": 0.0}, "member_temperature"),
    ],
)
def test_bad_defaults_are_invalid_input(kw: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        TransferDefaults(**kw)
