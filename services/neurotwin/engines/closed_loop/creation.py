"""Creating a session: a request checked and resolved against the store into its journaled settings."""

from __future__ import annotations

from neurotwin.engines.closed_loop.confirmation import resolve_confirmation
from neurotwin.engines.closed_loop.driver import OptimizerDriver, latent_prior
from neurotwin.engines.closed_loop.models import SessionModels
from neurotwin.engines.closed_loop.settings import (
    SessionConfig,
    SessionRequest,
    check_guidance,
    check_request,
    map_twin_neurons,
)
from neurotwin.engines.closed_loop.stimuli import prepare_natural_images
from neurotwin.engines.journal import NaturalImage
from neurotwin.engines.natural_images import read_natural_source
from neurotwin.engines.session_limits import (
    SessionLimits,
    check_cost,
    check_optimizer_options,
    check_text,
)
from neurotwin.engines.session_metadata import RecordingMetadata
from neurotwin.errors import InvalidInput


def resolve_session(
    models: SessionModels,
    session_id: str,
    req: SessionRequest,
    fingerprint: str,
    *,
    default_generator: str,
    natural_root: str,
    max_natural_images: int,
    limits: SessionLimits,
) -> tuple[SessionConfig, list[NaturalImage]]:
    """Check a create request against the store and build the session's journaled settings.

    Raises on the first fault, in a fixed order: the request's own values, the generator, the twin,
    the natural images, then the optimizer (built once here so bad options fail at creation).
    What the session may cost (text, optimizer ranges, bytes per Ask and per session) is checked as
    soon as the values it depends on are known, before any image is decoded.
    """
    check_text(req.description, req.metadata, limits)
    checked = check_request(req)
    check_optimizer_options(checked.options)
    population, targets = checked.population, checked.targets
    generator_name = req.generator or default_generator
    generator_version, generator = models.checkout_generator(generator_name, req.generator_version)
    image_size = req.image_size or int(generator.resolution)
    if image_size < 8:
        raise InvalidInput(f"image_size {image_size}: at least 8 pixels")

    twin_name, twin_version, twin_neurons = "", 0, []
    factor = req.candidates_per_presentation
    if req.twin:
        twin = models.twin(req.twin, req.twin_version)
        twin_name, twin_version = req.twin, twin.version.version
        twin_neurons = map_twin_neurons(
            req, targets, twin.card.name, list(twin.card.neuron_ids), twin.neurons
        )
    check_guidance(req, population, bool(req.twin))
    cost = {
        "population": population,
        "natural_per_generation": req.natural_per_generation,
        "image_size": image_size,
        "image_format": checked.image_format,
        "max_generations": req.max_generations,
        "limits": limits,
    }
    check_cost(natural_bytes=0, **cost)

    if req.natural_source and req.natural_images:
        raise InvalidInput("give natural_source or natural_images, not both")
    entries: list[tuple[str, bytes]] = []
    if req.natural_source:
        entries = read_natural_source(req.natural_source, natural_root)
    elif req.natural_images:
        entries = [(f"image{i:05d}", data) for i, data in enumerate(req.natural_images)]
    if req.natural_per_generation and not entries:
        raise InvalidInput(
            "natural_per_generation > 0 needs natural images (natural_source or natural_images)"
        )
    natural = prepare_natural_images(
        entries, image_size, checked.image_format, max_natural_images, limits.max_natural_pixels
    )
    check_cost(natural_bytes=sum(len(n.data) for n in natural), **cost)
    confirm_top, confirm_repeats = resolve_confirmation(
        req.confirm_requested,
        req.confirm_disabled,
        req.confirm_top,
        req.confirm_repeats,
        population,
        req.max_generations,
    )
    if confirm_top * confirm_repeats > population:
        # The confirmation generation is the largest Ask: it must fit the same limits.
        cost["population"] = confirm_top * confirm_repeats
        check_cost(natural_bytes=sum(len(n.data) for n in natural), **cost)

    config = SessionConfig(
        session_id=session_id,
        generator=generator_name,
        generator_version=generator_version,
        latent_dim=int(generator.latent_dim),
        generator_resolution=int(generator.resolution),
        neuron_count=checked.neuron_count,
        seed=checked.seed,
        image_size=image_size,
        optimizer=checked.optimizer,
        optimizer_options=checked.options,
        population_size=population,
        natural_per_generation=req.natural_per_generation,
        natural_source=req.natural_source,
        natural_count=len(natural),
        neuron_ids=list(req.neuron_ids),
        target_neurons=targets,
        objective=checked.objective,
        max_generations=req.max_generations,
        image_format=checked.image_format,
        twin=twin_name,
        twin_version=twin_version,
        twin_neurons=twin_neurons,
        candidates_per_presentation=max(0, factor) if twin_name else 0,
        refit_readout=bool(req.refit_readout),
        description=req.description,
        metadata=RecordingMetadata.from_dict(req.metadata).to_dict(),
        confirm_top=confirm_top,
        confirm_repeats=confirm_repeats,
        fingerprint=fingerprint,
    )
    if config.optimizer == "ga" and config.candidates > population:
        raise InvalidInput("twin pre-screening (candidates_per_presentation > 1) needs optimizer cma-es")
    # Building the optimizer now makes bad option names or values fail here, not at the first Ask.
    new_driver(models, config)
    return config, natural


def new_driver(models: SessionModels, config: SessionConfig) -> OptimizerDriver:
    """A fresh optimizer for a session; bad option values surface as InvalidInput."""
    generator = models.generator(config.generator, config.generator_version)
    initial = None
    if config.optimizer == "ga":
        import torch

        # The GA starts from draws of the generator's own latent prior, seeded by the session.
        rng = torch.Generator().manual_seed(config.seed)
        initial = generator.sample_latents(config.population_size, rng).double().cpu().numpy()
    try:
        return OptimizerDriver(config, latent_prior(generator), initial)
    except InvalidInput:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"optimizer {config.optimizer} options {config.optimizer_options}: {exc}") from exc
