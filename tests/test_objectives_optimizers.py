"""Objectives (each kind, their algebra, plain-data specs) and the latent optimizers (CMA-ES, GA, gradient
ascent): they improve, seeds reproduce, and saved state resumes bit-identically."""

from __future__ import annotations

import base64
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from neurotwin.engines.objectives import (
    Diversity,
    ObjectiveSpec,
    OneHotPopulation,
    build_objective,
    diversity,
    neuron,
    one_hot_population,
    population,
)
from neurotwin.engines.optimizers import (
    CMAES,
    CMAESConfig,
    GeneticAlgorithm,
    GeneticConfig,
    GradientAscent,
    GradientConfig,
    decode_array,
    encode_array,
    restore_optimizer,
    single_threaded_blas,
)
from neurotwin.errors import InvalidInput

RATES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]])

# ------------------------------------------------------------------------------------------------
# Objectives
# ------------------------------------------------------------------------------------------------


def test_neuron_and_population() -> None:
    assert neuron(2)(RATES).tolist() == [3.0, 2.0, 0.5]
    assert neuron(2).target == 2
    mean = population([0, 3])(RATES)
    torch.testing.assert_close(mean, torch.tensor([2.5, 2.5, 0.5]))
    weighted = population([0, 1], [2.0, -1.0])
    torch.testing.assert_close(weighted(RATES), torch.tensor([0.0, 5.0, 0.5]))
    assert weighted.target == 0 and weighted.neurons == [0, 1]


def test_one_hot_population_is_the_targets_softmax() -> None:
    full = one_hot_population(3)
    probs = torch.softmax(RATES, dim=1)[:, 3]
    torch.testing.assert_close(full(RATES), probs)
    # Over every member of a population the scores are a distribution.
    members = [0, 2, 3]
    total = sum(OneHotPopulation(m, members)(RATES) for m in members)
    torch.testing.assert_close(total, torch.ones(3))
    logged = one_hot_population(3, temperature=2.0, log=True)
    torch.testing.assert_close(logged(RATES), torch.log_softmax(RATES / 2.0, dim=1)[:, 3])
    # Its gradient drives the target up and every other neuron down.
    rates = RATES.clone().requires_grad_(True)
    full(rates).sum().backward()
    assert (rates.grad[:, 3] > 0).all() and (rates.grad[:, :3] < 0).all()


