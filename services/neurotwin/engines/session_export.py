"""Export a closed-loop session from its journal to NWB (pynwb) or to a plain HDF5 layout.

Both files hold the same facts: every presented image (pixels, sha256, latent code or natural-image
name), every presentation with its responses (the mean and every repeat) and times, the optimizer
trajectory per generation, the session's settings, and the generator and twin versions used.

NWB layout:
- ``stimulus_templates/stimuli``: ``Images`` with one ``RGBImage`` per distinct image (each synthetic
  stimulus; each natural image once), ordered; ``stimulus/presentations``: an ``IndexSeries`` into it.
- ``intervals/trials``: one row per told presentation, in order of start time: generation, stimulus id
  and index, kind, repeat_of (for a confirmation re-presentation, the stimulus id of the image's first
  presentation, whose image row it shares), image index, sha256, latent, objective, twin-predicted
  score, mean responses, every repeat (ragged), server receive time. ``start_time`` is the rig's
  onset of the first repeat when it gave one (0.0 included), else the server's receive time, in
  seconds from the session start;
  ``stop_time`` is start plus the presentation duration of one repeat (the Tell's, else the session
  metadata's ``presentation_duration``), NaN when neither is known.
- ``acquisition/responses``: ``TimeSeries`` [presentations, neurons] of mean responses, in the
  metadata's ``response_units``.
- ``general/subject``, devices, electrode group (when a brain area is given), experimenter, lab,
  institution, protocol: from the session's ``RecordingMetadata`` (with any given at export). A
  subject nobody described is written as id "unknown", sex "U", age "P0D/" (any age).
- ``processing/closed_loop``: tables ``generations`` (optimizer trajectory), ``models`` (generator and
  twin name/version) and ``neurons`` (ids; target flag); the settings JSON is in ``notes``.

HDF5 layout (``h5py``): attributes ``format``, ``session_id``, ``settings`` (JSON), ``metadata`` (JSON,
the given fields), ``created``; groups
``stimuli``, ``presentations``, ``generations``, ``natural_set`` and ``models`` with one dataset per
column (see ``write_hdf5``).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neurotwin.engines.journal import (
    NATURAL,
    GenerationRecord,
    Journal,
    NaturalImage,
    ResponseRecord,
    SessionRecord,
    StimulusRecord,
)
from neurotwin.engines.objectives import objective_scores
from neurotwin.engines.session_metadata import (
    DEFAULT_RESPONSE_UNITS,
    UNKNOWN_AGE,
    UNKNOWN_SEX,
    UNKNOWN_SUBJECT_ID,
    RecordingMetadata,
)
from neurotwin.errors import InvalidInput
from neurotwin.imagecodec import decode_image

FORMATS = ("nwb", "hdf5")
HDF5_FORMAT = "neurotwin.closed-loop-session/1"


@dataclass
class SessionData:
    """A consistent snapshot of one session read from the journal."""

    record: SessionRecord
    generations: list[GenerationRecord]
    stimuli: list[StimulusRecord]
    responses: list[ResponseRecord]
    natural: list[NaturalImage]

    # The session's metadata with any given for this export applied.
    metadata: RecordingMetadata = field(default_factory=RecordingMetadata)
    # Per generation, what each position re-presents (from the generation's journaled meta).
    _repeat_of: dict[int, list[str]] = field(default_factory=dict, init=False, repr=False)

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def start_time(self) -> float:
        """The session's time zero (Unix seconds): the rig's session start when given, else creation."""
        return self.metadata.session_start_time or self.record.created

    @property
    def response_units(self) -> str:
        return self.metadata.response_units or DEFAULT_RESPONSE_UNITS

    def repeat_of(self, stimulus: StimulusRecord) -> str:
        """For a confirmation re-presentation, the stimulus id of the image's first presentation; else ""."""
        originals = self._repeat_of.get(stimulus.generation)
        return originals[stimulus.index] if originals and stimulus.index < len(originals) else ""

    def __post_init__(self) -> None:
        self._repeat_of = {
            g.generation: list(g.meta["repeat_of"]) for g in self.generations if g.meta.get("repeat_of")
        }

    def told(self) -> list[tuple[StimulusRecord, ResponseRecord]]:
        by_key = {(s.generation, s.index): s for s in self.stimuli}
        return [
            (by_key[(r.generation, r.index)], r) for r in self.responses if (r.generation, r.index) in by_key
        ]


