"""Checks a model version passes before any service serves it.

1. Checksums (before the model is even parsed): every file ``integrity.json`` records hashes to its
   recorded digest.
2. Outputs on the reference inputs are finite.
3. They match the reference outputs recorded when the version was made, within the recorded tolerance.

A version made before records existed has no ``integrity.json``: its outputs on standard reference
inputs must be finite, and once they are, checksums and outputs are recorded so that every later load
is held to them. A store the server may not write to (a read-only volume) is validated the same way,
only without the record (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from neurotwin.card import PredictorCard
from neurotwin.errors import ModelStoreError
from neurotwin.integrity import (
    INTEGRITY_FILE,
    REFERENCE_COUNT,
    IntegrityRecord,
    Reference,
    check_finite,
    compare_outputs,
    load_record,
    read_reference,
    record_integrity,
    reference_images,
    verify_checksums,
)
from neurotwin.store import MODEL_FILES, ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validation:
    """How a version passed: ``verified`` against its record, or ``recorded`` now (first load), or
    ``unrecorded`` (first load into a store that cannot be written)."""

    outcome: str
    max_deviation: float = 0.0

    def __str__(self) -> str:
        if self.outcome == "verified":
            return f"verified (checksums; reference outputs within {self.max_deviation:.3g})"
        return self.outcome


def verify_files(version: ModelVersion) -> IntegrityRecord | None:
    """Step 1: the recorded checksums hold. None when the version has no record yet."""
    record = load_record(version.path)
    if record is not None:
        verify_checksums(version.path, record, required=(MODEL_FILES[version.kind], "card.json"))
    return record


def validate_outputs(
    version: ModelVersion,
    record: IntegrityRecord | None,
    run: Callable[[np.ndarray], np.ndarray],
    fresh_inputs: Callable[[], np.ndarray],
    check_inputs: Callable[[np.ndarray], None] = lambda inputs: None,
    stored_dtype: type | None = None,
) -> Validation:
    """Steps 2 and 3 with ``run`` (reference inputs -> outputs as the service computes them)."""
    what = str(version)
    if record is not None:
        reference = read_reference(version.path)
        check_inputs(reference.inputs)
        outputs = np.asarray(run(reference.inputs))
        check_finite(outputs, what)
        return Validation("verified", compare_outputs(outputs, reference.outputs, record, what))
    inputs = fresh_inputs()
    outputs = np.asarray(run(inputs))
    check_finite(outputs, what)
    try:
        record_integrity(
            version.path,
            [MODEL_FILES[version.kind]],
            Reference(inputs, outputs if stored_dtype is None else outputs.astype(stored_dtype)),
            recorded_by="first-load",
        )
    except OSError as exc:
        log.warning("%s: validated, but cannot record its checksums and reference outputs (%s)", version, exc)
        return Validation("unrecorded")
    log.info("%s: recorded checksums and reference outputs in %s (first load)", version, INTEGRITY_FILE)
    return Validation("recorded")


def validate_predictor(
    version: ModelVersion,
    card: PredictorCard,
    record: IntegrityRecord | None,
    run: Callable[[np.ndarray], np.ndarray],
) -> Validation:
    spec = card.input

    def check_inputs(images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape[1:] != (spec.height, spec.width, spec.channels):
            raise ModelStoreError(
                f"{version}: reference images are {images.dtype} {list(images.shape[1:])}, the card says "
                f"uint8 [{spec.height}, {spec.width}, {spec.channels}]"
            )

    return validate_outputs(
        version,
        record,
        run,
        lambda: reference_images(REFERENCE_COUNT, spec.height, spec.width, spec.channels),
        check_inputs,
    )


def validate_generator(version: ModelVersion, module: object, record: IntegrityRecord | None) -> Validation:
    latent_dim = int(module.latent_dim)  # type: ignore[attr-defined]

    def check_inputs(latents: np.ndarray) -> None:
        if latents.ndim != 2 or latents.shape[1] != latent_dim:
            raise ModelStoreError(
                f"{version}: reference latents are {list(latents.shape)}; the generator takes "
                f"[N, {latent_dim}]"
            )

    from neurotwin.runtimes.generator_reference import reference_latents, run_generator

    return validate_outputs(
        version, record, run_generator(module), lambda: reference_latents(module), check_inputs, np.float16
    )
