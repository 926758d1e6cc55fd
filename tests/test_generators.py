"""Natural-image priors, their store round trip, the DeePSim loader, GAN training and Frechet distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from neurotwin.card import GeneratorCard
from neurotwin.cli import main as cli_main
from neurotwin.errors import InvalidInput, ModelStoreError
from neurotwin.runtimes.generators import (
    ARCHITECTURES,
    DCGANGenerator,
    DeePSimFC6Generator,
    FourierPixels,
    ImagePrior,
    deepsim_expected_shapes,
    load_deepsim_fc6,
    load_generator,
    robustness_transforms,
    save_generator,
)
from neurotwin.store import GENERATORS, ModelStore, validate_generator
from neurotwin.training.frechet import (
    FeatureExtractor,
    extract_features,
    frechet_distance,
    frechet_distance_from_stats,
    generator_quality,
    noise_images,
    shared_extractor,
)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_images(images: torch.Tensor, batch: int, resolution: int) -> None:
    assert images.shape == (batch, 3, resolution, resolution)
    images = images.detach()
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.isfinite(images).all()


def _smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """uint8 [count, size, size, 3] 'natural-ish' images: blurred color blobs plus a gradient."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((count, 4, 4, 3))
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for i in range(count):
        up = np.asarray(
            Image.fromarray((coarse[i] * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        )
        out[i] = np.clip(up * 0.8 + 50 * ramp * rng.random(), 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize(
    ("prior", "resolution"),
    [
        (DCGANGenerator(latent_dim=16, resolution=32, width=8), 32),
        (DCGANGenerator(latent_dim=16, resolution=48, width=4), 48),
        (FourierPixels(resolution=24), 24),
    ],
)
def test_prior_shapes_and_range(prior: ImagePrior, resolution: int) -> None:
    prior.eval()
    latents = prior.sample_latents(3, _seeded())
    assert latents.shape == (3, prior.latent_dim)
    assert torch.equal(latents, prior.sample_latents(3, _seeded()))  # seeded draws repeat
    _check_images(prior(latents), 3, resolution)
    assert prior.resolution == resolution
    # Gradients reach the latent (what every gradient-based optimizer relies on).
    latents.requires_grad_(True)
    prior(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_dcgan_default_size_matches_anchor() -> None:
    gen = DCGANGenerator()
    assert (gen.latent_dim, gen.resolution) == (128, 64)
    assert 3.7e6 < sum(p.numel() for p in gen.parameters()) < 3.9e6


def test_fourier_pixels_are_unit_scaled_and_colored() -> None:
    prior = FourierPixels(resolution=32)
    images = prior(prior.sample_latents(64, _seeded(1)))
    logits = torch.logit(images.clamp(1e-6, 1 - 1e-6))
    # Normalized spectrum: about unit pre-sigmoid deviation (the color mix shrinks it a little).
    assert 0.4 < float(logits.std()) < 1.5
    # Decorrelated color space -> correlated RGB channels, as in photos.
    flat = logits.permute(1, 0, 2, 3).reshape(3, -1)
    assert float(torch.corrcoef(flat)[0, 2]) > 0.3
    assert prior.state_dict() == {}  # nothing to store but the card


def test_robustness_transforms() -> None:
    images = torch.rand(4, 3, 32, 32)
    out_a = robustness_transforms(images, _seeded(3))
    out_b = robustness_transforms(images, _seeded(3))
    assert out_a.shape == images.shape and torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, images)
    assert float(out_a.min()) >= 0.0 and float(out_a.max()) <= 1.0
    same = robustness_transforms(images, _seeded(3), jitter=0.0, scale=(1.0, 1.0), rotate_degrees=0.0)
    assert torch.allclose(same, images, atol=1e-5)
    leaf = images.clone().requires_grad_(True)
    robustness_transforms(leaf, _seeded(4)).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_store_round_trip_and_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    gen = DCGANGenerator(latent_dim=8, resolution=16, width=4)
    with torch.no_grad():  # non-default batch-norm statistics must survive the trip
        gen.project_norm.running_mean.uniform_(-1, 1)
    gen.eval()
    with store.new_version(GENERATORS, "tiny") as staging:
        save_generator(gen, staging, "tiny", metrics={"frechet": {"generated": 1.0}})
    version = store.resolve(GENERATORS, "tiny")
    card = validate_generator(version)
    assert card.architecture == "DCGANGenerator" and card.hyperparameters["width"] == 4
    loaded = load_generator(version)
    assert isinstance(loaded, DCGANGenerator) and not loaded.training
    assert loaded.card.metrics["frechet"]["generated"] == 1.0
    latents = gen.sample_latents(2, _seeded())
    assert torch.allclose(loaded(latents), gen(latents))
    assert all(not p.requires_grad for p in loaded.parameters())

    # The Fourier prior has no tensors: an empty weights file still makes a valid version.
    with store.new_version(GENERATORS, "pixels") as staging:
        save_generator(FourierPixels(resolution=16), staging, "pixels")
    pixels = load_generator(store.resolve(GENERATORS, "pixels"))
    assert isinstance(pixels, FourierPixels)
    _check_images(pixels(pixels.sample_latents(2, _seeded())), 2, 16)

    folder = version.path
    card_data = json.loads((folder / "card.json").read_text())

    bad = dict(card_data, architecture="StyleGAN9")
    (folder / "card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelStoreError, match="unknown generator architecture 'StyleGAN9'"):
        load_generator(folder)

    bad = dict(card_data, hyperparameters={**card_data["hyperparameters"], "width": 8})
    (folder / "card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelStoreError, match="expects"):
        load_generator(folder)

    bad = dict(card_data, resolution=32)
    (folder / "card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelStoreError, match="resolution"):
        load_generator(folder)

    (folder / "card.json").write_text(json.dumps(card_data))
    torch.save({"something": torch.zeros(1)}, folder / "weights.pt")
    with pytest.raises(ModelStoreError, match="missing"):
        load_generator(folder)

    # Pickled objects are refused: loading never executes code from the store.
    torch.save({"card": GeneratorCard("x", "DCGANGenerator", 8, 16)}, folder / "weights.pt")
    with pytest.raises(ModelStoreError, match="not a plain torch state_dict"):
        load_generator(folder)


def _trained_looking(gen: DCGANGenerator) -> DCGANGenerator:
    """Non-default weights and batch-norm statistics, so code layers differ from a fresh init."""
    with torch.no_grad():
        for module in gen.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return gen.eval()


@pytest.mark.parametrize("code_layer", [1, 2, 3])
def test_code_layers_generate_the_same_images_from_the_same_noise(code_layer: int) -> None:
    noise_prior = _trained_looking(DCGANGenerator(latent_dim=8, resolution=32, width=4))
    coded = DCGANGenerator(latent_dim=8, resolution=32, width=4, code_layer=code_layer).eval()
    coded.load_state_dict(noise_prior.state_dict())
    side = 4 * 2 ** (code_layer - 1)
    assert coded.latent_dim == noise_prior.channels[code_layer - 1] * side * side
    codes = coded.sample_latents(3, _seeded(7))
    assert codes.shape == (3, coded.latent_dim) and float(codes.min()) >= 0  # after a ReLU
    # Seeded noise drawn by the noise prior, pushed through the layers below the code, is the code.
    torch.testing.assert_close(coded(codes), noise_prior(noise_prior.sample_latents(3, _seeded(7))))
    # Codes below zero are not natural: they generate what zero does.
    torch.testing.assert_close(coded(codes - 10.0), coded(torch.zeros_like(codes)))
    prior = coded.latent_prior()
    assert prior["distribution"] == "rectified" and prior["min"] == 0.0
    assert prior["std"] > 0 and 0 < prior["zero_fraction"] < 1
    assert prior == coded.latent_prior()  # measured once, from fixed draws


def test_code_layer_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"code_layer must be in 0\.\.3"):
        DCGANGenerator(latent_dim=8, resolution=32, width=4, code_layer=4)


def test_recode_generator_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ModelStore(tmp_path)
    gen = _trained_looking(DCGANGenerator(latent_dim=8, resolution=16, width=4))
    with store.new_version(GENERATORS, "gan") as staging:
        save_generator(gen, staging, "gan", description="tiny", metrics={"frechet": {"generated": 3.0}})
    with store.new_version(GENERATORS, "pixels") as staging:
        save_generator(FourierPixels(resolution=16), staging, "pixels")
    out = tmp_path / GENERATORS / "gan-h2"
    assert (
        cli_main(
            ["recode-generator", str(tmp_path / GENERATORS / "gan"), "--code-layer", "2", "--out", str(out)]
        )
        == 0
    )
    version = store.resolve(GENERATORS, "gan-h2")
    card = validate_generator(version)
    assert card.hyperparameters["code_layer"] == 2 and card.latent_dim == 4 * 8 * 8
    assert card.latent_prior["distribution"] == "rectified" and card.latent_prior["min"] == 0.0
    assert card.training["recoded_from"] == {"name": "gan", "version": 1, "code_layer": 2}
    assert card.metrics["frechet"]["generated"] == 3.0  # the same images, so the same quality
    loaded = load_generator(version)
    assert isinstance(loaded, DCGANGenerator) and loaded.latent_prior() == card.latent_prior
    torch.testing.assert_close(
        loaded(loaded.sample_latents(2, _seeded())), gen(gen.sample_latents(2, _seeded()))
    )
    # A different latent space is a different model, not a new version of the same one.
    args = ["recode-generator", str(tmp_path / GENERATORS / "gan"), "--code-layer", "1"]
    assert cli_main([*args, "--out", str(tmp_path / GENERATORS / "gan")]) == 1
    assert "must name a new model" in capsys.readouterr().err
    pixels = ["recode-generator", str(tmp_path / GENERATORS / "pixels"), "--code-layer", "1"]
    assert cli_main([*pixels, "--out", str(tmp_path / GENERATORS / "x")]) == 1
    assert "has no code layers" in capsys.readouterr().err


def test_deepsim_fc6_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = DeePSimFC6Generator().eval()
    assert sum(p.numel() for p in original.parameters()) > 55e6  # the real 56 M-parameter layout
    # Save under the names a Caffe port uses (wrapped, deconv5_0/deconv5_1, ...) to exercise renaming.
    renames = {"deconv5": "deconv5_0", "conv5_1": "deconv5_1", "deconv4": "deconv4_0", "conv4_1": "deconv4_1"}
    state = {}
    for key, value in original.state_dict().items():
        layer, _, param = key.partition(".")
        state[f"G.{renames.get(layer, layer)}.{param}"] = value
    weight_file = tmp_path / "fc6.pt"
    torch.save({"state_dict": state}, weight_file)

    loaded = load_deepsim_fc6(weight_file)
    assert (loaded.latent_dim, loaded.resolution) == (4096, 256)
    codes = loaded.sample_latents(2, _seeded())
    assert float(codes.min()) >= 0.0  # fc6 codes follow a ReLU
    images = loaded(codes * 20)
    _check_images(images, 2, 256)
    assert torch.equal(images, original(codes * 20))
    # BGR -> RGB with the Caffe mean: a zero-output network gives the mean color, channels flipped.
    with torch.no_grad():
        loaded.deconv0.weight.zero_()
        loaded.deconv0.bias.zero_()
    flat = loaded(codes)[0, :, 0, 0] * 255
    assert torch.allclose(flat, torch.tensor([123.0, 117.0, 104.0]), atol=1e-3)

    # Error cases use stride-0 views, so each file stores one float whatever the shape it claims.
    cheap = {f"G.{k}": torch.zeros(()).expand(shape) for k, shape in deepsim_expected_shapes().items()}
    wrong_key = dict(cheap)
    wrong_key["G.defc8.weight"] = wrong_key.pop("G.defc7.weight")
    torch.save(wrong_key, weight_file)
    with pytest.raises(
        ModelStoreError, match=r"missing keys \['defc7.weight'\].*unexpected keys \['defc8.weight'\]"
    ):
        load_deepsim_fc6(weight_file)

    wrong_shape = dict(cheap)
    # Conv2d layout ([out, in, k, k]) where the transposed layout is expected.
    wrong_shape["G.conv5_1.weight"] = torch.zeros(()).expand(512, 256, 3, 3)
    torch.save(wrong_shape, weight_file)
    with pytest.raises(
        ModelStoreError, match=r"'conv5_1.weight' has shape \[512, 256, 3, 3\], expected \[256, 512, 3, 3\]"
    ):
        load_deepsim_fc6(weight_file)

    ambiguous = dict(cheap)
    ambiguous["G.deconv5_1.weight"] = ambiguous["G.conv5_1.weight"]
    torch.save(ambiguous, weight_file)
    with pytest.raises(ModelStoreError, match=r"two entries map to DeePSim key 'conv5_1\.weight'"):
        load_deepsim_fc6(weight_file)

    with pytest.raises(ModelStoreError, match="missing weight file"):
        load_deepsim_fc6(tmp_path / "absent.pt")
    assert deepsim_expected_shapes()["defc7.weight"] == (4096, 4096)


def test_frechet_distance_closed_form() -> None:
    # One dimension: (mu1 - mu2)^2 + (s1 - s2)^2.
    value = frechet_distance_from_stats(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    )
    assert value == pytest.approx(4.0 + 1.0)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 5))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(5.0, rel=1e-6)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return shared_extractor()  # the same instance the train-generator command uses


def test_frechet_sanity_in_backbone_space(extractor: FeatureExtractor) -> None:
    real = torch.from_numpy(_smooth_images(48, 32, seed=1)).permute(0, 3, 1, 2).contiguous()
    real_a, real_b = real[:24], real[24:]
    feats_a = extract_features(extractor, real_a)
    assert feats_a.shape == (24, extractor.dim)
    assert frechet_distance(feats_a, feats_a) == pytest.approx(0.0, abs=1e-6)
    floor = frechet_distance(feats_a, extract_features(extractor, real_b))
    ceiling = frechet_distance(feats_a, extract_features(extractor, noise_images(24, 32, seed=2)))
    assert ceiling > 2 * floor > 0

    quality = generator_quality(FourierPixels(resolution=32), real_a, real_b, extractor=extractor, count=24)
    assert quality["real_floor"] == pytest.approx(floor, rel=1e-3)
    assert quality["noise_ceiling"] > quality["real_floor"]
    assert quality["generated"] > 0 and quality["images"]["generated"] == 24


def test_train_generator_command_writes_a_valid_version(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(_smooth_images(24, 40, seed=5)):
        Image.fromarray(image).save(folder / f"img{i:02d}.png")
    out = tmp_path / "store" / "generators" / "tiny-gan"
    code = cli_main(
        [
            "train-generator", str(folder), "--out", str(out), "--resolution", "16", "--width", "4",
            "--latent-dim", "8", "--batch-size", "8", "--epochs", "2", "--eval-images", "4",
            "--device", "cpu", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    store = ModelStore(tmp_path / "store")
    assert store.versions(GENERATORS, "tiny-gan") == [1]
    version = store.resolve(GENERATORS, "tiny-gan")
    card = validate_generator(version)
    assert card.training["device"] == "cpu"
    assert card.training["train_image_count"] == 16 and card.training["image_count"] == 24
    assert card.training["iterations"] == 4 and card.training["stopped_by"] == "epochs"
    frechet = card.metrics["frechet"]
    assert {"generated", "noise_ceiling", "real_floor"} <= set(frechet)
    assert card.latent_prior["distribution"] == "normal"
    assert (version.path / "samples.png").is_file()
    gen = load_generator(version)
    _check_images(gen(gen.sample_latents(5, _seeded())), 5, 16)
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


def test_bad_out_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["train-generator", str(tmp_path), "--out", str(tmp_path / "gens" / "x")])
    assert code == 1
    assert "expected <store>/generators/<name>" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REPO / "model_store" / "generators" / "v4-dcgan").is_dir(), reason="bundled generator not present"
)
def test_bundled_generator_loads() -> None:
    store = ModelStore(REPO / "model_store")
    version = store.resolve(GENERATORS, "v4-dcgan")
    gen = load_generator(version)
    assert version.model_path.stat().st_size < 10e6
    _check_images(gen(gen.sample_latents(4, _seeded())), 4, gen.resolution)
    assert set(gen.card.metrics["frechet"]) >= {"generated", "noise_ceiling", "real_floor"}


@pytest.mark.skipif(
    not (REPO / "model_store" / "generators" / "v4-dcgan-h2").is_dir(), reason="bundled generator not present"
)
def test_bundled_code_layer_generator_matches_its_source() -> None:
    store = ModelStore(REPO / "model_store")
    source = load_generator(store.resolve(GENERATORS, "v4-dcgan"))
    coded = load_generator(store.resolve(GENERATORS, "v4-dcgan-h2"))
    assert coded.latent_dim == 4096 and coded.card.training["recoded_from"]["name"] == "v4-dcgan"
    torch.testing.assert_close(
        coded(coded.sample_latents(2, _seeded())), source(source.sample_latents(2, _seeded()))
    )


def test_every_architecture_is_registered_by_class_name() -> None:
    assert all(cls.__name__ == name for name, cls in ARCHITECTURES.items())
