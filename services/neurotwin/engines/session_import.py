"""Read a session back from its HDF5 export (``session_export.write_hdf5``) as ``SessionData``.

For a client that has no access to the server's journal (``rig-sim --address ... --report``): the HDF5
file carries every told presentation with its image, responses and times, the optimizer trajectory,
the settings and the metadata. Stimuli of a generation not yet told are not in the file, so they are
not in the result either.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.engines.journal import (
    GenerationRecord,
    NaturalImage,
    ResponseRecord,
    SessionRecord,
    StimulusRecord,
)
from neurotwin.engines.session_export import HDF5_FORMAT, SessionData
from neurotwin.engines.session_metadata import RecordingMetadata
from neurotwin.errors import DataError
from neurotwin.imagecodec import encode_png

# Per-generation columns that are not optimizer summary values.
_GENERATION_FIXED = ("generation", "created", "told", "latent_mean", "ranking")


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _strings(dataset: Any) -> list[str]:
    return list(dataset.asstr()[:]) if len(dataset) else []


def read_hdf5(path: str | Path) -> SessionData:
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(path, None, f"not a readable HDF5 file ({exc})") from exc
    with f:
        if f.attrs.get("format") != HDF5_FORMAT:
            raise DataError(path, "format", f"not a neurotwin session export (expected {HDF5_FORMAT})")
        config = json.loads(f.attrs["settings"])
        metadata = RecordingMetadata.from_dict(json.loads(f.attrs.get("metadata", "{}")))
        created = float(f.attrs["created"])
        zero = float(f.attrs.get("session_start_time", created))
        # Images come back as PNG whatever the session sent (the export holds decoded pixels).
        stimuli, responses = _presentations(f["presentations"], f["stimuli"], zero)
        generations = _generations(f["generations"], zero)
        if "repeat_of" in f["presentations"]:
            _restore_repeats(generations, stimuli, _strings(f["presentations/repeat_of"]))
        natural = [
            NaturalImage(index=i, name=name, sha256=sha, data=b"")
            for i, (name, sha) in enumerate(
                zip(_strings(f["natural_set/name"]), _strings(f["natural_set/sha256"]), strict=True)
            )
        ]
        record = SessionRecord(
            session_id=str(f.attrs["session_id"]),
            config=config,
            created=created,
            updated=created,
            status=str(f.attrs["status"]),
            generation=sum(1 for g in generations if g.told is not None),
            presentations_told=len(responses),
            best=json.loads(f.attrs["best"]),
        )
    return SessionData(record, generations, stimuli, responses, natural, metadata)


def _presentations(pres: Any, images: Any, zero: float) -> tuple[list[StimulusRecord], list[ResponseRecord]]:
    pixels = images["images"][:] if "images" in images else None
    encoded: dict[int, bytes] = {}
    counts = pres["repeat_count"][:]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    repeats = pres["repeats"][:]
    latents = pres["latent"][:]
    stimuli, responses = [], []
    for i, (generation, index, stimulus_id, kind, sha) in enumerate(
        zip(
            pres["generation"][:],
            pres["stimulus_index"][:],
            _strings(pres["stimulus_id"]),
            _strings(pres["kind"]),
            _strings(pres["sha256"]),
            strict=True,
        )
    ):
        row = int(pres["image_index"][i])
        if pixels is not None and row not in encoded:
            encoded[row] = encode_png(pixels[row])
        natural_index = int(pres["natural_index"][i])
        stimuli.append(
            StimulusRecord(
                generation=int(generation),
                index=int(index),
                stimulus_id=stimulus_id,
                kind=kind,
                sha256=sha,
                image=encoded.get(row),
                latent=None if np.isnan(latents[i]).all() else latents[i],
                natural_index=None if natural_index < 0 else natural_index,
                predicted_score=_optional(float(pres["predicted_score"][i])),
            )
        )
        onset = _optional(float(pres["rig_onset_time"][i]))
        responses.append(
            ResponseRecord(
                generation=int(generation),
                index=int(index),
                repeats=repeats[offsets[i] : offsets[i + 1]].astype(np.float32),
                received=float(pres["server_received_time"][i]) + zero,
                onset=onset,
                duration=_optional(float(pres["rig_duration"][i])),
            )
        )
    return stimuli, responses


def _generations(group: Any, zero: float) -> list[GenerationRecord]:
    columns = {key: group[key][:] for key in group if key != "ranking"}
    ranking = _strings(group["ranking"]) if "ranking" in group else []
    out = []
    for i, generation in enumerate(columns.get("generation", [])):
        summary: dict[str, Any] = {
            key: float(values[i])
            for key, values in columns.items()
            if key not in _GENERATION_FIXED and not math.isnan(float(values[i]))
        }
        latent_mean = columns.get("latent_mean")
        if latent_mean is not None and np.isfinite(latent_mean[i]).all():
            summary["latent_mean"] = latent_mean[i].tolist()
        told = float(columns["told"][i])
        out.append(
            GenerationRecord(
                generation=int(generation),
                created=float(columns["created"][i]) + zero,
                told=None if math.isnan(told) else told + zero,
                meta={"ranking": ranking[i]} if ranking and ranking[i] else {},
                summary=summary,
            )
        )
    return out


def _restore_repeats(
    generations: list[GenerationRecord], stimuli: list[StimulusRecord], repeat_of: list[str]
) -> None:
    """Put confirmation re-presentations back into their generation's meta, as the journal has them."""
    by_generation: dict[int, dict[int, str]] = {}
    for stimulus, original in zip(stimuli, repeat_of, strict=True):
        if original:
            by_generation.setdefault(stimulus.generation, {})[stimulus.index] = original
    for record in generations:
        originals = by_generation.get(record.generation)
        if originals:
            size = max(s.index for s in stimuli if s.generation == record.generation) + 1
            record.meta["repeat_of"] = [originals.get(i, "") for i in range(size)]
            record.meta["confirmation"] = True