def test_diversity_scores_similar_images_low() -> None:
    base = torch.rand(1, 3, 8, 8)
    same = base.repeat(3, 1, 1, 1)
    assert torch.allclose(diversity()(RATES, same), torch.full((3,), -1.0), atol=1e-5)
    varied = torch.rand(3, 3, 8, 8)
    assert (diversity()(RATES, varied) > -0.5).all()
    # Images are compared only within their request; one alone scores 0.
    groups = torch.tensor([0, 0, 1])
    out = diversity()(RATES, same, groups)
    assert torch.allclose(out, torch.tensor([-1.0, -1.0, 0.0]), atol=1e-5)
    # On rates: rows 0 and 1 are perfectly anti-correlated population patterns.
    on_rates = Diversity("rates")(RATES[:2], None)
    assert torch.allclose(on_rates, torch.ones(2), atol=1e-5)
    images = varied.clone().requires_grad_(True)
    diversity()(RATES, images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_objectives_compose() -> None:
    images = torch.rand(3, 3, 4, 4)
    combo = neuron(0) + 0.5 * population([1, 2]) - neuron(3) + 0.1 * diversity()
    expected = RATES[:, 0] + 0.5 * RATES[:, 1:3].mean(1) - RATES[:, 3] + 0.1 * diversity()(RATES, images)
    torch.testing.assert_close(combo(RATES, images), expected)
    assert combo.target == 0 and combo.neurons == [0, 1, 2, 3] and combo.uses_images
    torch.testing.assert_close((-neuron(1))(RATES), -RATES[:, 1])
    torch.testing.assert_close(sum([neuron(0), neuron(1)])(RATES), RATES[:, 0] + RATES[:, 1])
    torch.testing.assert_close((2 * (3 * neuron(1)))(RATES), 6 * RATES[:, 1])


def test_build_objective_from_plain_data() -> None:
    ids = ["a", "b", "c", "d"]
    one = build_objective({"kind": "neuron", "neurons": ["c"]}, ids)
    torch.testing.assert_close(one(RATES), RATES[:, 2])
    pop = build_objective(ObjectiveSpec("population", [0, "d"], [1.0, 3.0]), ids)
    torch.testing.assert_close(pop(RATES), RATES[:, 0] + 3 * RATES[:, 3])
    hot = build_objective({"kind": "one_hot", "neurons": 1, "population": [0, 2], "temperature": 0.5}, ids)
    torch.testing.assert_close(hot(RATES), torch.softmax(RATES[:, [0, 1, 2]] / 0.5, dim=1)[:, 1])
    spec = {"kind": "neuron", "neurons": [1], "diversity": 0.3, "diversity_on": "rates"}
    div = build_objective(spec, 4)
    torch.testing.assert_close(div(RATES), RATES[:, 1] + 0.3 * Diversity("rates")(RATES, None))
    # And back: specs round-trip through JSON.
    for objective in (one, pop, hot, div):
        again = build_objective(json.loads(json.dumps(objective.to_spec().to_dict())), ids)
        torch.testing.assert_close(
            again(RATES, torch.rand(3, 3, 4, 4)), objective(RATES, torch.rand(3, 3, 4, 4))
        )


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "stretch", "neurons": [0]}, "kind"),
        ({"kind": "neuron", "neurons": [4]}, "out of range"),
        ({"kind": "neuron", "neurons": ["zz"]}, "not a neuron id"),
        ({"kind": "neuron", "neurons": []}, "at least one"),
        ({"kind": "neuron", "neurons": [0, 1]}, "one neuron"),
        ({"kind": "population", "neurons": [0, 1], "weights": [1.0]}, "weights"),
        ({"kind": "population", "neurons": [0, 0]}, "twice"),
        ({"kind": "population", "neurons": [0, 1], "weights": [1.0, math.nan]}, "finite"),
        ({"kind": "one_hot", "neurons": [0], "temperature": 0}, "temperature"),
        ({"kind": "neuron", "neurons": [0], "diversity": -1}, "diversity"),
        ({"kind": "neuron", "neurons": [0], "diversity": 1, "diversity_on": "pixels"}, "diversity"),
        ({"kind": "neuron", "neurons": [0], "colour": "red"}, "unknown fields"),
    ],
)
def test_bad_objective_specs_are_invalid_input(spec: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        build_objective(spec, ["a", "b", "c", "d"])


# ------------------------------------------------------------------------------------------------
# Ask/tell optimizers
# ------------------------------------------------------------------------------------------------

TARGET = np.linspace(-1.0, 1.0, 12)


def _fitness(x: np.ndarray) -> np.ndarray:
    return -((x - TARGET) ** 2).sum(axis=1) + 0.1 * np.sin(3 * x).sum(axis=1)


def _cmaes(seed: int = 0, **kw: object) -> CMAES:
    return CMAES(np.zeros(12), CMAESConfig(population=10, sigma0=0.5, **kw), seed=seed)  # type: ignore[arg-type]


def _genetic(seed: int = 0, **kw: object) -> GeneticAlgorithm:
    start = np.random.default_rng(99).standard_normal((12, 12))
    return GeneticAlgorithm(start, GeneticConfig(population=12, **kw), seed=seed)  # type: ignore[arg-type]


def _run(opt: CMAES | GeneticAlgorithm, generations: int) -> list[np.ndarray]:
    asked = []
    for _ in range(generations):
        x = opt.ask()
        asked.append(x)
        opt.tell(_fitness(x))
    return asked


@pytest.mark.parametrize("make", [_cmaes, _genetic], ids=["cmaes", "genetic"])
def test_ask_tell_optimizers_improve(make) -> None:  # type: ignore[no-untyped-def]
    opt = make()
    first = _fitness(opt.ask()).mean()
    _run(opt, 40)
    assert opt.best_score > first + 3.0
    assert opt.generation == 40 and opt.evaluations == 40 * opt.population
    assert opt.best_latent is not None and math.isclose(_fitness(opt.best_latent[None])[0], opt.best_score)


@pytest.mark.parametrize("make", [_cmaes, _genetic], ids=["cmaes", "genetic"])
def test_seeds_reproduce_exactly(make) -> None:  # type: ignore[no-untyped-def]
    a, b, other = make(seed=5), make(seed=5), make(seed=6)
    runs_a, runs_b, runs_other = _run(a, 6), _run(b, 6), _run(other, 6)
    assert all(np.array_equal(x, y) for x, y in zip(runs_a, runs_b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(runs_a, runs_other, strict=True))


@pytest.mark.parametrize("make", [_cmaes, _genetic], ids=["cmaes", "genetic"])
@pytest.mark.parametrize("pending", [False, True])
def test_state_round_trip_resumes_bit_identically(make, pending: bool) -> None:  # type: ignore[no-untyped-def]
    original, reference = make(seed=3), make(seed=3)
    _run(original, 5)
    _run(reference, 5)
    if pending:
        original.ask()  # a generation asked but not told survives too
    state = json.loads(json.dumps(original.state_dict()))  # what the journal stores
    restored = restore_optimizer(state)
    assert restored.generation == 5 and restored.best_score == original.best_score
    assert np.array_equal(restored.ask(), reference.ask())
    # And the trajectories stay identical afterwards.
    assert all(np.array_equal(x, y) for x, y in zip(_run(restored, 4), _run(reference, 4), strict=True))


def test_ask_is_idempotent_until_told() -> None:
    for opt in (_cmaes(), _genetic()):
        first = opt.ask()
        first[0, 0] = 1e9  # callers get copies
        again = opt.ask()
        assert np.array_equal(again, opt.ask()) and again[0, 0] != 1e9
        opt.tell(_fitness(again))
        assert not np.array_equal(opt.ask(), again)


def test_tell_rejects_bad_scores() -> None:
    opt = _cmaes()
    with pytest.raises(InvalidInput, match="no pending"):
        opt.tell(np.zeros(10))
    x = opt.ask()
    with pytest.raises(InvalidInput, match="expected 10"):
        opt.tell(np.zeros(9))
    bad = _fitness(x)
    bad[3] = np.nan
    with pytest.raises(InvalidInput, match="finite"):
        opt.tell(bad)
    opt.tell(_fitness(x))  # the generation is still pending after a refused tell
    assert opt.generation == 1


def test_cmaes_state_refuses_foreign_pickles() -> None:
    state = _cmaes().state_dict()
    state["es"] = base64.b64encode(pickle.dumps(os.getcwd)).decode()
    with pytest.raises(InvalidInput, match="not allowed"):
        restore_optimizer(state)


def test_cmaes_bounds_and_diagonal_mode() -> None:
    opt = CMAES(np.full(600, 0.5), CMAESConfig(population=8, sigma0=1.0, bounds=(0.0, None)), seed=1)
    assert opt.es.opts["CMA_diagonal"] is True  # automatic above 512 dimensions
    x = opt.ask()
    assert x.min() >= 0.0
    opt.tell(-x.sum(axis=1))
    assert len(json.dumps(opt.state_dict())) < 400_000


def test_genetic_defaults_follow_xdream_and_keep_the_elite() -> None:
    cfg = GeneticConfig()
    assert (
        cfg.population,
        cfg.mutation_rate,
        cfg.mutation_size,
        cfg.selectivity,
        cfg.heritability,
        cfg.n_elite,
    ) == (
        20,
        0.5,
        0.5,
        2.0,
        0.5,
        1,
    )
    opt = _genetic(bounds=(-0.5, 0.5))
    x = opt.ask()
    assert x.min() >= -0.5 and x.max() <= 0.5
    scores = _fitness(x)
    opt.tell(scores)
    assert np.array_equal(opt.ask()[0], x[np.argmax(scores)])  # the elite survives unchanged
    with pytest.raises(InvalidInput):
        GeneticConfig(population=4, n_elite=4).validate()
    with pytest.raises(InvalidInput):
        GeneticAlgorithm(np.zeros((3, 2)), GeneticConfig(population=4))


def test_array_encoding_is_exact() -> None:
    for array in (np.random.default_rng(0).standard_normal((3, 5)), np.arange(6, dtype=np.float32), None):
        back = decode_array(json.loads(json.dumps(encode_array(array))))
        assert (back is None and array is None) or (np.array_equal(back, array) and back.dtype == array.dtype)


# ------------------------------------------------------------------------------------------------
# Gradient ascent
# ------------------------------------------------------------------------------------------------


def _ascend(opt: GradientAscent, steps: int) -> list[float]:
    target = torch.linspace(-1, 1, opt.latents.shape[1])
    scores = []
    for _ in range(steps):
        score = -((opt.latents - target) ** 2).sum(dim=1)
        (-score.sum()).backward()
        opt.step()
        scores.append(float(score.detach().sum()))
    return scores


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradient_ascent_improves(optimizer: str) -> None:
    start = torch.zeros(3, 6)
    opt = GradientAscent(start, GradientConfig(steps=60, optimizer=optimizer, lr=0.1, momentum=0.5))
    scores = _ascend(opt, 60)
    assert scores[-1] > scores[0] * 0.1 and opt.done
    assert start.abs().sum() == 0  # the caller's tensor is not modified


def test_gradient_schedule_decay_and_clipping() -> None:
    cfg = GradientConfig(steps=11, lr=1.0, lr_end=0.0)
    opt = GradientAscent(torch.zeros(1, 4), cfg)
    assert opt.lr_at(0) == 1.0 and opt.lr_at(5) == pytest.approx(0.5) and opt.lr_at(10) == 0.0
    assert GradientAscent(torch.zeros(1, 4), GradientConfig(steps=21, lr=0.2)).lr_at(20) == pytest.approx(
        0.01
    )
    # Decay shrinks the codes each step (zero gradient: only the decay acts).
    decaying = GradientAscent(torch.ones(2, 4), GradientConfig(steps=5, optimizer="sgd", decay=0.9))
    decaying.set_grad(torch.zeros(2, 4))
    decaying.step()
    torch.testing.assert_close(decaying.latents.detach(), torch.full((2, 4), 0.9))
    # Norm clipping: at most clip_norm * latent_std * sqrt(D) per code; bounds per unit.
    clipped = GradientAscent(torch.full((2, 4), 10.0), GradientConfig(clip_norm=1.0, latent_std=0.5))
    assert torch.allclose(clipped.latents.detach().norm(dim=1), torch.full((2,), 1.0))
    bounded = GradientAscent(torch.tensor([[-2.0, 3.0]]), GradientConfig(bounds=(0.0, 1.0)))
    assert bounded.latents.detach().tolist() == [[0.0, 1.0]]
    with pytest.raises(InvalidInput):
        GradientConfig(optimizer="lbfgs").validate()
    with pytest.raises(RuntimeError, match="no gradient"):
        GradientAscent(torch.zeros(1, 2)).step()


def test_gradient_state_round_trip_is_exact() -> None:
    cfg = GradientConfig(steps=20, lr=0.3, decay=0.99, clip_norm=2.0)
    original = GradientAscent(torch.randn(2, 5, generator=torch.Generator().manual_seed(0)), cfg)
    reference = GradientAscent(original.latents.detach().clone(), cfg)
    _ascend(original, 7)
    _ascend(reference, 7)
    restored = GradientAscent.from_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.step_index == 7
    _ascend(restored, 5)
    _ascend(reference, 5)
    assert torch.equal(restored.latents.detach(), reference.latents.detach())


def test_cmaes_runs_its_algebra_on_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    assert blas_threads(), "numpy's BLAS should be visible to threadpoolctl"  # else nothing is checked
    # Start from a multi-threaded pool, so the test means something on a machine whose default is one.
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert all(n == 2 for n in before)
        with single_threaded_blas():
            assert all(n == 1 for n in blas_threads())
        assert blas_threads() == before  # restored afterwards
        seen: list[list[int]] = []
        es = CMAES(np.zeros(6), CMAESConfig(population=4), seed=0)
        original_ask = es.es.ask

        def ask_and_record(*args: object, **kwargs: object) -> object:
            seen.append(blas_threads())
            return original_ask(*args, **kwargs)

        monkeypatch.setattr(es.es, "ask", ask_and_record)
        es.ask()
        assert seen and all(n == 1 for n in seen[0])
