"""Objectives over twin ensembles: member rates [B, M, K], Agreement (mean, soft-min, min, disagreement
penalty), their plain-data specs, and synthesis through a real ensemble of converted ONNX twins."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from neurotwin.engines.objectives import (
    Agreement,
    ObjectiveSpec,
    agreement,
    build_objective,
    diversity,
    neuron,
    one_hot_population,
    population,
)
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.synthesis import ModelPair, SynthesisRequest, synthesize
from neurotwin.errors import InvalidInput
from neurotwin.runtimes.generators import DCGANGenerator
from neurotwin.runtimes.onnx_torch import load_differentiable_twin
from neurotwin.runtimes.twin_ensemble import TwinEnsemble

from tests._models import make_predictor

# 2 images x 3 members x 4 neurons.
MEMBERS = torch.tensor(
    [
        [[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]],
        [[0.5, 4.5, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0], [0.5, 2.1, 1.0, 1.0]],
    ]
)


def test_plain_objectives_score_the_ensemble_mean() -> None:
    mean = MEMBERS.mean(dim=1)
    torch.testing.assert_close(neuron(1)(MEMBERS), mean[:, 1])
    torch.testing.assert_close(population([0, 3], [1.0, -1.0])(MEMBERS), mean[:, 0] - mean[:, 3])
    torch.testing.assert_close(one_hot_population(2)(MEMBERS), torch.softmax(mean, dim=1)[:, 2])
    with pytest.raises(InvalidInput, match="member rates"):
        neuron(0)(MEMBERS[None])


def test_agreement_aggregates_members() -> None:
    per_member = MEMBERS[:, :, 1]  # [[2, 2, 2], [4.5, 0, 2.1]]
    torch.testing.assert_close(agreement(neuron(1), "mean")(MEMBERS), per_member.mean(1))
    torch.testing.assert_close(agreement(neuron(1), "min")(MEMBERS), per_member.min(1).values)
    soft = agreement(neuron(1), "softmin", temperature=1.0)(MEMBERS)
    expected = -torch.logsumexp(-per_member, dim=1) + math.log(3)
    torch.testing.assert_close(soft, expected)
    # Members that agree score what they agree on; disagreement lands between the min and the mean.
    assert soft[0].item() == pytest.approx(2.0)
    assert per_member[1].min() < soft[1] < per_member[1].mean()
    # Temperature moves soft-min from the worst member (cold) to the mean (hot).
    cold = agreement(neuron(1), "softmin", temperature=1e-3)(MEMBERS)
    hot = agreement(neuron(1), "softmin", temperature=1e4)(MEMBERS)
    torch.testing.assert_close(cold, per_member.min(1).values, atol=1e-2, rtol=0)
    torch.testing.assert_close(hot, per_member.mean(1), atol=1e-3, rtol=0)


def test_disagreement_penalty_subtracts_the_members_spread() -> None:
    per_member = MEMBERS[:, :, 1]
    scored = agreement(neuron(1), "mean", disagreement=0.5)(MEMBERS)
    torch.testing.assert_close(scored, per_member.mean(1) - 0.5 * per_member.std(1, unbiased=False))
    # The image the members agree on now wins, though its mean is lower.
    assert scored[0] > scored[1] and per_member[0].mean() < per_member[1].mean()


def test_agreement_on_a_single_twin_is_the_inner_objective() -> None:
    rates = MEMBERS[:, 0, :]
    for objective in (agreement(neuron(2), "softmin"), agreement(neuron(2), "min", disagreement=3.0)):
        torch.testing.assert_close(objective(rates), rates[:, 2])


def test_softmin_gradient_goes_to_the_least_driven_member() -> None:
    rates = MEMBERS.clone().requires_grad_(True)
    agreement(neuron(1), "softmin", temperature=0.5)(rates).sum().backward()
    grad = rates.grad[1, :, 1]  # members drive neuron 1 at 4.5, 0, 2.1
    assert grad[1] > grad[2] > grad[0] > 0
    assert rates.grad[:, :, [0, 2, 3]].abs().sum() == 0


def test_agreement_composes_with_diversity_and_keeps_target() -> None:
    images = torch.rand(2, 3, 4, 4)
    combo = agreement(neuron(3), "softmin") + 0.2 * diversity()
    expected = agreement(neuron(3), "softmin")(MEMBERS) + 0.2 * diversity()(MEMBERS.mean(1), images)
    torch.testing.assert_close(combo(MEMBERS, images), expected)
    assert combo.target == 3 and combo.neurons == [3] and combo.uses_images and combo.reads_members
    assert not (neuron(3) + diversity()).reads_members


def test_agreement_specs_round_trip() -> None:
    ids = ["a", "b", "c", "d"]
    spec = {
        "kind": "neuron",
        "neurons": ["b"],
        "members": "softmin",
        "member_temperature": 0.5,
        "disagreement": 0.1,
        "diversity": 0.3,
        "diversity_on": "rates",
    }
    built = build_objective(spec, ids)
    expected = Agreement(neuron(1), "softmin", 0.5, 0.1)(MEMBERS) + 0.3 * diversity("rates")(MEMBERS)
    torch.testing.assert_close(built(MEMBERS), expected)
    back = built.to_spec()
    assert (back.members, back.member_temperature, back.disagreement) == ("softmin", 0.5, 0.1)
    again = build_objective(json.loads(json.dumps(back.to_dict())), ids)
    torch.testing.assert_close(again(MEMBERS), built(MEMBERS))
    # The default spec builds the plain objective (no Agreement wrapper).
    assert not isinstance(build_objective(ObjectiveSpec("neuron", [0]), ids), Agreement)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"members": "median"}, "members"),
        ({"members": "softmin", "member_temperature": 0}, "temperature"),
        ({"members": "mean", "disagreement": -1}, "disagreement"),
        ({"members": "min", "disagreement": math.inf}, "disagreement"),
    ],
)
def test_bad_agreement_specs_are_invalid_input(extra: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        build_objective({"kind": "neuron", "neurons": [0], **extra}, 4)


def test_agreement_refuses_image_terms_inside() -> None:
    with pytest.raises(InvalidInput, match="rates only"):
        agreement(neuron(0) + diversity())


# -- a real ensemble of converted ONNX twins through the synthesis engine ------------------------------


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> tuple[TwinEnsemble, object]:
    root = tmp_path_factory.mktemp("store")
    members, card = [], None
    for seed in (0, 1, 2):
        version = make_predictor(root, f"tiny-{seed}", neurons=5, size=32, seed=seed)
        twin, card = load_differentiable_twin(version, "cpu")
        members.append(twin)
    return TwinEnsemble(members), card


def test_ensemble_stacks_member_rates(ensemble: tuple[TwinEnsemble, object]) -> None:
    twin, _ = ensemble
    images = torch.rand(3, 3, 32, 32)
    rates = twin.forward_chw01(images, resize=False)
    assert rates.shape == (3, 3, 5)
    for m, member in enumerate(twin.members):
        torch.testing.assert_close(rates[:, m], member.forward_chw01(images, resize=False))
    assert (twin.input_height, twin.input_width) == (32, 32) and len(twin) == 3


def test_ensemble_refuses_mismatched_members(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small, _ = load_differentiable_twin(make_predictor(tmp_path, "a", neurons=5, size=16), "cpu")
    large, _ = load_differentiable_twin(make_predictor(tmp_path, "b", neurons=5, size=32), "cpu")
    with pytest.raises(InvalidInput, match="input sizes"):
        TwinEnsemble([small, large])
    with pytest.raises(InvalidInput, match="no members"):
        TwinEnsemble([])


def _prior() -> DCGANGenerator:
    torch.manual_seed(1)
    prior = DCGANGenerator(latent_dim=8, resolution=16, width=8).eval().requires_grad_(False)
    with torch.no_grad():
        prior.body[-1].weight.mul_(30.0)
    return prior


@pytest.mark.parametrize("method", ["gradient", "cmaes"])
def test_synthesis_on_an_ensemble_reports_the_mean_and_raises_the_worst_member(
    ensemble: tuple[TwinEnsemble, object], method: str
) -> None:
    twin, card = ensemble
    pair = ModelPair(twin, _prior(), card, key=f"ensemble-{method}")
    objective = agreement(neuron(2), "softmin", temperature=0.1)
    extra: dict = (
        {"budget": 30, "gradient": GradientConfig(lr=0.3)}
        if method == "gradient"
        else {"budget": 200, "population": 10}
    )
    result = synthesize(
        pair, SynthesisRequest(objective, method, n_images=2, seed=3, transforms=False, **extra), "cpu"
    )
    pixels = torch.from_numpy(result.images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        members = twin.forward_chw01(pixels, resize=False)
    # Reported rates are the members' mean on exactly the returned pixels; the score is the agreement.
    np.testing.assert_allclose(result.rates, members.mean(1).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.score, objective(members).numpy(), rtol=1e-4, atol=1e-5)
    assert result.activation is not None and result.rates.shape == (2, 5)
    # The worst member ends above where it started (images at the start: the prior's samples).
    start = synthesize(
        pair,
        SynthesisRequest(
            objective,
            method,
            n_images=2,
            seed=3,
            transforms=False,
            **{**extra, "budget": 1 if method == "gradient" else 10},
        ),
        "cpu",
    )
    start_pixels = torch.from_numpy(start.images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        before = twin.forward_chw01(start_pixels, resize=False)[:, :, 2].min(1).values
    assert (members[:, :, 2].min(1).values > before).all()
