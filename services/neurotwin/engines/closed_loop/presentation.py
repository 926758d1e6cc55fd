"""What one generation presents: which candidates the twin lets through, which natural images, in what order.

Every choice is deterministic given the session's seed and the generation number, so a replayed Ask
reproduces the journaled generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neurotwin.engines.closed_loop.settings import SessionConfig
from neurotwin.engines.closed_loop.stimuli import encode_stimulus, sha256_hex
from neurotwin.engines.journal import NATURAL, SYNTHETIC, NaturalImage, StimulusRecord


def choose_presented(guide: np.ndarray, population: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices of the candidates to show (the ``population`` the guide scores highest), in sampling order."""
    if len(guide) > population:
        # Stable sort: equal scores keep sampling order, so the choice is deterministic.
        chosen = np.sort(np.argsort(-guide, kind="stable")[:population])
        meta = {
            "guide_presented_mean": float(guide[chosen].mean()),
            "guide_candidates_mean": float(guide.mean()),
        }
        return chosen, meta
    return np.arange(len(guide)), {}


def natural_order(config: SessionConfig) -> np.ndarray:
    """The session's fixed shuffle of its natural images."""
    return np.random.default_rng([config.seed, 7]).permutation(config.natural_count)


def natural_indices(order: np.ndarray, generation: int, per_generation: int) -> list[int]:
    """The natural images shown in a generation: the next ``per_generation`` of the shuffle, cycling."""
    k = per_generation
    return [int(order[(generation * k + j) % len(order)]) for j in range(k)]


@dataclass
class Synthetic:
    """A generation's candidates, the images of those presented (``pixels[j]`` shows candidate
    ``chosen[j]``, at the session's image size), and what the twin made of them (None without one)."""

    latents: np.ndarray
    pixels: np.ndarray
    chosen: np.ndarray
    predicted: np.ndarray | None
    guide: np.ndarray


@dataclass
class Naturals:
    images: list[NaturalImage]
    predicted: np.ndarray | None
    guide: np.ndarray


def lay_out(
    config: SessionConfig, generation: int, synthetic: Synthetic, naturals: Naturals
) -> tuple[list[StimulusRecord], list[int]]:
    """The generation's stimuli in presentation order, and where each synthetic one landed.

    Natural images take random places among the synthetic ones (the same on every replay).
    """
    g = generation
    population = len(synthetic.chosen)
    k = len(naturals.images)
    placement = np.random.default_rng([config.seed, g, 11]).permutation(population + k)
    stimuli: list[StimulusRecord] = []
    synthetic_positions = [0] * population
    predicted, guide = synthetic.predicted, synthetic.guide
    for position, item in enumerate(placement.tolist()):
        stimulus_id = f"g{g:04d}-s{position:03d}"
        if item < population:
            c = int(synthetic.chosen[item])
            image = encode_stimulus(synthetic.pixels[item], config.image_format)
            synthetic_positions[item] = position
            stimuli.append(
                StimulusRecord(
                    generation=g,
                    index=position,
                    stimulus_id=stimulus_id,
                    kind=SYNTHETIC,
                    sha256=sha256_hex(image),
                    image=image,
                    latent=synthetic.latents[c],
                    predicted=None if predicted is None else predicted[c],
                    predicted_score=None if predicted is None else float(guide[c]),
                )
            )
        else:
            stimuli.append(natural_record(g, position, naturals, item - population))
    return stimuli, synthetic_positions


def natural_record(generation: int, position: int, naturals: Naturals, j: int) -> StimulusRecord:
    """The ``j``-th natural reference of a generation, shown at ``position``."""
    image_record = naturals.images[j]
    rates = None if naturals.predicted is None else naturals.predicted[j]
    return StimulusRecord(
        generation=generation,
        index=position,
        stimulus_id=f"g{generation:04d}-s{position:03d}",
        kind=NATURAL,
        sha256=image_record.sha256,
        image=image_record.data,
        natural_index=image_record.index,
        predicted=rates,
        predicted_score=None if rates is None else float(naturals.guide[j]),
    )


def lay_out_confirmation(
    config: SessionConfig,
    generation: int,
    originals: list[StimulusRecord],
    slots: list[int],
    naturals: Naturals,
) -> tuple[list[StimulusRecord], list[str]]:
    """The confirmation generation's stimuli: ``originals[slots[i]]`` again (same image bytes, latent
    and twin prediction) with natural references at random places; and, per position, the stimulus id
    each re-presentation repeats ("" for natural images)."""
    g = generation
    count = len(slots)
    k = len(naturals.images)
    placement = np.random.default_rng([config.seed, g, 11]).permutation(count + k)
    stimuli: list[StimulusRecord] = []
    repeat_of: list[str] = []
    for position, item in enumerate(placement.tolist()):
        stimulus_id = f"g{g:04d}-s{position:03d}"
        if item < count:
            original = originals[slots[item]]
            stimuli.append(
                StimulusRecord(
                    generation=g,
                    index=position,
                    stimulus_id=stimulus_id,
                    kind=SYNTHETIC,
                    sha256=original.sha256,
                    image=original.image,
                    latent=original.latent,
                    predicted=original.predicted,
                    predicted_score=original.predicted_score,
                )
            )
            repeat_of.append(original.stimulus_id)
        else:
            stimuli.append(natural_record(g, position, naturals, item - count))
            repeat_of.append("")
    return stimuli, repeat_of