def collect(
    journal: Journal, session_id: str, with_images: bool = True, metadata: dict[str, Any] | None = None
) -> SessionData:
    """A snapshot of the session; ``metadata`` (RecordingMetadata fields) replaces the journaled."""
    record = journal.get_session(session_id)
    session_metadata = RecordingMetadata.from_dict(record.config.get("metadata"))
    if metadata:
        session_metadata = session_metadata.merged(RecordingMetadata.from_dict(metadata))
    generations = journal.generations(session_id)
    known = {g.generation for g in generations}
    # Reads are separate transactions; keep only rows of generations seen in the first read, so a
    # generation proposed meanwhile does not appear half-exported.
    stimuli = [s for s in journal.stimuli(session_id, with_images=with_images) if s.generation in known]
    responses = [r for r in journal.responses(session_id) if r.generation in known]
    natural = journal.natural_images(session_id, with_data=with_images)
    return SessionData(record, generations, stimuli, responses, natural, session_metadata)


def export_session(
    journal: Journal,
    session_id: str,
    path: Path,
    fmt: str = "nwb",
    with_images: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Path:
    fmt = fmt.lower() or "nwb"
    if fmt not in FORMATS:
        raise InvalidInput(f"export format {fmt!r}: expected one of {FORMATS}")
    data = collect(journal, session_id, with_images, metadata)
    path = Path(path)
    if fmt == "nwb":
        write_nwb(data, path, with_images)
    else:
        write_hdf5(data, path, with_images)
    return path


# ------------------------------------------------------------------------------------------------
# Shared tables


def _scores(data: SessionData, means: np.ndarray) -> np.ndarray:
    if not len(means):
        return np.zeros(0)
    return objective_scores(means, data.config["target_neurons"], data.config["objective"])


@dataclass
class _Presentations:
    stimuli: list[StimulusRecord]
    responses: list[ResponseRecord]
    means: np.ndarray
    scores: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    received: np.ndarray
    onset: np.ndarray
    duration: np.ndarray


def _presentations(data: SessionData) -> _Presentations:
    """Told presentations in order of start time (NWB wants ascending start times), ties kept in
    (generation, index) order."""
    pairs = data.told()
    neurons = int(data.config["neuron_count"])
    zero = data.start_time
    received = np.array([r.received - zero for _, r in pairs], dtype=np.float64)
    onset = np.array([np.nan if r.onset is None else r.onset for _, r in pairs], dtype=np.float64)
    start = np.where(np.isnan(onset), received, onset)
    order = np.argsort(start, kind="stable")
    pairs = [pairs[i] for i in order]
    received, onset, start = received[order], onset[order], start[order]
    stimuli = [s for s, _ in pairs]
    responses = [r for _, r in pairs]
    means = np.stack([r.mean for r in responses]) if responses else np.zeros((0, neurons))
    duration = np.array([np.nan if r.duration is None else r.duration for r in responses], dtype=np.float64)
    # The session's presentation time stands in where a Tell gave none; unknown stays NaN, since a
    # made-up stop time would look like a measurement.
    default_duration = data.metadata.presentation_duration or np.nan
    stop = start + np.where(np.isnan(duration), default_duration, duration)
    return _Presentations(
        stimuli, responses, means, _scores(data, means), start, stop, received, onset, duration
    )


def _latent_matrix(stimuli: list[StimulusRecord], dim: int) -> np.ndarray:
    latents = np.full((len(stimuli), dim), np.nan)
    for i, s in enumerate(stimuli):
        if s.latent is not None:
            latents[i] = s.latent
    return latents


def _trajectory(data: SessionData) -> dict[str, np.ndarray]:
    """Per-generation columns: times, objective statistics, optimizer scalars, latent mean."""
    dim = int(data.config["latent_dim"])
    gens = data.generations
    keys = sorted({k for g in gens for k, v in g.summary.items() if isinstance(v, int | float)})
    zero = data.start_time
    columns: dict[str, np.ndarray] = {
        "generation": np.array([g.generation for g in gens], dtype=np.int64),
        "created": np.array([g.created - zero for g in gens], dtype=np.float64),
        "told": np.array([np.nan if g.told is None else g.told - zero for g in gens], dtype=np.float64),
    }
    for key in keys:
        columns[key] = np.array([float(g.summary.get(key, np.nan)) for g in gens], dtype=np.float64)
    latent_mean = np.full((len(gens), dim), np.nan)
    for i, g in enumerate(gens):
        if g.summary.get("latent_mean"):
            latent_mean[i] = g.summary["latent_mean"]
    columns["latent_mean"] = latent_mean
    columns["ranking"] = np.array([str(g.meta.get("ranking", "")) for g in gens], dtype=object)
    return columns


def _models(config: dict[str, Any]) -> list[tuple[str, str, int]]:
    models = [("generator", config["generator"], int(config["generator_version"]))]
    if config.get("twin"):
        models.append(("twin", config["twin"], int(config["twin_version"])))
    return models


def _neuron_ids(config: dict[str, Any]) -> list[str]:
    return list(config.get("neuron_ids") or [f"neuron{i}" for i in range(int(config["neuron_count"]))])


def _image_table(data: SessionData) -> tuple[list[tuple[str, bytes | None]], dict[tuple[int, int], int]]:
    """Distinct images (name, bytes) and, per (generation, index), the image's row."""
    images: list[tuple[str, bytes | None]] = []
    row_of: dict[tuple[int, int], int] = {}
    natural_row: dict[int, int] = {}
    synthetic_row: dict[str, int] = {}
    names = {n.index: n.name for n in data.natural}
    for s in data.stimuli:
        original = data.repeat_of(s)
        if original and original in synthetic_row:
            # A confirmation re-presentation shows its original's image: one row for both.
            row_of[(s.generation, s.index)] = synthetic_row[original]
        elif s.kind == NATURAL and s.natural_index is not None:
            if s.natural_index not in natural_row:
                natural_row[s.natural_index] = len(images)
                images.append((f"natural{s.natural_index:05d}_{names.get(s.natural_index, '')}", s.image))
            row_of[(s.generation, s.index)] = natural_row[s.natural_index]
        else:
            synthetic_row[s.stimulus_id] = row_of[(s.generation, s.index)] = len(images)
            images.append((s.stimulus_id, s.image))
    return images, row_of


# ------------------------------------------------------------------------------------------------
# NWB


def _session_description(data: SessionData) -> str:
    config = data.config
    return (
        data.metadata.session_description
        or f"neurotwin closed-loop session {data.record.session_id}: "
        f"{config['optimizer']} over {config['generator']} v{config['generator_version']}"
        + (f", twin-guided by {config['twin']} v{config['twin_version']}" if config.get("twin") else "")
    )


def _nwb_file(data: SessionData) -> Any:
    """The NWBFile with the session, subject, device and lab metadata filled in."""
    from pynwb import NWBFile
    from pynwb.file import Subject

    config = data.config
    record = data.record
    meta = data.metadata
    nwb = NWBFile(
        session_description=_session_description(data),
        identifier=f"neurotwin-closed-loop-{record.session_id}",
        session_start_time=datetime.datetime.fromtimestamp(data.start_time, tz=datetime.UTC),
        session_id=record.session_id,
        notes=json.dumps({"settings": config, "status": record.status, "best": record.best}, sort_keys=True),
        stimulus_notes=config.get("description", ""),
        source_script="neurotwin.engines.session_export",
        source_script_file_name="session_export.py",
        experimenter=list(meta.experimenter) or None,
        lab=meta.lab or None,
        institution=meta.institution or None,
        experiment_description=meta.experiment_description or None,
        protocol=meta.protocol or None,
        keywords=["closed loop", "stimulus synthesis", "neurotwin"],
    )
    nwb.subject = Subject(
        subject_id=meta.subject_id or UNKNOWN_SUBJECT_ID,
        species=meta.species or None,
        sex=meta.sex or UNKNOWN_SEX,
        age=meta.age or UNKNOWN_AGE,
        description=meta.subject_description or None,
    )
    if meta.device_name or meta.device_description or meta.device_manufacturer or meta.brain_area:
        name = meta.device_name or "recording device"
        details: dict[str, Any] = {}
        if meta.device_manufacturer:
            # pynwb >= 3.1 keeps the manufacturer on a DeviceModel; older versions on the Device.
            if hasattr(nwb, "create_device_model"):
                details["model"] = nwb.create_device_model(
                    name=f"{name} model", manufacturer=meta.device_manufacturer
                )
            else:
                details["manufacturer"] = meta.device_manufacturer
        device = nwb.create_device(name=name, description=meta.device_description or None, **details)
        if meta.brain_area:
            nwb.create_electrode_group(
                name="recording_site",
                description="where the recorded neurons are",
                location=meta.brain_area,
                device=device,
            )
    return nwb


def _timing(times: np.ndarray) -> dict[str, Any]:
    """``timestamps``, or ``starting_time`` and ``rate`` when the times are evenly spaced (a rig that
    presents back to back), as NWB's best practices ask."""
    steps = np.unique(np.diff(times).round(9))
    if len(times) > 2 and len(steps) == 1 and steps[0] > 0:
        return {"starting_time": float(times[0]), "rate": float(1.0 / steps[0])}
    return {"timestamps": times}


def write_nwb(data: SessionData, path: Path, with_images: bool = True) -> None:
    from hdmf.common import DynamicTable, VectorData
    from pynwb import NWBHDF5IO, TimeSeries
    from pynwb.base import ImageReferences, Images
    from pynwb.image import IndexSeries, RGBImage

    config = data.config
    nwb = _nwb_file(data)
    p = _presentations(data)
    images, row_of = _image_table(data)
    indexed: Images | None = None
    if with_images and images:
        rgb = [
            RGBImage(name=name, data=decode_image(blob, what=name), description=name)
            for name, blob in images
            if blob is not None
        ]
        if len(rgb) == len(images):
            indexed = Images(
                name="stimuli",
                images=rgb,
                description="every distinct presented image (synthetic stimuli and natural references)",
                order_of_images=ImageReferences(name="order_of_images", data=rgb),
            )
            nwb.add_stimulus_template(indexed)
    if indexed is not None and len(p.stimuli):
        nwb.add_stimulus(
            IndexSeries(
                name="presentations",
                data=np.array([row_of[(s.generation, s.index)] for s in p.stimuli], dtype=np.uint32),
                indexed_images=indexed,
                unit="N/A",
                **_timing(p.start),
                description="index into stimulus_templates/stimuli of each told presentation",
            )
        )

    neurons = int(config["neuron_count"])
    dim = int(config["latent_dim"])
    units = data.response_units
    columns = [
        ("generation", "generation index"),
        ("stimulus_index", "position in the generation (presentation order)"),
        ("stimulus_id", "stimulus id"),
        ("kind", "synthetic or natural"),
        ("repeat_of", "confirmation re-presentation: stimulus id of the image's first presentation, else ''"),
        ("image_index", "row of stimulus_templates/stimuli"),
        ("sha256", "sha256 of the presented image bytes"),
        ("latent", "latent code (NaN for natural images)"),
        ("objective", f"measured objective ({config['objective']} over target neurons), in {units}"),
        ("predicted_score", "twin-predicted ranking score (NaN without a twin)"),
        ("responses", f"responses averaged over repeats, one per neuron, in {units}"),
        ("server_received_time", "when the server received the responses, seconds from session start"),
        ("rig_onset_time", "onset reported by the rig, seconds from session start (NaN when not given)"),
    ]
    for name, description in columns:
        nwb.add_trial_column(name=name, description=description)
    nwb.add_trial_column(name="repeats", description=f"every repeat's responses, in {units}", index=True)
    for i, (s, r) in enumerate(zip(p.stimuli, p.responses, strict=True)):
        nwb.add_trial(
            start_time=float(p.start[i]),
            stop_time=float(p.stop[i]),
            generation=s.generation,
            stimulus_index=s.index,
            stimulus_id=s.stimulus_id,
            kind=s.kind,
            repeat_of=data.repeat_of(s),
            image_index=row_of[(s.generation, s.index)],
            sha256=s.sha256,
            latent=s.latent if s.latent is not None else np.full(dim, np.nan),
            objective=float(p.scores[i]),
            predicted_score=np.nan if s.predicted_score is None else s.predicted_score,
            responses=p.means[i].astype(np.float32),
            server_received_time=float(p.received[i]),
            rig_onset_time=float(p.onset[i]),
            repeats=[row.astype(np.float32) for row in r.repeats],
        )
    if len(p.stimuli):
        nwb.add_acquisition(
            TimeSeries(
                name="responses",
                data=p.means.astype(np.float32).reshape(-1, neurons),
                unit=units,
                **_timing(p.start),
                description="mean response of every recorded neuron to each told presentation",
            )
        )

    module = nwb.create_processing_module("closed_loop", "optimizer trajectory, models and neurons")
    trajectory = _trajectory(data)
    module.add(
        DynamicTable(
            name="generations",
            description="one row per generation: times (s from session start), objective statistics of "
            "its synthetic (and natural) images, optimizer scalars, mean latent of the presented images",
            columns=[
                VectorData(name=k, description=k, data=v.tolist() if v.dtype == object else v)
                for k, v in trajectory.items()
            ],
        )
    )
    models = _models(config)
    module.add(
        DynamicTable(
            name="models",
            description="store models used by the session (generator; twin when guided)",
            columns=[
                VectorData(name="role", description="generator or twin", data=[m[0] for m in models]),
                VectorData(
                    name="model_name", description="model name in the store", data=[m[1] for m in models]
                ),
                VectorData(name="version", description="store version", data=[m[2] for m in models]),
            ],
        )
    )
    ids = _neuron_ids(config)
    targets = set(config["target_neurons"])
    module.add(
        DynamicTable(
            name="neurons",
            description="recorded neurons in response-column order",
            columns=[
                VectorData(name="neuron_id", description="id given at creation", data=ids),
                VectorData(
                    name="target",
                    description="whether the objective drives this neuron",
                    data=[i in targets for i in range(len(ids))],
                ),
            ],
        )
    )
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)


