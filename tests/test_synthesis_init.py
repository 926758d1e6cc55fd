"""Starting codes screened on the twin: ``init_candidates`` (best of N prior samples) and
``initial_latents`` (given codes), for every method, through the real engine and a converted ONNX twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from neurotwin.engines.objectives import neuron
from neurotwin.engines.optimizers import GradientConfig
from neurotwin.engines.synthesis import ModelPair, SynthesisRequest, score_latents, synthesize
from neurotwin.errors import InvalidInput
from neurotwin.runtimes.generators import DCGANGenerator
from neurotwin.runtimes.onnx_torch import load_differentiable_twin

from tests._models import make_predictor


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> ModelPair:
    version = make_predictor(tmp_path_factory.mktemp("store"), "tiny", neurons=4, size=32, seed=3)
    twin, card = load_differentiable_twin(version, "cpu")
    torch.manual_seed(1)
    prior = DCGANGenerator(latent_dim=8, resolution=16, width=8).eval().requires_grad_(False)
    with torch.no_grad():
        prior.body[-1].weight.mul_(30.0)
    return ModelPair(twin, prior, card, key="tiny|init")


def _frozen(pair: ModelPair, **kw: object) -> SynthesisRequest:
    """One gradient step of a negligible size: the result is (almost) the starting code."""
    return SynthesisRequest(
        neuron(1),
        "gradient",
        budget=1,
        n_images=2,
        seed=4,
        transforms=False,
        gradient=GradientConfig(lr=1e-9),
        **kw,  # type: ignore[arg-type]
    )


def test_best_of_n_prior_samples_start_high(pair: ModelPair) -> None:
    reference, _ = score_latents(
        pair, pair.prior.sample_latents(400, torch.Generator().manual_seed(99)), neuron(1)
    )
    plain = synthesize(pair, _frozen(pair), "cpu")
    screened = synthesize(pair, _frozen(pair, init_candidates=128), "cpu")
    # The best 2 of 128 samples sit in the top few percent of the prior's scores.
    assert screened.score.min() >= np.quantile(reference, 0.9)
    assert screened.score.min() > plain.score.min()
    # Same seed, same starts.
    again = synthesize(pair, _frozen(pair, init_candidates=128), "cpu")
    np.testing.assert_array_equal(again.latents, screened.latents)


def test_given_codes_are_screened_and_used(pair: ModelPair) -> None:
    codes = pair.prior.sample_latents(50, torch.Generator().manual_seed(7)).numpy()
    scores, _ = score_latents(pair, codes, neuron(1))
    best_two = codes[np.argsort(-scores)[:2]]
    result = synthesize(pair, _frozen(pair, initial_latents=codes), "cpu")
    np.testing.assert_allclose(result.latents, best_two, atol=1e-5)
    # Fewer codes than images: the rest are prior samples.
    one = synthesize(pair, _frozen(pair, initial_latents=codes[:1]), "cpu")
    assert any(np.allclose(row, codes[0], atol=1e-5) for row in one.latents)


@pytest.mark.parametrize("method", ["cmaes", "genetic"])
def test_evolution_starts_from_screened_codes(pair: ModelPair, method: str) -> None:
    kw = {"budget": 20, "population": 10, "n_images": 1, "seed": 2, "transforms": False}
    plain = synthesize(pair, SynthesisRequest(neuron(1), method, **kw), "cpu")  # type: ignore[arg-type]
    screened = synthesize(pair, SynthesisRequest(neuron(1), method, init_candidates=256, **kw), "cpu")  # type: ignore[arg-type]
    assert screened.score[0] > plain.score[0]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"init_candidates": -1}, "init_candidates"),
        ({"init_candidates": 10**6}, "init_candidates"),
        ({"initial_latents": np.zeros((3, 5), np.float32)}, "initial_latents"),
        ({"initial_latents": np.full((3, 8), np.nan, np.float32)}, "initial_latents"),
    ],
)
def test_bad_starts_are_invalid_input(pair: ModelPair, change: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        SynthesisRequest(neuron(1), "gradient", **change).validate(pair)
