"""Admission by cost for closed-loop sessions: what one Ask and one whole session may cost the server.

A session is refused at creation (INVALID_ARGUMENT naming the limit) when it could never run: an Ask
whose images would not fit in the journal or in one gRPC reply, a bounded session whose journal would
outgrow its budget, a description or metadata that every ListSessions would have to carry, or
optimizer options far outside the ranges the optimizers are meant for (``sigma0 = 1e308`` overflows at
the first Tell and would wedge the session).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from neurotwin.errors import InvalidInput

# Worst-case encoded bytes per pixel: PNG of generator noise barely compresses (RGB, 3 bytes); JPEG at
# quality 95 stays under 1.5 bytes per pixel even on noise.
BYTES_PER_PIXEL = {"png": 3.0, "jpeg": 1.5}
# Per stimulus in the journal and the reply besides the image: ids, hashes, latents, presentation row.
STIMULUS_OVERHEAD_BYTES = 4096

# Sane ranges for optimizer options (inclusive). Latents are unit-scale, so a step size or spread
# beyond 1e3 is never useful and beyond ~1e150 overflows float64 in the covariance update.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "sigma0": (1e-8, 1e3),
    "latent_std": (1e-8, 1e3),
    "mutation_size": (0.0, 1e3),
    "selectivity": (0.0, 1e3),
    "mutation_rate": (0.0, 1.0),
    "heritability": (0.0, 1.0),
    "n_elite": (0.0, 1e4),
    "diagonal_above": (0.0, 1e7),
}
# Any other numeric option (a future one) is still bounded.
ANY_OPTION_RANGE = (-1e6, 1e6)


@dataclass(frozen=True)
class SessionLimits:
    """The budgets a create request is checked against (closed-loop settings fill these)."""

    # Images (and their rows) one Ask journals and returns. Below the default gRPC message limit
    # (64 MiB), so that an accepted generation can always be sent.
    max_generation_bytes: int = 48 * 1024 * 1024
    # All the journal a session may take: natural images plus, when max_generations bounds it, every
    # generation's images.
    max_session_bytes: int = 8 * 1024 * 1024 * 1024
    max_description_chars: int = 4096
    max_metadata_bytes: int = 64 * 1024
    # Decoded pixels of one natural image (as Predict's max_decoded_pixels): refused before decoding.
    max_natural_pixels: int = 2048 * 2048


def generation_bytes(stimuli: int, image_size: int, image_format: str) -> int:
    """Worst-case bytes one generation's stimuli take in the journal and in the Ask reply."""
    per_image = image_size * image_size * BYTES_PER_PIXEL.get(image_format, 3.0) + STIMULUS_OVERHEAD_BYTES
    return math.ceil(stimuli * per_image)


def check_text(description: str, metadata: dict[str, Any], limits: SessionLimits) -> None:
    """Description and metadata are in every ListSessions reply: bounded before anything else."""
    if len(description) > limits.max_description_chars:
        raise InvalidInput(
            f"description has {len(description)} characters; the limit is "
            f"{limits.max_description_chars} (max_description_chars)"
        )
    size = len(json.dumps(metadata, default=str).encode())
    if size > limits.max_metadata_bytes:
        raise InvalidInput(
            f"metadata takes {size} bytes; the limit is {limits.max_metadata_bytes} (max_metadata_bytes)"
        )


def check_optimizer_options(options: dict[str, float]) -> None:
    """Every option finite and within its sane range, named when it is not."""
    for name, value in options.items():
        low, high = OPTION_RANGES.get(name, ANY_OPTION_RANGE)
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidInput(f"optimizer option {name} = {value:g}: must be within [{low:g}, {high:g}]")


def check_cost(
    *,
    population: int,
    natural_per_generation: int,
    image_size: int,
    image_format: str,
    max_generations: int,
    natural_bytes: int,
    limits: SessionLimits,
) -> None:
    """One Ask within max_generation_bytes; a bounded session's journal within max_session_bytes."""
    per_generation = generation_bytes(population + natural_per_generation, image_size, image_format)
    if per_generation > limits.max_generation_bytes:
        raise InvalidInput(
            f"one generation of {population} + {natural_per_generation} {image_format} images of "
            f"{image_size} x {image_size} px may take {per_generation / 2**20:.0f} MiB; the limit is "
            f"{limits.max_generation_bytes / 2**20:.0f} MiB (max_generation_bytes): use a smaller "
            "population, image_size or JPEG"
        )
    total = natural_bytes + per_generation * max_generations
    if total > limits.max_session_bytes:
        raise InvalidInput(
            f"the session may take {total / 2**30:.1f} GiB of journal ({max_generations} generations of "
            f"{per_generation / 2**20:.1f} MiB, natural images {natural_bytes / 2**20:.1f} MiB); the limit "
            f"is {limits.max_session_bytes / 2**30:.1f} GiB (max_session_bytes)"
        )
