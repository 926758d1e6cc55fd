"""Unit tests for the science pieces the end-to-end tests only reach through a server: the closed
loop's ridge readout, its PNG writer and resampling, response objectives, and Pearson r."""

from __future__ import annotations

import io

import numpy as np
import pytest
from neurotwin.engines.closed_loop.guidance import READOUT_MIN_SAMPLES, fit_readout
from neurotwin.engines.objectives import objective_scores, population, response_objective
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import encode_png_fast, resize_batch
from neurotwin.stats import pearson, pearson_columns
from PIL import Image


def test_fit_readout_recovers_a_linear_map_and_its_loo_is_exact() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5)) * [1.0, 10.0, 0.1, 3.0, 1.0] + [0, 5, 0, -2, 0]
    truth = np.array([0.5, -0.2, 3.0, 0.0, 1.0])
    targets = features @ truth + 2.0 + 0.01 * rng.normal(size=60)
    readout = fit_readout(features, targets)
    assert readout is not None and readout.samples == 60
    assert readout.loo_r > 0.999
    assert np.allclose(readout.predict(features), targets, atol=0.05)
    # The hat-matrix shortcut equals refitting without each sample at the chosen penalty (design
    # [1, z] with the intercept unpenalized): the LOO correlation it reports is the refits' one.
    z = (features - readout.mean) / readout.scale
    design = np.hstack([np.ones((60, 1)), z])
    penalty = np.diag([0.0] + [readout.alpha] * 5)
    loo = np.empty(60)
    for i in range(60):
        keep = np.arange(60) != i
        beta = np.linalg.solve(design[keep].T @ design[keep] + penalty, design[keep].T @ targets[keep])
        loo[i] = design[i] @ beta
    assert readout.loo_r == pytest.approx(pearson(loo, targets), abs=1e-9)


def test_fit_readout_refuses_too_few_or_non_finite_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(READOUT_MIN_SAMPLES - 1, 3))
    assert fit_readout(x, x[:, 0]) is None
    x = rng.normal(size=(READOUT_MIN_SAMPLES + 5, 3))
    y = x[:, 0].copy()
    y[3] = np.nan
    assert fit_readout(x, y) is None
    # A constant feature column is harmless (its scale is taken as 1, so it gets no weight).
    x[:, 2] = 4.0
    readout = fit_readout(x, x[:, 0])
    assert readout is not None and abs(readout.coef[2]) < 1e-9


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64)])
def test_png_writer_round_trips_through_pillow(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    data = encode_png_fast(image)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded.shape == image.shape and np.array_equal(decoded, image)


def test_resize_batch_matches_pillow_and_skips_same_size() -> None:
    images = np.random.default_rng(3).integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
    assert resize_batch(images, 20, 30) is images
    out = resize_batch(images, 10, 12)
    expected = np.asarray(Image.fromarray(images[1]).resize((12, 10), Image.Resampling.BILINEAR))
    assert out.shape == (3, 10, 12, 3) and np.array_equal(out[1], expected)


def test_response_objectives_score_means() -> None:
    means = np.array([[1.0, 2.0, 4.0], [3.0, 0.0, 1.0]])
    assert np.array_equal(objective_scores(means, [0, 1], "mean"), [1.5, 1.5])
    assert np.array_equal(objective_scores(means, [2], "contrast"), [4.0 - 1.5, 1.0 - 1.5])
    with pytest.raises(InvalidInput, match="not a target"):
        response_objective("contrast", [0, 1, 2], 3)
    with pytest.raises(InvalidInput, match="expected one of"):
        response_objective("median", [0], 3)


def test_numpy_scores_agree_with_the_torch_algebra() -> None:
    import torch

    rates = np.random.default_rng(4).normal(size=(9, 6))
    weighted = population([1, 4], [0.25, -2.0]) - 0.5 * population([0, 2, 5])
    torch_scores = weighted(torch.as_tensor(rates)).numpy()
    assert np.allclose(weighted.score_array(rates), torch_scores, rtol=1e-6)


def test_pearson_conventions() -> None:
    a = np.array([[1.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    b = np.array([[2.0, 3.0], [4.0, 5.0], [8.0, 1.0]])
    r = pearson_columns(a, b)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])
    assert pearson_columns(a, b, constant=0.0)[1] == 0.0
    assert pearson(a[:, 0], -b[:, 0]) == pytest.approx(-1.0)
    assert pearson(a[:, 1], b[:, 1]) == 0.0
    with pytest.raises(InvalidInput, match="must match"):
        pearson_columns(a, b[:2])