# ------------------------------------------------------------------------------------------------
# HDF5


def write_hdf5(data: SessionData, path: Path, with_images: bool = True) -> None:
    import h5py

    config = data.config
    record = data.record
    p = _presentations(data)
    images, row_of = _image_table(data)
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs["format"] = HDF5_FORMAT
        f.attrs["session_id"] = record.session_id
        f.attrs["settings"] = json.dumps(config, sort_keys=True)
        f.attrs["metadata"] = json.dumps(data.metadata.to_dict(), sort_keys=True)
        f.attrs["session_start_time"] = data.start_time
        f.attrs["response_units"] = data.response_units
        f.attrs["status"] = record.status
        f.attrs["best"] = json.dumps(record.best)
        f.attrs["created"] = record.created

        stim = f.create_group("stimuli")
        stim.attrs["description"] = "every distinct presented image, in first-presentation order"
        stim.create_dataset("name", data=np.array([name for name, _ in images], dtype=object), dtype=strings)
        if with_images and images and all(blob is not None for _, blob in images):
            pixels = np.stack([decode_image(blob, what=name) for name, blob in images if blob is not None])
            stim.create_dataset("images", data=pixels, compression="gzip", compression_opts=1)

        pres = f.create_group("presentations")
        pres.attrs["description"] = "one row per told presentation, in order of start time"
        n = len(p.stimuli)
        pres.create_dataset("generation", data=np.array([s.generation for s in p.stimuli], dtype=np.int64))
        pres.create_dataset("stimulus_index", data=np.array([s.index for s in p.stimuli], dtype=np.int64))
        pres.create_dataset(
            "stimulus_id", data=np.array([s.stimulus_id for s in p.stimuli], dtype=object), dtype=strings
        )
        pres.create_dataset("kind", data=np.array([s.kind for s in p.stimuli], dtype=object), dtype=strings)
        pres.create_dataset(
            "repeat_of", data=np.array([data.repeat_of(s) for s in p.stimuli], dtype=object), dtype=strings
        )
        pres.create_dataset(
            "sha256", data=np.array([s.sha256 for s in p.stimuli], dtype=object), dtype=strings
        )
        pres.create_dataset(
            "image_index", data=np.array([row_of[(s.generation, s.index)] for s in p.stimuli], dtype=np.int64)
        )
        pres.create_dataset(
            "natural_index",
            data=np.array(
                [-1 if s.natural_index is None else s.natural_index for s in p.stimuli], dtype=np.int64
            ),
        )
        pres.create_dataset("latent", data=_latent_matrix(p.stimuli, int(config["latent_dim"])))
        pres.create_dataset("objective", data=p.scores)
        pres.create_dataset(
            "predicted_score",
            data=np.array([np.nan if s.predicted_score is None else s.predicted_score for s in p.stimuli]),
        )
        pres.create_dataset("responses", data=p.means.reshape(n, int(config["neuron_count"])))
        repeats = [r.repeats for r in p.responses]
        counts = np.array([len(r) for r in repeats], dtype=np.int64)
        pres.create_dataset("repeat_count", data=counts)
        pres.create_dataset(
            "repeats",
            data=np.concatenate(repeats)
            if repeats
            else np.zeros((0, int(config["neuron_count"])), np.float32),
        )
        pres["repeats"].attrs["description"] = (
            "all repeats stacked; rows of presentation i start at sum(repeat_count[:i])"
        )
        for name, values in (
            ("start_time", p.start),
            ("stop_time", p.stop),
            ("server_received_time", p.received),
            ("rig_onset_time", p.onset),
            ("rig_duration", p.duration),
        ):
            pres.create_dataset(name, data=values)

        gens = f.create_group("generations")
        gens.attrs["description"] = "optimizer trajectory, one row per generation"
        for key, values in _trajectory(data).items():
            if values.dtype == object:
                gens.create_dataset(key, data=values, dtype=strings)
            else:
                gens.create_dataset(key, data=values)

        nat = f.create_group("natural_set")
        nat.create_dataset("name", data=np.array([x.name for x in data.natural], dtype=object), dtype=strings)
        nat.create_dataset(
            "sha256", data=np.array([x.sha256 for x in data.natural], dtype=object), dtype=strings
        )

        models = f.create_group("models")
        for role, name, version in _models(config):
            models.attrs[f"{role}_name"] = name
            models.attrs[f"{role}_version"] = version
        f.create_dataset("neuron_ids", data=np.array(_neuron_ids(config), dtype=object), dtype=strings)
        f.create_dataset("target_neurons", data=np.array(config["target_neurons"], dtype=np.int64))
