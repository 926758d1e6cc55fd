"""The twin model, its training loop and its metrics, on small planted data made here.

Planted neurons are linear-nonlinear: a rate that is a softplus of a linear function of the image (colour
contrast in a region), Poisson-sampled. A twin must recover them far above chance within seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from neurotwin.errors import InvalidInput
from neurotwin.training import fit as fit_module
from neurotwin.training.datasets import Recording, split_indices
from neurotwin.training.evaluate import (
    fraction_explainable_variance_explained,
    pearson_per_neuron,
    split_half_ceiling,
    summarize,
)
from neurotwin.training.fit import FitConfig, SessionData, fit_predict, fit_twin, fit_twins
from neurotwin.training.readouts.gaussian import GaussianReadout
from neurotwin.training.report import write_report
from neurotwin.training.twin import (
    SessionSpec,
    TwinConfig,
    build_twins,
)

SIZE = 32
# A tiny but real configuration: the pretrained trunk cut after block 1 at 32 px (24 channels, 8 x 8).
TINY_EFFNET = TwinConfig(core="efficientnet", stages=(1,), input_size=SIZE, hidden=16, core_layers=1)
TINY_CONV = TwinConfig(core="conv", input_size=SIZE, hidden=12, conv_layers=2, readout="factorized")
FAST = FitConfig(max_epochs=30, patience=5, lr_drops=1, progress=False)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Low-frequency colour fields (4 x 4 random colours, bilinearly upsampled)."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.random((n, 3, 4, 4)).astype(np.float32))
    up = F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (up.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def planted_rates(images: np.ndarray) -> np.ndarray:
    """[images, 3] true rates of three LN neurons with different receptive fields and features."""
    x = images.astype(np.float32) / 255
    drive = np.stack(
        [
            x[:, :16, :16, 0].mean((1, 2)) - x[:, :16, :16, 1].mean((1, 2)),
            x[:, 16:, 8:24, 2].mean((1, 2)),
            x[:, 8:24, 8:24].mean((1, 2, 3)),
        ],
        axis=1,
    )
    drive = (drive - drive.mean(0)) / drive.std(0)
    return 5.0 * np.log1p(np.exp(1.5 * drive))


def planted_recording(n: int = 200, seed: int = 0, repeats: int | None = None) -> Recording:
    images = smooth_images(n, seed)
    rates = planted_rates(images)
    rng = np.random.default_rng(seed + 1)
    if repeats:
        trials = rng.poisson(rates.T[:, :, None], size=(3, n, repeats)).astype(np.float32)
        responses, per_repeat = trials.mean(axis=2), trials
    else:
        responses, per_repeat = rng.poisson(rates.T).astype(np.float32), None
    return Recording(
        images=images,
        responses=responses,
        repeats=per_repeat,
        neuron_ids=["red-green", "blue-low", "luminance"],
        image_ids=[f"img{i}" for i in range(n)],
        source=f"planted-{seed}",
        sha256=f"{seed:064d}",
    )


@pytest.fixture(scope="module")
def planted() -> Recording:
    return planted_recording()


@pytest.fixture(scope="module")
def split(planted: Recording) -> dict[str, np.ndarray]:
    return split_indices(planted.n_images, scheme="random", seed=0)


# ------------------------------------------------------------------------------------------------
# Training recovers planted neurons
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TINY_EFFNET,
        TwinConfig(**{**TINY_EFFNET.to_dict(), "readout": "gaussian", "core_layers": 2, "core_kernel": 3}),
        TINY_CONV,
    ],
    ids=["effnet-factorized", "effnet-gaussian", "conv-factorized"],
)
def test_training_recovers_planted_neurons(
    planted: Recording, split: dict[str, np.ndarray], config: TwinConfig
) -> None:
    twin, result = fit_twin(planted, split, config, FAST)
    assert result.history[-1]["loss"] < result.history[0]["loss"], "training loss must go down"
    assert 0 <= result.best_epoch < result.epochs_run
    test = split["test"]
    predicted = twin.predict(planted.images[test])
    assert predicted.shape == (test.size, 3) and predicted.dtype == np.float32
    assert (predicted > 0).all(), "rates are a Poisson mean: strictly positive"
    r = pearson_per_neuron(predicted, planted.responses[:, test].T)
    # Chance is ~0 +- 0.16 on 40 test images; the best achievable (truth vs Poisson draws) is ~0.87.
    # These short runs reach 0.55-0.8, so 0.4 tests learning without being brittle across machines.
    assert np.median(r) > 0.4, r


def test_fit_is_deterministic_for_a_seed(planted: Recording, split: dict[str, np.ndarray]) -> None:
    config = FitConfig(max_epochs=4, patience=10, progress=False, seed=3)
    a = fit_predict(planted, split, TINY_EFFNET, config)
    b = fit_predict(planted, split, TINY_EFFNET, config)
    np.testing.assert_array_equal(a, b)


def test_multi_session_training_shares_one_core(planted: Recording) -> None:
    other = planted_recording(n=120, seed=5)
    split = split_indices(planted.n_images, scheme="first-half", seed=0)
    config = TwinConfig(**{**TINY_EFFNET.to_dict(), "ensemble": 2})
    result = fit_twins(
        {"a": SessionData(planted, split), "b": SessionData(other, None)},
        config,
        FitConfig(max_epochs=3, progress=False),
    )
    a, b = result.twins["a"], result.twins["b"]
    assert len(a.heads) == 2
    for head_a, head_b in zip(a.heads, b.heads, strict=True):
        assert head_a.core is head_b.core, "sessions share the trainable core"
        assert head_a.readout is not head_b.readout, "each session has its own readout"
    assert a.heads[0].core is not a.heads[1].core, "ensemble members are independent"
    assert a.features is b.features
    assert a.predict(planted.images[:5]).shape == (5, 3)


def test_frozen_features_are_cached_across_fits(planted: Recording, split: dict[str, np.ndarray]) -> None:
    fit_module.clear_feature_cache()
    fit_predict(planted, split, TINY_EFFNET, FitConfig(max_epochs=1, progress=False))
    assert len(fit_module._FEATURE_CACHE) == 1
    fit_predict(planted, split, TINY_EFFNET, FitConfig(max_epochs=1, progress=False, seed=1))
    assert len(fit_module._FEATURE_CACHE) == 1, "the same images and trunk reuse the cached features"


def test_fit_refuses_unusable_inputs(planted: Recording) -> None:
    no_val = {"train": np.arange(160), "val": np.zeros(0, dtype=np.int64), "test": np.arange(160, 200)}
    with pytest.raises(InvalidInput, match="validation"):
        fit_twin(planted, no_val, TINY_EFFNET, FAST)
    with pytest.raises(InvalidInput, match="device"):
        fit_twin(planted, split_indices(200, scheme="random", seed=0), TINY_EFFNET, FitConfig(device="tpu"))


def test_config_validation() -> None:
    with pytest.raises(InvalidInput, match="core"):
        TwinConfig(core="resnet")
    with pytest.raises(InvalidInput, match="readout"):
        TwinConfig(readout="attention")
    with pytest.raises(InvalidInput, match="stages"):
        TwinConfig(stages=(16,))
    assert TwinConfig.from_dict({**TINY_EFFNET.to_dict(), "unknown": 1}) == TINY_EFFNET


def test_gaussian_readout_samples_in_training_and_uses_the_mean_at_test() -> None:
    readout = GaussianReadout(channels=4, neurons=2)
    x = torch.randn(3, 4, 6, 6)
    readout.train()
    torch.manual_seed(0)
    a = readout(x)
    b = readout(x)
    assert not torch.allclose(a, b), "training samples positions around the mean"
    readout.eval()
    torch.testing.assert_close(readout(x), readout(x))


def test_untrained_twin_runs_on_any_image_size() -> None:
    twins = build_twins(TINY_EFFNET, [SessionSpec("s", 4)])
    twin = twins["s"].eval()
    for shape in [(2, SIZE, SIZE, 3), (1, 50, 40, 3)]:
        images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        assert twin.predict(images).shape == (shape[0], 4)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_pearson_matches_numpy_and_flags_constant_columns() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    b[:, 2] = 1.0
    r = pearson_per_neuron(a, b)
    for k in range(2):
        assert r[k] == pytest.approx(np.corrcoef(a[:, k], b[:, k])[0, 1])
    assert np.isnan(r[2])


def test_noise_ceiling_and_feve_on_planted_repeats() -> None:
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 3.0, size=(2, 300))
    truth[1] = 4.0  # neuron 1 does not depend on the image: all its variance is noise
    trials = rng.poisson(truth[:, :, None], size=(2, 300, 8)).astype(np.float64)
    trials[0, :10, 5:] = np.nan  # ragged repeats are allowed
    ceiling = split_half_ceiling(trials)
    assert ceiling[0] > 0.8
    assert abs(ceiling[1]) < 0.3
    # The true rates explain all explainable variance (FEVE ~ 1); the grand mean explains none.
    perfect = fraction_explainable_variance_explained(truth.T, trials)
    assert perfect[0] == pytest.approx(1.0, abs=0.1)
    flat = np.full_like(truth.T, np.nanmean(trials[0]))
    assert fraction_explainable_variance_explained(flat, trials)[0] == pytest.approx(0.0, abs=0.1)


def test_summarize_reports_ceiling_when_repeats_exist() -> None:
    rec = planted_recording(n=60, repeats=4)
    metrics = summarize(planted_rates(rec.images), rec.responses.T, rec.repeats)
    for key in ("median_r", "mean_r", "top_decile_r", "median_noise_ceiling", "median_feve"):
        assert metrics[key] is not None
    assert len(metrics["per_neuron_r"]) == 3 and len(metrics["per_neuron_feve"]) == 3
    assert "median_noise_ceiling" not in summarize(rec.responses.T, rec.responses.T)


def test_report_writes_plots_and_html(tmp_path: pytest.TempPathFactory) -> None:
    rec = planted_recording(n=40)
    predicted = planted_rates(rec.images)
    metrics = summarize(predicted, rec.responses.T)
    page = write_report(tmp_path, predicted, rec.responses.T, rec.neuron_ids, metrics, title="t")
    for name in ("scatter_best.png", "scatter_median.png", "r_histogram.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
        if name.endswith(".png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = page.read_text()
    assert "scatter_best.png" in text and "red-green" in text and "median r" in text


def test_pretrained_core_is_saved_loaded_and_reused_frozen(
    planted: Recording, split: dict[str, np.ndarray], tmp_path: pytest.TempPathFactory
) -> None:
    helper = planted_recording(n=120, seed=7)
    shared, _ = fit_module.pretrain_core({"h": helper}, TINY_EFFNET, FitConfig(max_epochs=8, progress=False))
    assert shared.sessions == ["h"] and len(shared.cores) == 1
    path = tmp_path / "core.pt"
    shared.save(path)
    loaded = fit_module.SharedCore.load(path)
    assert loaded.config == TINY_EFFNET
    before = {k: v.clone() for k, v in loaded.cores[0].state_dict().items()}
    for key, value in shared.cores[0].state_dict().items():
        torch.testing.assert_close(before[key], value)
    twin, _ = fit_twin(
        planted, split, None, FitConfig(max_epochs=25, patience=5, progress=False), core=loaded
    )
    core = twin.heads[0].core
    assert isinstance(core, fit_module.FrozenCore)
    for key, value in core.core.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=f"frozen core changed: {key}")
    r = pearson_per_neuron(twin.predict(planted.images[split["test"]]), planted.responses[:, split["test"]].T)
    assert np.median(r) > 0.4, r
    with pytest.raises(InvalidInput, match="conflicts"):
        fit_twin(planted, split, TwinConfig(stages=(2,), input_size=SIZE), FAST, core=loaded)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(InvalidInput, match="not a neurotwin core file"):
        fit_module.SharedCore.load(tmp_path / "bad.pt")
